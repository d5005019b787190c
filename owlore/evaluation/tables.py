"""Markdown views of result dicts: one run as a table, two runs side by side with deltas (B - A)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from owlore.errors import UsageError

METRICS = ("acc", "acc_norm")


def save_results(result: dict[str, Any], path: str | Path) -> Path:
    """Write a result dict as indented JSON (parent directories created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def load_results(path: str | Path) -> dict[str, Any]:
    """Read a result JSON written by ``save_results`` (or by ``eval/*.py --output``)."""
    try:
        result = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file (an evaluation result written with --output)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: not a JSON evaluation result ({e})") from None
    if not isinstance(result, dict) or "results" not in result:
        raise UsageError(f"{path} is not an evaluation result (no 'results' key)")
    return result


def _fmt(x: float | None, signed: bool = False) -> str:
    if x is None:
        return "–"
    return f"{x:+.4f}" if signed else f"{x:.4f}"


def format_table(result: dict[str, Any]) -> str:
    """One run: a row per task (acc, acc_norm, n) and a final ``average`` row."""
    lines = [f"**{result.get('model', '?')}** ({result.get('suite', '?')}, split {result.get('split', '?')}, "
             f"{result.get('shots', '?')}-shot)", "",
             "| task | acc | acc_norm | n |", "|---|---:|---:|---:|"]
    for task, r in result["results"].items():
        lines.append(f"| {task} | {_fmt(r.get('acc'))} | {_fmt(r.get('acc_norm'))} | {r.get('n', '')} |")
    lines.append(f"| **average** | {_fmt(result.get('average'))} | | |")
    return "\n".join(lines)


def _delta(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else b - a


def compare_results(a: dict[str, Any], b: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """Per task (union of both runs, A's order first) and ``average``: each metric for A and B and B - A."""
    tasks = list(dict.fromkeys([*a["results"], *b["results"]]))
    out: dict[str, dict[str, float | None]] = {}
    for task in tasks:
        ra, rb = a["results"].get(task, {}), b["results"].get(task, {})
        row: dict[str, float | None] = {}
        for m in METRICS:
            row[f"{m}_a"], row[f"{m}_b"] = ra.get(m), rb.get(m)
            row[f"{m}_delta"] = _delta(ra.get(m), rb.get(m))
        out[task] = row
    out["average"] = {"acc_a": a.get("average"), "acc_b": b.get("average"),
                      "acc_delta": _delta(a.get("average"), b.get("average")),
                      "acc_norm_a": None, "acc_norm_b": None, "acc_norm_delta": None}
    return out


def format_comparison(a: dict[str, Any], b: dict[str, Any]) -> str:
    """Two runs side by side: acc and acc_norm of A and B with deltas (B - A); ``–`` where a value is missing."""
    name_a, name_b = a.get("model", "A"), b.get("model", "B")
    lines = [f"A = **{name_a}** ({a.get('suite', '?')}), B = **{name_b}** ({b.get('suite', '?')})", "",
             "| task | acc A | acc B | Δ acc | acc_norm A | acc_norm B | Δ acc_norm |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for task, r in compare_results(a, b).items():
        label = "**average**" if task == "average" else task
        lines.append(f"| {label} | {_fmt(r['acc_a'])} | {_fmt(r['acc_b'])} | {_fmt(r['acc_delta'], True)} | "
                     f"{_fmt(r['acc_norm_a'])} | {_fmt(r['acc_norm_b'])} | {_fmt(r['acc_norm_delta'], True)} |")
    return "\n".join(lines)
