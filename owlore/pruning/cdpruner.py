"""CDPruner: instruction-conditioned visual-token selection as a determinantal point process (greedy MAP).

Paper: Zhang et al., "Beyond Attention or Similarity: Maximizing Conditional Diversity for Token Pruning in MLLMs",
arXiv 2506.10967 (NeurIPS 2025, https://github.com/Theia-4869/CDPruner). Written from the method's description.

The kernel ``L = diag(r) S diag(r)`` couples diversity (``S``: cosine similarity of the projected tokens) with
relevance to the instruction (``r``), so the DPP's MAP set is diverse among relevant tokens. It is found greedily
with the incremental-Cholesky algorithm of Chen et al. 2018 ("Fast Greedy MAP Inference for Determinantal Point
Process", arXiv 1709.05135): each pick is the token with the largest remaining marginal gain ``d_i²``, and the
gains are updated in ``O(N)`` per pick per image, batched over images.

Relevance here: cosine similarity between each projected visual token and the language model's input embeddings
of the prompt's text tokens, averaged over the text tokens and min-max normalised per image. The released LLaVA code
uses CLIP's text tower instead and negates the similarity (a CLIP-specific choice, per the authors); models run here
have no CLIP text tower, so the language model's own embedding space is used, as the authors advise for models
whose projector output is in that space (Qwen2-VL). ``cdpruner_negate=True`` restores the negation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from owlore.pruning.divprune import cosine_similarity_matrix
from owlore.pruning.registry import PruningMethod, SelectionContext, register

__all__ = ["cdpruner_kernel", "dpp_greedy_map", "instruction_relevance"]


def instruction_relevance(projected: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor, *,
                          negate: bool = False) -> torch.Tensor:
    """``(images, N)`` relevance in [0, 1]: mean cosine of each visual token with the image's text tokens,
    min-max normalised per image.

    Args:
        projected: ``(images, N, d)`` projected visual tokens.
        text: ``(images, L, d)`` prompt embeddings.
        text_mask: ``(images, L)`` True at the text tokens to use.
        negate: Negate the similarity first (CDPruner's CLIP variant).
    """
    cos = torch.einsum("bnd,bld->bnl", F.normalize(projected.float(), dim=-1), F.normalize(text.float(), dim=-1))
    weights = text_mask.float()
    relevance = (cos * weights[:, None]).sum(-1) / weights.sum(-1, keepdim=True).clamp_min(1.0)
    if negate:
        relevance = -relevance
    low, high = relevance.min(-1, keepdim=True).values, relevance.max(-1, keepdim=True).values
    return (relevance - low + 1e-6) / (high - low + 1e-6)


def cdpruner_kernel(projected: torch.Tensor, relevance: torch.Tensor) -> torch.Tensor:
    """``L = diag(r) S diag(r)`` with ``S`` the cosine similarity of the projected tokens: ``(images, N, N)``."""
    return relevance[:, :, None] * cosine_similarity_matrix(projected) * relevance[:, None, :]


def dpp_greedy_map(kernel: torch.Tensor, k: int, *, eps: float = 1e-10) -> torch.Tensor:
    """Greedy MAP of a DPP (Chen et al. 2018): ``k`` picks, each maximising ``log det L_S``'s gain.

    ``d_i²`` is the gain of adding token ``i`` (the squared Cholesky diagonal); after picking ``j``, each ``c_i``
    gains ``e_i = (L_ji - <c_j, c_i>) / d_j`` and ``d_i² -= e_i²``. Runs exactly ``k`` steps (when the kernel's
    rank is exhausted the remaining gains are ~0 and picks fall to the largest of them); batched over images.

    Args:
        kernel: ``(images, N, N)`` positive semi-definite.
        k: Tokens to pick per image.

    Returns:
        ``(images, k)`` sorted indices.
    """
    images, n, _ = kernel.shape
    kernel = kernel.float()
    rows = torch.arange(images, device=kernel.device)
    c = kernel.new_zeros(images, k, n)
    gains = kernel.diagonal(dim1=1, dim2=2).clone()
    taken = torch.zeros(images, n, dtype=torch.bool, device=kernel.device)
    picks = torch.empty(images, k, dtype=torch.long, device=kernel.device)
    for t in range(k):
        j = gains.masked_fill(taken, -float("inf")).argmax(dim=-1)
        picks[:, t] = j
        taken[rows, j] = True
        if t == k - 1:
            break
        c_j = c[rows, :t, j]  # (images, t)
        e = (kernel[rows, j] - torch.einsum("bt,btn->bn", c_j, c[:, :t])) / gains[rows, j].clamp_min(eps).sqrt()[:, None]
        c[:, t] = e
        gains = gains - e.square()
    return picks.sort(dim=-1).values


def _select(ctx: SelectionContext) -> torch.Tensor:
    relevance = instruction_relevance(ctx.projected, ctx.text, ctx.text_mask,
                                      negate=bool(ctx.options.get("cdpruner_negate", False)))
    return dpp_greedy_map(cdpruner_kernel(ctx.projected, relevance), ctx.k)


def _flops(k: int, vision, options) -> float:
    n, d = vision.tokens - 1, vision.lm_hidden
    text = options.get("text_tokens", 64)
    # relevance (N x T cosines) + the N x N kernel + k picks of an O(t N) update
    return 2.0 * n * text * d + 2.0 * n * n * d + 2.0 * k * k * n


register(PruningMethod(
    name="cdpruner", select=_select, needs=frozenset({"projected", "text"}), flops=_flops,
    paper="[arXiv 2506.10967](https://arxiv.org/abs/2506.10967)",
    summary="CDPruner: conditional DPP, L = diag(r) S diag(r) (relevance to the prompt x diversity), greedy MAP",
    options=("cdpruner_negate",),
))
