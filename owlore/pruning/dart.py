"""DART: keep the visual tokens least duplicated by a few pivot tokens, inside the language model.

Paper: Wen et al., "Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters More",
arXiv 2502.11494 (EMNLP 2025, https://github.com/ZichenWen1/DART). Written from the method's description:

* before decoder layer K (default 2), pivots are the tokens whose layer K - 1 keys (post-RoPE, heads concatenated)
  have the largest L1 norm: 4 among each image's tokens and 4 among the text after the image;
* duplication is the cosine similarity of the final-norm hidden states (the input of layer K) to a pivot; pivot by
  pivot (image pivots first), each takes its quota of the remaining visual tokens least similar to it;
* image pivots are kept, text pivots only guide, every text token is kept, kept tokens keep their positions.

One difference from the released code: there each pivot takes ``budget // pivots`` tokens on top of the image pivots,
so "128" keeps 132; here the budget is exact (``k - image pivots`` split over the pivots, remainder to the first),
so DART is compared with the other methods at the same token count. No attention map is needed (SDPA kept).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from owlore.pruning.in_llm import LLMSelectionContext
from owlore.pruning.registry import PruningMethod, register

__all__ = ["dart_quotas", "dart_select"]


def dart_quotas(k: int, image_pivots: int, text_pivots: int) -> list[int]:
    """Tokens each pivot takes (image pivots first) so that ``image_pivots + sum(quotas) == k``."""
    pivots = image_pivots + text_pivots
    rest = k - image_pivots
    return [rest // pivots + (1 if i < rest % pivots else 0) for i in range(pivots)]


def dart_select(ctx: LLMSelectionContext) -> torch.Tensor:
    """``(B, I, k)`` sorted positions of the kept visual tokens of each image."""
    positions, k = ctx.image_positions, ctx.k
    b, images, n = positions.shape
    rows = torch.arange(b, device=positions.device)
    norms = ctx.keys.float().abs().sum(-1)  # (B, L) L1 norm of the keys
    hidden = F.normalize(ctx.hidden.float(), dim=-1)
    image_hidden = hidden[rows[:, None], positions.flatten(1)].view(b, images, n, -1)
    image_pivots = min(int(ctx.options.get("image_pivots", 4)), k)
    image_pivot_idx = norms.gather(1, positions.flatten(1)).view(b, images, n).topk(image_pivots, -1).indices
    after = (torch.arange(norms.shape[1], device=norms.device)[None] > positions.flatten(1).amax(1)[:, None]) \
        & ctx.attention_mask.bool()
    text_pivots = min(int(ctx.options.get("text_pivots", 4)), int(after.sum(1).min()))
    text_pivot_idx = norms.masked_fill(~after, -float("inf")).topk(text_pivots, -1).indices  # (B, T)
    pivots = torch.cat([image_hidden.gather(2, image_pivot_idx[..., None].expand(-1, -1, -1, hidden.shape[-1])),
                        hidden[rows[:, None], text_pivot_idx][:, None].expand(-1, images, -1, -1)], dim=2)
    taken = torch.zeros(b, images, n, dtype=torch.bool, device=positions.device)
    taken.scatter_(2, image_pivot_idx, True)
    for i, quota in enumerate(dart_quotas(k, image_pivots, text_pivots) if image_pivots + text_pivots else []):
        if quota == 0:
            continue
        similarity = torch.einsum("bind,bid->bin", image_hidden, pivots[:, :, i])
        pick = similarity.masked_fill(taken, float("inf")).topk(quota, dim=-1, largest=False).indices
        taken.scatter_(2, pick, True)
    local = taken.nonzero()[:, 2].view(b, images, k)
    return positions.gather(2, local)


def _flops(k: int, vision, options) -> float:
    # L1 norms + one cosine row per pivot over the visual tokens.
    pivots = options.get("image_pivots", 4) + options.get("text_pivots", 4)
    return 2.0 * pivots * vision.tokens * vision.lm_hidden


register(PruningMethod(
    name="dart", select=dart_select, needs=frozenset({"llm_keys", "llm_hidden"}), flops=_flops,
    paper="[arXiv 2502.11494](https://arxiv.org/abs/2502.11494)",
    summary="DART: pivots by key L1 norm at LLM layer K - 1; keep the visual tokens least similar to the pivots",
    options=("layer", "image_pivots", "text_pivots"), stage="llm", default_layer=2,
))
