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


CHUNK_ELEMENTS = 2**20
"""Rows are processed in chunks of about this many elements, so the squared gradient and the update never
exist at full size: the only V×d tensor of the step is the gradient itself (the step would otherwise be the
peak of a run whose other tensors are small)."""


@torch.no_grad()
def factored_update(param: Tensor, grad: Tensor, state: dict, *, lr: float, weight_decay: float = 0.0) -> None:
    """One Adafactor step of a 2-D ``param`` (in place); ``state`` gets ``step``, ``exp_avg_sq_row``/``_col``.

    Three passes over row chunks (row/column means of the squared gradient; the update's RMS for the clipping;
    the update itself), each chunk computed in fp32 and written back in the param's dtype.
    """
    if grad.dim() != 2:
        raise ValueError(f"factored state needs a 2-D weight, got shape {tuple(grad.shape)}")
    m, n = grad.shape
    if "exp_avg_sq_row" not in state:
        state["step"] = 0
        state["exp_avg_sq_row"] = torch.zeros(m, dtype=torch.float32, device=grad.device)
        state["exp_avg_sq_col"] = torch.zeros(n, dtype=torch.float32, device=grad.device)
    state["step"] += 1
    beta2t = 1.0 - state["step"] ** DECAY_RATE
    row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
    step = max(1, CHUNK_ELEMENTS // max(n, 1))
    chunks = [(s, min(s + step, m)) for s in range(0, m, step)]
    row_mean = torch.empty_like(row)
    col_sum = torch.zeros_like(col)
    for s, e in chunks:
        squared = grad[s:e].float().square().add_(EPS)  # never in place: .float() of fp32 is the gradient
        row_mean[s:e] = squared.mean(dim=-1)
        col_sum += squared.sum(dim=0)
    row.mul_(beta2t).add_(row_mean, alpha=1.0 - beta2t)
    col.mul_(beta2t).add_(col_sum / m, alpha=1.0 - beta2t)
    r_factor = (row / row.mean()).rsqrt_().unsqueeze(-1)
    c_factor = col.rsqrt().unsqueeze(0)

    def update(s: int, e: int) -> Tensor:
        return (r_factor[s:e] * c_factor).mul_(grad[s:e].float())

    sum_sq = sum(update(s, e).square_().sum(dtype=torch.float64) for s, e in chunks)
    rms = (sum_sq / (m * n)) ** 0.5
    step_size = lr / max(float(rms) / CLIP_THRESHOLD, 1.0)
    for s, e in chunks:
        target = param[s:e].float() if param.dtype in (torch.float16, torch.bfloat16) else param[s:e]
        if weight_decay:
            target.add_(target, alpha=-weight_decay * lr)
        target.sub_(update(s, e), alpha=step_size)
        if target.data_ptr() != param[s:e].data_ptr():
            param[s:e].copy_(target)
