"""Fine-tuning data: formats, prompt masking, truncation, packing, bad rows; the demo task set."""

import json

import pytest
import torch

from owlore.data import build_demo_tasks, build_prompt, write_demo_tasks
from owlore.data.sft import IGNORE_INDEX, DataError, load_rows, tokenize_rows


@pytest.fixture(scope="module")
def tok(smollm2_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_path)


def _trained_text(tok, ex):
    ids = [i for i, lab in zip(ex["input_ids"], ex["labels"], strict=True) if lab != IGNORE_INDEX]
    return tok.decode(ids)


def test_instruction_row_masks_prompt(tok):
    row = {"instruction": "Convert 3 km to meters.", "input": "", "output": "3000"}
    ex = {k: torch.tensor(v) for k, v in tokenize_rows([row], tok, max_seq_length=256)[0].items()}
    assert _trained_text(tok, {k: v.tolist() for k, v in ex.items()}) == "3000<|im_end|>"
    prompt = build_prompt(tok, row)
    assert "<|im_start|>user\nConvert 3 km to meters.<|im_end|>" in prompt and prompt.endswith("assistant\n")
    n_prompt = int((ex["labels"] == IGNORE_INDEX).sum())
    assert tok.decode(ex["input_ids"][:n_prompt]) == prompt
    assert torch.equal(ex["attention_mask"], torch.ones_like(ex["input_ids"]))


def test_instruction_input_field_and_alpaca_template_without_chat_template(tok):
    row = {"instruction": "Summarise.", "input": "A long text.", "output": "Short."}
    assert "Summarise.\n\nA long text." in build_prompt(tok, row)
    alpaca = build_prompt(tok, row, use_chat_template=False)
    assert "### Instruction:\nSummarise." in alpaca and "### Input:\nA long text." in alpaca


def test_chat_rows_train_only_assistant_turns(tok):
    row = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                        {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}
    ex = tokenize_rows([row], tok, max_seq_length=512)[0]
    trained = _trained_text(tok, ex)
    assert "Hello!" in trained and "4" in trained
    assert "Hi" not in trained and "2+2?" not in trained
    assert tok.decode(ex["input_ids"]) == tok.apply_chat_template(row["messages"], tokenize=False)


def test_plain_text_rows_train_everything(tok):
    ex = tokenize_rows([{"text": "Plain text to learn."}], tok, max_seq_length=64)[0]
    assert ex["input_ids"] == ex["labels"]


def test_truncation_and_packing(tok):
    rows = [{"text": "word " * 100}] * 3
    assert all(len(e["input_ids"]) == 32 for e in tokenize_rows(rows, tok, max_seq_length=32))
    packed = tokenize_rows([{"text": f"example {i} " * 5} for i in range(20)], tok, max_seq_length=16, packing=True)
    assert len(packed) > 1 and all(len(e["input_ids"]) == 16 for e in packed)


def test_bad_rows_named_or_skipped(tok, caplog):
    rows = [{"instruction": "ok", "output": "fine"}, {"instruction": "no answer", "output": ""}, {"foo": 1}]
    with pytest.raises(DataError, match=r"(?s)^row 1: field 'output' is missing or empty\nrow 2: has none of the "
                       r"fields.*\n2 bad rows\. Fix them, or set data\.skip_bad_rows=true to skip such rows\.$"):
        tokenize_rows(rows, tok)  # every bad row, one a line (the CLI prints 'data error: row 1: ...')
    ds = tokenize_rows(rows, tok, skip_bad_rows=True)
    assert len(ds) == 1
    assert "skipped 2 bad rows" in caplog.text
    with pytest.raises(DataError, match="row 0: the prompt fills all 8 tokens"):
        tokenize_rows([{"instruction": "a very long instruction " * 5, "output": "x"}], tok, max_seq_length=8)
    with pytest.raises(DataError, match=r"row 0: messages\[0\] needs 'role' and 'content'"):
        tokenize_rows([{"messages": [{"content": "x"}]}], tok)


def test_local_json_and_jsonl(tmp_path):
    rows = [{"instruction": "a", "output": "b"}, {"text": "c"}]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert load_rows(str(tmp_path / "d.json")) == rows == load_rows(str(tmp_path / "d.jsonl"))
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{broken\n')
    with pytest.raises(DataError, match="line 2 is not valid JSON"):
        load_rows(str(tmp_path / "bad.jsonl"))
    assert len(load_rows("demo", limit=5)) == 5
    with pytest.raises(DataError, match="does not exist"):  # a file named demo_* is not the demo set
        load_rows(str(tmp_path / "demo_mine.jsonl"))


def test_demo_tasks_are_deterministic_and_disjoint(tmp_path):
    train, test = build_demo_tasks("train"), build_demo_tasks("test")
    assert train == build_demo_tasks("train") and len(train) == 2000 and len(test) == 210
    assert not {x["key"] for x in train} & {x["key"] for x in test}
    assert len({x["key"] for x in test}) == len(test)
    assert all(x["choices"][x["label"]] == x["output"] for x in train + test)
    # Log-likelihood scoring needs choices that are not prefixes of one another.
    assert not any(a != b and b.startswith(a) for x in train + test for a in x["choices"] for b in x["choices"])
    assert {x["task"] for x in test} == {x["task"] for x in train}
    assert build_demo_tasks("train", seed=1) != train
    paths = write_demo_tasks(tmp_path, n_train=10, n_test=5)
    assert len(paths["train"].read_text().splitlines()) == 10
    with pytest.raises(ValueError, match="unknown demo tasks"):
        build_demo_tasks("train", tasks=["nope"])


@pytest.mark.parametrize(("name", "content", "why"), [
    ("x.jsonl", "", "the file is empty"),
    ("x.jsonl", "\n  \n\n", "the file is empty"),
    ("x.json", "", "the file is empty"),
    ("x.json", "[]", "the JSON list is empty"),
    ("x.json", '{"data": []}', "the JSON list is empty"),
])
def test_empty_data_file_is_named(tmp_path, name, content, why):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError) as e:
        load_rows(str(path))
    assert str(e.value) == f"{path}: no rows ({why})"


def test_no_usable_rows_names_the_source(tok, tmp_path):
    bad = [{"instruction": "no answer"}, {"foo": 1}]
    with pytest.raises(DataError, match=r"^data/x\.jsonl: no usable rows \(all 2 rows were bad and skipped\)$"):
        tokenize_rows(bad, tok, skip_bad_rows=True, source="data/x.jsonl")
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in bad) + "\n")
    with pytest.raises(DataError, match=rf"^{path}: no usable rows"):  # load_rows' rows remember their file
        tokenize_rows(load_rows(str(path)), tok, skip_bad_rows=True)


def test_jsonl_reports_bad_rows_and_unparsable_lines_together(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"instruction": "ok", "output": "fine"}\n{"instruction": "no answer"}\n'
                    '{"text": "fine"}\n{broken\n\n[1, 2]\nnot json either\n')
    with pytest.raises(DataError) as e:
        load_rows(str(path))
    msg = str(e.value)
    assert msg.startswith(f"{path}: 2 lines are not valid JSON and 2 rows are bad")
    lines = msg.splitlines()
    assert lines[1:5] == [
        "row 1: field 'output' is missing or empty (line 2)",
        "line 4 is not valid JSON (Expecting property name enclosed in double quotes at column 2)",
        "row 4: expected a JSON object, got list (line 6)",  # row numbers count every non-blank line
        "line 7 is not valid JSON (Expecting value at column 1)",
    ]
    assert msg.count("skip_bad_rows") == 1


def test_every_bad_row_listed_once_with_line_numbers_and_a_cap(tok, tmp_path):
    rows = [{"instruction": "ok", "output": "fine"}] + [{"instruction": f"q{i}", "output": ""} for i in range(30)]
    path = tmp_path / "many.jsonl"
    path.write_text("\n\n".join(json.dumps(r) for r in rows) + "\n")  # blank lines: line != row + 1
    with pytest.raises(DataError) as e:
        tokenize_rows(load_rows(str(path)), tok)
    lines = str(e.value).splitlines()
    assert lines[0] == "row 1: field 'output' is missing or empty (line 3)"
    assert lines[19] == "row 20: field 'output' is missing or empty (line 41)"
    assert lines[20] == "... and 10 more"
    assert lines[21] == f"30 bad rows in {path}. Fix them, or set data.skip_bad_rows=true to skip such rows."
    assert len(lines) == 22
    assert len(tokenize_rows(load_rows(str(path)), tok, skip_bad_rows=True)) == 1


def test_invalid_json_file_names_file_and_position(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[{"text": "a"},\n {text: "b"}]')
    with pytest.raises(DataError, match=rf"^{path}: not valid JSON at line 2 column 3 \(Expecting property name"):
        load_rows(str(path))
    path.write_text('{"text": "a"}\n{"text": "b"}\n')
    with pytest.raises(DataError, match=r"line 2 column 1 \(Extra data\).*\.jsonl"):  # JSON Lines named .json
        load_rows(str(path))


def test_jsonl_keeps_unicode_line_separators_inside_strings(tmp_path):
    rows = [{"text": "a\u2028b\x85c"}, {"text": "d"}]
    path = tmp_path / "u.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    assert load_rows(str(path)) == rows
    assert load_rows(str(path)).lines == [1, 2]
