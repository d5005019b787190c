"""VisionZip: dominant tokens by [CLS] attention, plus contextual tokens merged from the rest by key similarity.

Paper: Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision Language Models", arXiv 2412.04467
(CVPR 2025, https://github.com/dvlab-research/VisionZip). Written from the method's description and checked against
the behaviour of the released code where the paper is silent:

* dominant: the ``D`` patches with the highest [CLS] attention at the feature layer (heads summed; the mean ranks
  the same);
* contextual: of the ``R = N - D`` remaining tokens (raster order), ``C`` targets at a uniform stride
  ``max(1, R // C)``; every other remaining token joins the target whose head-averaged key is most similar
  (cosine); a contextual token is ``target + mean(joined tokens)`` of the pre-projector features (the released
  code's rule: the target is not averaged in);
* budget: ``C = round(k * 10 / 64)`` (the paper's 64 = 54 + 10, 128 = 108 + 20, 192 = 162 + 30).

Two differences from the released LLaVA code, both forced by transformers' LLaVA: its features drop [CLS]
(``vision_feature_select_strategy="default"``), so all ``D`` dominant tokens are patches (the released code counts
[CLS] as one of them); and each contextual token takes its target's place in raster order (the released code
appends the contextual tokens after the dominant ones), as every method here keeps raster order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from owlore.pruning.registry import PruningMethod, Selection, SelectionContext, register
from owlore.pruning.vit_attention import cls_attention_scores

__all__ = ["visionzip_merge", "visionzip_split"]

CONTEXTUAL_RATIO = 10 / 64


def visionzip_split(k: int, contextual_ratio: float = CONTEXTUAL_RATIO) -> tuple[int, int]:
    """``(dominant, contextual)`` token counts for a budget of ``k`` (at least one dominant token)."""
    contextual = min(k - 1, round(k * contextual_ratio)) if k > 1 else 0
    return k - contextual, contextual


def visionzip_merge(cls_scores: torch.Tensor, keys: torch.Tensor, k: int,
                    contextual_ratio: float = CONTEXTUAL_RATIO) -> Selection:
    """VisionZip's choice for ``k`` tokens per image, as positions plus merge weights.

    Args:
        cls_scores: ``(images, N)`` [CLS] attention to each token.
        keys: ``(images, N, d)`` head-averaged keys of the same layer.
        k: Output tokens per image.
        contextual_ratio: Share of contextual tokens.

    Returns:
        A :class:`Selection`: sorted positions (dominant tokens and contextual targets) and ``(images, k, N)``
        weights (one-hot rows for dominant tokens; 1 at the target + 1/count at each joined token).
    """
    images, n = cls_scores.shape
    dominant_count, contextual = visionzip_split(k, contextual_ratio)
    dominant = cls_scores.topk(dominant_count, dim=-1).indices
    weights = torch.zeros(images, k, n, device=cls_scores.device)
    rows = torch.arange(images, device=cls_scores.device)[:, None]
    weights[rows, torch.arange(dominant_count), dominant] = 1.0
    positions = dominant
    if contextual:
        is_dominant = torch.zeros(images, n, dtype=torch.bool, device=cls_scores.device)
        is_dominant[rows, dominant] = True
        remaining = (~is_dominant).nonzero()[:, 1].view(images, n - dominant_count)  # raster order
        step = max(1, remaining.shape[1] // contextual)
        target_slots = torch.arange(0, remaining.shape[1], step, device=cls_scores.device)[:contextual]
        is_target = torch.zeros(remaining.shape[1], dtype=torch.bool, device=cls_scores.device)
        is_target[target_slots] = True
        targets, others = remaining[:, is_target], remaining[:, ~is_target]
        unit = F.normalize(keys.float(), dim=-1)
        similarity = torch.einsum("bod,btd->bot", unit[rows, others], unit[rows, targets])
        joined = F.one_hot(similarity.argmax(dim=-1), contextual).float()  # (images, others, C)
        share = joined / joined.sum(dim=1, keepdim=True).clamp_min(1.0)
        block = torch.zeros(images, contextual, n, device=cls_scores.device)
        block.scatter_add_(2, others[:, None, :].expand(-1, contextual, -1), share.transpose(1, 2))
        block[rows, torch.arange(contextual), targets] += 1.0
        weights[:, dominant_count:] = block
        positions = torch.cat([dominant, targets], dim=1)
    order = positions.argsort(dim=-1)
    return Selection(indices=positions.gather(1, order), weights=weights.gather(1, order[..., None].expand(-1, -1, n)))


def _select(ctx: SelectionContext) -> Selection:
    enc = ctx.enc
    scores = cls_attention_scores(enc.query, enc.key, scale=enc.scale)
    keys = enc.key.float().mean(dim=1)
    if enc.cls_dropped:
        scores, keys = scores[:, 1:], keys[:, 1:]
    return visionzip_merge(scores, keys, ctx.k, ctx.options.get("contextual_ratio", CONTEXTUAL_RATIO))


def _flops(k: int, vision, options) -> float:
    n, d = vision.tokens - 1, vision.hidden
    _, contextual = visionzip_split(k, options.get("contextual_ratio", CONTEXTUAL_RATIO))
    head_dim = vision.hidden // vision.heads
    # [CLS] row + key cosines (remaining x targets) + the merge (k x N weights on d_v features)
    return 2.0 * n * d + 2.0 * (n - k) * contextual * head_dim + 2.0 * k * n * d


register(PruningMethod(
    name="visionzip", select=_select, needs=frozenset({"attention", "cls"}), flops=_flops,
    paper="[arXiv 2412.04467](https://arxiv.org/abs/2412.04467)",
    summary="VisionZip: dominant tokens by [CLS] attention + contextual tokens merged by key similarity",
    options=("contextual_ratio",),
))
