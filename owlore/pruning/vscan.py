"""VScan (first stage): a local scan of a shallow layer plus a global scan of the feature layer, then merging.

Paper: "VScan: Rethinking Visual Token Reduction for Efficient Large Vision-Language Models", arXiv 2505.22654
(code: github.com/Tencent/SelfEvolvingAgent, ``VScan/``). Deep [CLS] attention concentrates on a few global tokens;
a shallow layer still sees local detail. So half the budget is chosen window by window from a shallow layer's
[CLS] attention (the local scan), the other half from the feature layer's (the global scan), and every token not
kept is merged into the kept token it is most similar to. Written from the method's description:

* local scan: the patch grid is split into ``g × g`` windows (``g = 4``: 6 × 6 windows on LLaVA-1.5's 24 × 24, fewer
  when the local half cannot give each window a token); each window keeps its top ``floor(k_local / g²)`` tokens by
  the [CLS] attention of the shallow layer (``shallow_layer``; default CLIP-L's 6th of 24, scaled to the tower's depth);
* global scan: the rest of the budget, the top tokens by the feature layer's [CLS] attention among those not taken;
* merging: each dropped token joins its most cosine-similar kept token (pre-projector features); a kept token
  becomes the mean of itself and its joiners, so no token's information is thrown away outright.

Second stage (optional, ``method_options={"stage2_keep": R2, "layer": K}``): inside the language model, after
decoder layer ``K`` (default half its depth), only the ``R2`` of the ``k`` visual tokens the last prompt token
attends to most at layer ``K - 1`` go on (FastV's rule; the released code scores with layer ``K``'s own attention:
the same last-token row, one layer later). The paper's LLaVA-1.5 setting is ``k = 96``, ``R2 = 32``, ``K = 16`` of 32
("64 tokens" on average over the layers). Without ``stage2_keep``, ``vscan`` spends its whole budget before the LLM.

Differences from the released code: merging happens before the projector, as the paper's figure draws it (the code
merges after it); the split is exact (the code's floor rounding can keep fewer than ``k``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from owlore.pruning.registry import PruningMethod, Selection, SelectionContext, register
from owlore.pruning.vit_attention import cls_attention_scores

__all__ = ["merge_into_kept", "vscan_scan", "windows"]

LOCAL_SHARE = 0.5
WINDOWS_PER_SIDE = 4


def windows(n: int, k_local: int, per_side: int = WINDOWS_PER_SIDE, device=None) -> tuple[torch.Tensor, int]:
    """``(N,)`` window of each raster token and the window count: ``g × g`` windows, ``g`` at most ``per_side`` and
    small enough that every window gets a token."""
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"VScan scans a square patch grid; {n} tokens per image is not one")
    g = max(1, min(per_side, side, math.isqrt(max(k_local, 1))))
    rows = torch.arange(side, device=device) * g // side
    return (rows[:, None] * g + rows[None, :]).flatten(), g * g


def vscan_scan(shallow: torch.Tensor, deep: torch.Tensor, k: int, *, local_share: float = LOCAL_SHARE
               ) -> torch.Tensor:
    """``(images, k)`` sorted indices: per-window top tokens of ``shallow`` attention, then the global top of
    ``deep`` among the rest (both ``(images, N)``)."""
    images, n = shallow.shape
    k_local = int(k * local_share)
    window, count = windows(n, k_local, device=shallow.device)
    per_window = k_local // count if k_local else 0
    taken = torch.zeros(images, n, dtype=torch.bool, device=shallow.device)
    if per_window:
        same = window[:, None] == window[None, :]
        idx = torch.arange(n, device=shallow.device)
        s = shallow.float()
        better = (s[:, None, :] > s[:, :, None]) | ((s[:, None, :] == s[:, :, None]) & (idx[None, :] < idx[:, None]))
        taken = (better & same).sum(-1) < per_window  # rank inside the window
    rest = k - int(taken[0].sum())
    glob = deep.float().masked_fill(taken, -float("inf")).topk(rest, dim=-1).indices
    taken[torch.arange(images, device=shallow.device)[:, None], glob] = True
    return taken.nonzero()[:, 1].view(images, k)


def merge_into_kept(features: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """``(images, k, N)`` merge weights: every dropped token joins its most cosine-similar kept token; each kept
    token is the mean of itself and its joiners."""
    images, n, _ = features.shape
    k = kept.shape[1]
    rows = torch.arange(images, device=features.device)[:, None]
    unit = F.normalize(features.float(), dim=-1)
    nearest = torch.einsum("bnd,bkd->bnk", unit, unit[rows, kept]).argmax(-1)  # (images, N)
    nearest[rows, kept] = torch.arange(k, device=features.device)  # a kept token is its own group
    weights = F.one_hot(nearest, k).float().transpose(1, 2)  # (images, k, N)
    return weights / weights.sum(-1, keepdim=True)


def _select(ctx: SelectionContext) -> Selection:
    enc = ctx.enc
    deep = cls_attention_scores(enc.query, enc.key, scale=enc.scale)
    shallow = cls_attention_scores(enc.shallow_query, enc.shallow_key, scale=enc.scale)
    if enc.cls_dropped:
        deep, shallow = deep[:, 1:], shallow[:, 1:]
    kept = vscan_scan(shallow, deep, ctx.k, local_share=float(ctx.options.get("local_share", LOCAL_SHARE)))
    return Selection(indices=kept, weights=merge_into_kept(enc.features, kept))


def _flops(k: int, vision, options) -> float:
    n, d = vision.tokens - 1, vision.hidden
    # two [CLS] rows + the N x k cosines of the merge + the k x N merge itself (pre-projector features)
    return 2.0 * 2 * n * d + 2.0 * n * k * d + 2.0 * k * n * d


register(PruningMethod(
    name="vscan", select=_select, needs=frozenset({"attention", "cls", "shallow_attention"}), flops=_flops,
    paper="[arXiv 2505.22654](https://arxiv.org/abs/2505.22654)",
    summary="VScan: local scan of a shallow layer's [CLS] attention per window + global scan of the feature layer, "
            "dropped tokens merged into their nearest kept token; optionally (stage2_keep) FastV at LLM layer K",
    options=("shallow_layer", "local_share", "stage2_keep", "layer"), then="fastv",
))
