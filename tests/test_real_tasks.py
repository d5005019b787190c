"""The real offline tasks (owlore.data.real_tasks) on tiny fixture trees, and their scorers
(owlore.evaluation.answers, owlore.evaluation.perplexity) against naive references and lm-eval's own metrics."""

from __future__ import annotations

import gzip
import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch

from owlore.data import real_tasks as rt
from owlore.evaluation.answers import evaluate_answers, generate_answers, score_answers, token_f1
from owlore.evaluation.perplexity import perplexity, text_blocks

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures"))
import eval_support as support  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def _page(name: str, desc: str, *, mdoc: bool = False) -> bytes:
    if mdoc:
        return f'.Dd 2020\n.Dt {name.upper()} 1\n.Sh NAME\n.Nm {name}\n.Nd {desc}\n.Sh SYNOPSIS\n.Nm\n'.encode()
    return (f'.TH {name.upper()} 1\n.\\" a comment\n.SH NAME\n{name}, {name}x \\- \\fB{desc}\\fR\n'
            f'.SH SYNOPSIS\n.B {name}\n').encode()


@pytest.fixture
def man_dir(tmp_path) -> Path:
    """60 real-looking pages in man1/man3 (roff and mdoc), plus what must be skipped."""
    root = tmp_path / "man"
    for section in ("1", "3"):
        (root / f"man{section}").mkdir(parents=True)
    for i in range(60):
        section = "1" if i % 2 else "3"
        data = _page(f"tool{i}", f"does thing number {i}", mdoc=i % 5 == 0)
        (root / f"man{section}" / f"tool{i}.{section}.gz").write_bytes(gzip.compress(data))
    (root / "man1" / "gcloud-x.1.gz").write_bytes(gzip.compress(_page("gcloud-x", "cloud stuff")))
    (root / "man1" / "alias.1.gz").write_bytes(gzip.compress(b".so man1/tool1.1\n"))
    os.symlink(root / "man1" / "tool1.1.gz", root / "man1" / "tool1x.1.gz")
    (root / "man1" / "dup.1.gz").write_bytes(gzip.compress(_page("dup", "does thing number 1")))  # same answer
    (root / "man1" / "broken.1.gz").write_bytes(b"not gzip")
    (root / "man3" / "Dpkg::Thing.3perl.gz").write_bytes(gzip.compress(_page("Dpkg::Thing", "a perl module")))
    return root


def test_roff_and_name_lines():
    assert rt.roff_text(r"\fBls\fR \- list \fIdirectory\fP contents\&") == "ls - list directory contents"
    line = rt.man_name_line(".TH X 1\n.SH NAME\ngzip, gunzip, zcat \\- compress or expand files\n.SH SYNOPSIS\n")
    assert rt.parse_name_line(line) == (["gzip", "gunzip", "zcat"], "compress or expand files")
    assert rt.man_name_line(".so man1/gzip.1\n") is None
    assert rt.man_name_line(".Sh NAME\n.Nm cat\n.Nd concatenate files\n.Sh X\n") == "cat - concatenate files"
    assert rt.parse_name_line("no separator here") is None


def test_man_pages_are_read_once_and_split_by_page(man_dir):
    pages = rt.read_man_pages(man_dir)
    names = {p["name"] for p in pages}
    assert {"tool0", "tool1", "tool59", "dup", "Dpkg::Thing"} <= names
    assert not names & {"gcloud-x", "alias", "tool1x", "broken"}  # generated pages, .so aliases, links, junk
    assert next(p for p in pages if p["name"] == "tool1")["aliases"] == ["tool1x"]
    assert next(p for p in pages if p["name"] == "Dpkg::Thing")["kind"] == "Perl module"
    splits = rt.manpage_task(man_dir)
    answers = {s: {r["output"] for r in rows} for s, rows in splits.items()}
    assert all(answers[s] for s in rt.SPLITS)
    assert not (answers["train"] & answers["test"]) and not (answers["train"] & answers["validation"])
    assert not (answers["validation"] & answers["test"])
    total = sum(len(v) for v in splits.values())
    assert total == 61  # 60 tools + the Perl module; dup's description is tool1's, kept once
    row = next(r for rows in splits.values() for r in rows if r["name"] == "tool2")
    assert row["instruction"].startswith("What does the library function `tool2` do?")
    assert row["output"] == "does thing number 2"
    again = rt.manpage_task(man_dir)
    assert again == splits  # deterministic
    assert rt.manpage_task(man_dir, seed=1) != splits  # the seed moves the held-out pages
    with pytest.raises(rt.TaskDataMissing, match="install the manuals"):
        rt.manpage_task(man_dir / "man1")


def test_documents_split_by_document(tmp_path):
    docs = tmp_path / "api"
    docs.mkdir()
    for i in range(30):
        body = "\n\n".join(f"Paragraph {j} of doc {i}. " * 5 for j in range(6))
        (docs / f"mod{i}.md").write_text(f"# Module {i}\n\n{body}")
    (docs / "zipped.md.gz").write_bytes(gzip.compress(b"# Zipped\n\nhello"))
    splits = rt.document_task(docs, max_chars=400)
    owners = {s: {r["doc"] for r in rows} for s, rows in splits.items()}
    assert owners["validation"] and owners["test"]
    assert not (owners["train"] & owners["test"]) and not (owners["train"] & owners["validation"])
    assert "zipped.md" in set().union(*owners.values())
    assert all(len(r["text"]) <= 400 for rows in splits.values() for r in rows)
    assert rt.chunk_text("a\n\nb\n\nc", max_chars=4) == ["a\n\nb", "c"]
    with pytest.raises(rt.TaskDataMissing, match="nodejs"):
        rt.document_task(tmp_path / "empty_missing")


def test_mmlu_text_rows_and_jsonl(tmp_path):
    rows = rt.mmlu_text_rows([{"question": "2+2?", "choices": ["3", "4", "5", "6"], "answer": 1, "subject": "m"}])
    assert rows == [{"text": "2+2?\nAnswer: 4", "subject": "m"}]
    assert rt.write_jsonl(rows, tmp_path / "a" / "t.jsonl") == 1
    assert json.loads((tmp_path / "a" / "t.jsonl").read_text()) == rows[0]


def test_prepare_tasks_script_builds_every_file(man_dir, tmp_path):
    import subprocess

    docs = tmp_path / "api"
    docs.mkdir()
    for i in range(12):
        (docs / f"m{i}.md").write_text(f"# M{i}\n\ntext {i}")
    out = tmp_path / "tasks"
    r = subprocess.run([sys.executable, "scripts/prepare_tasks.py", "--out", str(out), "--man-dir", str(man_dir),
                        "--docs", str(docs)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    manifest = json.loads((out / "MANIFEST.json").read_text())
    assert set(manifest["tasks"]) == {"manpages", "nodejs_docs", "mmlu_text"}
    for name, info in manifest["tasks"].items():
        for split, n in info["rows"].items():
            assert len((out / name / f"{split}.jsonl").read_text().splitlines()) == n > 0


# ------------------------------------------------------------------------------------------------ scorers
def _lcs(a: list[str], b: list[str]) -> int:
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
    return table[-1][-1]


def test_scores_match_naive_references_and_lm_evals_exact_match():
    preds = ["List directory contents.", "copy files", "the quick brown fox", "", "Remove files or dirs"]
    refs = ["list directory contents", "copy files and directories", "a quick fox", "print text", "remove files"]
    s = score_answers(preds, refs)
    assert s["exact_match"] == pytest.approx(1 / 5)  # case and punctuation ignored, as lm-eval's exact_match
    assert token_f1("the quick brown fox", "a quick fox") == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))
    assert token_f1("", "") == 1.0 and token_f1("x", "") == 0.0
    rouge = []
    for p, r in zip(preds, refs, strict=True):  # ROUGE-L F from a naive LCS over rouge_score's tokens
        pt = [t for t in p.lower().replace(".", " ").split() if t]
        rt_ = r.lower().split()
        lcs = _lcs(pt, rt_)
        rouge.append(0.0 if lcs == 0 else 2 * (lcs / len(pt)) * (lcs / len(rt_)) / (lcs / len(pt) + lcs / len(rt_)))
    assert s["rougeL"] == pytest.approx(sum(rouge) / 5)
    with pytest.raises(ValueError):
        score_answers(["a"], [])


@pytest.fixture(scope="module")
def tiny():
    return support.tiny_model(), support.tokenizer()


def test_batched_generation_equals_one_row_at_a_time(tiny):
    model, tok = tiny
    rows = [{"instruction": "What is 3 plus 4?"}, {"instruction": "Name a colour, please, any colour at all."},
            {"instruction": "Hi"}]
    batched = generate_answers(model, tok, rows, max_new_tokens=6, batch_size=3)
    single = [generate_answers(model, tok, [r], max_new_tokens=6, batch_size=1)[0] for r in rows]
    assert batched == single and not model.training
    out = evaluate_answers(model, tok, [{**r, "output": "seven"} for r in rows], max_new_tokens=4, keep=2)
    assert out["n"] == 3 and len(out["samples"]) == 2 and out["average"] == out["rougeL"]
    assert tok.padding_side == "right"


def test_perplexity_equals_a_naive_per_block_loop(tiny):
    model, tok = tiny
    rows = [{"text": "one two three four five six seven eight nine ten " * 3}, {"text": "short text here ok"}]
    blocks = text_blocks(tok, rows, seq_len=16)
    assert all(len(b) <= 16 for b in blocks) and len(blocks) >= 3
    total, count = 0.0, 0
    with torch.no_grad():
        for b in blocks:
            ids = torch.tensor([b])
            loss = model(input_ids=ids, labels=ids).loss  # mean over len(b) - 1 predicted tokens
            total += float(loss) * (len(b) - 1)
            count += len(b) - 1
    r = perplexity(model, tok, rows, seq_len=16, batch_size=2)
    assert r["tokens"] == count and r["blocks"] == len(blocks)
    assert r["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)
    assert perplexity(model, tok, rows, seq_len=16, limit=2)["blocks"] == 2


def test_eval_sets_that_do_not_exist_are_config_errors_naming_the_key(tmp_path):
    from owlore.run.config import ConfigError
    from owlore.run.recipe import load_config

    with pytest.raises(ConfigError) as e:
        load_config([str(ROOT / "configs" / "smollm2_owlore.yaml")],
                    [f"eval.answers={{test: {tmp_path / 'nope.jsonl'}}}", "eval.perplexity_limit=0"])
    assert "eval.answers.test=" in str(e.value) and "make tasks" in str(e.value)
    assert "eval.perplexity_limit=0: must be >= 1" in str(e.value)  # every problem at once
