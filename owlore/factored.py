"""Factored second moment for the embedding / output head (``optimizer.embedding_state=factored``).

Adafactor (Shazeer & Stern, arXiv 1804.04235, https://arxiv.org/abs/1804.04235) keeps, for an m×n matrix, the
running means of the squared gradient over rows and over columns (m + n floats instead of 2·m·n for AdamW) and
rebuilds the second moment as their normalised outer product; without a first moment, with relative-RMS update
clipping at 1 and the step-dependent decay ``β2_t = 1 - t^-0.8``. Under layer sampling the embedding is the largest
trained tensor (SmolLM2: 28 M params, 226 MB of AdamW state; LLaMA-2-7B's embedding + head: 262 M params,
2 GB), and it is the one a factored state shrinks to almost nothing.

The math follows ``transformers.optimization.Adafactor`` with ``scale_parameter=False, relative_step=False,
warmup_init=False, beta1=None`` (its tests use it as the oracle); the learning rate is the group's, so the
Trainer's schedule applies.
"""

from __future__ import annotations

import torch
from torch import Tensor

EPS = 1e-30
"""Added to the squared gradient (Adafactor's ε1)."""
DECAY_RATE = -0.8
CLIP_THRESHOLD = 1.0


def factored_state_bytes(shape: torch.Size | tuple[int, ...]) -> int:
    """Bytes of the fp32 row and column accumulators of an m×n weight."""
    m, n = shape
    return 4 * (m + n)


@torch.no_grad()
def factored_update(param: Tensor, grad: Tensor, state: dict, *, lr: float, weight_decay: float = 0.0) -> None:
    """One Adafactor step of a 2-D ``param`` (in place); ``state`` gets ``step``, ``exp_avg_sq_row``/``_col``.

    The update is computed in fp32 and written back in the param's dtype.
    """
    if grad.dim() != 2:
        raise ValueError(f"factored state needs a 2-D weight, got shape {tuple(grad.shape)}")
    grad = grad.float()
    if "exp_avg_sq_row" not in state:
        state["step"] = 0
        state["exp_avg_sq_row"] = torch.zeros(grad.shape[0], dtype=torch.float32, device=grad.device)
        state["exp_avg_sq_col"] = torch.zeros(grad.shape[1], dtype=torch.float32, device=grad.device)
    state["step"] += 1
    beta2t = 1.0 - state["step"] ** DECAY_RATE
    row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
    squared = grad.square().add_(EPS)
    row.mul_(beta2t).add_(squared.mean(dim=-1), alpha=1.0 - beta2t)
    col.mul_(beta2t).add_(squared.mean(dim=-2), alpha=1.0 - beta2t)
    del squared
    update = (row / row.mean()).rsqrt_().unsqueeze(-1) * col.rsqrt().unsqueeze(0)
    update.mul_(grad)
    rms = update.norm() / update.numel() ** 0.5
    update.div_((rms / CLIP_THRESHOLD).clamp_(min=1.0)).mul_(lr)
    target = param.float() if param.dtype in (torch.float16, torch.bfloat16) else param
    if weight_decay:
        target.add_(target, alpha=-weight_decay * lr)
    target.sub_(update)
    if target is not param:
        param.copy_(target)
