"""Evaluation with lm-eval: MMLU, the commonsense suite and the demo task set, online or fully offline.

``evaluate(model, tokenizer, suite=...)`` scores an in-memory model (``train.py`` calls it after training);
``eval/mmlu.py``, ``eval/commonsense.py`` and ``eval/demo_tasks.py`` wrap it for checkpoints on disk.
lm-eval is an optional dependency and is imported only when an evaluation runs.
"""

from owlore.evaluation.harness import DEFAULT_SHOTS, SUITES, check_data, evaluate
from owlore.evaluation.loading import load_model
from owlore.evaluation.mmlu_data import mmlu_dev_items, mmlu_subjects
from owlore.evaluation.tables import (
    compare_results,
    format_comparison,
    format_table,
    load_results,
    save_results,
)
from owlore.evaluation.tasks import COMMONSENSE_TASKS

__all__ = [
    "COMMONSENSE_TASKS",
    "DEFAULT_SHOTS",
    "SUITES",
    "check_data",
    "compare_results",
    "evaluate",
    "format_comparison",
    "format_table",
    "load_model",
    "load_results",
    "mmlu_dev_items",
    "mmlu_subjects",
    "save_results",
]
