"""Run an evaluation suite on an in-memory model with lm-eval and return one small, stable result dict.

lm-eval does all the scoring (``HFLM`` log-likelihoods, its metrics and group aggregation); this module only
builds the task configs (``owlore.evaluation.tasks``), runs ``simple_evaluate`` and reduces its large output to::

    {"model": str, "suite": str, "split": str, "shots": int, "limit": int | None,
     "results": {task: {"acc": float, "acc_norm": float | None, "n": int}},
     "average": float, "subtasks": {...} (MMLU only), "runtime_s": float, "lm_eval_version": str}

``average`` is the suite's headline number: the size-weighted accuracy over all items for MMLU (lm-eval's
``mmlu`` group) and the demo set (its ``overall`` entry), and the unweighted mean of task accuracies for the
commonsense suite (the convention of the OwLore / LISA / LLM-Adapters tables).
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

from owlore.errors import UsageError
from owlore.evaluation.tasks import COMMONSENSE_TASKS, TaskSet, commonsense_tasks, demo_tasks, mmlu_tasks

logger = logging.getLogger(__name__)

Suite = Literal["mmlu", "commonsense", "demo"]
SUITES: tuple[str, ...] = ("mmlu", "commonsense", "demo")
DEFAULT_SHOTS: dict[str, int] = {"mmlu": 5, "commonsense": 0, "demo": 0}


def build_task_set(out_dir: Path, *, suite: Suite, tokenizer: Any = None, data_dir: str | Path | None = None,
                   split: str = "test", shots: int | None = None, tasks: list[str] | None = None,
                   examples: list[dict[str, Any]] | None = None) -> TaskSet:
    """Write the suite's task YAMLs into ``out_dir`` (see ``evaluate`` for the arguments)."""
    if suite not in SUITES:
        raise UsageError(f"suite must be one of {SUITES}, got {suite!r}")
    shots = DEFAULT_SHOTS[suite] if shots is None else shots
    data = Path(data_dir) if data_dir is not None else None
    if shots < 0:
        raise UsageError(f"shots must be >= 0, got {shots}")
    if suite == "mmlu":
        return mmlu_tasks(out_dir, split=split, data_dir=data, shots=shots, subjects=tasks)
    if suite == "commonsense":
        if split != "test":
            raise UsageError("the commonsense suite scores each task's standard split; split must be 'test'")
        return commonsense_tasks(out_dir, tasks or list(COMMONSENSE_TASKS), data_dir=data, shots=shots)
    if examples is None:  # demo
        from owlore.data import build_demo_tasks

        examples = build_demo_tasks(split, tasks=tasks)
    elif tasks:
        examples = [ex for ex in examples if ex["task"] in tasks]
    return demo_tasks(out_dir, examples, tokenizer)


def check_data(*, suite: Suite, data_dir: str | Path | None = None, split: str = "test", shots: int | None = None,
               tasks: list[str] | None = None) -> None:
    """Raise the errors ``evaluate`` would raise for missing data or bad names, before any model is loaded."""
    if suite == "demo":
        return
    with tempfile.TemporaryDirectory(prefix="owlore-eval-check-") as tmp:
        build_task_set(Path(tmp), suite=suite, data_dir=data_dir, split=split, shots=shots, tasks=tasks)


def run_lm_eval(model: Any, tokenizer: Any, task_set: TaskSet, *, limit: int | None = None, batch_size: int = 8,
                max_length: int | None = None) -> dict[str, Any]:
    """``simple_evaluate`` on ``task_set`` with the model wrapped in ``HFLM``; returns lm-eval's raw output.

    Global RNGs are left alone (multiple-choice scoring is deterministic), and the model's train/eval mode is
    restored, so this is safe to call in the middle of a training run.
    """
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    was_training = model.training
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
        manager = TaskManager(include_path=str(task_set.directory), include_defaults=False)
        raw = simple_evaluate(model=lm, tasks=task_set.request(), task_manager=manager, limit=limit,
                              bootstrap_iters=0, log_samples=False, random_seed=None, numpy_random_seed=None,
                              torch_random_seed=None)
    finally:
        model.train(was_training)
    if raw is None:  # non-zero rank under a distributed launcher
        raise RuntimeError("lm-eval returned no results (not rank 0?)")
    return raw


def _metrics(raw: dict[str, Any], name: str) -> dict[str, Any]:
    r = raw["results"][name]
    acc_norm = r.get("acc_norm,none")
    return {"acc": float(r["acc,none"]), "acc_norm": None if acc_norm is None else float(acc_norm)}


def normalise_results(raw: dict[str, Any], task_set: TaskSet, *, suite: str) -> dict[str, Any]:
    """Reduce lm-eval's output to ``{"results": ..., "average": ..., ["subtasks": ...]}`` (see module doc)."""
    counts = {name: int(raw["n-samples"][name]["effective"]) for name in task_set.tasks.values()}
    per_task = {key: {**_metrics(raw, name), "n": counts[name]} for key, name in task_set.tasks.items()}
    if suite == "mmlu":
        total = {**_metrics(raw, "mmlu"), "n": sum(counts.values())}
        return {"results": {"mmlu": total}, "average": total["acc"], "subtasks": per_task}
    if suite == "demo":
        overall = {**_metrics(raw, "demo"), "n": sum(counts.values())}
        return {"results": {**per_task, "overall": overall}, "average": overall["acc"]}
    average = sum(r["acc"] for r in per_task.values()) / len(per_task)
    return {"results": per_task, "average": average}


def evaluate(model: Any, tokenizer: Any, *, suite: Suite, data_dir: str | Path | None = None, split: str = "test",
             shots: int | None = None, limit: int | None = None, batch_size: int = 8, tasks: list[str] | None = None,
             examples: list[dict[str, Any]] | None = None, max_length: int | None = None,
             model_name: str | None = None) -> dict[str, Any]:
    """Evaluate an in-memory causal LM on one suite with lm-eval; the reusable core of ``eval/*.py``.

    Args:
        model: a ``transformers`` causal LM (or a peft ``PeftModel``), already on its device.
        tokenizer: its tokenizer (the demo suite also renders prompts with it).
        suite: ``"mmlu"``, ``"commonsense"`` or ``"demo"``.
        data_dir: local data root (``<data_dir>/<task>/<split>.jsonl`` in each dataset's HF schema); None means
            lm-eval's hub datasets (MMLU ``split="dev"`` never needs the network).
        split: MMLU: ``"test"`` or ``"dev"``; demo: ``"test"`` (held-out) or ``"train"``; commonsense: ``"test"``.
        shots: few-shot examples per item (default 5 for MMLU, 0 otherwise).
        limit: score only the first ``limit`` items of every task (lm-eval's ``limit``).
        batch_size: HFLM batch size.
        tasks: subset of tasks: commonsense task names, MMLU subjects, or demo task types.
        examples: demo items (``owlore.data.build_demo_tasks`` format); default: the built-in ``split``.
        max_length: HFLM context length (default: from the model config).
        model_name: label stored under ``"model"`` (default: the model's ``name_or_path``).

    Returns:
        The result dict described in the module docstring.

    Raises:
        ValueError: bad suite / split / task names.
        FileNotFoundError: a local data file is missing (the message names the task and the expected path).
    """
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="owlore-eval-") as tmp:
        task_set = build_task_set(Path(tmp), suite=suite, tokenizer=tokenizer, data_dir=data_dir, split=split,
                                  shots=shots, tasks=tasks, examples=examples)
        logger.info("evaluating %s (%d tasks, split %s)", suite, len(task_set.tasks), split)
        raw = run_lm_eval(model, tokenizer, task_set, limit=limit, batch_size=batch_size, max_length=max_length)
    summary = normalise_results(raw, task_set, suite=suite)
    import lm_eval

    name = model_name or getattr(getattr(model, "config", None), "name_or_path", None) or type(model).__name__
    requested = DEFAULT_SHOTS[suite] if shots is None else shots
    out = {"model": str(name), "suite": suite, "split": split, "shots": requested, "limit": limit, **summary}
    capped = {task: k for task, k in task_set.shots.items() if k != requested}
    if capped:  # MMLU dev: a subject with m items offers at most m - 1 shots
        out["shots_used"] = capped
    return {**out, "runtime_s": round(time.perf_counter() - start, 2), "lm_eval_version": lm_eval.__version__}
