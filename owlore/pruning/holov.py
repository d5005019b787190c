"""HoloV: holistic visual-token pruning: the budget is spread over spatial crops, then spent inside each crop.

Paper: Zou et al., "Don't Just Chase 'Highlighted Tokens' in MLLMs: Revisiting Visual Holistic Context Retention",
arXiv 2510.02912 (NeurIPS 2025, https://github.com/obananas/HoloV). Attention-only pruners keep the few most salient
tokens, which cluster on one object; HoloV first splits the image into crops, gives each crop a share of the budget
by its score, and keeps the best tokens of each crop, so every region keeps some context. Written from the method's
description:

* crops: a ``g × g`` grid of the patch grid, ``g² ≈ K`` with ``K = max(1, round(16 · (N / 576) · (64 / k)))``
  (16 crops for 64 of 576 tokens, fewer for larger budgets, as the authors' Qwen port scales it);
* token score ``t_i = â_i + α · v_i / mean(v)``: ``â`` the [CLS] attention at the feature layer over its mean, ``v``
  the variance of the token's cosine similarities to the other tokens of its crop (projected features), ``α = 0.09``;
* crop score: the mean ``t`` of its tokens; crop budgets proportional to it (largest remainder, capped at the crop's
  size, the rest handed to the other crops); inside a crop the top-``b`` tokens by ``t``; raster order kept.

Where this differs from the released code (issues #13, #15 of obananas/HoloV): the code cuts the raster sequence
into 1-D strips while the paper draws 2-D crops (2-D here); it scales the variance term per strip, which makes ``α``
cancel exactly in the budget split and leaves the selection to [CLS] attention alone (one scale per image here, so
the crop's diversity counts); and budget that overflows a full strip is replaced by zero vectors (re-allocated here,
so exactly ``k`` real tokens are kept).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from owlore.pruning.registry import PruningMethod, SelectionContext, register
from owlore.pruning.vit_attention import cls_attention_scores

__all__ = ["allocate_budget", "crop_ids", "holov_scores", "holov_select", "num_crops"]

ALPHA = 0.09


def num_crops(n: int, k: int) -> int:
    """``K``: 16 crops for 64 of 576 tokens, scaled with the grid and inversely with the budget."""
    return max(1, min(n, round(16 * (n / 576) * (64 / max(k, 1)))))


def crop_ids(n: int, crops: int, device: torch.device | None = None) -> torch.Tensor:
    """``(N,)`` crop of each raster token: a ``g × g`` grid of a square patch grid, ``g = round(sqrt(crops))``."""
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"HoloV crops a square patch grid; {n} tokens per image is not one")
    g = max(1, min(side, round(math.sqrt(crops))))
    rows = torch.arange(side, device=device) * g // side
    return (rows[:, None] * g + rows[None, :]).flatten()


def holov_scores(cls_scores: torch.Tensor, features: torch.Tensor, crop: torch.Tensor, *,
                 alpha: float = ALPHA) -> torch.Tensor:
    """``(images, N)`` token scores ``â + α · v / mean(v)`` (see the module docstring)."""
    unit = F.normalize(features.float(), dim=-1)
    sim = unit @ unit.transpose(1, 2)  # (images, N, N)
    same = (crop[:, None] == crop[None, :]) & ~torch.eye(len(crop), dtype=torch.bool, device=crop.device)
    others = same.sum(1).clamp_min(1).float()  # crop size - 1
    mean = (sim * same).sum(-1) / others
    var = ((sim - mean[..., None]).square() * same).sum(-1) / others
    attn = cls_scores.float() / cls_scores.float().mean(-1, keepdim=True).clamp_min(1e-12)
    return attn + alpha * var / var.mean(-1, keepdim=True).clamp_min(1e-12)


def allocate_budget(crop_scores: torch.Tensor, sizes: torch.Tensor, k: int) -> torch.Tensor:
    """``(K,)`` tokens per crop summing to ``k``: proportional to the (non-negative) scores by largest remainder,
    no crop over its size; what a full crop cannot take goes to the others, again by score."""
    budget = torch.zeros_like(sizes)
    weights = crop_scores.clamp_min(0) + 1e-12
    left = k
    while left > 0:
        open_ = budget < sizes
        share = torch.where(open_, weights, torch.zeros_like(weights))
        share = share / share.sum() * left
        add = torch.minimum(share.floor().long(), sizes - budget)
        rest = left - int(add.sum())
        if rest > 0:  # largest remainders first, among crops with room after ``add``
            room = (budget + add) < sizes
            order = torch.where(room, share - share.floor(), torch.full_like(share, -1.0)).argsort(descending=True)
            extra = torch.zeros_like(add)
            extra[order[:min(rest, int(room.sum()))]] = 1
            add = add + extra
        budget, left = budget + add, k - int((budget + add).sum())
    return budget


def holov_select(cls_scores: torch.Tensor, features: torch.Tensor, k: int, *, crops: int | None = None,
                 alpha: float = ALPHA) -> torch.Tensor:
    """``(images, k)`` sorted indices: crop budgets by crop score, then the top tokens of each crop."""
    images, n = cls_scores.shape
    crop = crop_ids(n, crops or num_crops(n, k), cls_scores.device)
    scores = holov_scores(cls_scores, features, crop, alpha=alpha)
    count = int(crop.max()) + 1
    sizes = torch.bincount(crop, minlength=count)
    same = crop[:, None] == crop[None, :]
    idx = torch.arange(n, device=crop.device)
    picks = []
    for b in range(images):
        s = scores[b]
        crop_score = torch.zeros(count, device=s.device).index_add_(0, crop, s) / sizes
        budget = allocate_budget(crop_score, sizes, k)
        better = (s[None, :] > s[:, None]) | ((s[None, :] == s[:, None]) & (idx[None, :] < idx[:, None]))
        rank = (better & same).sum(1)  # rank of each token inside its crop
        picks.append((rank < budget[crop]).nonzero()[:, 0])
    return torch.stack(picks)


def _select(ctx: SelectionContext) -> torch.Tensor:
    enc = ctx.enc
    scores = cls_attention_scores(enc.query, enc.key, scale=enc.scale)
    if enc.cls_dropped:
        scores = scores[:, 1:]
    return holov_select(scores, ctx.projected, ctx.k, crops=ctx.options.get("crops"),
                        alpha=float(ctx.options.get("alpha", ALPHA)))


def _flops(k: int, vision, options) -> float:
    n = vision.tokens - 1
    # [CLS] row + the N x N cosine GEMM of the projected tokens (only same-crop pairs are read)
    return 2.0 * n * vision.hidden + 2.0 * n * n * vision.lm_hidden


register(PruningMethod(
    name="holov", select=_select, needs=frozenset({"attention", "cls", "projected"}), flops=_flops,
    paper="[arXiv 2510.02912](https://arxiv.org/abs/2510.02912)",
    summary="HoloV: budget split over spatial crops by crop score ([CLS] attention + in-crop diversity), "
            "top tokens of each crop",
    options=("crops", "alpha"),
))
