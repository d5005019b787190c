"""owlore.evaluation library: task building, schema, equivalence with a plain lm-eval run, errors."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
import eval_support as support  # noqa: E402
from eval_support import DATA_DIR, fixture_rows, tiny_model  # noqa: E402

from owlore.evaluation import COMMONSENSE_TASKS, evaluate, mmlu_dev_items, mmlu_subjects  # noqa: E402
from owlore.evaluation.mmlu_data import lm_eval_tasks_dir, parse_cot_sample  # noqa: E402
from owlore.evaluation.tasks import commonsense_tasks, mmlu_tasks  # noqa: E402


@pytest.fixture(scope="module")
def tiny_tokenizer():
    return support.tokenizer()


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    return support.save_checkpoint(tmp_path_factory.mktemp("tiny_ckpt"))


EVAL_SPLIT = {"boolq": "validation", "piqa": "validation", "siqa": "validation", "hellaswag": "validation",
              "winogrande": "validation", "arc_easy": "test", "arc_challenge": "test", "openbookqa": "test"}


def test_parse_cot_sample_handles_inline_and_multiline_options():
    inline = {"question": "What is 2 + 2?\n(A) 3 (B) 4 (C) 5 (D) 22", "target": "Simple. The answer is (B)."}
    lines = {"question": "Pick one.\n(A) red\n(B) green\n(C) blue\n(D) none of\nthe above",
             "target": "... the answer is (D)."}
    five = {"question": "Q?\n(A) 1 (B) 2 (C) 3 (D) 4 (E) 5", "target": "The answer is (A)."}
    torn = {"question": "Q?\n(A) 1 (B) 2 (C) 3 (D) 4", "target": "The answer is (A). No, the answer is (C)."}
    assert parse_cot_sample(inline, "s") == {"question": "What is 2 + 2?", "subject": "s",
                                             "choices": ["3", "4", "5", "22"], "answer": 1}
    assert parse_cot_sample(lines, "s")["choices"] == ["red", "green", "blue", "none of\nthe above"]
    assert parse_cot_sample(lines, "s")["answer"] == 3
    assert parse_cot_sample(five, "s") is None
    assert parse_cot_sample(torn, "s") is None


def test_mmlu_dev_items_shipped_with_lm_eval():
    items = mmlu_dev_items()
    subjects = mmlu_subjects()
    assert len(subjects) == 57
    assert {i["subject"] for i in items} == set(subjects)
    assert len(items) >= 273  # the environment check parsed 273 with a stricter parser
    for it in items:
        assert set(it) == {"question", "subject", "choices", "answer"}
        assert len(it["choices"]) == 4 and all(c for c in it["choices"]) and it["question"]
        assert it["answer"] in (0, 1, 2, 3)
    keys = Counter((i["subject"], i["question"], tuple(i["choices"])) for i in items)
    assert max(keys.values()) == 1
    assert min(Counter(i["subject"] for i in items).values()) >= 3


def test_commonsense_all_tasks_schema(tiny_tokenizer):
    res = evaluate(tiny_model(), tiny_tokenizer, suite="commonsense", data_dir=DATA_DIR, model_name="tiny")
    assert res["model"] == "tiny" and res["suite"] == "commonsense" and res["shots"] == 0
    assert list(res["results"]) == list(COMMONSENSE_TASKS)
    for task, r in res["results"].items():
        assert set(r) == {"acc", "acc_norm", "n"}
        assert r["n"] == len(fixture_rows(task, EVAL_SPLIT[task]))
        assert 0.0 <= r["acc"] <= 1.0
        assert r["acc_norm"] is None or 0.0 <= r["acc_norm"] <= 1.0
    # tasks whose lm-eval YAML reports acc_norm keep it; boolq / siqa / winogrande only report acc
    assert res["results"]["piqa"]["acc_norm"] is not None and res["results"]["boolq"]["acc_norm"] is None
    assert res["average"] == pytest.approx(sum(r["acc"] for r in res["results"].values()) / 8)


def _reference_yaml(directory: Path, name: str, include: Path, data: dict[str, Path], **extra) -> Path:
    """A task written the way lm-eval's docs describe, independently of owlore.evaluation.tasks."""
    cfg = {"include": str(include), "task": name, "dataset_path": "json", "dataset_name": None,
           "dataset_kwargs": {"data_files": {k: str(v) for k, v in data.items()}},
           "training_split": None, "validation_split": None, "test_split": None, **extra}
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _lm_eval_reference(model_dir: Path, yamls: list[Path], limit: int | None = None) -> dict:
    """Plain lm-eval: its own HF loader (model="hf" from the checkpoint dir) and TaskManager."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(
        model="hf", model_args={"pretrained": str(model_dir), "dtype": "float32"}, device="cpu", batch_size=8,
        tasks=[p.stem for p in yamls], task_manager=TaskManager(include_path=str(yamls[0].parent),
                                                                include_defaults=False),
        bootstrap_iters=0, limit=limit)
    return out["results"]


def test_commonsense_equals_plain_lm_eval(tmp_path, tiny_model_dir, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    builtin = {"boolq": "super_glue/boolq/default.yaml", "piqa": "piqa/piqa.yaml", "siqa": "siqa/siqa.yaml",
               "hellaswag": "hellaswag/hellaswag.yaml", "winogrande": "winogrande/default.yaml",
               "arc_easy": "arc/arc_easy.yaml", "arc_challenge": "arc/arc_challenge.yaml",
               "openbookqa": "openbookqa/openbookqa.yaml"}
    yamls = []
    for task, rel in builtin.items():
        split = EVAL_SPLIT[task]
        yamls.append(_reference_yaml(tmp_path, f"ref_{task}", lm_eval_tasks_dir() / rel,
                                     {split: DATA_DIR / task / f"{split}.jsonl"}, **{f"{split}_split": split}))
    ref = _lm_eval_reference(tiny_model_dir, yamls)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ours = evaluate(model, tiny_tokenizer, suite="commonsense", data_dir=DATA_DIR)["results"]
    for task in builtin:
        r = ref[f"ref_{task}"]
        assert ours[task]["acc"] == r["acc,none"], task
        assert ours[task]["acc_norm"] == r.get("acc_norm,none"), task


def test_fewshot_from_local_train_split_equals_plain_lm_eval(tmp_path, tiny_model_dir, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    ref_yaml = _reference_yaml(tmp_path, "ref_piqa", lm_eval_tasks_dir() / "piqa/piqa.yaml",
                               {"validation": DATA_DIR / "piqa/validation.jsonl",
                                "train": DATA_DIR / "piqa/train.jsonl"},
                               validation_split="validation", training_split="train", num_fewshot=1)
    ref = _lm_eval_reference(tiny_model_dir, [ref_yaml])["ref_piqa"]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ours = evaluate(model, tiny_tokenizer, suite="commonsense", tasks=["piqa"], data_dir=DATA_DIR, shots=1)
    assert ours["shots"] == 1
    assert (ours["results"]["piqa"]["acc"], ours["results"]["piqa"]["acc_norm"]) == (
        ref["acc,none"], ref["acc_norm,none"])


def test_mmlu_local_equals_plain_lm_eval(tmp_path, tiny_model_dir, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    rows = {s: fixture_rows("mmlu", s) for s in ("test", "dev")}
    subjects = sorted({r["subject"] for r in rows["test"]})
    yamls = []
    for subject in subjects:
        files = {}
        for split, items in rows.items():
            files[split] = tmp_path / f"{subject}_{split}.jsonl"
            files[split].write_text("".join(json.dumps(r) + "\n" for r in items if r["subject"] == subject))
        builtin = lm_eval_tasks_dir() / f"mmlu/default/mmlu_{subject}.yaml"
        yamls.append(_reference_yaml(tmp_path, f"ref_{subject}", builtin, files, test_split="test",
                                     fewshot_split="dev", num_fewshot=2))
    ref = _lm_eval_reference(tiny_model_dir, yamls)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ours = evaluate(model, tiny_tokenizer, suite="mmlu", data_dir=DATA_DIR, shots=2)
    assert set(ours["subtasks"]) == set(subjects)
    for subject in subjects:
        assert ours["subtasks"][subject]["acc"] == ref[f"ref_{subject}"]["acc,none"], subject
    total = sum(ours["subtasks"][s]["acc"] * ours["subtasks"][s]["n"] for s in subjects) / len(rows["test"])
    assert ours["results"]["mmlu"] == {"acc": pytest.approx(total), "acc_norm": None, "n": len(rows["test"])}
    assert ours["average"] == ours["results"]["mmlu"]["acc"]


def test_mmlu_dev_fewshot_excludes_the_scored_item(tmp_path):
    """On dev, few-shot examples come from the subject's own dev pool minus the item being scored."""
    from lm_eval.tasks import TaskManager

    ts = mmlu_tasks(tmp_path, split="dev", data_dir=None, shots=5, subjects=["anatomy", "astronomy"])
    loaded = TaskManager(include_path=str(tmp_path), include_defaults=False).load(["mmlu"])["tasks"]
    for subject in ("anatomy", "astronomy"):
        task = loaded[ts.tasks[subject]]
        docs = list(task.eval_docs)
        k = ts.shots[subject]
        assert k == min(5, len(docs) - 1)
        for doc in docs:
            ctx = task.fewshot_context(doc, num_fewshot=k)
            assert ctx.count(doc["question"].strip()) == 1  # only as the final, unanswered question
            assert ctx.rstrip().endswith("Answer:")
            others = [d for d in docs if d != doc][:k]
            assert all(o["question"].strip() in ctx for o in others)


def test_without_data_dir_tasks_are_lm_eval_builtins(tmp_path):
    """Online mode changes nothing but the task name and shots: same hub dataset, prompt and metrics."""
    from lm_eval.tasks._yaml_loader import load_yaml

    ours_only = {"task", "tag", "num_fewshot"}
    ts = commonsense_tasks(tmp_path / "cs", list(COMMONSENSE_TASKS), data_dir=None, shots=0)
    for name, spec in COMMONSENSE_TASKS.items():
        ours = load_yaml(ts.directory / f"{ts.tasks[name]}.yaml", resolve_func=False)
        builtin = load_yaml(lm_eval_tasks_dir() / spec.builtin, resolve_func=False)
        assert {k: v for k, v in ours.items() if k not in ours_only} == \
            {k: v for k, v in builtin.items() if k not in ours_only}, name
    ts = mmlu_tasks(tmp_path / "mmlu", split="test", data_dir=None, shots=5)
    assert len(ts.tasks) == 57 and set(ts.shots.values()) == {5}
    ours = load_yaml(ts.directory / "mmlu_anatomy.yaml", resolve_func=False)
    assert (ours["dataset_path"], ours["dataset_name"], ours["fewshot_split"], ours["test_split"]) == (
        "cais/mmlu", "anatomy", "dev", "test")


def test_evaluate_restores_train_mode(tiny_tokenizer):
    model = tiny_model().train()
    evaluate(model, tiny_tokenizer, suite="commonsense", data_dir=DATA_DIR, tasks=["boolq"], limit=1)
    assert model.training


def test_missing_local_files_name_task_and_path(tmp_path, tiny_tokenizer):
    (tmp_path / "piqa").mkdir()
    (tmp_path / "piqa" / "validation.jsonl").write_text((DATA_DIR / "piqa/validation.jsonl").read_text())
    with pytest.raises(FileNotFoundError) as err:
        evaluate(tiny_model(), tiny_tokenizer, suite="commonsense", data_dir=tmp_path,
                 tasks=["piqa", "arc_easy", "hellaswag"])
    msg = str(err.value)
    assert f"arc_easy: expected {tmp_path / 'arc_easy' / 'test.jsonl'}" in msg
    assert f"hellaswag: expected {tmp_path / 'hellaswag' / 'validation.jsonl'}" in msg
    assert "piqa" not in msg  # present, so not reported
    with pytest.raises(FileNotFoundError, match=r"piqa: 1-shot needs few-shot examples; expected .*piqa/train"):
        evaluate(tiny_model(), tiny_tokenizer, suite="commonsense", data_dir=tmp_path, tasks=["piqa"], shots=1)
    with pytest.raises(FileNotFoundError, match=rf"mmlu: expected {tmp_path / 'mmlu' / 'test.jsonl'}"):
        evaluate(tiny_model(), tiny_tokenizer, suite="mmlu", data_dir=tmp_path, shots=0)


def test_bad_arguments_are_rejected(tiny_tokenizer):
    with pytest.raises(ValueError, match="unknown commonsense tasks"):
        evaluate(tiny_model(), tiny_tokenizer, suite="commonsense", data_dir=DATA_DIR, tasks=["piqa", "copa"])
    with pytest.raises(ValueError, match="unknown MMLU subjects"):
        evaluate(tiny_model(), tiny_tokenizer, suite="mmlu", split="dev", tasks=["astrology"])
    with pytest.raises(ValueError, match="suite must be one of"):
        evaluate(tiny_model(), tiny_tokenizer, suite="gsm8k")
