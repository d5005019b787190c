"""Layerwise Outlier Distribution (LOD): the per-decoder-layer outlier ratio that OwLore samples layers by.

OwLore, arXiv 2405.18380 (Li et al., 2024), takes the metric from OWL, arXiv 2310.05175 (Yin et al., 2023;
luuyin/OWL). For every ``nn.Linear`` j of decoder layer l, the Wanda score of a weight is
``A_j[r, c] = |W_j[r, c]| * sqrt(mean over tokens of x_c^2)``, with ``x`` the linear's input on calibration text.
All scores of the layer are pooled into one vector ``S_l`` and the layer's outlier ratio, in percent, is
``D_l = 100 * #{s in S_l : s > M * mean(S_l)} / |S_l|``.

Implementation notes:
* One dense forward pass over the calibration batches with forward pre-hooks that keep a running sum of squared
  inputs per input channel (fp64), so memory is O(channels), not O(activations). Nothing is pruned during the
  LOD pass, so this equals OWL's layer-by-layer pass.
* Padding positions (``attention_mask == 0``) do not count.
* ``logits_to_keep=1`` (skip the ``[B, T, vocab]`` logits) is passed only when ``forward`` names it; a forward
  is never retried, since the hooks already counted whatever ran before an exception.
* The pooled vector is never concatenated: scores live per linear (fp32, one layer at a time), their mean is
  summed in fp64, then the count above ``M * mean`` is taken per linear.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterable, Mapping
from contextlib import ExitStack

import torch
from torch import nn

from owlore.layerwise.layers import find_decoder_layers, is_conv1d, linear_modules
from owlore.parallel.sharded import is_sharded

logger = logging.getLogger(__name__)

Batch = torch.Tensor | Mapping[str, torch.Tensor]


class _ChannelStats:
    """Running sum of x_c^2 over (non-padding) tokens for one linear's input."""

    def __init__(self) -> None:
        self.sum_sq: torch.Tensor | None = None
        self.count = 0


def _as_batch(batch: Batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(batch, torch.Tensor):
        return batch.to(device), None
    if "input_ids" not in batch:
        raise ValueError(f"calibration batch dict needs 'input_ids'; got keys {sorted(batch)}")
    mask = batch.get("attention_mask")
    return batch["input_ids"].to(device), None if mask is None else mask.to(device)


def _forward_kwargs(model: nn.Module) -> dict[str, object]:
    """Extra forward arguments, decided once from the signature (not by trying a forward and catching TypeError).

    ``logits_to_keep`` (``num_logits_to_keep`` before transformers 4.45) only when named explicitly: ``**kwargs``
    alone does not show that the model honours it. ``use_cache=False`` when named or ``**kwargs`` is there.
    """
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # no introspectable signature: plain call
        return {}
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    kwargs: dict[str, object] = {}
    if "use_cache" in params or var_kw:
        kwargs["use_cache"] = False
    for name in ("logits_to_keep", "num_logits_to_keep"):
        if name in params and params[name].kind is not inspect.Parameter.VAR_KEYWORD:
            kwargs[name] = 1
            break
    return kwargs


def _dequantized_weight(module: nn.Module) -> torch.Tensor:
    """The weight as a float matrix ``[out, in]`` (GPT-2 Conv1D transposed, bitsandbytes 4-bit dequantised)."""
    w = module.weight
    if getattr(w, "quant_state", None) is not None:  # bitsandbytes Params4bit
        import bitsandbytes.functional as bnbf

        w = bnbf.dequantize_4bit(w.data, w.quant_state)
    elif getattr(w, "SCB", None) is not None:  # bitsandbytes Int8Params
        w = w.data.float() * w.SCB.float().unsqueeze(1) / 127.0
    w = w.detach()
    return w.t() if is_conv1d(module) else w


def _layer_ratio(linears: list[tuple[nn.Module, _ChannelStats]], threshold: float) -> float:
    """Outlier ratio (percent) of one layer from its linears' weights and input statistics.

    Scores are materialised one layer at a time in fp32 (a 7B layer: ~0.8 GB), summed in fp64.
    """
    scores = []
    for module, stats in linears:
        if stats.sum_sq is None or stats.count == 0:
            raise RuntimeError(f"linear {type(module).__name__} saw no calibration tokens (is it used in forward?)")
        w = _dequantized_weight(module)
        if is_sharded(w):  # an FSDP2 shard: gather this one weight (every rank calibrates the same layers)
            w = w.full_tensor()
        norm = (stats.sum_sq / stats.count).sqrt().to(device=w.device, dtype=torch.float32)
        scores.append(w.float().abs().mul_(norm))
    n = sum(s.numel() for s in scores)
    mean = sum(s.sum(dtype=torch.float64) for s in scores) / n
    cutoff = threshold * mean.item()
    above = sum(int((s > cutoff).sum()) for s in scores)
    return 100.0 * above / n


@torch.no_grad()
def compute_outlier_ratios(
    model: nn.Module,
    batches: Iterable[Batch],
    *,
    threshold: float = 5.0,
    layers: nn.ModuleList | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Per-decoder-layer outlier ratio in percent (OWL's LOD), shape ``[num_layers]``, float64 on CPU.

    Args:
        model: a causal LM (anything ``find_decoder_layers`` understands); it is run in its current dtype.
        batches: ``input_ids`` LongTensors ``[B, T]``, or dicts with ``input_ids`` and optional
            ``attention_mask`` (zeros mark padding, which is ignored).
        threshold: OWL's M: a weight is an outlier when its score exceeds ``M`` times the layer's mean score.
        layers: the decoder blocks, if ``find_decoder_layers`` cannot find them.
        progress: show a tqdm bar over batches.
    """
    if threshold <= 0:
        raise ValueError(f"threshold must be > 0, got {threshold}")
    layers = find_decoder_layers(model) if layers is None else layers
    device = next(model.parameters()).device
    per_layer: list[list[tuple[nn.Module, _ChannelStats]]] = []
    current_mask: dict[str, torch.Tensor | None] = {"mask": None}

    def make_hook(stats: _ChannelStats):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0]
            mask = current_mask["mask"]
            if mask is not None and x.dim() == 3 and x.shape[:2] == mask.shape:
                x = x[mask]
            x = x.reshape(-1, x.shape[-1])
            # Reduce in fp32 without an fp64 copy of the activations; accumulate across batches in fp64.
            sq = torch.linalg.vector_norm(x, dim=0, dtype=torch.float32).double().pow(2)
            stats.sum_sq = sq if stats.sum_sq is None else stats.sum_sq + sq
            stats.count += x.shape[0]

        return hook

    was_training = model.training
    model.eval()
    with ExitStack() as stack:
        stack.callback(model.train, was_training)  # also when a forward raises
        for layer in layers:
            entries = []
            for _, module in linear_modules(layer):
                stats = _ChannelStats()
                stack.callback(module.register_forward_pre_hook(make_hook(stats)).remove)
                entries.append((module, stats))
            if not entries:
                raise ValueError(f"decoder layer {type(layer).__name__} contains no nn.Linear modules")
            per_layer.append(entries)
        iterator = batches
        if progress:
            from tqdm.auto import tqdm

            iterator = tqdm(batches, desc="outlier ratios", unit="batch")
        # Only the layers' inputs matter: skip the [B, T, vocab] logits (GBs at 7B, 2048 tokens) where possible.
        extra = _forward_kwargs(model)
        n_batches = 0
        for batch in iterator:
            input_ids, mask = _as_batch(batch, device)
            current_mask["mask"] = None if mask is None else mask.bool()
            model(input_ids=input_ids, attention_mask=mask, **extra)
            n_batches += 1
    if n_batches == 0:
        raise ValueError("compute_outlier_ratios got no calibration batches")
    ratios = torch.tensor([_layer_ratio(entries, threshold) for entries in per_layer], dtype=torch.float64)
    logger.info("outlier ratios (M=%s, %d batches): %s", threshold, n_batches,
                " ".join(f"{r:.3f}" for r in ratios.tolist()))
    return ratios
