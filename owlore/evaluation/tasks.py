"""lm-eval task configs for the three suites, written as YAML files into a scratch directory at run time.

Benchmark tasks ``include`` lm-eval's built-in YAML, so prompts, answer choices and metrics are exactly lm-eval's;
only the data source is overridden when it is local (``dataset_path: json`` with absolute ``data_files``, one JSONL
per HF split in the dataset's own schema). The demo suite is a plain multiple-choice task over prompts rendered
with ``owlore.data.build_prompt``, scored with an empty target delimiter so the answer follows the prompt exactly
as in training.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from owlore.errors import UsageError
from owlore.evaluation.mmlu_data import lm_eval_tasks_dir, mmlu_dev_items, mmlu_subjects

logger = logging.getLogger(__name__)

_ACC = {"metric": "acc", "aggregation": "mean", "higher_is_better": True}
_ACC_NORM = {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}
_SPLIT_KEYS = ("training_split", "validation_split", "test_split", "fewshot_split")


@dataclass(frozen=True)
class BenchmarkTask:
    """A commonsense benchmark: lm-eval's YAML for it and the HF fields its prompt reads."""

    builtin: str
    """Path of lm-eval's task YAML, relative to ``lm_eval/tasks``."""
    hub: tuple[str, ...]
    """HF dataset (and config) the built-in task downloads; shown in error messages."""
    fields: tuple[str, ...]
    """Fields each JSONL row needs (the dataset's HF schema)."""


COMMONSENSE_TASKS: dict[str, BenchmarkTask] = {
    "boolq": BenchmarkTask("super_glue/boolq/default.yaml", ("aps/super_glue", "boolq"), ("question", "passage", "label")),
    "piqa": BenchmarkTask("piqa/piqa.yaml", ("baber/piqa",), ("goal", "sol1", "sol2", "label")),
    "siqa": BenchmarkTask("siqa/siqa.yaml", ("lighteval/siqa",),
                          ("context", "question", "answerA", "answerB", "answerC", "label")),
    "hellaswag": BenchmarkTask("hellaswag/hellaswag.yaml", ("Rowan/hellaswag",),
                               ("activity_label", "ctx_a", "ctx_b", "endings", "label")),
    "winogrande": BenchmarkTask("winogrande/default.yaml", ("allenai/winogrande", "winogrande_xl"),
                                ("sentence", "option1", "option2", "answer")),
    "arc_easy": BenchmarkTask("arc/arc_easy.yaml", ("allenai/ai2_arc", "ARC-Easy"), ("question", "choices", "answerKey")),
    "arc_challenge": BenchmarkTask("arc/arc_challenge.yaml", ("allenai/ai2_arc", "ARC-Challenge"),
                                   ("question", "choices", "answerKey")),
    "openbookqa": BenchmarkTask("openbookqa/openbookqa.yaml", ("allenai/openbookqa", "main"),
                                ("question_stem", "choices", "answerKey")),
}
MMLU_FIELDS = ("question", "subject", "choices", "answer")


@dataclass
class TaskSet:
    """The YAML directory handed to lm-eval's ``TaskManager`` and what to request from it."""

    directory: Path
    tasks: dict[str, str] = field(default_factory=dict)
    """Our result key -> lm-eval task name, in report order."""
    group: str | None = None
    """lm-eval group whose size-weighted aggregate is the suite's headline (MMLU, demo); None for a plain mean."""
    shots: dict[str, int] = field(default_factory=dict)
    """Few-shot count actually used per task."""

    def request(self) -> list[str]:
        """Names to pass to ``simple_evaluate``: the group if there is one, else the tasks."""
        return [self.group] if self.group else list(self.tasks.values())


def _write_yaml(path: Path, cfg: dict[str, Any]) -> None:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True))


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open() as f:
        return [json.loads(line) for line in f if line.strip()]


def _local_dataset(files: dict[str, Path], cache_dir: Path) -> dict[str, Any]:
    """Overrides that make lm-eval read local JSONL files (absolute, since relative paths follow the CWD)."""
    return {
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {s: str(p.resolve()) for s, p in files.items()}, "cache_dir": str(cache_dir)},
    }


def _missing(task: str, path: Path, fields: tuple[str, ...], hub: tuple[str, ...], split: str) -> str:
    return (f"{task}: expected {path} (JSONL, one row per line with fields {', '.join(fields)}; e.g. "
            f"datasets.load_dataset({', '.join(map(repr, hub))})[{split!r}].to_json({str(path)!r}))")


def commonsense_tasks(out_dir: Path, names: list[str], *, data_dir: Path | None, shots: int) -> TaskSet:
    """YAMLs for commonsense tasks; with ``data_dir``, each reads ``<data_dir>/<task>/<split>.jsonl``.

    The split lm-eval scores is the built-in task's (test if it defines one, else validation). Few-shot examples
    come from ``train.jsonl`` (or validation when the task scores test), as lm-eval does with the hub data.

    Raises:
        ValueError: unknown task names.
        FileNotFoundError: local files missing, one line per task naming the expected path.
    """
    from lm_eval.tasks._yaml_loader import load_yaml

    unknown = sorted(set(names) - set(COMMONSENSE_TASKS))
    if unknown:
        raise UsageError(f"unknown commonsense tasks {unknown}; available: {', '.join(COMMONSENSE_TASKS)}")
    ts = TaskSet(out_dir)
    problems: list[str] = []
    for name in names:
        spec = COMMONSENSE_TASKS[name]
        builtin = lm_eval_tasks_dir() / spec.builtin
        cfg: dict[str, Any] = {"include": str(builtin), "task": name, "tag": [], "num_fewshot": shots}
        if data_dir is not None:
            base = load_yaml(builtin, resolve_func=False)
            eval_key = "test_split" if base.get("test_split") else "validation_split"
            files: dict[str, Path] = {}
            for key in _SPLIT_KEYS:
                split = base.get(key)
                if split is None:
                    continue
                path = Path(data_dir) / name / f"{split}.jsonl"
                if path.is_file():
                    files[split] = path
                elif key == eval_key:
                    problems.append(_missing(name, path.resolve(), spec.fields, spec.hub, split))
                else:
                    cfg[key] = None
            fewshot_source = [s for k in ("training_split", "validation_split", "fewshot_split")
                              if (s := base.get(k)) and s in files and k != eval_key]
            if shots > 0 and not fewshot_source and files:
                problems.append(f"{name}: {shots}-shot needs few-shot examples; expected "
                                f"{(Path(data_dir) / name / 'train.jsonl').resolve()}")
            cfg.update(_local_dataset(files, out_dir / "hf_cache"))
        _write_yaml(out_dir / f"{name}.yaml", cfg)
        ts.tasks[name] = name
        ts.shots[name] = shots
    if problems:
        raise FileNotFoundError("missing local evaluation data:\n  " + "\n  ".join(problems))
    return ts


def mmlu_tasks(out_dir: Path, *, split: str, data_dir: Path | None, shots: int,
               subjects: list[str] | None = None) -> TaskSet:
    """YAMLs for MMLU (one task per subject plus an ``mmlu`` group weighting subjects by size).

    ``split="test"`` without ``data_dir`` is lm-eval's own MMLU (hub ``cais/mmlu``, few-shot from dev). With
    ``data_dir`` it reads ``<data_dir>/mmlu/test.jsonl`` and, for few-shot, ``dev.jsonl``. ``split="dev"`` scores
    the dev items (``<data_dir>/mmlu/dev.jsonl``, else the ones shipped in lm-eval); few-shot examples then come
    from the same subject's dev pool minus the item itself (lm-eval drops the evaluated doc when the few-shot
    split is the test split), so a subject with m items gets at most m - 1 shots.
    """
    known = mmlu_subjects()
    wanted = subjects or known
    unknown = sorted(set(wanted) - set(known))
    if unknown:
        raise UsageError(f"unknown MMLU subjects {unknown}; available: {', '.join(known)}")
    if split not in ("test", "dev"):
        raise UsageError(f"MMLU split must be 'test' or 'dev', got {split!r}")

    by_subject: dict[str, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    local = data_dir is not None or split == "dev"
    if data_dir is not None:
        needed = ["dev"] if split == "dev" else (["test", "dev"] if shots > 0 else ["test"])
        problems = [_missing("mmlu", (Path(data_dir) / "mmlu" / f"{s}.jsonl").resolve(), MMLU_FIELDS,
                             ("cais/mmlu", "all"), s)
                    for s in needed if not (Path(data_dir) / "mmlu" / f"{s}.jsonl").is_file()]
        if problems:
            raise FileNotFoundError("missing local evaluation data:\n  " + "\n  ".join(problems))
        for s in needed:
            for row in _read_jsonl(Path(data_dir) / "mmlu" / f"{s}.jsonl"):
                by_subject[row["subject"]][s].append(row)
    elif split == "dev":
        for row in mmlu_dev_items(wanted):
            by_subject[row["subject"]]["dev"].append(row)

    ts = TaskSet(out_dir, group="mmlu")
    problems = []
    for subject in wanted:
        name = f"mmlu_{subject}"
        cfg: dict[str, Any] = {"include": str(lm_eval_tasks_dir() / "mmlu" / "default" / f"{name}.yaml"),
                               "task": name, "tag": [], "num_fewshot": shots}
        if local:
            rows = by_subject.get(subject, {})
            if not rows.get(split):
                continue  # subject absent from the local file
            k = min(shots, len(rows[split]) - 1) if split == "dev" else shots
            if split == "test" and len(rows.get("dev", [])) < shots:
                problems.append(f"mmlu: subject {subject} has {len(rows.get('dev', []))} dev rows, {shots}-shot")
            files = {}
            for s, items in rows.items():
                files[s] = out_dir / "data" / f"{name}_{s}.jsonl"
                _write_jsonl(files[s], items)
            cfg.update(_local_dataset(files, out_dir / "hf_cache"))
            # On dev, fewshot split == test split, which is what makes lm-eval leave the scored item out.
            cfg.update({"test_split": split, "validation_split": None, "training_split": None,
                        "fewshot_split": "dev" if "dev" in files else None, "num_fewshot": k})
            if k < shots:
                logger.info("mmlu %s: %d dev items, so %d shots instead of %d", subject, len(rows[split]), k, shots)
        _write_yaml(out_dir / f"{name}.yaml", cfg)
        ts.tasks[subject] = name
        ts.shots[subject] = cfg["num_fewshot"]
    if problems:
        raise UsageError("not enough few-shot examples:\n  " + "\n  ".join(problems))
    if not ts.tasks:
        raise UsageError(f"no MMLU items for subjects {wanted} in the {split} data")
    _write_yaml(out_dir / "mmlu_group.yaml", {
        "group": "mmlu", "task": list(ts.tasks.values()),
        "aggregate_metric_list": [{"metric": "acc", "weight_by_size": True}], "metadata": {"version": 2},
    })
    return ts


def demo_tasks(out_dir: Path, examples: list[dict[str, Any]], tokenizer: Any) -> TaskSet:
    """YAMLs for the demo task set: one multiple-choice task per task type, grouped as ``demo``.

    Each row's ``prompt`` is ``build_prompt(tokenizer, example)``; the choices are scored right after it
    (``target_delimiter: ""``), i.e. on exactly the text the model is trained to produce.
    """
    from owlore.data import build_prompt

    by_task: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for ex in examples:
        by_task[ex["task"]].append({"prompt": build_prompt(tokenizer, ex), "choices": list(ex["choices"]),
                                    "label": int(ex["label"]), "task": ex["task"], "key": ex.get("key", "")})
    if not by_task:
        raise ValueError("no demo examples to evaluate")
    ts = TaskSet(out_dir, group="demo")
    for task, rows in by_task.items():
        name = f"demo_{task}"
        path = out_dir / "data" / f"{name}.jsonl"
        _write_jsonl(path, rows)
        _write_yaml(out_dir / f"{name}.yaml", {
            "task": name, **_local_dataset({"test": path}, out_dir / "hf_cache"), "test_split": "test",
            "output_type": "multiple_choice", "doc_to_text": "prompt", "doc_to_choice": "choices",
            "doc_to_target": "label", "target_delimiter": "", "num_fewshot": 0,
            "metric_list": [_ACC, _ACC_NORM], "metadata": {"version": 1.0},
        })
        ts.tasks[task] = name
        ts.shots[task] = 0
    _write_yaml(out_dir / "demo_group.yaml", {
        "group": "demo", "task": list(ts.tasks.values()),
        "aggregate_metric_list": [{"metric": "acc", "weight_by_size": True},
                                  {"metric": "acc_norm", "weight_by_size": True}],
        "metadata": {"version": 1.0},
    })
    return ts
