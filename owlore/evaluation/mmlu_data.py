"""MMLU data that needs no network: the dev questions that ship inside the installed lm-eval package.

lm-eval's chain-of-thought MMLU variant (``tasks/mmlu/flan_cot_fewshot/mmlu_<subject>.yaml``) embeds each subject's
dev questions as few-shot samples, with the four options inlined into the question text and the answer letter in
the worked solution ("... The answer is (B)."). Parsing them back into MMLU's HF schema (``question``, ``subject``,
``choices``, ``answer``) gives a real, offline MMLU check that runs through lm-eval's standard MMLU prompt. Items
whose options cannot be split unambiguously (five options, or no single answer letter) are skipped, and so are
repeats.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

_OPTIONS = re.compile(r"(?P<q>.*)\n\(A\) (?P<a>.*?)\s*\(B\) (?P<b>.*?)\s*\(C\) (?P<c>.*?)\s*\(D\) (?P<d>.*)", re.S)
_ANSWER = re.compile(r"answer is \(([A-E])\)", re.I)


def lm_eval_tasks_dir() -> Path:
    """Directory of lm-eval's built-in task YAMLs in the installed package."""
    import lm_eval

    return Path(lm_eval.__file__).resolve().parent / "tasks"


def mmlu_subjects() -> list[str]:
    """The 57 MMLU subjects, from the per-subject YAMLs of lm-eval's default MMLU task."""
    files = sorted((lm_eval_tasks_dir() / "mmlu" / "default").glob("mmlu_*.yaml"))
    return [f.stem.removeprefix("mmlu_") for f in files]


def parse_cot_sample(sample: dict[str, str], subject: str) -> dict[str, Any] | None:
    """One flan-CoT few-shot sample as an MMLU row, or None if it is not a clean 4-option item."""
    m = _OPTIONS.fullmatch(sample["question"].strip())
    letters = {x.upper() for x in _ANSWER.findall(sample["target"])}
    if m is None or len(letters) != 1 or re.search(r"\(E\)", m["d"]):
        return None
    answer = "ABCD".find(letters.pop())
    if answer < 0:
        return None
    choices = [m[k].strip() for k in "abcd"]
    return {"question": m["q"].strip(), "subject": subject, "choices": choices, "answer": answer}


def mmlu_dev_items(subjects: list[str] | None = None) -> list[dict[str, Any]]:
    """MMLU dev questions shipped with lm-eval, in MMLU's HF schema, ordered by subject.

    Args:
        subjects: restrict to these subjects (default: all 57).

    Returns:
        Dicts with ``question``, ``subject``, ``choices`` (4 strings) and ``answer`` (0-3).
    """
    from lm_eval.tasks._yaml_loader import load_yaml

    cot_dir = lm_eval_tasks_dir() / "mmlu" / "flan_cot_fewshot"
    wanted = subjects or mmlu_subjects()
    items: list[dict[str, Any]] = []
    skipped = 0
    for subject in wanted:
        path = cot_dir / f"mmlu_{subject}.yaml"
        if not path.is_file():
            raise FileNotFoundError(f"MMLU subject {subject!r}: {path} is not in the installed lm-eval")
        samples = load_yaml(path, resolve_func=False, recursive=False)["fewshot_config"]["samples"]
        seen: list[dict[str, Any]] = []
        for parsed in (parse_cot_sample(s, subject) for s in samples):
            # Drop unparseable items and repeats (one subject lists an item twice, which would leak into its
            # own few-shot context).
            if parsed is None or parsed in seen:
                skipped += 1
            else:
                seen.append(parsed)
        items.extend(seen)
    logger.info("parsed %d MMLU dev items from lm-eval (%d skipped: not 4 clean options, or repeated)",
                len(items), skipped)
    return items
