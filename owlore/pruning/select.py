"""Budget resolution and the simplest selectors: top-k and random.

Every selector in this package returns a ``(batch, k)`` long tensor of kept token indices, sorted
ascending so the kept tokens keep their original raster order (DivPrune issue #8 shows that unsorted
indices silently change results).
"""

from __future__ import annotations

import math

import torch

from owlore.pruning.registry import PruningMethod, SelectionContext, register

__all__ = ["random_scores", "resolve_keep", "topk_select"]


def resolve_keep(keep: int | float, num_tokens: int) -> int:
    """Turn a budget (tokens per image, or a ratio of them) into a token count in ``[1, num_tokens]``.

    Args:
        keep: An ``int`` >= 1 is a number of tokens per image (values >= ``num_tokens`` mean "keep all");
            a ``float`` in (0, 1] is a ratio, floored (``ratio * num_tokens``) but at least one token.
        num_tokens: Visual tokens per image before pruning.

    Returns:
        The number of tokens to keep per image.

    Raises:
        ValueError: If ``keep`` is not a positive int or a ratio in (0, 1].
    """
    if isinstance(keep, bool) or not isinstance(keep, int | float):
        raise ValueError(f"keep must be an int (tokens per image) or a float ratio in (0, 1], got {keep!r}")
    if isinstance(keep, int):
        if keep <= 0:
            raise ValueError(f"keep must be >= 1 token per image, got {keep}")
        return min(keep, num_tokens)
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep as a ratio must be in (0, 1], got {keep}; pass an int for a token count")
    # The small epsilon makes ratios like 1/3 of 576 land on 192 rather than 191.
    return max(1, min(num_tokens, math.floor(keep * num_tokens + 1e-6)))


def topk_select(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` highest scores per row, sorted in original order.

    Args:
        scores: ``(batch, num_tokens)`` importance scores (higher = keep).
        k: Tokens to keep per row.

    Returns:
        ``(batch, k)`` sorted indices.
    """
    return scores.topk(k, dim=-1).indices.sort(dim=-1).values


def random_scores(batch: int, num_tokens: int, *, generator: torch.Generator) -> torch.Tensor:
    """Uniform random scores: the no-signal baseline every pruning paper should beat.

    Args:
        batch: Number of images.
        num_tokens: Tokens per image.
        generator: Explicit RNG, so runs are reproducible without touching global state.

    Returns:
        ``(batch, num_tokens)`` scores in [0, 1).
    """
    return torch.rand(batch, num_tokens, generator=generator, device=generator.device)


def _select_random(ctx: SelectionContext) -> torch.Tensor:
    features = ctx.enc.features
    return topk_select(random_scores(features.shape[0], features.shape[1], generator=ctx.generator()), ctx.k)


register(PruningMethod(
    name="random", select=_select_random, needs=frozenset(), flops=lambda k, vision, options: 0.0,
    paper="-", summary="uniform random tokens (seeded): the no-signal baseline every method should beat",
))
