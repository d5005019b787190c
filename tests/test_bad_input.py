"""A user's mistakes at every entry point: each case runs the real command in a subprocess and must exit 2 with
one message naming the input and the fix, and no traceback (owlore.cli). The cases are issue 22's list."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
import method_support as ms  # noqa: E402

from owlore.run.resume import run_settings, write_manifest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
ENV.pop("OWLORE_DEBUG", None)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A tiny model, good and bad data files, broken model folders, a used output dir, a checkpoint."""
    root = tmp_path_factory.mktemp("bad")
    f = {"root": root, "model": ms.save_checkpoint(root / "m"), "rows": ms.write_rows(root / "r.jsonl")}
    from owlore.data.vqa_files import VQARecord, write_vqa_dir

    f["vqa"] = write_vqa_dir(root / "vqa", [VQARecord(image=np.zeros((8, 8), np.uint8), question="q?", answer="a")])
    (root / "latin1.jsonl").write_bytes(b'{"instruction": "a", "output": "b"}\n{"instruction": "caf\xe9", "output": "x"}\n')
    (root / "notes.txt").write_text("hello\n")
    (root / "no_output.csv").write_text("instruction,answer\nhi,there\n")
    (root / "empty_dir").mkdir()
    (root / "config_only").mkdir()
    (root / "config_only" / "config.json").write_text((f["model"] / "config.json").read_text())
    used = root / "used"
    (used / "final").mkdir(parents=True)
    (used / "owlore_record.json").write_text("{}")
    ckpt_dir = root / "ckpts"
    ckpt = ckpt_dir / "checkpoint-2"
    ckpt.mkdir(parents=True)
    (ckpt / "optimizer.pt").write_bytes(b"x" * 100)
    (ckpt / "trainer_state.json").write_text("{}")
    (ckpt / "owlore_state.pt").write_bytes(b"x")
    write_manifest(ckpt, run_settings("owlore", {"owlore": {"gamma": 1}}), 2)
    truncated = root / "trunc" / "checkpoint-2"
    truncated.mkdir(parents=True)
    (truncated / "optimizer.pt").write_bytes(b"x" * 100)
    (truncated / "trainer_state.json").write_text("{}")
    (truncated / "owlore_state.pt").write_bytes(b"x")
    write_manifest(truncated, run_settings("owlore", {}), 2)
    (truncated / "optimizer.pt").write_bytes(b"x" * 7)
    f.update(used=used, ckpts=ckpt_dir, trunc=truncated)
    return f


def _run(args: list[str]) -> tuple[int, str]:
    r = subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    return r.returncode, r.stdout + r.stderr


def _check(args: list[str], words: tuple[str, ...]) -> None:
    rc, text = _run(args)
    if os.environ.get("OWLORE_BAD_INPUT_TABLE"):  # collect the table of cases (command, exit code, message)
        message = next((ln for ln in text.splitlines() if "error" in ln.split(":")[0] or ln.startswith("usage")), "")
        with open(os.environ["OWLORE_BAD_INPUT_TABLE"], "a") as f:
            f.write(json.dumps({"args": args, "rc": rc, "message": message}) + "\n")
    assert rc == 2, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    assert "No module named 'kernels'" not in text  # bitsandbytes' harmless import warning is silenced
    for w in words:
        assert w in text, f"{w!r} not in:\n{text[-3000:]}"


def _train(f: dict[str, Path], *extra: str, method: str = "lisa") -> list[str]:
    return ["train.py", *ms.train_argv(method, f["model"], f["rows"], f["root"] / "out", *extra)]


TRAIN_CASES = {
    "used output_dir": (lambda f: [f"training.output_dir={f['used']}"],
                        ("holds another run's results", "resume_from_checkpoint=last", "overwrite_output_dir=true")),
    "negative learning rate": (lambda f: ["training.learning_rate=-1"], ("training.learning_rate=-1.0: must be > 0",)),
    "max_steps 0": (lambda f: ["training.max_steps=0"], ("training.max_steps=0: must be >= 1",)),
    "sequence longer than the model": (lambda f: ["data.max_seq_length=100000"],
                                       ("data.max_seq_length=100000: longer than the model's context",
                                        "max_position_embeddings=1024")),
    "missing model path": (lambda f: [f"model.name={f['root'] / 'nope'}"], ("no such file or directory",)),
    "folder without config.json": (lambda f: [f"model.name={f['root'] / 'empty_dir'}"], ("has no config.json",)),
    "config.json but no weights": (lambda f: [f"model.name={f['root'] / 'config_only'}"],
                                   ("has config.json but no weights",)),
    "invalid UTF-8": (lambda f: [f"data.train={f['root'] / 'latin1.jsonl'}"],
                      ("latin1.jsonl: not UTF-8 text at line 2, byte offset 56",)),
    "unsupported file type": (lambda f: [f"data.train={f['root'] / 'notes.txt'}"],
                              ("unsupported file type '.txt'", ".csv", ".parquet")),
    "CSV row without output": (lambda f: [f"data.train={f['root'] / 'no_output.csv'}"], ("row 0:", "bad row")),
    "missing data file": (lambda f: [f"data.train={f['root'] / 'none.jsonl'}"], ("does not exist",)),
    "unknown method": (lambda f: ["method=nosuch"], ("method", "nosuch")),
    "resume with another method": (
        lambda f: [f"training.output_dir={f['ckpts']}", "training.resume_from_checkpoint=last"],
        ("trained with 'owlore', this run asks for 'lisa'", "resume_allow_changes=true")),
    "truncated checkpoint": (lambda f: [f"training.resume_from_checkpoint={f['trunc']}"],
                             ("does not verify", "optimizer.pt: 7 bytes, the manifest says 100")),
}


@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_train_py(files, case):
    extra, words = TRAIN_CASES[case]
    _check(_train(files, *extra(files)), words)


EVAL_CASES = {
    "mmlu: missing model": (lambda f: ["eval/mmlu.py", "--model", str(f["root"] / "nope"), "--split", "dev"],
                            ("--model", "no such file or directory")),
    "mmlu: --limit 0": (lambda f: ["eval/mmlu.py", "--model", str(f["model"]), "--split", "dev", "--limit", "0"],
                        ("argument --limit: 0 is not >= 1",)),
    "mmlu: --limit -1": (lambda f: ["eval/mmlu.py", "--model", str(f["model"]), "--split", "dev", "--limit", "-1"],
                         ("argument --limit: -1 is not >= 1",)),
    "mmlu: missing --compare file": (lambda f: ["eval/mmlu.py", "--compare", str(f["root"] / "a.json"),
                                                str(f["root"] / "b.json")], ("a.json: no such file",)),
    "mmlu: unknown subject": (lambda f: ["eval/mmlu.py", "--model", str(f["model"]), "--split", "dev", "--shots",
                                         "0", "--tasks", "nosuch"], ("unknown MMLU subjects ['nosuch']",)),
    "commonsense: unknown task": (lambda f: ["eval/commonsense.py", "--model", str(f["model"]), "--tasks",
                                             "nosuch"], ("unknown commonsense tasks ['nosuch']", "boolq")),
    "demo: unknown task": (lambda f: ["eval/demo_tasks.py", "--model", str(f["model"]), "--tasks", "nosuch"],
                           ("unknown demo tasks ['nosuch']",)),
    "outliers: missing model": (lambda f: ["eval/outliers.py", "--model", str(f["root"] / "nope")],
                                ("no such file or directory",)),
    "vlm_pruning: bad --budgets": (lambda f: ["eval/vlm_pruning.py", "accuracy", "--model", str(f["model"]),
                                              "--budgets", "-3"], ("argument --budgets: -3 is not >= 1",)),
    "vlm_pruning: not a LLaVA": (lambda f: ["eval/vlm_pruning.py", "accuracy", "--model", str(f["model"]),
                                            "--data", str(f["vqa"])],
                                 ("a 'llama' model", "LlavaForConditionalGeneration")),
    "vlm_pruning: no questions": (lambda f: ["eval/vlm_pruning.py", "accuracy", "--model", str(f["model"]),
                                             "--data", str(f["root"])],
                                  ("no questions.jsonl", "a VQA set is a directory of images")),
    "bench: unknown method": (lambda f: ["eval/bench.py", "--methods", "nosuch", "--dry-run"],
                              ("unknown methods ['nosuch']",)),
    "memory: bad --fit size": (lambda f: ["-m", "owlore.memory", "--fit", "24XB", "--model", str(f["model"])],
                               ("--fit '24XB': expected a size such as 24GiB",)),
    "memory: missing model": (lambda f: ["-m", "owlore.memory", "--fit", "24GiB", "--model", str(f["root"] / "n")],
                              ("no such file or directory",)),
    "memory: missing config": (lambda f: ["-m", "owlore.memory", "--config", str(f["root"] / "none.yaml")],
                               ("none.yaml not found",)),
    "benchmarks: unknown method": (lambda f: ["benchmarks/scale_out.py", "--methods", "nosuch"],
                                   ("--methods nosuch", "known:")),
    "benchmarks: missing model": (lambda f: ["benchmarks/optimizer_kernels.py", "--model", str(f["root"] / "n")],
                                  ("no such file or directory",)),
}


@pytest.mark.parametrize("case", list(EVAL_CASES))
def test_eval_memory_and_benchmark_scripts(files, case):
    args, words = EVAL_CASES[case]
    _check(args(files), words)


def test_debug_shows_the_traceback_as_well(files):
    rc, text = _run(_train(files, "training.learning_rate=-1", "--debug"))
    assert rc == 2 and "Traceback" in text and "training.learning_rate=-1.0: must be > 0" in text
