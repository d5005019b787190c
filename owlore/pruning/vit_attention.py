"""One ViT layer's attention, recomputed from captured queries and keys.

FoPru and FasterVLM need attention maps of a single vision layer. Asking the vision tower for
``output_attentions`` would switch every layer to eager attention; instead we hook that one layer's
``q_proj``/``k_proj`` outputs (already computed by the SDPA forward) and redo only the softmax we need:
the full ``N x N`` map for FoPru, or just the [CLS] row (``O(N d)``) for FasterVLM.

FasterVLM: Zhang et al., "[CLS] Attention is All You Need for Training-Free Visual Token Pruning",
arXiv 2412.01818, https://github.com/Theia-4869/FasterVLM.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["capture_qk", "cls_attention_scores", "head_mean_attention"]


@contextmanager
def capture_qk(attention: nn.Module | None) -> Iterator[dict[str, torch.Tensor]]:
    """Record the query/key projections of one attention module during a forward pass.

    Args:
        attention: A HF-style attention module with ``q_proj``, ``k_proj``, ``num_heads`` and
            ``head_dim`` (CLIP, SigLIP).

    Yields:
        A dict filled after the forward with ``"query"`` and ``"key"``, each ``(batch, heads, T, head_dim)``
        and detached (selection never needs gradients); stays empty for ``attention=None``.
    """
    captured: dict[str, torch.Tensor] = {}
    if attention is None:
        yield captured
        return
    heads, head_dim = attention.num_heads, attention.head_dim

    def save(name: str):
        def hook(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
            b, t, _ = output.shape
            captured[name] = output.detach().view(b, t, heads, head_dim).transpose(1, 2)

        return hook

    handles = [
        attention.q_proj.register_forward_hook(save("query")),
        attention.k_proj.register_forward_hook(save("key")),
    ]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def head_mean_attention(query: torch.Tensor, key: torch.Tensor, *, scale: float) -> torch.Tensor:
    """Softmax attention probabilities averaged over heads (FoPru's ``A-bar``).

    Args:
        query: ``(batch, heads, T, head_dim)``.
        key: ``(batch, heads, T, head_dim)``.
        scale: Logit scale, ``head_dim ** -0.5`` for CLIP.

    Returns:
        ``(batch, T, T)``; row ``i`` is the attention token ``i`` pays to every token.
    """
    logits = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scale
    return logits.softmax(dim=-1).mean(dim=1)


def cls_attention_scores(query: torch.Tensor, key: torch.Tensor, *, scale: float) -> torch.Tensor:
    """Attention the [CLS] token (position 0) pays to every token, averaged over heads.

    Only the [CLS] query row is formed, so the cost is ``O(T d)`` rather than ``O(T^2 d)``.

    Args:
        query: ``(batch, heads, T, head_dim)``.
        key: ``(batch, heads, T, head_dim)``.
        scale: Logit scale.

    Returns:
        ``(batch, T)`` attention weights; column 0 is [CLS] attending to itself.
    """
    logits = torch.einsum("bhd,bhtd->bht", query[:, :, 0].float(), key.float()) * scale
    return logits.softmax(dim=-1).mean(dim=1)
