"""Benchmark rows summarised: per column and learning rate over seeds and repeats, ratios to the reference taken
within a repeat, forgetting against the base model, and each column's learning rate chosen on validation.

Host noise (a shared CPU, steal time) moves step times by tens of percent between runs, so a ratio is
``column / reference`` of two runs made side by side (same repeat, seed and grid position), then summarised;
noise common to both cancels, which a ratio of medians would not do. That holds when the sweep ran in its own
interleaved order; a column added later (``--only``) pairs with a reference timed hours before, and the report says so.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from owlore.benchmark.runs import lr_text

REFERENCE = "full"
METRICS = ("trainable_parameters", "peak_memory_bytes", "baseline_memory_bytes", "memory_above_load_bytes",
           "train_peak_reserved_bytes", "optimizer_state_bytes", "step_median_s", "step_mean_s", "step_max_s",
           "step_max_over_median", "tokens_per_step", "tokens_per_second", "final_loss", "train_loss",
           "train_seconds", "wall_seconds", "weights_bytes", "gradients_bytes", "optimizer_state_peak_bytes",
           "activations_bytes", "logits_bytes", "live_peak_bytes", "live_above_weights_bytes",
           "optimizer_state_max_bytes", "svd_seconds_total", "svd_seconds_per_event")
RATIO_METRICS = ("peak_memory_bytes", "memory_above_load_bytes", "optimizer_state_bytes", "step_median_s",
                 "step_mean_s", "tokens_per_second", "live_above_weights_bytes", "activations_bytes",
                 "gradients_bytes", "train_peak_reserved_bytes")
GENERAL_PPL = "perplexity:general.perplexity"


def spread(values: Iterable[float | None]) -> dict[str, Any] | None:
    """Median, mean, std (sample; 0 for one value), min, max and count of the values that are not None."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None
    return {"median": statistics.median(vals), "mean": statistics.fmean(vals),
            "std": statistics.stdev(vals) if len(vals) > 1 else 0.0, "min": min(vals), "max": max(vals),
            "n": len(vals)}


def key_of(label: str, lr: float | None) -> str:
    """The aggregate key of a column at one learning rate: ``owlore@3e-04`` (just the label without a grid)."""
    return label if lr is None else f"{label}@{lr_text(lr)}"


def base_quality(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """The base model's scores: the ``before`` evaluations of the runs that made them (identical weights)."""
    out: dict[str, float] = {}
    for r in rows:
        if r["status"] == "ok":
            for k, v in (r.get("before") or {}).items():
                out.setdefault(k, v)
    return out


def forgetting(after: Mapping[str, float], base: Mapping[str, float]) -> float | None:
    """Relative rise of the general-text perplexity over the base model's (0.05 = 5 % worse), or None."""
    a, b = after.get(GENERAL_PPL), base.get(GENERAL_PPL)
    return a / b - 1.0 if a is not None and b else None


def aggregate(rows: Sequence[Mapping[str, Any]], reference: str = REFERENCE) -> dict[str, dict[str, Any]]:
    """Per ``label@lr`` in first-seen order: metrics, quality (after, and forgetting) and ratios as spreads,
    the run counts and failures."""
    base = base_quality(rows)
    ref = {(r["repeat"], r["seed"], r.get("grid", 0)): r for r in rows
           if r["label"] == reference and r["status"] == "ok"}
    ref_any = {(r["repeat"], r["seed"]): r for r in rows if r["label"] == reference and r["status"] == "ok"}
    out: dict[str, dict[str, Any]] = {}
    for key in dict.fromkeys(key_of(r["label"], r["lr"]) for r in rows):
        mine = [r for r in rows if key_of(r["label"], r["lr"]) == key]
        ok = [r for r in mine if r["status"] == "ok"]
        entry: dict[str, Any] = {
            "label": mine[0]["label"], "method": mine[0]["method"], "lr": mine[0]["lr"], "runs": len(mine),
            "ok": len(ok), "missing": sum(r["status"] == "missing" for r in mine),
            "failed": [{"seed": r["seed"], "repeat": r["repeat"], "returncode": r["returncode"],
                        "stderr_tail": r.get("stderr_tail", "")} for r in mine if r["status"] == "failed"],
            "memory_kind": ok[0]["memory_kind"] if ok else None,
            "tokens_estimated": any(r.get("tokens_estimated") for r in ok),
            "warmup_timed": any(r.get("warmup_skipped") == 0 for r in ok)}
        entry["metrics"] = {m: spread(r.get(m) for r in ok) for m in METRICS}
        names = dict.fromkeys(k for r in ok for k in r.get("after") or {})
        entry["quality"] = {k: spread(r["after"].get(k) for r in ok) for k in names}
        fg = spread(forgetting(r.get("after") or {}, base) for r in ok)
        if fg is not None:
            entry["quality"]["forgetting"] = fg
        ratios: dict[str, Any] = {}
        for m in RATIO_METRICS:
            vals = []
            for r in ok:
                other = ref.get((r["repeat"], r["seed"], r.get("grid", 0))) or ref_any.get((r["repeat"], r["seed"]))
                if other is not None and r.get(m) is not None and other.get(m):
                    vals.append(r[m] / other[m])
            ratios[m] = spread(vals)
        entry["ratio"] = ratios
        out[key] = entry
    if base:
        out["_base"] = {"label": "base model", "quality": {k: spread([v]) for k, v in base.items()}}
    return out


def choose(agg: Mapping[str, Mapping[str, Any]], metric: str, *,
           lower_is_better: bool = False) -> dict[str, dict[str, Any]]:
    """Each column's best learning rate by the mean of ``metric`` (a validation metric, never the held-out one):
    ``{label: {"key", "lr", "value", "grid": {lr_text: value}}}``. Columns with no value are left out."""
    out: dict[str, dict[str, Any]] = {}
    for key, e in agg.items():
        if key.startswith("_"):
            continue
        s = (e.get("quality") or {}).get(metric)
        if s is None:
            continue
        best = out.get(e["label"])
        grid = {**(best or {}).get("grid", {}), lr_text(e["lr"]) if e["lr"] else "-": s["mean"]}
        better = best is None or (s["mean"] < best["value"] if lower_is_better else s["mean"] > best["value"])
        out[e["label"]] = {"key": key, "lr": e["lr"], "value": s["mean"], "grid": grid} if better else {
            **best, "grid": grid}
    return out
