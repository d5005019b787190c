""""Will it fit on my GPU?": every method and option set whose estimated peak fits a memory budget, cheapest first.

    python -m owlore.memory --fit 24GiB --model meta-llama/Llama-2-7b-hf [--seq 2048] [--batch 8] [--dtype bfloat16]
        [--quality benchmarks/results/manpages_methods/bench.json]

Each candidate is a registered method in its paper setting (``configs/paper/<method>.yaml`` over
``configs/smollm2.yaml`` with the model, batch, sequence and dtype replaced), without and with activation
checkpointing, plus OwLore with each memory option; the estimate is ``owlore.memory.estimator`` (validated within
-6.9 ... -0.8 % of measured peaks). Where a quality benchmark was measured, each method's rank in it is shown
(measured on SmolLM2-135M on our CPU: a guide to the order, not a promise at 7B).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from owlore.errors import UsageError
from owlore.memory.estimator import GIB, MemoryEstimate, estimate_run

REPO = Path(__file__).resolve().parents[2]
BASE = REPO / "configs" / "smollm2.yaml"
UNITS = {"gib": GIB, "gb": 10**9, "mib": 2**20, "mb": 10**6, "": GIB}


@dataclass(frozen=True)
class Candidate:
    name: str
    method: str
    estimate: MemoryEstimate


def parse_budget(text: str) -> int:
    """``24GiB`` / ``24GB`` / ``80`` (GiB) -> bytes.

    Raises:
        UsageError: not a positive number with an optional unit GiB, GB, MiB, MB.
    """
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = (m.group(2).lower() if m else "").removesuffix("ytes")
    if not m or unit not in UNITS or float(m.group(1)) <= 0:
        raise UsageError(f"--fit {text!r}: expected a size such as 24GiB, 80GB or 16 (GiB)")
    return int(float(m.group(1)) * UNITS[unit])


def candidates(model: str, *, seq: int, batch: int, dtype: str,
               overrides: Sequence[str] = ()) -> tuple[list[Candidate], list[str]]:
    """Every method (paper setting) without / with checkpointing, and OwLore with each memory option; plus the
    methods that could not be estimated, with why."""
    from owlore.memory.method_runs import OWLORE_OPTIONS, method_config
    from owlore.methods import REGISTRY

    common = [f"model.name={model}", f"model.dtype={dtype}", f"data.max_seq_length={seq}",
              f"training.per_device_train_batch_size={batch}", "training.use_cpu=false", "eval.demo=false",
              "model.gradient_checkpointing=false", *overrides]
    out, skipped = [], []
    for method in REGISTRY:
        try:
            cfg = method_config([str(BASE)], common, method, "")
            for ckpt in ("off", "all"):
                name = method + (", checkpointing" if ckpt == "all" else "")
                out.append(Candidate(name, method, estimate_run(cfg, checkpointing=ckpt)))
            if method == "owlore":
                out += [Candidate(f"{name}, checkpointing", "owlore", estimate_run(cfg, checkpointing="all", **opts))
                        for name, opts in OWLORE_OPTIONS if "checkpointing" not in opts]
        except (ValueError, KeyError) as e:
            skipped.append(f"{method}: {str(e).splitlines()[0]}")
    return out, skipped


def quality_ranks(path: str | Path | None) -> tuple[dict[str, int], str]:
    """``{method: rank}`` (1 = best held-out score) from a quality benchmark's ``bench.json`` and a line saying
    what was measured; empty when there is none."""
    if path is None or not Path(path).is_file():
        return {}, ""
    data = json.loads(Path(path).read_text())
    chosen, agg, report = data.get("chosen") or {}, data.get("aggregate") or {}, data.get("report")
    if not chosen or not report:
        return {}, ""
    keys = [k for e in agg.values() for k in (e.get("quality") or {}) if k.startswith(report + ".")]
    metric = next((k for k in keys if k.endswith(("rougeL", "perplexity"))), None)
    if metric is None:
        return {}, ""
    lower = metric.endswith("perplexity")
    best: dict[str, float] = {}
    for c in chosen.values():
        e = agg[c["key"]]
        v = (e["quality"].get(metric) or {}).get("mean")
        if v is not None and (e["method"] not in best or (v < best[e["method"]] if lower else v > best[e["method"]])):
            best[e["method"]] = v
    order = sorted(best, key=lambda m: best[m], reverse=not lower)
    return {m: i + 1 for i, m in enumerate(order)}, f"{metric} of `{data.get('name')}` ({len(order)} methods)"


def fit_table(found: Sequence[Candidate], budget: int, ranks: Mapping[str, int], *, quality_note: str = "") -> str:
    """The candidates that fit, cheapest first, as markdown; then how many did not."""
    fits = sorted((c for c in found if c.estimate.total <= budget), key=lambda c: c.estimate.total)
    lines = [f"Fits in {budget / GIB:.1f} GiB: {len(fits)} of {len(found)} candidates (estimated peak, cheapest "
             "first)", "", "| method / options | est. peak GiB | est. peak GB | host GiB | quality rank |",
             "|---|---:|---:|---:|---:|"]
    for c in fits:
        rank = ranks.get(c.method)
        lines.append(f"| {c.name} | {c.estimate.total / GIB:.2f} | {c.estimate.total / 1e9:.1f} | "
                     f"{c.estimate.host / GIB:.2f} | {rank if rank else '–'} |")
    if not fits:
        smallest = min(found, key=lambda c: c.estimate.total, default=None)
        if smallest is not None:
            lines.append(f"| (nothing fits; the smallest is {smallest.name} at {smallest.estimate.total / GIB:.2f} "
                         "GiB: lower --batch or --seq) | | | | |")
    if quality_note:
        lines += ["", f"Quality rank: {quality_note}, measured on SmolLM2-135M (CPU); a guide, not a 7B result."]
    return "\n".join(lines)


def looks_local(model: str) -> bool:
    """A local directory or ``config.json`` (checked here), rather than a hub id or a shipped stand-in's name."""
    from owlore.run.sources import looks_like_path

    return looks_like_path(model) or model.endswith(".json")


def fit(budget: str, model: str, *, seq: int = 2048, batch: int = 8, dtype: str = "bfloat16",
        quality: str | Path | None = None, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Everything ``--fit`` prints, as data: the table, the candidates and what could not be estimated."""
    from owlore.run.sources import check_model_source

    limit = parse_budget(budget)
    if looks_local(model):
        check_model_source(model, key="--model")
    found, skipped = candidates(model, seq=seq, batch=batch, dtype=dtype, overrides=overrides)
    if not found:  # nothing could be estimated: the same reason for every method, most likely the model
        raise UsageError(f"--model {model}: no method could be estimated; the first reason: {skipped[0]}")
    ranks, note = quality_ranks(quality)
    return {"budget_bytes": limit, "table": fit_table(found, limit, ranks, quality_note=note), "skipped": skipped,
            "candidates": [{"name": c.name, "method": c.method, "total_bytes": c.estimate.total,
                            "fits": c.estimate.total <= limit, "quality_rank": ranks.get(c.method)} for c in found]}
