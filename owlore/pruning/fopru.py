"""FoPru: focal pruning of visual tokens from one ViT layer's attention.

Paper: Jiang et al., "FoPru: Focal Pruning for Efficient Large Vision-Language Models",
arXiv 2411.14164 (https://arxiv.org/abs/2411.14164). No official code; written from the paper text.

Significance is the column mean (attention received) or row mean of the head-averaged patch-to-patch
attention map, whichever varies more across tokens. "Rank" keeps the global top-k; "row" keeps whole
rows of the patch grid so text lines and horizontally spread objects stay contiguous.
"""

from __future__ import annotations

import math

import torch

from owlore.pruning.registry import PruningMethod, SelectionContext, register
from owlore.pruning.select import topk_select
from owlore.pruning.vit_attention import head_mean_attention

__all__ = ["fopru_rank_select", "fopru_row_select", "fopru_significance", "square_grid"]


def fopru_significance(attention: torch.Tensor) -> torch.Tensor:
    """Per-token significance from a head-averaged attention map.

    Args:
        attention: ``(batch, N, N)`` attention among the visual tokens (CLS row/column already removed),
            averaged over heads.

    Returns:
        ``(batch, N)``: the column mean if its variance exceeds the row mean's, else the row mean, chosen
        per image. With full softmax rows the row mean would be constant, which is why the rule exists.
    """
    received = attention.mean(dim=1)  # column mean: how much attention each token receives
    given = attention.mean(dim=2)  # row mean
    use_received = received.var(dim=-1) > given.var(dim=-1)
    return torch.where(use_received[:, None], received, given)


def fopru_rank_select(significance: torch.Tensor, k: int) -> torch.Tensor:
    """FoPru rank strategy: the global top-``k`` tokens, sorted in raster order."""
    return topk_select(significance, k)


def square_grid(num_tokens: int) -> tuple[int, int]:
    """The ``(rows, cols)`` of a square patch grid.

    Raises:
        ValueError: If ``num_tokens`` is not a perfect square (e.g. the CLS token was kept).
    """
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ValueError(
            f"row selection needs a square patch grid, got {num_tokens} tokens; pass grid=(rows, cols) "
            "or use vision_feature_select_strategy='default' so the CLS token is dropped"
        )
    return side, side


def fopru_row_select(
    significance: torch.Tensor, k: int, *, grid: tuple[int, int] | None = None
) -> torch.Tensor:
    """FoPru row strategy: keep the highest-scoring whole rows of the patch grid.

    ``k // cols`` whole rows are kept (ranked by summed significance). When ``k`` is not a multiple of
    the row length, the remaining ``k % cols`` tokens are the best-scoring contiguous run of the next
    ranked row, so the budget is met exactly and every image keeps the same count.

    Args:
        significance: ``(batch, N)`` scores in raster order.
        k: Tokens to keep per image.
        grid: ``(rows, cols)`` of the patch grid; square by default.

    Returns:
        ``(batch, k)`` sorted indices.
    """
    batch, num_tokens = significance.shape
    rows, cols = grid if grid is not None else square_grid(num_tokens)
    if rows * cols != num_tokens:
        raise ValueError(f"grid {rows}x{cols} does not match {num_tokens} tokens")
    scores = significance.view(batch, rows, cols)
    row_order = scores.sum(dim=-1).argsort(dim=-1, descending=True, stable=True)
    full, rest = divmod(k, cols)
    keep_row = torch.zeros(batch, rows, dtype=torch.bool, device=significance.device)
    keep_row.scatter_(1, row_order[:, :full], True)
    mask = keep_row[:, :, None].expand(batch, rows, cols).reshape(batch, num_tokens).clone()
    if rest:
        partial = row_order[:, full]
        values = scores.gather(1, partial[:, None, None].expand(batch, 1, cols)).squeeze(1)
        csum = torch.nn.functional.pad(values.cumsum(dim=-1), (1, 0))
        start = (csum[:, rest:] - csum[:, :-rest]).argmax(dim=-1)
        cols_kept = start[:, None] + torch.arange(rest, device=significance.device)
        mask.scatter_(1, partial[:, None] * cols + cols_kept, True)
    return mask.nonzero()[:, 1].view(batch, k)


def _significance(ctx: SelectionContext) -> torch.Tensor:
    enc = ctx.enc
    attention = head_mean_attention(enc.query, enc.key, scale=enc.scale)
    if enc.cls_dropped:
        attention = attention[:, 1:, 1:]
    return fopru_significance(attention)


def _attention_flops(k: int, vision, options) -> float:
    # The one N x N attention map recomputed from the hooked queries and keys.
    return 2.0 * vision.tokens**2 * vision.hidden


register(PruningMethod(
    name="fopru_rank", select=lambda ctx: fopru_rank_select(_significance(ctx), ctx.k),
    needs=frozenset({"attention"}), flops=_attention_flops, paper="[arXiv 2411.14164](https://arxiv.org/abs/2411.14164)",
    summary="FoPru: global top-k of one ViT layer's attention significance",
))
register(PruningMethod(
    name="fopru_row", select=lambda ctx: fopru_row_select(_significance(ctx), ctx.k, grid=ctx.options.get("grid")),
    needs=frozenset({"attention"}), flops=_attention_flops, paper="[arXiv 2411.14164](https://arxiv.org/abs/2411.14164)",
    summary="FoPru: whole rows of the patch grid with the highest summed significance", options=("grid",),
))
