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

__all__ = ["accuracy_table", "draw_kept", "lm_shape", "plot_accuracy", "to_markdown", "vision_shape"]


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


def _prefill_ms(model: Any, pruner: Any, tokenizer: Any, examples: Sequence[Any], num_image_tokens: int,
                repeats: int) -> tuple[float, int]:
    """Median ms of the language model's prefill of one batch of pruned prompts, and the mean prompt length."""
    from owlore.pruning.accuracy import prepare_inputs, vqa_batch
    from owlore.vision.llava import prompt_ids

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    raw = vqa_batch([prompt_ids(tokenizer, e.question, num_image_tokens) for e in examples], [e.image for e in examples],
                    pad, model)
    with torch.no_grad():
        inputs = prepare_inputs(model, pruner, raw)
        model(**inputs, logits_to_keep=1)  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(**inputs, logits_to_keep=1)
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), int(inputs["attention_mask"].sum(1).float().mean())


def make_pruner(method: str, keep: int, *, zoo_directions: int = 16, seed: int = 0, llm_layer: int | None = None):
    """A ``VisualTokenPruner``; ``llm_layer`` sets K of LLM-stage methods (FastV, DART) and is ignored by others."""
    from owlore.pruning import VisualTokenPruner, get_method

    options = {"layer": llm_layer} if llm_layer is not None and get_method(method).stage == "llm" else None
    return VisualTokenPruner(method, keep, num_directions=zoo_directions, seed=seed, method_options=options)


def accuracy_table(model: Any, tokenizer: Any, examples: Sequence[Any], *, methods: Sequence[str],
                   budgets: Sequence[int], num_image_tokens: int, batch_size: int = 16, repeats: int = 3,
                   zoo_directions: int = 16, seed: int = 0, llm_layer: int | None = None,
                   progress: bool = True) -> list[dict[str, Any]]:
    """One row per (method, budget), the unpruned model first (method ``none``)."""
    from owlore.pruning.flops import prefill_flops_exact, pruned_prefill_flops, selection_flops

    lm, vision = lm_shape(model), vision_shape(model)
    timing = list(examples[:batch_size])
    jobs = [("none", num_image_tokens)] + [(m, k) for k in budgets for m in methods]
    bar = _progress(len(jobs), progress)
    rows: list[dict[str, Any]] = []
    for method, k in jobs:
        pruner = None if method == "none" else make_pruner(method, k, zoo_directions=zoo_directions, seed=seed,
                                                          llm_layer=llm_layer)
        start = time.perf_counter()
        res = vqa_accuracy(model, tokenizer, examples, num_image_tokens=num_image_tokens, pruner=pruner,
                           batch_size=batch_size)
        eval_s = time.perf_counter() - start
        prefill_ms, length = _prefill_ms(model, pruner, tokenizer, timing, num_image_tokens, repeats)
        if pruner is None:
            gflops = prefill_flops_exact(length, lm) / 1e9
        else:  # length: the prompt the model is given (shortened by pre-LLM methods, full for LLM-stage ones)
            text = length - (num_image_tokens if pruner.spec.stage == "llm" else k)
            gflops = pruned_prefill_flops(method, text_tokens=text, visual_tokens=num_image_tokens, kept=k, lm=lm,
                                          layer=pruner.method_options.get("layer")) / 1e9
            pruner.detach(model)  # LLM-stage hooks must not prune the next method's prompts
        row = {"method": method, "tokens": k, "accuracy": res["accuracy"], "n": res["n"],
               "by_kind": {kind: v["accuracy"] for kind, v in res["by_kind"].items()},
               "prefill_ms": prefill_ms, "prompt_tokens": length, "prefill_gflops": gflops,
               "select_gflops": 0.0 if method == "none" else
               selection_flops(method, k, vision, directions=zoo_directions) / 1e9,
               "eval_seconds": eval_s}
        rows.append(row)
        logger.info("%s @ %d tokens: accuracy %.3f, prefill %.0f ms", method, k, row["accuracy"], prefill_ms)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(method=method, tokens=k, acc=f"{row['accuracy']:.3f}")
    if bar is not None:
        bar.close()
    base = rows[0]
    for row in rows:
        row["retention"] = row["accuracy"] / base["accuracy"] if base["accuracy"] else float("nan")
        row["prefill_speedup"] = base["prefill_ms"] / row["prefill_ms"]
        row["flops_reduction"] = base["prefill_gflops"] / row["prefill_gflops"]
    return rows


def to_markdown(rows: Sequence[dict[str, Any]]) -> str:
    kinds = sorted({k for r in rows for k in r["by_kind"]})
    head = ("| method | visual tokens | accuracy | retention | " + " | ".join(kinds)
            + " | prefill ms | prefill speed-up | prefill GFLOPs | select GFLOPs |")
    lines = [head, "|" + "---|" * (9 + len(kinds) - 1)]
    for r in rows:
        per_kind = " | ".join(f"{r['by_kind'].get(k, float('nan')):.3f}" for k in kinds)
        lines.append(f"| {r['method']} | {r['tokens']} | {r['accuracy']:.3f} | {100 * r['retention']:.1f} % | "
                     f"{per_kind} | {r['prefill_ms']:.0f} | {r['prefill_speedup']:.2f}x | "
                     f"{r['prefill_gflops']:.2f} | {r['select_gflops']:.4f} |")
    return "\n".join(lines) + "\n"


def plot_accuracy(rows: Sequence[dict[str, Any]], path: Path, *, title: str = "") -> Path:
    """Accuracy vs visual tokens kept, one line per method, the unpruned accuracy as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from owlore.layerwise.plotting import save_figure

    base = rows[0]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for method in dict.fromkeys(r["method"] for r in rows[1:]):
        mine = sorted((r for r in rows[1:] if r["method"] == method), key=lambda r: r["tokens"])
        ax.plot([r["tokens"] for r in mine], [r["accuracy"] for r in mine], marker="o", label=method)
    ax.axhline(base["accuracy"], color="k", ls="--", label=f"unpruned ({base['tokens']} tokens)")
    ax.set(xscale="log", xlabel="visual tokens kept per image", ylabel="held-out accuracy",
           title=title or "Accuracy vs kept visual tokens")
    ticks = sorted({r["tokens"] for r in rows})
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def kept_indices(model: Any, tokenizer: Any, example: Any, method: str, keep: int, num_image_tokens: int, *,
                 zoo_directions: int = 16, seed: int = 0, llm_layer: int | None = None) -> np.ndarray:
    """Raster indices of the visual tokens ``method`` keeps for ``example`` (its own question as the prompt)."""
    from owlore.pruning.accuracy import vqa_batch
    from owlore.vision.llava import prompt_ids

    pruner = make_pruner(method, keep, zoo_directions=zoo_directions, seed=seed, llm_layer=llm_layer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    with torch.no_grad():
        inputs = pruner.prepare(model, **vqa_batch([prompt_ids(tokenizer, example.question, num_image_tokens)],
                                                   [example.image], pad, model))
        if pruner.spec.stage == "llm":  # chosen inside the language model, at the prefill
            model(**inputs, logits_to_keep=1)
            keep = pruner.llm_keep(model)
            pruner.detach(model)
            image = (inputs["input_ids"][0] == model.config.image_token_id).nonzero()[:, 0]
            kept = keep[0][torch.isin(keep[0], image)] if keep is not None else image
            return (kept - image[0]).cpu().numpy()
    idx = pruner.last_stats["keep_indices"]
    return np.arange(num_image_tokens) if idx is None else idx[0].cpu().numpy()


def draw_kept(model: Any, tokenizer: Any, examples: Sequence[Any], methods: Sequence[str], keep: int,
              num_image_tokens: int, path: Path, *, zoo_directions: int = 16, seed: int = 0,
              llm_layer: int | None = None) -> Path:
    """A PNG grid: one row per example image, one column per method; dropped patches are dimmed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from owlore.layerwise.plotting import save_figure

    side = int(round(num_image_tokens ** 0.5))
    fig, axes = plt.subplots(len(examples), len(methods), figsize=(1.9 * len(methods), 2.1 * len(examples)),
                             squeeze=False)
    for i, e in enumerate(examples):
        patch = e.image.shape[0] // side
        for j, method in enumerate(methods):
            kept = np.zeros(num_image_tokens, bool)
            kept[kept_indices(model, tokenizer, e, method, keep, num_image_tokens, zoo_directions=zoo_directions,
                              llm_layer=llm_layer,
                              seed=seed)] = True
            mask = np.kron(kept.reshape(side, side), np.ones((patch, patch)))
            shown = np.stack([e.image / 255.0] * 3, -1) * (0.25 + 0.75 * mask[..., None])
            shown[..., 0] = np.maximum(shown[..., 0], 0.35 * (1 - mask))  # dropped patches tinted red
            ax = axes[i, j]
            ax.imshow(shown, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(method, fontsize=9)
            if j == 0:
                ax.set_ylabel(f"{e.question}\n({e.answer})", fontsize=6)
    fig.suptitle(f"kept visual tokens ({keep} of {num_image_tokens}); the question is the prompt", fontsize=9)
    return save_figure(fig, path)


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="pruning accuracy", unit="run")
