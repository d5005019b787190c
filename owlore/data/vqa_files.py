"""Bring-your-own-images VQA sets: a directory of images plus one JSONL of questions.

The format every visual-token pruning evaluation reads (``eval/vlm_pruning.py accuracy --data DIR``)::

    DIR/questions.jsonl     one object per line:
        {"image": "img/0001.png", "question": "Is there a cat?", "answer": "yes"}
        {"image": "0002.jpg", "question": "What color is the car?", "choices": ["red", "blue"], "answer": "red"}
    DIR/...                 the images, paths relative to DIR (any format PIL opens)

Fields: ``image``, ``question`` and ``answer`` (the reference) are required; with ``choices`` (``answer`` one of
them) each choice is scored by its log-likelihood, as lm-eval scores multiple choice; without, the model's greedy
answer is scored by exact match and token F1. Optional ``kind`` (rows are also scored per kind: the tables get
one column per kind) and ``id``. Every bad row is reported at once, by line number and field, before any model
loads. The Fashion-MNIST benchmark is one such directory (``owlore.data.fashion_vqa.write_vqa_dir``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from owlore.errors import UsageError

__all__ = ["QUESTIONS_FILE", "VQARecord", "load_image", "read_vqa_dir", "write_vqa_dir"]

QUESTIONS_FILE = "questions.jsonl"
_FIELDS = {"image", "question", "answer", "choices", "kind", "id"}


@dataclass(frozen=True)
class VQARecord:
    """One question about one image.

    Attributes:
        image: A path (read when scored) or an in-memory image (``np.ndarray`` uint8, gray or RGB, or PIL).
        question: The question text, as the user would type it.
        answer: The reference answer (one of ``choices`` when they are given).
        choices: Candidate answers scored by log-likelihood, or None for generated answers.
        kind: Group for the per-kind tables ("all" when the file gives none).
        id: The row's id (default: its line number).
    """

    image: Any
    question: str
    answer: str = ""
    choices: tuple[str, ...] | None = None
    kind: str = "all"
    id: str = ""


def load_image(image: Any):
    """``image`` as an RGB PIL image (paths are opened here, so a set of thousands stays lazy)."""
    from PIL import Image

    if isinstance(image, (str, Path)):
        with Image.open(image) as im:
            return im.convert("RGB")
    if isinstance(image, np.ndarray):
        return Image.fromarray(image).convert("RGB")
    return image.convert("RGB")


def _row_problems(row: Any, root: Path) -> list[str]:
    if not isinstance(row, dict):
        return [f"a JSON object, got {type(row).__name__}"]
    problems = [f"unknown field {k!r} (fields: {', '.join(sorted(_FIELDS))})" for k in row if k not in _FIELDS]
    for key in ("image", "question"):
        if not isinstance(row.get(key), str) or not row.get(key, "").strip():
            problems.append(f"{key!r} must be a non-empty string")
    choices, answer = row.get("choices"), row.get("answer")
    if choices is not None and (not isinstance(choices, list) or len(choices) < 2
                                or not all(isinstance(c, str) and c.strip() for c in choices)):
        problems.append("'choices' must be a list of at least 2 non-empty strings")
    elif choices is not None and len(set(choices)) != len(choices):
        problems.append("'choices' has duplicates")
    if not isinstance(answer, str) or not answer.strip():
        problems.append("'answer' must be a non-empty string (the reference; with 'choices', one of them)")
    elif isinstance(choices, list) and answer is not None and answer not in choices:
        problems.append(f"'answer' {answer!r} is not one of 'choices' {choices}")
    if "kind" in row and not isinstance(row["kind"], str):
        problems.append("'kind' must be a string")
    if isinstance(row.get("image"), str) and row["image"].strip() and not (root / row["image"]).is_file():
        problems.append(f"image {row['image']!r} not found in {root}")
    return problems


def read_vqa_dir(path: str | Path, *, limit: int | None = None) -> list[VQARecord]:
    """The records of ``path`` (a directory holding ``questions.jsonl``, or the JSONL file itself).

    Raises:
        UsageError: A missing directory or file, or bad rows: every problem, each with its line number.
    """
    path = Path(path)
    file = path / QUESTIONS_FILE if path.is_dir() else path
    if not file.is_file():
        found = sorted(p.name for p in path.glob("*.jsonl")) if path.is_dir() else []
        hint = f" (found {', '.join(found)}; pass the file itself)" if found else ""
        raise UsageError(f"--data {path}: no {QUESTIONS_FILE}{hint}; a VQA set is a directory of images and a "
                         f"{QUESTIONS_FILE} of {{\"image\", \"question\", \"answer\" | \"choices\"}} rows")
    root, records, problems = file.parent, [], []
    for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(f"line {number}: not JSON ({e.msg})")
            continue
        bad = _row_problems(row, root)
        problems += [f"line {number}: {p}" for p in bad]
        if not bad:
            choices = tuple(row["choices"]) if row.get("choices") else None
            records.append(VQARecord(image=root / row["image"], question=row["question"], answer=row["answer"],
                                     choices=choices, kind=row.get("kind") or "all", id=str(row.get("id", number))))
        if limit is not None and len(records) >= limit and not problems:
            break
    if problems:
        shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise UsageError(f"{file}: {len(problems)} bad row(s):\n  {shown}")
    if not records:
        raise UsageError(f"{file}: no questions")
    return records


def write_vqa_dir(path: str | Path, records: Iterable[VQARecord], *, image_dir: str = "images") -> Path:
    """Write ``records`` (in-memory images) as a VQA directory: PNGs under ``image_dir`` and the JSONL.

    The JSONL is written last, through a temporary file, so a stopped write never leaves a set that reads as
    complete.
    """
    from PIL import Image

    path = Path(path)
    (path / image_dir).mkdir(parents=True, exist_ok=True)
    lines = []
    for i, r in enumerate(records):
        name = f"{image_dir}/{i:05d}.png"
        image = r.image if not isinstance(r.image, np.ndarray) else Image.fromarray(r.image)
        image.save(path / name)
        row: dict[str, Any] = {"id": r.id or str(i), "image": name, "question": r.question, "kind": r.kind}
        row["answer"] = r.answer
        if r.choices is not None:
            row["choices"] = list(r.choices)
        lines.append(json.dumps(row))
    tmp = path / (QUESTIONS_FILE + ".tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tmp.replace(path / QUESTIONS_FILE)
    return path


def kinds(records: Sequence[VQARecord]) -> list[str]:
    """The kinds present, sorted."""
    return sorted({r.kind for r in records})
