"""FastV: after decoder layer K, keep the visual tokens the last token attends to most.

Paper: Chen et al., "An Image is Worth 1/2 Tokens After Layer 2: Plug-and-Play Inference Acceleration for Large
Vision-Language Models", arXiv 2403.06764 (ECCV 2024, https://github.com/pkunlp-icler/FastV). Written from the
method's description: at layer K (default 2) the visual tokens are ranked by the attention the last prompt token
pays them at layer K - 1, averaged over heads, and the top ``k`` per image are kept for layers >= K; text tokens are
always kept and keep their positions. The released code needs eager attention for that map; here the one attention
row is recomputed from a hook (``owlore.pruning.in_llm``), so every layer keeps SDPA, and selection runs once at
prefill so the KV cache stays valid during ``generate``.
"""

from __future__ import annotations

import torch

from owlore.pruning.in_llm import LLMSelectionContext
from owlore.pruning.registry import PruningMethod, register

__all__ = ["fastv_select"]


def fastv_select(ctx: LLMSelectionContext) -> torch.Tensor:
    """``(B, I, k)`` sorted positions of the visual tokens with the largest last-token attention, per image."""
    b, images, n = ctx.image_positions.shape
    scores = ctx.last_attention.gather(1, ctx.image_positions.flatten(1)).view(b, images, n)
    top = scores.topk(ctx.k, dim=-1).indices.sort(dim=-1).values
    return ctx.image_positions.gather(2, top)


def _flops(k: int, vision, options) -> float:
    # One query row against the prompt at layer K - 1 (the LLM-side savings are counted by the prefill FLOPs).
    return 2.0 * 2 * (vision.tokens + 64) * vision.lm_hidden


register(PruningMethod(
    name="fastv", select=fastv_select, needs=frozenset({"llm_attention"}), flops=_flops,
    paper="[arXiv 2403.06764](https://arxiv.org/abs/2403.06764)",
    summary="FastV: after LLM layer K, keep the visual tokens the last token attends to most at layer K - 1",
    options=("layer",), stage="llm", default_layer=2,
))
