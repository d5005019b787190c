"""Accuracy of every visual-token pruning method at several budgets on a trained LLaVA (Fashion-MNIST grid VQA).

For each method and budget: held-out accuracy (``owlore.pruning.accuracy``), retention relative to the unpruned model,
the measured prefill time of the pruned prompt (median over repeats, one batch), the analytic prefill FLOPs of the
language model at that prompt length and the selection FLOPs (``owlore.pruning.flops``). ``draw_kept`` shows which
tokens each method keeps on a few images, so a user sees what a method looks at.

Published comparisons find random selection a strong baseline at moderate budgets (e.g. VisionZip, arXiv 2412.04467;
DivPrune, arXiv 2503.02175); this benchmark keeps it in every table for that reason.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from owlore.pruning.accuracy import vqa_accuracy

logger = logging.getLogger(__name__)

__all__ = ["accuracy_table", "draw_kept", "kind_tables", "lm_shape", "plot_accuracy", "plot_by_kind", "to_markdown",
           "vision_shape"]


def lm_shape(model: Any):
    """``LMShape`` of a LLaVA's language model (for the analytic prefill FLOPs)."""
    from owlore.pruning.flops import LMShape

    t = model.config.text_config
    return LMShape(t.hidden_size, t.intermediate_size, t.num_hidden_layers, t.num_attention_heads,
                   getattr(t, "num_key_value_heads", None) or t.num_attention_heads)


def vision_shape(model: Any):
    """``VisionShape`` of a LLaVA's vision tower and projector."""
    from owlore.pruning.flops import VisionShape

    v = model.config.vision_config
    tokens = (v.image_size // v.patch_size) ** 2 + 1
    return VisionShape(v.hidden_size, v.intermediate_size, v.num_hidden_layers, v.num_attention_heads, tokens,
                       model.config.text_config.hidden_size)


def _prefill_ms(model: Any, pruner: Any, prompter: Any, records: Sequence[Any], repeats: int) -> tuple[float, int]:
    """Median ms of the language model's prefill of one batch of pruned prompts, and the mean prompt length."""
    from owlore.data.vqa_files import load_image
    from owlore.pruning.accuracy import prepare_inputs

    raw = prompter.batch([prompter.prompt(r.question) for r in records], [load_image(r.image) for r in records])
    with torch.no_grad():
        inputs = prepare_inputs(model, pruner, raw)
        model(**inputs, logits_to_keep=1)  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(**inputs, logits_to_keep=1)
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), int(inputs["attention_mask"].sum(1).float().mean())


def make_pruner(method: str, keep: int | float, *, zoo_directions: int = 16, seed: int = 0,
                llm_layer: int | None = None, options: dict[str, dict[str, Any]] | None = None):
    """A ``VisualTokenPruner``; ``llm_layer`` sets K of LLM-stage methods (FastV, DART) and is ignored by others;
    ``options[method]`` are that method's ``method_options`` (e.g. ``{"vscan": {"stage2_keep": 8}}``)."""
    from owlore.pruning import VisualTokenPruner, get_method

    chosen = dict((options or {}).get(method, {}))
    if llm_layer is not None and get_method(method).stage == "llm":
        chosen.setdefault("layer", llm_layer)
    return VisualTokenPruner(method, keep, num_directions=zoo_directions, seed=seed, method_options=chosen or None)


def accuracy_table(model: Any, processor: Any, records: Sequence[Any], *, methods: Sequence[str],
                   budgets: Sequence[int], num_image_tokens: int, batch_size: int = 16, repeats: int = 3,
                   zoo_directions: int = 16, seed: int = 0, llm_layer: int | None = None, prompt: str | None = None,
                   max_new_tokens: int = 16, scoring: str = "auto", method_options: dict | None = None,
                   progress: bool = True) -> list[dict[str, Any]]:
    """One row per (method, budget), the unpruned model first (method ``none``); ``records`` are
    ``owlore.data.vqa_files.VQARecord``, scored by ``owlore.pruning.accuracy.vqa_accuracy``."""
    from owlore.pruning.flops import prefill_flops_exact, pruned_prefill_flops, selection_flops
    from owlore.pruning.models import adapter_for
    from owlore.pruning.vlm_inputs import Prompter

    # analytic FLOPs need LLaVA-1.5's fixed N tokens per image and a CLIP tower (other families: measured ms only)
    analytic = adapter_for(model).name == "llava"
    lm, vision = (lm_shape(model), vision_shape(model)) if analytic else (None, None)
    prompter = Prompter(processor, prompt)
    timing = list(records[:batch_size])
    jobs = [("none", num_image_tokens)] + [(m, k) for k in budgets for m in methods]
    bar = _progress(len(jobs), progress)
    rows: list[dict[str, Any]] = []
    for method, k in jobs:
        pruner = None if method == "none" else make_pruner(method, k, zoo_directions=zoo_directions, seed=seed,
                                                          llm_layer=llm_layer, options=method_options)
        start = time.perf_counter()
        res = vqa_accuracy(model, processor, records, pruner=pruner, batch_size=batch_size, prompt=prompt,
                           max_new_tokens=max_new_tokens, scoring=scoring)
        eval_s = time.perf_counter() - start
        prefill_ms, length = _prefill_ms(model, pruner, prompter, timing, repeats)
        gflops = select = None
        if analytic and pruner is None:
            gflops, select = prefill_flops_exact(length, lm) / 1e9, 0.0
        elif analytic:  # length: the prompt the model is given (shortened by pre-LLM methods, full for LLM-stage)
            text = length - (num_image_tokens if pruner.spec.stage == "llm" else k)
            stats = pruner.last_stats
            gflops = pruned_prefill_flops(method, text_tokens=text, visual_tokens=num_image_tokens, kept=k, lm=lm,
                                          layer=stats.get("llm_layer", pruner.method_options.get("layer")),
                                          kept_after=stats.get("stage2_keep")) / 1e9
            select = selection_flops(method, k, vision, directions=zoo_directions) / 1e9
        if pruner is not None:
            pruner.detach(model)  # LLM-stage hooks must not prune the next method's prompts
        row = {"method": method, "tokens": k, "accuracy": res["accuracy"], "n": res["n"],
               "by_kind": {kind: v["accuracy"] for kind, v in res["by_kind"].items()},
               "kind_n": {kind: v["n"] for kind, v in res["by_kind"].items()}, "scoring": res["scoring"],
               **({"f1": res["f1"]} if "f1" in res else {}),
               "prefill_ms": prefill_ms, "prompt_tokens": length, "prefill_gflops": gflops,
               "select_gflops": select, "eval_seconds": eval_s}
        rows.append(row)
        logger.info("%s @ %s tokens: accuracy %.3f, prefill %.0f ms", method, k, row["accuracy"], prefill_ms)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(method=method, tokens=k, acc=f"{row['accuracy']:.3f}")
    if bar is not None:
        bar.close()
    base = rows[0]
    for row in rows:
        row["retention"] = row["accuracy"] / base["accuracy"] if base["accuracy"] else float("nan")
        row["prefill_speedup"] = base["prefill_ms"] / row["prefill_ms"]
        row["flops_reduction"] = base["prefill_gflops"] / row["prefill_gflops"] if analytic else None
    return rows


def _budget(k: int | float) -> str:
    return str(k) if isinstance(k, int) else f"{k:.3g}"


def kind_tables(rows: Sequence[dict[str, Any]]) -> str:
    """One markdown table per question kind: method × budget, accuracy and retention against the unpruned model
    on that kind (the kinds a method loses show here, hidden in the overall mean)."""
    base, kinds = rows[0], sorted({k for r in rows for k in r["by_kind"]})
    budgets = list(dict.fromkeys(r["tokens"] for r in rows[1:]))
    methods = list(dict.fromkeys(r["method"] for r in rows[1:]))
    cell = {(r["method"], r["tokens"]): r for r in rows[1:]}
    out = []
    for kind in kinds:
        ref = base["by_kind"].get(kind, float("nan"))
        n = base.get("kind_n", {}).get(kind, "?")
        out += [f"**{kind}** ({n} questions; unpruned {ref:.3f})", "",
                "| method | " + " | ".join(_budget(b) for b in budgets) + " |", "|---" * (1 + len(budgets)) + "|"]
        for m in methods:
            cells = []
            for b in budgets:
                acc = cell[(m, b)]["by_kind"].get(kind) if (m, b) in cell else None
                cells.append("-" if acc is None else f"{acc:.3f} ({100 * acc / ref:.0f} %)" if ref else f"{acc:.3f}")
            out.append(f"| {m} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def to_markdown(rows: Sequence[dict[str, Any]]) -> str:
    kinds = sorted({k for r in rows for k in r["by_kind"]})
    head = ("| method | visual tokens | accuracy | retention | " + " | ".join(kinds)
            + " | prefill ms | prefill speed-up | prefill GFLOPs | select GFLOPs |")
    lines = [head, "|" + "---|" * (9 + len(kinds) - 1)]
    for r in rows:
        per_kind = " | ".join(f"{r['by_kind'].get(k, float('nan')):.3f}" for k in kinds)
        select = "-" if r["select_gflops"] is None else f"{r['select_gflops']:.4f}"
        prefill = "-" if r["prefill_gflops"] is None else f"{r['prefill_gflops']:.2f}"
        lines.append(f"| {r['method']} | {_budget(r['tokens'])} | {r['accuracy']:.3f} | {100 * r['retention']:.1f} % | "
                     f"{per_kind} | {r['prefill_ms']:.0f} | {r['prefill_speedup']:.2f}x | {prefill} | {select} |")
    return "\n".join(lines) + "\n"


def plot_accuracy(rows: Sequence[dict[str, Any]], path: Path, *, title: str = "") -> Path:
    """Accuracy vs visual tokens kept, one line per method, the unpruned accuracy as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from owlore.layerwise.plotting import save_figure

    base = rows[0]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for i, method in enumerate(dict.fromkeys(r["method"] for r in rows[1:])):
        mine = sorted((r for r in rows[1:] if r["method"] == method), key=lambda r: r["tokens"])
        ax.plot([r["tokens"] for r in mine], [r["accuracy"] for r in mine], label=method, **_style(i))
    ax.axhline(base["accuracy"], color="k", ls="--", label=f"unpruned ({base['tokens']} tokens)")
    ax.set(xscale="log", xlabel="visual tokens kept per image", ylabel="held-out accuracy",
           title=title or "Accuracy vs kept visual tokens")
    ticks = sorted({r["tokens"] for r in rows[1:]})
    ax.minorticks_off()
    ax.set_xticks(ticks, [_budget(t) for t in ticks])
    ax.legend(fontsize=7, ncol=2)
    return save_figure(fig, path)


def _style(i: int) -> dict[str, Any]:
    """Line style of the ``i``-th method: colour, then marker and dash, so 14 methods stay apart."""
    return {"color": f"C{i % 10}", "marker": "osD^v"[i // 10 % 5], "ls": ("-", "--", ":")[i // 10 % 3]}


def plot_by_kind(rows: Sequence[dict[str, Any]], path: Path, *, title: str = "") -> Path:
    """One panel per question kind: accuracy vs visual tokens kept, one line per method, unpruned dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from owlore.layerwise.plotting import save_figure

    kinds = sorted({k for r in rows for k in r["by_kind"]})
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.6 * len(kinds), 3.8), squeeze=False)
    ticks = sorted({r["tokens"] for r in rows[1:]})
    for ax, kind in zip(axes[0], kinds):
        for i, method in enumerate(dict.fromkeys(r["method"] for r in rows[1:])):
            mine = sorted((r for r in rows[1:] if r["method"] == method and kind in r["by_kind"]),
                          key=lambda r: r["tokens"])
            ax.plot([r["tokens"] for r in mine], [r["by_kind"][kind] for r in mine], label=method, **_style(i))
        ax.axhline(rows[0]["by_kind"].get(kind, float("nan")), color="k", ls="--", label="unpruned")
        ax.set(xscale="log", xlabel="visual tokens kept per image", ylabel="accuracy", title=kind)
        ax.minorticks_off()
        ax.set_xticks(ticks, [_budget(t) for t in ticks])
    axes[0][-1].legend(fontsize=6)
    if title:
        fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)


def kept_indices(model: Any, processor: Any, record: Any, method: str, keep: int, num_image_tokens: int, *,
                 zoo_directions: int = 16, seed: int = 0, llm_layer: int | None = None,
                 prompt: str | None = None) -> np.ndarray:
    """Raster indices of the visual tokens ``method`` keeps for ``record`` (its own question as the prompt)."""
    from owlore.data.vqa_files import load_image
    from owlore.pruning.vlm_inputs import Prompter, move_inputs

    pruner = make_pruner(method, keep, zoo_directions=zoo_directions, seed=seed, llm_layer=llm_layer)
    prompter = Prompter(processor, prompt)
    with torch.no_grad():
        raw = move_inputs(prompter.batch([prompter.prompt(record.question)], [load_image(record.image)]), model)
        inputs = pruner.prepare(model, **raw)
        if pruner.spec.stage == "llm":  # chosen inside the language model, at the prefill
            model(**inputs, logits_to_keep=1)
            keep = pruner.llm_keep(model)
            pruner.detach(model)
            image = (inputs["input_ids"][0] == model.config.image_token_id).nonzero()[:, 0]
            kept = keep[0][torch.isin(keep[0], image)] if keep is not None else image
            return (kept - image[0]).cpu().numpy()
    idx = pruner.last_stats["keep_indices"]
    return np.arange(num_image_tokens) if idx is None else idx[0].cpu().numpy()


def draw_kept(model: Any, processor: Any, records: Sequence[Any], methods: Sequence[str], keep: int,
              num_image_tokens: int, path: Path, *, zoo_directions: int = 16, seed: int = 0,
              llm_layer: int | None = None, prompt: str | None = None) -> Path:
    """A PNG grid: one row per example image, one column per method; dropped patches are dimmed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from owlore.data.vqa_files import load_image
    from owlore.layerwise.plotting import save_figure

    side = int(round(num_image_tokens ** 0.5))
    if side * side != num_image_tokens:
        raise ValueError(f"draw_kept shows a square patch grid; {num_image_tokens} tokens per image is not one")
    patch = max(1, round(168 / side))  # shown at ~168 px, each token a patch x patch square
    fig, axes = plt.subplots(len(records), len(methods), figsize=(1.9 * len(methods), 2.1 * len(records)),
                             squeeze=False)
    for i, r in enumerate(records):
        shown_size = (side * patch, side * patch)  # the image as the model sees it: resized to the grid
        picture = np.asarray(load_image(r.image).resize(shown_size), dtype=np.float32) / 255.0
        for j, method in enumerate(methods):
            kept = np.zeros(num_image_tokens, bool)
            kept[kept_indices(model, processor, r, method, keep, num_image_tokens, zoo_directions=zoo_directions,
                              llm_layer=llm_layer, seed=seed, prompt=prompt)] = True
            mask = np.kron(kept.reshape(side, side), np.ones((patch, patch)))
            shown = picture * (0.25 + 0.75 * mask[..., None])
            shown[..., 0] = np.maximum(shown[..., 0], 0.35 * (1 - mask))  # dropped patches tinted red
            ax = axes[i, j]
            ax.imshow(shown, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(method, fontsize=9)
            if j == 0:
                ax.set_ylabel(f"{r.question}\n({r.answer})", fontsize=6)
    fig.suptitle(f"kept visual tokens ({keep} of {num_image_tokens}); the question is the prompt", fontsize=9)
    return save_figure(fig, path)


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="pruning accuracy", unit="run")
