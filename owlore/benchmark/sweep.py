"""A sweep file: the whole plan of a quality benchmark (task, budget, columns, learning-rate grid, seeds, selection)
in one YAML file, so one command runs it and a rerun resumes it (``eval/bench.py --sweep FILE``).

    name: manpages_methods
    task: configs/tasks/manpages.yaml          # config overlay added to every run
    steps: 100
    batch: 8
    seq: 128
    learning_rates: [3.0e-4, 1.0e-4, 1.0e-3]   # the first value runs first for every column
    seeds: [0]
    select: answers:validation.rougeL          # pick each column's learning rate here (max; perplexity: min)
    report: answers:test                       # the held-out metrics shown
    overrides: [eval.answers_limit=160]        # every run
    columns:
      full: {method: full}
      lora_r64: {method: lora, overrides: [lora.r=64, lora.alpha=128], learning_rates: [1.0e-3, 3.0e-4, 3.0e-3]}
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from owlore.benchmark.runs import Column

KEYS = {"name", "task", "steps", "batch", "seq", "learning_rates", "seeds", "select", "report", "overrides",
        "columns", "repeats", "description"}


class SweepError(ValueError):
    """A sweep file that cannot run; the message lists every problem."""


@dataclass(frozen=True)
class Sweep:
    name: str
    columns: tuple[Column, ...]
    steps: int
    batch: int
    seq: int
    task: Path | None = None
    learning_rates: tuple[float, ...] | None = None
    seeds: tuple[int, ...] | None = None
    select: str | None = None
    report: str | None = None
    overrides: tuple[str, ...] = ()
    repeats: int = 1
    description: str = ""

    @property
    def lower_is_better(self) -> bool:
        """Perplexity-like selection metrics are minimised."""
        return bool(self.select) and ("perplexity" in self.select or self.select.endswith(".nll"))


def _floats(value: Any, where: str, problems: list[str]) -> tuple[float, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not value or not all(isinstance(v, int | float) and v > 0 for v in value):
        problems.append(f"{where}={value!r}: must be a non-empty list of positive numbers, e.g. [3.0e-4, 1.0e-3]")
        return None
    return tuple(float(v) for v in value)


def load_sweep(path: str | Path, known_methods: Mapping[str, Any] | None = None) -> Sweep:
    """Read and check a sweep file.

    Raises:
        SweepError: every problem at once (unknown keys, bad values, unknown methods, a missing task file).
    """
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        raise SweepError(f"{path}: cannot read the sweep file ({str(e).splitlines()[0]})") from None
    problems: list[str] = []
    if not isinstance(raw, dict):
        raise SweepError(f"{path}: expected a mapping with name, steps, batch, seq and columns")
    problems += [f"{k}: unknown key; valid: {', '.join(sorted(KEYS))}" for k in raw if k not in KEYS]
    for key in ("steps", "batch", "seq"):
        if not isinstance(raw.get(key), int) or raw[key] < 1:
            problems.append(f"{key}={raw.get(key)!r}: must be an integer >= 1")
    task = raw.get("task")
    if task is not None and not Path(task).is_file():
        problems.append(f"task={task!r}: no such config overlay (e.g. configs/tasks/manpages.yaml)")
    cols = raw.get("columns")
    columns: list[Column] = []
    if not isinstance(cols, dict) or not cols:
        problems.append("columns: must map labels to {method: NAME, overrides: [...], learning_rates: [...]}")
        cols = {}
    for label, spec in cols.items():
        if not isinstance(spec, dict) or "method" not in spec:
            problems.append(f"columns.{label}: needs method: NAME")
            continue
        if any(c in str(label) for c in ":=/ ,"):
            problems.append(f"columns.{label}: a label names a folder; no ':', '=', '/', ',' or spaces")
        bad = set(spec) - {"method", "overrides", "learning_rates"}
        if bad:
            problems.append(f"columns.{label}: unknown keys {sorted(bad)}; valid: method, overrides, learning_rates")
        if known_methods is not None and spec["method"] not in known_methods:
            problems.append(f"columns.{label}.method={spec['method']!r}: unknown (known: {', '.join(known_methods)})")
        overrides = spec.get("overrides") or []
        if not isinstance(overrides, list) or not all(isinstance(o, str) and "=" in o for o in overrides):
            problems.append(f"columns.{label}.overrides={overrides!r}: must be a list of section.key=value")
            overrides = []
        columns.append(Column(str(label), spec["method"], tuple(overrides),
                              _floats(spec.get("learning_rates"), f"columns.{label}.learning_rates", problems)))
    seeds = raw.get("seeds")
    if seeds is not None and (not isinstance(seeds, list) or not all(isinstance(s, int) for s in seeds)):
        problems.append(f"seeds={seeds!r}: must be a list of integers")
        seeds = None
    overrides = raw.get("overrides") or []
    if not isinstance(overrides, list) or not all(isinstance(o, str) and "=" in o for o in overrides):
        problems.append(f"overrides={overrides!r}: must be a list of section.key=value")
        overrides = []
    lrs = _floats(raw.get("learning_rates"), "learning_rates", problems)
    repeats = raw.get("repeats", 1)
    if not isinstance(repeats, int) or repeats < 1:
        problems.append(f"repeats={repeats!r}: must be an integer >= 1")
    if problems:
        raise SweepError(f"{path}:\n" + "\n".join(f"  {p}" for p in problems))
    return Sweep(name=str(raw.get("name") or path.stem), columns=tuple(columns), steps=raw["steps"],
                 batch=raw["batch"], seq=raw["seq"], task=Path(task) if task else None, learning_rates=lrs,
                 seeds=tuple(seeds) if seeds else None, select=raw.get("select"), report=raw.get("report"),
                 overrides=tuple(overrides), repeats=repeats, description=str(raw.get("description") or ""))
