"""One benchmark row per run, read from its ``owlore_record.json``: memory, memory by kind, time, loss, quality.

Everything here is a pure function of a record, so the numbers in a table are unit-tested on synthetic ones.

Memory: the peak of training (reset at train begin) and that peak minus the memory with only the weights resident
(CPU: RSS after loading and touching the weights; CUDA: allocated at train begin). Live bytes by kind come from
the memory probe (``owlore.memory.probe``) at its peak step. Tokens/s are real (non-padding) tokens over the
timed steps. Quality: every evaluation of the run, flattened to ``<suite>.<metric>`` (``answers:test.rougeL``,
``perplexity:general.perplexity``, ``demo.average``), after training and, where the run measured it, before.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from owlore.benchmark.runs import RECORD, RUN_FILE, Fingerprint, Run, read_json, same_run, tail

WARMUP_STEPS = 2
"""Steps left out of the median step time (first-step allocations, lazy inits, the first projection SVD)."""
LOSS_TAIL = 0.1
"""Final loss = mean of this last fraction of the logged losses (at least one)."""
KIND_FIELDS = {"weights": "weights_bytes", "gradients": "gradients_bytes",
               "optimizer_state": "optimizer_state_peak_bytes", "activations": "activations_bytes",
               "logits": "logits_bytes"}
"""Probe kind -> row field (the kind's bytes at the probe's peak step)."""
QUALITY_KEYS = ("exact_match", "f1", "rougeL", "perplexity", "nll", "average")


def step_stats(seconds: Sequence[float], warmup: int = WARMUP_STEPS) -> dict[str, Any]:
    """Median, mean and max step time after ``warmup`` steps (all steps when there are no more than ``warmup``).

    The median is the steady state; the mean and the max keep the rare expensive steps (layer switches, SVDs).
    """
    skip = warmup if len(seconds) > warmup else 0
    timed = list(seconds[skip:])
    if not timed:
        return {"step_median_s": None, "step_mean_s": None, "step_max_s": None, "step_max_over_median": None,
                "timed_steps": 0, "warmup_skipped": 0}
    med = statistics.median(timed)
    return {"step_median_s": med, "step_mean_s": statistics.fmean(timed), "step_max_s": max(timed),
            "step_max_over_median": max(timed) / med if med else None, "timed_steps": len(timed),
            "warmup_skipped": skip}


def final_loss(losses: Sequence[float], tail_fraction: float = LOSS_TAIL) -> float | None:
    """Mean of the last ``tail_fraction`` of the logged losses (at least one): less noisy than the last loss."""
    if not losses:
        return None
    k = max(1, math.ceil(tail_fraction * len(losses)))
    return statistics.fmean(losses[-k:])


def quality(evals: Mapping[str, Any] | None) -> dict[str, float]:
    """``{"<suite>.<metric>": value}`` of a run's evaluations (only the numeric metrics)."""
    out = {}
    for suite, res in (evals or {}).items():
        for key in QUALITY_KEYS:
            v = (res or {}).get(key)
            if isinstance(v, int | float) and not isinstance(v, bool):
                out[f"{suite}.{key}"] = float(v)
    return out


def svd_per_event(series: Mapping[str, Sequence[Any]], switch_steps: set[int]) -> tuple[float | None, float | None]:
    """(total SVD seconds, SVD seconds per event): an event is a layer switch (the step after it, where the new
    layers' first GaLore step computes their bases), else any step with an SVD (GaLore's refreshes)."""
    svd = list(series.get("svd_seconds") or [])
    if not svd or all(v is None for v in svd):
        return None, None
    steps = list(series.get("step") or [])
    total = sum(v or 0.0 for v in svd)
    events = ([v or 0.0 for s, v in zip(steps, svd, strict=False) if s in switch_steps] if switch_steps
              else [v for v in svd if v])
    return total, (sum(events) / len(events) if events else None)


def probe_fields(record: Mapping[str, Any]) -> dict[str, Any]:
    """Memory by kind at the probe's peak step, the optimizer-state curve, the SVD cost per switch."""
    prof = record["summary"].get("memory_profile") or {}
    peak, series = prof.get("peak") or {}, prof.get("series") or {}
    out: dict[str, Any] = {field: peak.get(kind) for kind, field in KIND_FIELDS.items()}
    out["live_peak_bytes"] = peak.get("total")
    w = out["weights_bytes"]
    out["live_above_weights_bytes"] = peak["total"] - w if peak.get("total") is not None and w is not None else None
    curve = list(series.get("optimizer_state") or [])
    out["optimizer_state_max_bytes"] = max(curve, default=None)
    out["optimizer_state_series"] = {"step": list(series.get("step") or []), "bytes": curve}
    history = record.get("history")
    out["layer_switching"] = history is not None
    out["switches"] = len(history or [])
    out["svd_seconds_total"], out["svd_seconds_per_event"] = svd_per_event(
        series, {h["step"] + 1 for h in history or []})  # a switch at step s falls in the step logged s + 1
    return out


def parse_record(record: Mapping[str, Any], *, label: str, batch: int, seq: int, method: str | None = None,
                 lr: float | None = None, seed: int | None = None, repeat: int = 0, grid: int = 0,
                 warmup: int = WARMUP_STEPS) -> dict[str, Any]:
    """One row from a run's record. Without token counts tokens/s is ``batch * seq`` per step, an upper bound
    (``tokens_estimated``)."""
    s = record["summary"]
    kind = s.get("memory_kind", "rss")
    peak = s.get("train_peak_memory_bytes") or s.get("peak_memory_bytes")
    baseline = s.get("memory_at_train_begin_bytes") if kind == "cuda" else s.get("rss_after_load_bytes")
    seconds = list(s.get("step_seconds") or [])
    stats = step_stats(seconds, warmup)
    skip = stats["warmup_skipped"]
    tokens = s.get("step_tokens")
    estimated = not tokens or len(tokens) != len(seconds)
    timed_tokens = batch * seq * stats["timed_steps"] if estimated else sum(tokens[skip:])
    timed_seconds = sum(seconds[skip:])
    return {
        "label": label, "method": method or s.get("method"), "lr": lr, "seed": seed, "repeat": repeat,
        "grid": grid, "status": "ok", "returncode": 0,
        "trainable_parameters": s.get("trainable_parameters"), "memory_kind": kind,
        "peak_memory_bytes": peak, "peak_is_training_only": bool(s.get("train_peak_is_training_only")),
        "baseline_memory_bytes": baseline,
        "memory_above_load_bytes": peak - baseline if peak is not None and baseline is not None else None,
        "train_peak_reserved_bytes": s.get("train_peak_reserved_bytes"),
        "optimizer_state_bytes": s.get("optimizer_state_bytes"), **stats,
        "tokens_per_step": (timed_tokens / stats["timed_steps"]) if stats["timed_steps"] else None,
        "tokens_per_second": timed_tokens / timed_seconds if timed_seconds > 0 else None,
        "tokens_estimated": estimated,
        "final_loss": final_loss(s.get("log_losses") or []), "train_loss": s.get("train_loss"),
        "optimizer_steps": s.get("optimizer_steps"), "train_seconds": s.get("train_seconds"),
        "wall_seconds": s.get("wall_seconds"), "step_seconds": seconds,
        "after": quality(s.get("eval_after")), "before": quality(s.get("eval_before")),
        "layers_sampled": s.get("layers_sampled"), **probe_fields(record),
    }


def failed_row(label: str, *, method: str, lr: float | None, seed: int | None, repeat: int, returncode: int | None,
               stderr_tail: str, status: str = "failed", grid: int = 0) -> dict[str, Any]:
    """A run that exited non-zero, left no record, or has not run yet (``status="missing"``)."""
    return {"label": label, "method": method, "lr": lr, "seed": seed, "repeat": repeat, "grid": grid,
            "status": status,
            "returncode": returncode, "stderr_tail": stderr_tail}


def read_row(run: Run, *, batch: int, seq: int, fingerprint: Fingerprint | None = None) -> dict[str, Any]:
    """The row of a planned run from its folder: parsed, failed (with the stderr tail) or missing (nothing there,
    or another run's record: ``same_run``)."""
    key = {"method": run.column.method, "lr": run.lr, "seed": run.seed, "repeat": run.repeat, "grid": run.grid}
    meta = read_json(run.out_dir / RUN_FILE)
    record = read_json(run.out_dir / RECORD)
    if not isinstance(meta, dict) or not same_run(meta, run.command, fingerprint):
        return failed_row(run.label, **key, returncode=None, stderr_tail="", status="missing")
    if meta.get("returncode") == 0 and record is not None:
        try:
            row = parse_record(record, label=run.label, batch=batch, seq=seq, **key)
        except (KeyError, TypeError, ValueError) as e:  # a record from an older train.py
            return failed_row(run.label, **key, returncode=1, stderr_tail=f"unreadable record: {e!r}")
        row["output_dir"] = str(run.out_dir)
        return row
    err = run.out_dir / "train.stderr"
    text = tail(err.read_text(errors="replace")) if err.is_file() else ""
    return failed_row(run.label, **key, returncode=meta.get("returncode"), stderr_tail=text)
