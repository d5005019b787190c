"""MMTok: multimodal coverage maximisation: keep the visual tokens that best cover the question and the image.

Paper: "MMTok: Multimodal Coverage Maximization for Efficient Inference of VLMs", arXiv 2508.18264
(ICLR 2026, https://github.com/Ironieser/MMTok). Written from the method's description: token selection as two
maximum-coverage problems solved together, a text-visual one (every question token should have a kept visual
token it matches) and a visual-visual one (every visual token should have a kept token like it). With ``P`` the
cosine similarities of the text tokens to the projected visual tokens and ``Q`` those among the pre-projector
visual features, each row is turned into a distribution over the candidates::

    P~ = softmax(P / tau_tv) / m        Q~ = softmax(Q / tau_vv) / N        (softmax over the visual tokens)
    f(S) = sum_rows max_{j in S} [P~ ; alpha Q~]_{row, j}                   (a facility-location function)

``f`` is monotone submodular, so the greedy choice (the largest marginal gain, ``k`` times) is within ``1 - 1/e`` of
the optimum. Defaults are the released code's: ``alpha = 0.5``, ``tau_tv = 0.02``, ``tau_vv = 0.2``.

Differences from the released code: the text tokens are the prompt's own (every text token of the image's prompt
row, through the language model's input embeddings), where the code re-tokenises the question without lmms-eval's
answer-format sentence and stop-words; the optional "agent" that rewrites the question first (in the first version
of the paper, absent from the code) is not used; the greedy runs batched over images (the code is batch size 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from owlore.pruning.registry import PruningMethod, SelectionContext, register

__all__ = ["coverage_matrix", "greedy_coverage"]

ALPHA, TAU_TV, TAU_VV = 0.5, 0.02, 0.2


def coverage_matrix(projected: torch.Tensor, features: torch.Tensor, text: torch.Tensor | None,
                    text_mask: torch.Tensor | None, *, alpha: float = ALPHA, tau_tv: float = TAU_TV,
                    tau_vv: float = TAU_VV) -> torch.Tensor:
    """``(images, L + N, N)``: the rows to cover (text tokens, then visual tokens) against the candidates.

    Rows of padding or image positions (``text_mask`` False) are zero, so they add nothing to the coverage.
    """
    vis = F.normalize(features.float(), dim=-1)
    q = (vis @ vis.transpose(1, 2) / tau_vv).softmax(-1) / features.shape[1]
    if text is None:
        return alpha * q
    proj = F.normalize(projected.float(), dim=-1)
    p = (F.normalize(text.float(), dim=-1) @ proj.transpose(1, 2) / tau_tv).softmax(-1)
    mask = text_mask.float()
    p = p * (mask / mask.sum(-1, keepdim=True).clamp_min(1.0))[..., None]
    return torch.cat([p, alpha * q], dim=1)


def greedy_coverage(cover: torch.Tensor, k: int) -> torch.Tensor:
    """``(images, k)`` sorted indices maximising ``sum_rows max_{j in S} cover[row, j]`` greedily (ties: lowest
    index)."""
    images, _, n = cover.shape
    best = cover.new_zeros(images, cover.shape[1])
    taken = torch.zeros(images, n, dtype=torch.bool, device=cover.device)
    rows = torch.arange(images, device=cover.device)
    for _ in range(k):
        gain = (cover - best[..., None]).clamp_min(0).sum(1).masked_fill(taken, -float("inf"))
        j = gain.argmax(-1)
        taken[rows, j] = True
        best = torch.maximum(best, cover[rows, :, j])
    return taken.nonzero()[:, 1].view(images, k)


def _select(ctx: SelectionContext) -> torch.Tensor:
    o = ctx.options
    cover = coverage_matrix(ctx.projected, ctx.enc.features, ctx.text, ctx.text_mask,
                            alpha=float(o.get("alpha", ALPHA)), tau_tv=float(o.get("tau_tv", TAU_TV)),
                            tau_vv=float(o.get("tau_vv", TAU_VV)))
    return greedy_coverage(cover, ctx.k)


def _flops(k: int, vision, options) -> float:
    n, text = vision.tokens - 1, options.get("text_tokens", 64)
    # P (L x N in LM space) + Q (N x N in the tower's space) + k greedy steps over the (L + N) x N matrix
    return 2.0 * text * n * vision.lm_hidden + 2.0 * n * n * vision.hidden + 3.0 * k * (text + n) * n


register(PruningMethod(
    name="mmtok", select=_select, needs=frozenset({"projected", "text"}), flops=_flops,
    paper="[arXiv 2508.18264](https://arxiv.org/abs/2508.18264)",
    summary="MMTok: greedy maximum coverage of the prompt's text tokens and of the visual tokens (submodular)",
    options=("alpha", "tau_tv", "tau_vv"),
))
