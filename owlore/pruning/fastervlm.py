"""[CLS] attention (FasterVLM): keep the patches the vision tower's [CLS] token attends to most.

Paper: Zhang et al., "[CLS] Attention is All You Need for Training-Free Visual Token Pruning",
arXiv 2412.01818 (https://github.com/Theia-4869/FasterVLM). Only the [CLS] query row of one layer is formed from
the hooked queries and keys (``vit_attention.cls_attention_scores``), so the tower keeps SDPA.
"""

from __future__ import annotations

import torch

from owlore.pruning.registry import PruningMethod, SelectionContext, register
from owlore.pruning.select import topk_select
from owlore.pruning.vit_attention import cls_attention_scores

__all__: list[str] = []


def _select_cls(ctx: SelectionContext) -> torch.Tensor:
    enc = ctx.enc
    scores = cls_attention_scores(enc.query, enc.key, scale=enc.scale)
    return topk_select(scores[:, 1:] if enc.cls_dropped else scores, ctx.k)


register(PruningMethod(
    name="cls", select=_select_cls, needs=frozenset({"attention", "cls"}),
    flops=lambda k, vision, options: 2.0 * (vision.tokens - 1) * vision.hidden,
    paper="[arXiv 2412.01818](https://arxiv.org/abs/2412.01818)",
    summary="FasterVLM: top-k of the [CLS] token's attention in one ViT layer",
))
