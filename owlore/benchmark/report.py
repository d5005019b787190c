"""The benchmark as markdown and plots: quality at each column's chosen learning rate, the whole learning-rate grid,
memory by kind and time per column, failures; ``bench.png`` (memory by kind, optimizer state, step times) and
``pareto.png`` (held-out quality against memory above the model, one point per column with its seed spread)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from owlore.benchmark.aggregate import REFERENCE, key_of
from owlore.benchmark.records import KIND_FIELDS, LOSS_TAIL, WARMUP_STEPS
from owlore.benchmark.runs import lr_text

GIB, MIB = 2**30, 2**20
QUALITY_NAMES = {"exact_match": "EM", "f1": "F1", "rougeL": "ROUGE-L", "perplexity": "ppl", "average": "acc"}


def fmt(s: Mapping[str, Any] | None, spec: str, scale: float = 1.0, *, mean: bool = False) -> str:
    """``median (min–max)`` (or ``mean ± std`` with ``mean``) of a spread; the bare value for one run."""
    if s is None:
        return "–"
    if mean:
        text = format(s["mean"] / scale, spec)
        return text + (f" ± {format(s['std'] / scale, spec)}" if s["n"] > 1 else "")
    text = format(s["median"] / scale, spec)
    if s["n"] > 1 and s["min"] != s["max"]:
        text += f" ({format(s['min'] / scale, spec)}–{format(s['max'] / scale, spec)})"
    return text


def ratio(s: Mapping[str, Any] | None) -> str:
    return "–" if s is None else fmt(s, ".2f") + "×"


def report_metrics(agg: Mapping[str, Mapping[str, Any]], prefix: str | None) -> list[str]:
    """The quality keys under ``prefix`` (``answers:test`` -> its EM, F1, ROUGE-L) present in the aggregates."""
    keys = dict.fromkeys(k for e in agg.values() for k in (e.get("quality") or {}))
    if prefix is None:
        return [k for k in keys if k != "forgetting"]
    order = list(QUALITY_NAMES)
    mine = [k for k in keys if k.startswith(prefix + ".") and k.rsplit(".", 1)[1] in order]
    if len(mine) > 1:  # "average" repeats the headline metric (ROUGE-L, perplexity) when there are others
        mine = [k for k in mine if not k.endswith(".average")]
    return sorted(mine, key=lambda k: order.index(k.rsplit(".", 1)[1]))


def _name(key: str) -> str:
    suite, _, metric = key.rpartition(".")
    return f"{suite} {QUALITY_NAMES.get(metric, metric)}"


def _entries(agg: Mapping[str, Mapping[str, Any]]) -> list[tuple[str, Mapping[str, Any]]]:
    return [(k, e) for k, e in agg.items() if not k.startswith("_")]


def quality_table(agg: Mapping[str, Mapping[str, Any]], chosen: Mapping[str, Mapping[str, Any]],
                  meta: Mapping[str, Any]) -> list[str]:
    """One row per column at its chosen learning rate: held-out quality (mean ± std over seeds), forgetting,
    memory and time against the reference."""
    keys = report_metrics(agg, meta.get("report"))
    header = ["column", "method", "lr (chosen)", *(_name(k) for k in keys), "forgetting (general ppl)",
              "peak − load (MiB)", f"× {REFERENCE}", f"step × {REFERENCE}", "tokens/s", "final loss", "seeds"]
    lines = ["| " + " | ".join(header) + " |", "|---|---|---|" + "---:|" * (len(header) - 3)]
    base = agg.get("_base", {}).get("quality", {})
    if base:
        cells = ["base model", "–", "–", *(fmt(base.get(k), ".2f" if k.endswith("perplexity") else ".3f") for k in keys),
                 "0", "–", "–", "–", "–", "–", "–"]
        lines.append("| " + " | ".join(cells) + " |")
    for label, c in chosen.items():
        e = agg[c["key"]]
        q, m, r = e["quality"], e["metrics"], e["ratio"]
        fg = q.get("forgetting")
        cells = [label, e["method"], lr_text(c["lr"]) if c["lr"] else "config",
                 *(fmt(q.get(k), ".2f" if k.endswith("perplexity") else ".3f", mean=True) for k in keys),
                 "–" if fg is None else fmt({**fg, "mean": 100 * fg["mean"], "std": 100 * fg["std"]}, "+.1f",
                                            mean=True) + " %",
                 fmt(m["memory_above_load_bytes"], ".0f", MIB), ratio(r["memory_above_load_bytes"]),
                 ratio(r["step_median_s"]), fmt(m["tokens_per_second"], ",.0f"), fmt(m["final_loss"], ".3f"),
                 str(e["ok"])]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def grid_table(agg: Mapping[str, Mapping[str, Any]], chosen: Mapping[str, Mapping[str, Any]],
               select: str) -> list[str]:
    """The selection metric of every column at every learning rate (chosen in bold)."""
    lrs = sorted({e["lr"] for _, e in _entries(agg) if e["lr"] is not None})
    lines = [f"| column | {' | '.join(lr_text(x) for x in lrs)} |", "|---|" + "---:|" * len(lrs)]
    for label in dict.fromkeys(e["label"] for _, e in _entries(agg)):
        cells = []
        for lr in lrs:
            e = next((e for _, e in _entries(agg) if e["label"] == label and e["lr"] == lr), None)
            s = (e or {}).get("quality", {}).get(select)
            text = "" if e is None else "–" if s is None else fmt(s, ".3f" if s["mean"] < 10 else ".2f", mean=True)
            if label in chosen and chosen[label]["lr"] == lr and s is not None:
                text = f"**{text}**"
            cells.append(text)
        lines.append(f"| {label} | {' | '.join(cells)} |")
    return lines


def memory_table(agg: Mapping[str, Mapping[str, Any]], keys: Sequence[str]) -> list[str]:
    """Memory by kind, time and loss per column (and learning rate)."""
    cuda = {e.get("memory_kind") for _, e in _entries(agg) if e.get("memory_kind")} == {"cuda"}
    mem, base = ("CUDA alloc.", "train begin") if cuda else ("RSS", "load")
    header = ["column", "trainable params", f"peak {mem} (GiB)", f"peak − {base} (MiB)", f"× {REFERENCE}",
              "weights (MiB)", "grads (MiB)", "opt. state (MiB)", "activations (MiB)", "of which logits (MiB)",
              "median step (s)", f"× {REFERENCE}", "max / median step", "tokens / step", "tokens/s", "SVD s / switch",
              "final loss"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for key, e in _entries(agg):
        if key not in keys:
            continue
        m, r = e["metrics"], e["ratio"]
        if not e["ok"]:
            lines.append(f"| {key} | {'failed' if e['failed'] else 'not run yet'} |" + " |" * (len(header) - 2))
            continue
        cells = [key, fmt(m["trainable_parameters"], ",.0f"), fmt(m["peak_memory_bytes"], ".3f", GIB),
                 fmt(m["memory_above_load_bytes"], ".0f", MIB), ratio(r["memory_above_load_bytes"]),
                 *(fmt(m[f], ".0f", MIB) for f in KIND_FIELDS.values()), fmt(m["step_median_s"], ".3f"),
                 ratio(r["step_median_s"]), fmt(m["step_max_over_median"], ".2f"),
                 fmt(m["tokens_per_step"], ".0f"),
                 ("≤ " if e["tokens_estimated"] else "") + fmt(m["tokens_per_second"], ",.0f"),
                 fmt(m["svd_seconds_per_event"], ".3f"), fmt(m["final_loss"], ".4f")]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def render_markdown(agg: Mapping[str, Mapping[str, Any]], chosen: Mapping[str, Mapping[str, Any]] | None,
                    meta: Mapping[str, Any]) -> str:
    """The whole report: command, settings, quality at the chosen learning rates, the grid, memory and time,
    notes, failures."""
    settings = meta.get("settings", {})
    lines = [f"# Benchmark: {meta.get('name', 'bench')}", "", meta.get("description", "") or "", "", "```",
             meta.get("command", ""), "```", "", ", ".join(f"{k} {v}" for k, v in settings.items()), ""]
    entries = _entries(agg)
    done = sum(e["ok"] for _, e in entries)
    total = sum(e["runs"] for _, e in entries)
    lines += [f"{done} of {total} runs done" + (f" ({total - done} not run yet or failed)" if done < total else ""),
              ""]
    if chosen:
        lines += [f"## Held-out quality at each column's learning rate (chosen on `{meta['select']}`)", "",
                  *quality_table(agg, chosen, meta), "",
                  f"## Learning-rate grid: `{meta['select']}` (mean ± std over seeds; chosen in bold)", "",
                  *grid_table(agg, chosen, meta["select"]), ""]
    shown = [c["key"] for c in chosen.values()] if chosen else [k for k, _ in entries]
    if not chosen:
        keys = report_metrics(agg, meta.get("report"))
        if keys:
            lines += ["## Quality", "", "| column | " + " | ".join(_name(k) for k in keys) + " |",
                      "|---|" + "---:|" * len(keys)]
            for key, e in entries:
                lines.append(f"| {key} | " + " | ".join(fmt(e["quality"].get(k), ".3f", mean=True) for k in keys)
                             + " |")
            lines.append("")
    lines += ["## Memory and time" + (" (at the chosen learning rates)" if chosen else ""), "",
              *memory_table(agg, shown), ""]
    notes = ["Peak: training only (reset at train begin); peak − load: minus the memory with only the weights "
             "resident. By kind: live tensors at the probe's peak step (owlore.memory.probe).",
             f"Step times after the first {WARMUP_STEPS} steps; × {REFERENCE}: the ratio to the reference run of the "
             f"same repeat, seed and grid position, then summarised: side by side when the sweep ran in one go, "
             f"hours apart (so only indicative) for columns added later with --only. Final loss: mean of the last "
             f"{LOSS_TAIL:.0%} of the per-step losses. tokens/s: real (non-padding) tokens over the timed steps.",
             "Quality: mean ± std over seeds; forgetting: general-text perplexity after / before − 1 (the base "
             "model's before comes from the sweep's first run)."]
    lines += [f"- {n}" for n in notes]
    for key, e in entries:
        for f in e["failed"]:
            lines += ["", f"## {key} failed (seed {f['seed']}, repeat {f['repeat'] + 1}, exit {f['returncode']})",
                      "", "```", f["stderr_tail"] or "(no stderr)", "```"]
    return "\n".join(lines) + "\n"


def plot_bench(agg: Mapping[str, Mapping[str, Any]], rows: Sequence[Mapping[str, Any]], path: str | Path, *,
               title: str = "") -> Path | None:
    """(a) stacked live bytes by kind per column, (b) optimizer state per step of layer-switching columns,
    (c) seconds per step. None when no run finished."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from owlore.layerwise.plotting import save_figure

    keys = [k for k, e in _entries(agg) if e["ok"]]
    if not keys:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(max(15.0, 0.9 * len(keys) + 11), 5.0))

    def med(key: str, field: str) -> float:
        s = agg[key]["metrics"].get(field)
        return s["median"] / GIB if s else 0.0

    bottom = [0.0] * len(keys)
    x = list(range(len(keys)))
    parts = [("weights", "weights_bytes", "tab:gray"), ("gradients", "gradients_bytes", "tab:orange"),
             ("optimizer state", "optimizer_state_peak_bytes", "tab:red"),
             ("activations", "activations_bytes", "tab:blue")]
    for name, field, color in parts:
        vals = [med(k, field) - (med(k, "logits_bytes") if field == "activations_bytes" else 0.0) for k in keys]
        axes[0].bar(x, vals, bottom=bottom, color=color, label=name)
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    vals = [med(k, "logits_bytes") for k in keys]
    axes[0].bar(x, vals, bottom=bottom, color="tab:cyan", label="logits (head + loss)")
    axes[0].scatter(x, [med(k, "weights_bytes") + med(k, "memory_above_load_bytes") or math.nan for k in keys],
                    color="magenta", marker="D", s=25, zorder=4, label="weights + measured peak above load")
    axes[0].set_xticks(x)
    axes[0].set_xticklabels(keys, rotation=35, ha="right", fontsize=7)
    axes[0].set_ylabel("GiB")
    axes[0].set_title("(a) live tensor bytes by kind at the peak step")
    axes[0].legend(fontsize=7)
    for key in keys:
        r = next((r for r in rows if r["status"] == "ok" and key_of(r["label"], r["lr"]) == key), None)
        if r is None:
            continue
        curve = r.get("optimizer_state_series") or {}
        if r.get("layer_switching") and curve.get("bytes"):
            axes[1].plot(curve["step"], [b / MIB for b in curve["bytes"]], label=key)
        if r.get("step_seconds"):
            axes[2].plot(range(1, len(r["step_seconds"]) + 1), r["step_seconds"], marker=".", label=key)
    for ax, ylabel, t in ((axes[1], "optimizer state (MiB)", "(b) optimizer state per step, layer switching"),
                          (axes[2], "seconds", "(c) step time (first run)")):
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        ax.set_title(t)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)
    return save_figure(fig, path, title=title)


def plot_pareto(agg: Mapping[str, Mapping[str, Any]], chosen: Mapping[str, Mapping[str, Any]], prefix: str,
                path: str | Path, *, title: str = "") -> Path | None:
    """Held-out quality (the report's headline metric, mean ± std over seeds) against peak memory above the loaded
    model, one point per column at its chosen learning rate. None without data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from owlore.layerwise.plotting import save_figure

    keys = report_metrics(agg, prefix)
    headline = next((k for k in keys if k.endswith(("rougeL", "perplexity"))), keys[0] if keys else None)
    pts = []
    for label, c in chosen.items():
        e = agg[c["key"]]
        q, mem = e["quality"].get(headline or ""), e["metrics"].get("memory_above_load_bytes")
        if q is not None and mem is not None:
            pts.append((label, mem["median"] / MIB, q["mean"], q["std"], (mem["max"] - mem["min"]) / MIB / 2))
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 5.0))
    for label, mem, q, std, mem_err in pts:
        ax.errorbar(mem, q, yerr=std or None, xerr=mem_err or None, fmt="o", capsize=3)
        ax.annotate(label, (mem, q), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlabel("peak memory above the loaded model (MiB)")
    ax.set_ylabel(_name(headline) + (" (lower is better)" if headline.endswith("perplexity") else ""))
    ax.grid(alpha=0.3)
    return save_figure(fig, path, title=title or "quality vs memory")
