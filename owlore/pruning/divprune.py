"""DivPrune: keep a maximally diverse subset of the projected visual tokens.

Paper: Alvar et al., "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models",
CVPR 2025, https://github.com/vbdi/divprune. Written from the paper's description of the
max-min diversity problem (MMDP), not from its code.

The greedy MMDP solver starts from the most isolated token and repeatedly adds the token farthest
(``1 - cos``) from everything already kept. A running "closest kept token" vector makes each step
``O(N d)`` per image instead of the ``O(k N)`` gather over all picks, and all images run together.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["divprune_select", "greedy_max_min"]


def greedy_max_min(
    features: torch.Tensor, k: int, *, first: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Greedy diverse selection: repeatedly take ``argmax weight * (1 - max cos to the kept set)``.

    Shared by DivPrune (``weight=None``) and ZOO-Prune's sensitivity-aware selection.

    Args:
        features: ``(batch, N, d)`` token features; cosine distance is taken on them in fp32.
        k: Tokens to keep per image.
        first: ``(batch,)`` index of the first pick of each image.
        weight: Optional ``(batch, N)`` non-negative multiplier of the diversity term.

    Returns:
        ``(batch, k)`` sorted indices.
    """
    unit = F.normalize(features.float(), dim=-1)
    batch, num_tokens, _ = unit.shape
    rows = torch.arange(batch, device=unit.device)
    picks = torch.empty(batch, k, dtype=torch.long, device=unit.device)
    taken = torch.zeros(batch, num_tokens, dtype=torch.bool, device=unit.device)
    closest = torch.full((batch, num_tokens), -float("inf"), device=unit.device)
    pick = first
    for step in range(k):
        picks[:, step] = pick
        taken[rows, pick] = True
        # cos of every token to the new pick: O(N d) per image, the only per-step matmul.
        closest = torch.maximum(closest, torch.einsum("bnd,bd->bn", unit, unit[rows, pick]))
        score = 1.0 - closest
        if weight is not None:
            score = score * weight
        pick = score.masked_fill(taken, -float("inf")).argmax(dim=-1)
    return picks.sort(dim=-1).values


def divprune_select(features: torch.Tensor, k: int) -> torch.Tensor:
    """DivPrune selection on projected tokens.

    The first pick is the token whose nearest neighbour is farthest away, which needs the full
    ``N x N`` cosine matrix once (``O(N^2 d)``); later picks are ``O(N d)`` each.

    Args:
        features: ``(batch, N, d)`` projected visual tokens.
        k: Tokens to keep per image.

    Returns:
        ``(batch, k)`` sorted indices.
    """
    unit = F.normalize(features.float(), dim=-1)
    distance = 1.0 - unit @ unit.transpose(-1, -2)
    distance.diagonal(dim1=-2, dim2=-1).fill_(float("inf"))
    first = distance.min(dim=-1).values.argmax(dim=-1)
    return greedy_max_min(unit, k, first=first)
