"""The benchmark of ``eval/bench.py``: comparison rows plus live tensor bytes by kind, step-time bursts, SVD cost.

Builds on ``owlore.comparison`` (commands, schedule, one row per run, medians and within-repeat ratios): a bench
row is a comparison row of a run made with ``memory.profile=true``, plus what ``owlore.memory.probe`` recorded:
weights, gradients, optimizer state and saved activations (of which logits) at the probe's peak step, the
optimizer-state curve over the steps, and the SVD seconds spent at layer switches. A benchmark column is a
label running a method with options (``owlore_opt=owlore:memory.chunked_loss=1024``), so one method can appear
several times. Everything here is a pure function of run records, unit-tested on synthetic ones.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from owlore import comparison as cmp

logger = logging.getLogger(__name__)

KIND_FIELDS = {"weights": "weights_bytes", "gradients": "gradients_bytes",
               "optimizer_state": "optimizer_state_peak_bytes", "activations": "activations_bytes",
               "logits": "logits_bytes"}
"""Probe kind -> row field (the kind's bytes at the probe's peak step)."""
METRICS = (*cmp.METRICS, "train_peak_reserved_bytes", *KIND_FIELDS.values(), "live_peak_bytes",
           "live_above_weights_bytes", "optimizer_state_max_bytes", "step_max_s", "step_max_over_median",
           "svd_seconds_total", "svd_seconds_per_event")
RATIO_METRICS = (*cmp.RATIO_METRICS, "train_peak_reserved_bytes", "gradients_bytes", "optimizer_state_peak_bytes",
                 "activations_bytes", "live_peak_bytes", "live_above_weights_bytes", "step_max_over_median")


# ------------------------------------------------------------------------------------------------ columns
def split_overrides(text: str) -> list[str]:
    """``a.b=1,c.d=[x,y]`` -> ``["a.b=1", "c.d=[x,y]"]``: a comma starts a new override only where the next
    piece has its own ``=`` (so list values keep their commas)."""
    out: list[str] = []
    for piece in text.split(","):
        if out and "=" not in piece:
            out[-1] += "," + piece
        elif piece:
            out.append(piece)
    return out


def parse_variant(text: str) -> tuple[str, str, list[str]]:
    """``label=method[:override,override...]`` -> ``(label, method, overrides)``.

    Raises:
        ValueError: without ``label=method``, or a label with ``:``, ``=``, ``/`` or spaces (it names a folder).
    """
    label, sep, rest = text.partition("=")
    method, _, overrides = rest.partition(":")
    if not sep or not label or not method or any(c in label for c in ":=/ ,"):
        raise ValueError(f"--variants {text!r}: expected label=method[:section.key=value,...], e.g. "
                         "owlore_opt=owlore:memory.chunked_loss=1024,training.max_grad_norm=0")
    return label, method, split_overrides(overrides)


# ------------------------------------------------------------------------------------------------ one run
def _at(series: Mapping[str, Sequence[Any]], key: str) -> list[Any]:
    return list(series.get(key) or [])


def svd_per_event(series: Mapping[str, Sequence[Any]], switch_steps: set[int]) -> tuple[float | None, float | None]:
    """(total SVD seconds, SVD seconds per event) from the probe's per-step SVD seconds.

    An event is a layer switch (the step right after it, where the newly trained layers' first GaLore step
    computes their bases) for a layer-switching method, else a step with any SVD (GaLore's projection
    refreshes). None where the optimizer has no SVD clock.
    """
    svd = _at(series, "svd_seconds")
    if not svd or all(v is None for v in svd):
        return None, None
    steps = _at(series, "step")
    total = sum(v or 0.0 for v in svd)
    if switch_steps:
        events = [v or 0.0 for s, v in zip(steps, svd, strict=False) if s in switch_steps]
    else:
        events = [v for v in svd if v]
    return total, (sum(events) / len(events) if events else None)


def probe_fields(record: Mapping[str, Any], warmup: int = cmp.WARMUP_STEPS) -> dict[str, Any]:
    """The bench's fields of one run record: memory by kind at the probe's peak step, the optimizer-state curve,
    the slowest step against the median (a layer switch's SVD burst), SVD seconds per switch."""
    s = record["summary"]
    prof = s.get("memory_profile") or {}
    peak = prof.get("peak") or {}
    series = prof.get("series") or {}
    out: dict[str, Any] = {field: peak.get(kind) for kind, field in KIND_FIELDS.items()}
    out["live_peak_bytes"] = peak.get("total")
    w = out["weights_bytes"]
    out["live_above_weights_bytes"] = peak["total"] - w if peak.get("total") is not None and w is not None else None
    state_curve = _at(series, "optimizer_state")
    out["optimizer_state_max_bytes"] = max(state_curve, default=None)
    out["optimizer_state_series"] = {"step": _at(series, "step"), "bytes": state_curve}
    out["gradients_source"] = prof.get("gradients_source")
    seconds = list(s.get("step_seconds") or [])
    timed = seconds[warmup:] if len(seconds) > warmup else seconds
    med = statistics.median(timed) if timed else None
    out["step_max_s"] = max(timed) if timed else None
    out["step_max_over_median"] = max(timed) / med if med else None
    history = record.get("history")
    out["layer_switching"] = history is not None
    out["switches"] = len(history or [])
    # A switch made in on_step_begin at global step s falls in the step the probe logs as s + 1.
    total, per = svd_per_event(series, {h["step"] + 1 for h in history or []})
    out["svd_seconds_total"], out["svd_seconds_per_event"] = total, per
    out["train_peak_reserved_bytes"] = s.get("train_peak_reserved_bytes")
    return out


def parse_bench_record(record: Mapping[str, Any], *, label: str, method: str, repeat: int, batch: int,
                       seq: int, warmup: int = cmp.WARMUP_STEPS) -> dict[str, Any]:
    """One bench row: ``comparison.parse_record`` under the column's label, plus ``probe_fields``."""
    row = cmp.parse_record(record, method=label, repeat=repeat, batch=batch, seq=seq, warmup=warmup)
    return {**row, "base_method": method, **probe_fields(record, warmup)}


def aggregate(rows: Sequence[Mapping[str, Any]], reference: str = cmp.REFERENCE) -> dict[str, dict[str, Any]]:
    """``comparison.aggregate`` over the bench's metrics (medians, spreads, within-repeat ratios to ``full``)."""
    return cmp.aggregate(rows, reference, metrics=METRICS, ratio_metrics=RATIO_METRICS)


# ------------------------------------------------------------------------------------------------ report
def _mib(m: Mapping[str, Any], key: str, sp: bool) -> str:
    return cmp._fmt(m.get(key), ".1f", cmp.MIB, sp)


def render_markdown(agg: Mapping[str, Mapping[str, Any]], *, command: str, settings: Mapping[str, Any],
                    reference: str = cmp.REFERENCE) -> str:
    """The benchmark as markdown: one row per column, memory by kind, step times, SVD cost, then failures."""
    sp = int(settings.get("repeats", 1)) > 1
    kinds = {e["memory_kind"] for e in agg.values() if e["memory_kind"]}
    cuda = kinds == {"cuda"}
    mem, base = ("CUDA alloc.", "train begin") if cuda else ("RSS", "post-load")
    demo = any(e["metrics"].get("demo_after") for e in agg.values())
    ref = f"× {reference}"
    header = ["method", "trainable params", f"peak {mem} (GiB)", f"peak − {base} (MiB)", ref,
              *(["peak reserved (GiB)"] if cuda else []), "weights (MiB)", "grads (MiB)", "opt. state (MiB)",
              "activations (MiB)", "of which logits (MiB)", "live − weights (MiB)", ref, "median step (s)", ref,
              "max / median step", "tokens/s", "SVD s / switch", "final loss",
              *(["demo acc before → after"] if demo else [])]
    lines = [f"# Benchmark ({len(agg)} columns)", "", "```", command, "```", "",
             ", ".join(f"{k} {v}" for k, v in settings.items()), "",
             "| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for label, e in agg.items():
        m, r = e["metrics"], e["ratio"]
        if not e["ok"]:
            rc = ", ".join(str(f["returncode"]) for f in e["failed"])
            lines.append(f"| {label} | failed (exit {rc}, see below) |" + " |" * (len(header) - 2))
            continue
        cells = [label if not e["failed"] else f"{label} ({e['ok']}/{e['runs']} ok)",
                 cmp._fmt(m["trainable_parameters"], ",.0f", show_spread=False),
                 cmp._fmt(m["peak_memory_bytes"], ".3f", cmp.GIB, sp), _mib(m, "memory_above_load_bytes", sp),
                 cmp._ratio(r["memory_above_load_bytes"], sp),
                 *([cmp._fmt(m["train_peak_reserved_bytes"], ".3f", cmp.GIB, sp)] if cuda else []),
                 *(_mib(m, f, sp) for f in KIND_FIELDS.values()), _mib(m, "live_above_weights_bytes", sp),
                 cmp._ratio(r["live_above_weights_bytes"], sp),
                 cmp._fmt(m["step_median_s"], ".3f", show_spread=sp), cmp._ratio(r["step_median_s"], sp),
                 cmp._fmt(m["step_max_over_median"], ".2f", show_spread=sp),
                 ("≤ " if e["tokens_estimated"] else "") + cmp._fmt(m["tokens_per_second"], ",.0f", show_spread=sp),
                 cmp._fmt(m["svd_seconds_per_event"], ".3f", show_spread=sp),
                 cmp._fmt(m["final_loss"], ".4f", show_spread=sp), *([cmp._acc(m, sp)] if demo else [])]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", *(f"- {n}" for n in _notes(agg, cuda, sp, reference, settings))]
    for label, e in agg.items():
        for f in e["failed"]:
            lines += ["", f"## {label} failed (repeat {f['repeat'] + 1}, exit {f['returncode']})", "", "```",
                      f["stderr_tail"] or "(no stderr)", "```"]
    return "\n".join(lines) + "\n"


def _notes(agg: Mapping[str, Mapping[str, Any]], cuda: bool, sp: bool, reference: str,
           settings: Mapping[str, Any]) -> list[str]:
    peak = ("CUDA max_memory_allocated of training (reset at train begin) and that minus the allocation at train "
            "begin (the weights on the device); reserved: what the caching allocator held" if cuda else
            "peak RSS of training (reset at train begin) and that minus the RSS once the weights were resident")
    notes = [f"Peak: {peak}. Live tensors (owlore.memory.probe) at the step with the most: weights (params + "
             "buffers), gradients (most alive at once), optimizer state, activations saved for backward (of "
             "which logits-sized, the head + loss); live − weights is their part above the model, what peak − "
             f"{'train begin' if cuda else 'post-load'} should be without temporaries and allocator slack.",
             f"Step times after the first {cmp.WARMUP_STEPS} steps; max / median shows the burst of a layer switch "
             "(the new layers' first GaLore SVDs). SVD s / switch: GaLoreAdamW's SVD seconds in the steps after "
             "a layer switch, per switch (galore: per projection refresh). Final loss: mean of the last "
             f"{cmp.LOSS_TAIL:.0%} of the per-step losses."]
    if "malloc_env" in settings and not cuda:
        notes.append(f"Child processes ran with {settings['malloc_env']}: glibc returns freed blocks to the OS, so "
                     "the peak RSS is close to the live bytes, and step times include the page faults of getting "
                     "them back (eval/bench.py --no-malloc-env for step times).")
    if any(e["ok"] and e["warmup_timed"] for e in agg.values()):
        notes.append(f"Some runs had no more than {cmp.WARMUP_STEPS} steps: all their steps are timed.")
    if sp:
        notes.append(f"Interleaved repeats: median (min–max); × {reference} is taken within each repeat.")
    return notes


def _first_ok(rows: Sequence[Mapping[str, Any]], label: str) -> Mapping[str, Any] | None:
    return next((r for r in rows if r["method"] == label and r["status"] == "ok"), None)


def plot_bench(agg: Mapping[str, Mapping[str, Any]], rows: Sequence[Mapping[str, Any]], path: str | Path, *,
               title: str = "") -> Path:
    """Three panels: (a) stacked live bytes by kind per column, with the probe's live total and the measured peak
    as markers, (b) optimizer-state bytes per step of the layer-switching columns, (c) seconds per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(agg)
    fig, axes = plt.subplots(1, 3, figsize=(max(15.0, 1.2 * len(labels) + 11), 5.0))
    ax = axes[0]
    bottom = [0.0] * len(labels)

    def med(label: str, key: str) -> float:
        s = agg[label]["metrics"].get(key)
        return s["median"] / cmp.GIB if s else 0.0

    parts = [("weights", lambda lb: med(lb, "weights_bytes"), "tab:gray"),
             ("gradients", lambda lb: med(lb, "gradients_bytes"), "tab:orange"),
             ("optimizer state", lambda lb: med(lb, "optimizer_state_peak_bytes"), "tab:red"),
             ("activations", lambda lb: med(lb, "activations_bytes") - med(lb, "logits_bytes"), "tab:blue"),
             ("logits (head + loss)", lambda lb: med(lb, "logits_bytes"), "tab:cyan")]
    x = list(range(len(labels)))
    for name, value, color in parts:
        vals = [value(lb) for lb in labels]
        ax.bar(x, vals, bottom=bottom, color=color, label=name)
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    cuda = {e["memory_kind"] for e in agg.values() if e["memory_kind"]} == {"cuda"}
    measured = [med(lb, "peak_memory_bytes") if cuda else (med(lb, "weights_bytes")
                                                            + med(lb, "memory_above_load_bytes")) for lb in labels]
    # gradients and activations peak at different times: the stack is each kind's maximum, the bar marks what
    # was alive at once, the diamond what the process measured
    ax.scatter(x, [med(lb, "live_peak_bytes") or math.nan for lb in labels], color="black", marker="_", s=600,
               linewidths=2, zorder=3, label="live at once (probe)")
    ax.scatter(x, [v or math.nan for v in measured], color="magenta", marker="D", s=25, zorder=4,
               label="peak allocated" if cuda else "weights + (peak RSS − post-load)")
    ax.set_xticks(x)
    ax.set_xticklabels(labels, rotation=30, ha="right")
    ax.set_ylabel("GiB, each kind's maximum in the probe's peak step")
    ax.set_title("(a) live tensor bytes by kind")
    ax.legend(fontsize=7)
    for label in labels:
        r = _first_ok(rows, label)
        if r is None:
            continue
        curve = r.get("optimizer_state_series") or {}
        if r.get("layer_switching") and curve.get("bytes"):
            axes[1].plot(curve["step"], [b / cmp.MIB for b in curve["bytes"]], label=label)
        if r.get("step_seconds"):
            axes[2].plot(range(1, len(r["step_seconds"]) + 1), r["step_seconds"], marker=".", label=label)
    for a, ylabel, t in ((axes[1], "optimizer state (MiB)", "(b) optimizer state per step, layer switching"),
                         (axes[2], "seconds", "(c) step time (first repeat)")):
        a.set_xlabel("optimizer step")
        a.set_ylabel(ylabel)
        a.set_title(t)
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=7)
    from owlore.plotting import save_figure

    return save_figure(fig, path, title=title)
