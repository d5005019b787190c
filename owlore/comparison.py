"""Side-by-side comparison of training methods: per-run commands, records parsed into rows, aggregates, report.

``eval/compare.py`` runs ``train.py`` once per method (and repeat) in a fresh process, so no run inherits another's
allocator state, caches or peak memory, and reads each run's ``owlore_record.json``. Everything here is a pure
function of those records (``run_process`` aside, which starts one run), so the numbers in the table can be
unit-tested on synthetic ones.

Host noise (a shared CPU, steal time) moves step times by tens of percent between runs; repeats are interleaved
(A B C A B C) and ratios to the reference method are taken within a repeat, where both runs saw the same host.
"""

from __future__ import annotations

import logging
import math
import statistics
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

REFERENCE = "full"
WARMUP_STEPS = 2
"""Steps left out of the median step time (first-step allocations, lazy inits, the first projection SVD)."""
LOSS_TAIL = 0.1
"""Final loss = mean of this last fraction of the logged losses (at least one)."""
GIB, MIB = 2**30, 2**20

# Metrics aggregated per method (median, min, max over repeats) and those also given as a ratio to REFERENCE.
METRICS = ("trainable_parameters", "peak_memory_bytes", "baseline_memory_bytes", "memory_above_load_bytes",
           "optimizer_state_bytes", "step_median_s", "step_mean_s", "tokens_per_second", "final_loss",
           "train_loss", "demo_before", "demo_after", "train_seconds", "wall_seconds")
RATIO_METRICS = ("peak_memory_bytes", "memory_above_load_bytes", "optimizer_state_bytes", "step_median_s",
                 "step_mean_s", "tokens_per_second")


# ------------------------------------------------------------------------------------------------ commands
def config_args(method: str, *, config_dir: Path, base: Path, base_given: bool = False) -> list[str]:
    """``--config configs/smollm2_<method>.yaml`` when that file exists and no base was asked for, else the base
    file plus ``method=`` (the method's sections at their defaults, unless overridden)."""
    path = Path(config_dir) / f"smollm2_{method}.yaml"
    if path.is_file() and not base_given:
        return ["--config", str(path)]
    return ["--config", str(base), f"method={method}"]


def run_dir(out: Path, method: str, repeat: int, repeats: int) -> Path:
    """``<out>/<method>`` for a single repeat, ``<out>/<method>_r<k>`` (1-based) for several."""
    return Path(out) / (method if repeats == 1 else f"{method}_r{repeat + 1}")


def run_command(method: str, *, steps: int, batch: int, seq: int, output_dir: Path, config_dir: Path, base: Path,
                demo_limit: int | None = None, overrides: Sequence[str] = (), python: str = sys.executable,
                script: str = "train.py", base_given: bool = False) -> list[str]:
    """The ``train.py`` command line of one run; every run gets the same model, data, batch and steps.

    Losses are logged every step (the final-loss tail needs them) and input tokens counted without padding;
    logging happens after ``on_step_end``, outside the timed step. ``overrides`` come last, so they win; one
    written ``<method>:section.key=value`` goes to that method's runs only (``owlore:owlore.gamma=2``: a
    method's own section is an error in another method's config).
    """
    cmd = [python, script, *config_args(method, config_dir=config_dir, base=base, base_given=base_given),
           f"training.max_steps={steps}", f"training.per_device_train_batch_size={batch}",
           f"data.max_seq_length={seq}", f"training.output_dir={output_dir}", "training.save_strategy=no",
           "training.report_to=none", "training.logging_steps=1",
           "training.include_num_input_tokens_seen=non_padding", "eval.demo=true"]
    if demo_limit is not None:
        cmd.append(f"eval.demo_limit={demo_limit}")
    return [*cmd, *method_overrides(method, overrides)]


def method_overrides(method: str, overrides: Sequence[str]) -> list[str]:
    """The overrides for ``method``'s runs: the unprefixed ones and those prefixed ``<method>:``."""
    return column_overrides(method, method, overrides)


def column_overrides(label: str, method: str, overrides: Sequence[str]) -> list[str]:
    """The overrides for one column of a benchmark: a column ``label`` runs ``method`` (``owlore_opt`` runs
    owlore with options), so it takes the unprefixed ones and those prefixed ``<method>:`` or ``<label>:``, in
    the order given."""
    out = []
    for o in overrides:
        prefix, sep, rest = o.partition(":")
        if sep and "=" not in prefix:  # a ':' inside the value (a URL, a path) is no prefix
            if prefix in (method, label):
                out.append(rest)
        else:
            out.append(o)
    return out


def schedule(methods: Sequence[str], repeats: int) -> list[tuple[int, str]]:
    """``(repeat, method)`` in interleaved order: A B C A B C, so slow host phases hit every method alike."""
    return [(r, m) for r in range(repeats) for m in methods]


# ------------------------------------------------------------------------------------------------ one run
def step_stats(seconds: Sequence[float], warmup: int = WARMUP_STEPS) -> dict[str, Any]:
    """Median and mean step time after ``warmup`` steps (all steps when there are no more than ``warmup``).

    The median is the steady state; the mean keeps the rare expensive steps (layer switches, projection SVDs).
    """
    skip = warmup if len(seconds) > warmup else 0
    timed = list(seconds[skip:])
    if not timed:
        return {"step_median_s": None, "step_mean_s": None, "timed_steps": 0, "warmup_skipped": 0}
    return {"step_median_s": statistics.median(timed), "step_mean_s": statistics.fmean(timed),
            "timed_steps": len(timed), "warmup_skipped": skip}


def final_loss(losses: Sequence[float], tail: float = LOSS_TAIL) -> float | None:
    """Mean of the last ``tail`` fraction of the logged losses (at least one): less noisy than the last loss."""
    if not losses:
        return None
    k = max(1, math.ceil(tail * len(losses)))
    return statistics.fmean(losses[-k:])


def _demo(evals: Mapping[str, Any] | None) -> float | None:
    demo = (evals or {}).get("demo") or {}
    return demo.get("average")


def parse_record(record: Mapping[str, Any], *, method: str, repeat: int, batch: int, seq: int,
                 warmup: int = WARMUP_STEPS) -> dict[str, Any]:
    """One comparison row from a run's ``owlore_record.json``.

    Memory: the peak of training (where the run could reset the peak, else of the process) and that peak minus
    the memory with only the weights resident (CPU: RSS after loading and touching the weights; CUDA: allocated
    at train begin, once the weights are on the device). Tokens/s are real (non-padding) tokens over the timed
    steps; without token counts, ``batch * seq`` per step, an upper bound (``tokens_estimated``).
    """
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
        "method": method, "repeat": repeat, "status": "ok", "returncode": 0,
        "trainable_parameters": s.get("trainable_parameters"),
        "memory_kind": kind,
        "peak_memory_bytes": peak,
        "peak_is_training_only": bool(s.get("train_peak_is_training_only")),
        "process_peak_memory_bytes": s.get("peak_memory_bytes"),
        "baseline_memory_bytes": baseline,
        "memory_above_load_bytes": peak - baseline if peak is not None and baseline is not None else None,
        "optimizer_state_bytes": s.get("optimizer_state_bytes"),
        **stats,
        "tokens_per_second": timed_tokens / timed_seconds if timed_seconds > 0 else None,
        "tokens_estimated": estimated,
        "final_loss": final_loss(s.get("log_losses") or []),
        "train_loss": s.get("train_loss"),
        "demo_before": _demo(s.get("eval_before")),
        "demo_after": _demo(s.get("eval_after")),
        "optimizer_steps": s.get("optimizer_steps"),
        "train_seconds": s.get("train_seconds"),
        "wall_seconds": s.get("wall_seconds"),
        "step_seconds": seconds,
    }


def failed_row(method: str, repeat: int, returncode: int, stderr_tail: str) -> dict[str, Any]:
    """The row of a run that exited non-zero (or left no record): the table names it with its stderr tail."""
    return {"method": method, "repeat": repeat, "status": "failed", "returncode": returncode,
            "stderr_tail": stderr_tail}


RECORD = "owlore_record.json"
"""The run record ``train.py`` writes into its output directory (``owlore.callback.RECORD_FILE``)."""


def run_process(cmd: Sequence[str], out_dir: Path, *, cwd: Path, timeout: float | None = None,
                env: Mapping[str, str] | None = None, who: str = "compare.py") -> tuple[int, str]:
    """Run one ``train.py`` process with its logs in ``out_dir`` (``train.log``, ``train.stderr``), after deleting
    a record left by an earlier run; the exit code (124 when ``timeout`` killed it) and the stderr tail.

    The one place eval/compare.py and eval/bench.py start their runs.
    """
    import subprocess

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / RECORD).unlink(missing_ok=True)  # never read a stale record from an earlier run
    with (out_dir / "train.log").open("w") as out, (out_dir / "train.stderr").open("w") as err:
        try:
            rc = subprocess.run(list(cmd), stdout=out, stderr=err, cwd=cwd, env=None if env is None else dict(env),
                                timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            err.write(f"\n{who}: killed after {timeout:.0f} s (--timeout)\n")
            rc = 124
    return rc, tail((out_dir / "train.stderr").read_text(errors="replace"))


def tail(text: str, lines: int = 15, chars: int = 2000) -> str:
    """The last ``lines`` lines (at most ``chars`` characters) of a log, where the error usually is."""
    out = "\n".join(text.rstrip().splitlines()[-lines:])
    return out[-chars:]


# ------------------------------------------------------------------------------------------------ aggregate
def spread(values: Iterable[float | None]) -> dict[str, Any] | None:
    """Median, min, max and count of the values that are not None (None if there are none)."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


def aggregate(rows: Sequence[Mapping[str, Any]], reference: str = REFERENCE, *, metrics: Sequence[str] = METRICS,
              ratio_metrics: Sequence[str] = RATIO_METRICS) -> dict[str, dict[str, Any]]:
    """Per method, in first-seen order: ``{metric: spread}``, ``ratio`` ``{metric: spread of per-repeat ratios}``,
    the run count and failures.

    A ratio is ``method / reference`` within one repeat (both runs must have succeeded), then summarised over
    repeats: host noise common to a repeat cancels, which a ratio of medians would not do.
    """
    ref = {r["repeat"]: r for r in rows if r["method"] == reference and r["status"] == "ok"}
    out: dict[str, dict[str, Any]] = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        ok = [r for r in mine if r["status"] == "ok"]
        entry: dict[str, Any] = {"runs": len(mine), "ok": len(ok),
                                 "failed": [{"repeat": r["repeat"], "returncode": r["returncode"],
                                             "stderr_tail": r.get("stderr_tail", "")}
                                            for r in mine if r["status"] != "ok"],
                                 "memory_kind": ok[0]["memory_kind"] if ok else None,
                                 "tokens_estimated": any(r.get("tokens_estimated") for r in ok),
                                 "peak_is_training_only": all(r.get("peak_is_training_only") for r in ok),
                                 "warmup_timed": any(r.get("warmup_skipped") == 0 for r in ok)}
        entry["metrics"] = {m: spread(r.get(m) for r in ok) for m in metrics}
        ratios: dict[str, Any] = {}
        for m in ratio_metrics:
            vals = []
            for r in ok:
                base = ref.get(r["repeat"], {}).get(m)
                if r.get(m) is not None and base:
                    vals.append(r[m] / base)
            ratios[m] = spread(vals)
        entry["ratio"] = ratios
        out[method] = entry
    return out


# ------------------------------------------------------------------------------------------------ report
def _fmt(s: Mapping[str, Any] | None, fmt: str, scale: float = 1.0, show_spread: bool = True) -> str:
    if s is None:
        return "–"
    text = format(s["median"] / scale, fmt)
    if show_spread and s["n"] > 1:
        text += f" ({format(s['min'] / scale, fmt)}–{format(s['max'] / scale, fmt)})"
    return text


def _ratio(s: Mapping[str, Any] | None, show_spread: bool) -> str:
    return "–" if s is None else _fmt(s, ".2f", show_spread=show_spread) + "×"


def _acc(m: Mapping[str, Any], show_spread: bool) -> str:
    before, after = m["demo_before"], m["demo_after"]
    if before is None and after is None:
        return "–"
    return f"{_fmt(before, '.3f', show_spread=show_spread)} → {_fmt(after, '.3f', show_spread=show_spread)}"


def render_markdown(agg: Mapping[str, Mapping[str, Any]], *, command: str, settings: Mapping[str, Any],
                    reference: str = REFERENCE) -> str:
    """The comparison as markdown: the command line, the settings, one table row per method, then failures.

    With several repeats a cell is ``median (min–max)``; ``× full`` columns are per-repeat ratios.
    """
    repeats = int(settings.get("repeats", 1))
    sp = repeats > 1
    kinds = {e["memory_kind"] for e in agg.values() if e["memory_kind"]}
    mem = "CUDA" if kinds == {"cuda"} else "RSS" if kinds <= {"rss"} else "RSS/CUDA"
    base = "post-load" if mem == "RSS" else "train begin" if mem == "CUDA" else "baseline"
    ref = f"× {reference}"
    header = ["method", "trainable params", f"peak {mem} (GiB)", f"peak − {base} (GiB)", ref, "opt. state (MiB)",
              "median step (s)", ref, "mean step (s)", "tokens/s", "final loss", "demo acc before → after"]
    lines = ["# Method comparison", "", "```", command, "```", "",
             ", ".join(f"{k} {v}" for k, v in settings.items()), "",
             "| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 2) + ":---:|"]
    for method, e in agg.items():
        m, r = e["metrics"], e["ratio"]
        if not e["ok"]:
            rc = ", ".join(str(f["returncode"]) for f in e["failed"])
            lines.append(f"| {method} | failed (exit {rc}, see below) |" + " |" * (len(header) - 2))
            continue
        name = method if not e["failed"] else f"{method} ({e['ok']}/{e['runs']} ok)"
        cells = [name, _fmt(m["trainable_parameters"], ",.0f", show_spread=False),
                 _fmt(m["peak_memory_bytes"], ".3f", GIB, sp), _fmt(m["memory_above_load_bytes"], ".3f", GIB, sp),
                 _ratio(r["memory_above_load_bytes"], sp), _fmt(m["optimizer_state_bytes"], ".1f", MIB, sp),
                 _fmt(m["step_median_s"], ".3f", show_spread=sp), _ratio(r["step_median_s"], sp),
                 _fmt(m["step_mean_s"], ".3f", show_spread=sp),
                 ("≤ " if e["tokens_estimated"] else "") + _fmt(m["tokens_per_second"], ",.0f", show_spread=sp),
                 _fmt(m["final_loss"], ".4f", show_spread=sp), _acc(m, sp)]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [f"Step times: median / mean over the optimizer steps after the first {WARMUP_STEPS} (the mean "
             "includes layer switches and projection SVDs). Final loss: mean of the last "
             f"{LOSS_TAIL:.0%} of the per-step losses. tokens/s: non-padding tokens over the timed steps "
             "(≤: estimated as batch × seq)."]
    if any(e["ok"] and e["warmup_timed"] for e in agg.values()):
        notes.append(f"Some runs had no more than {WARMUP_STEPS} steps: all their steps are timed, warm-up included.")
    if any(e["ok"] and not e["peak_is_training_only"] for e in agg.values()):
        notes.append("The peak of some runs could not be reset at train begin: it includes loading and evaluation.")
    if sp:
        notes.append(f"{repeats} interleaved repeats: median (min–max); × {reference} is taken within each repeat.")
    lines += ["", *(f"- {n}" for n in notes)]
    failures = [(method, f) for method, e in agg.items() for f in e["failed"]]
    for method, f in failures:
        lines += ["", f"## {method} failed (repeat {f['repeat'] + 1}, exit {f['returncode']})", "", "```",
                  f["stderr_tail"] or "(no stderr)", "```"]
    return "\n".join(lines) + "\n"


def plot_comparison(agg: Mapping[str, Mapping[str, Any]], path: str | Path, *, title: str = "") -> Path:
    """Four bar charts per method: memory above the loaded model, step time, final loss, demo accuracy.

    Error bars span min–max over repeats; a method without a value (failed, or no evaluation) has no bar.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(agg)
    x = list(range(len(methods)))

    def series(metric: str, scale: float = 1.0) -> tuple[list[float], list[list[float]]]:
        meds, errs = [], [[], []]
        for m in methods:
            s = agg[m]["metrics"].get(metric)
            med = s["median"] / scale if s else math.nan
            meds.append(med)
            errs[0].append(med - s["min"] / scale if s else 0.0)
            errs[1].append(s["max"] / scale - med if s else 0.0)
        return meds, errs

    fig, axes = plt.subplots(2, 2, figsize=(max(8.0, 1.4 * len(methods) + 4), 7.5))
    kinds = {e["memory_kind"] for e in agg.values() if e["memory_kind"]}
    mem_label = "peak − train begin (GiB, CUDA)" if kinds == {"cuda"} else "peak − post-load (GiB)"
    panels = [(axes[0][0], "memory_above_load_bytes", GIB, mem_label, "tab:red"),
              (axes[0][1], "step_median_s", 1.0, "median step (s)", "tab:blue"),
              (axes[1][0], "final_loss", 1.0, "final training loss", "tab:green")]
    for ax, metric, scale, label, color in panels:
        meds, errs = series(metric, scale)
        ax.bar(x, meds, yerr=errs, color=color, capsize=3)
        if metric == "step_median_s":
            means, _ = series("step_mean_s")
            ax.scatter(x, means, color="black", marker="D", s=20, zorder=3, label="mean step")
            ax.legend(fontsize=8)
        ax.set_ylabel(label)
    ax = axes[1][1]
    w = 0.38
    for offset, metric, color, label in ((-w / 2, "demo_before", "tab:gray", "before"),
                                         (w / 2, "demo_after", "tab:purple", "after")):
        meds, errs = series(metric)
        ax.bar([i + offset for i in x], meds, w, yerr=errs, color=color, capsize=3, label=label)
    ax.set_ylabel("demo accuracy")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    for ax in (a for row in axes for a in row):
        ax.set_xticks(x)
        ax.set_xticklabels(methods, rotation=30, ha="right")
        for i, m in enumerate(methods):
            if not agg[m]["ok"]:
                ax.text(i, 0, "failed", ha="center", va="bottom", color="red", rotation=90)
    from owlore.plotting import save_figure

    return save_figure(fig, path, title=title)
