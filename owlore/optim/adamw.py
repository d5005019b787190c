"""One AdamW step for one parameter, optionally in a GaLore subspace: the optimizer's math as a pure function.

Kept apart from ``GaLoreAdamW``'s bookkeeping (like torchao's ``single_param_adam``), so it can be tested against
``torch.optim.AdamW`` and galore-torch op for op. GaLore: arXiv 2403.03507, https://arxiv.org/abs/2403.03507.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

from torch import Tensor

from owlore.optim.projector import LEFT, project, project_back

Convention = Literal["torch", "hf"]


def adamw_update(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: int,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    convention: Convention = "torch",
    basis: Tensor | None = None,
    side: int = LEFT,
    scale: float = 1.0,
    reduce_projected: Callable[[Tensor], None] | None = None,
) -> None:
    """One AdamW step for one parameter, in the GaLore subspace if ``basis`` is given (updates tensors in place).

    ``convention="torch"`` is ``torch.optim.AdamW`` op for op (bias-corrected moments, eps added after the bias
    correction, decoupled decay ``p *= 1 - lr·wd`` before the update), so full-rank params match it bit for bit.
    ``convention="hf"`` is the HF/galore-torch AdamW used by the official OwLore code (eps added before the bias
    correction, decay applied to the already-updated weight), kept to reproduce published runs.

    Args:
        param: the weight, updated in place.
        grad: its full-size gradient.
        exp_avg: first moment, shaped like the (projected) gradient.
        exp_avg_sq: second moment, same shape.
        step: this step's 1-based count for bias correction.
        lr: learning rate.
        beta1: first-moment decay.
        beta2: second-moment decay.
        eps: denominator epsilon.
        weight_decay: decoupled weight decay.
        convention: ``"torch"`` or ``"hf"`` (see above).
        basis: GaLore basis, or None for plain AdamW.
        side: ``projector.LEFT`` or ``projector.RIGHT``.
        scale: GaLore scale applied to the back-projected update.
        reduce_projected: sums the projected gradient over ranks in place, when ``grad`` and a LEFT ``basis`` are
            this rank's rows of a row-sharded matrix (FSDP2; ``owlore.parallel.sharded``).
    """
    hf = convention == "hf"
    if weight_decay != 0 and not hf:
        param.mul_(1 - lr * weight_decay)
    if basis is not None:
        grad = project(grad, basis, side)
        if reduce_projected is not None:  # a row-sharded LEFT projection: sum the shards' parts (owlore.parallel.sharded)
            reduce_projected(grad)
    if hf:
        exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
    else:
        exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    if hf:
        step_size = lr * math.sqrt(bias_correction2) / bias_correction1
        denom = exp_avg_sq.sqrt().add_(eps)
    else:
        step_size = lr / bias_correction1
        denom = exp_avg_sq.sqrt().div_(bias_correction2**0.5).add_(eps)  # one param-sized temporary, not two
    if basis is None and not hf:
        param.addcdiv_(exp_avg, denom, value=-step_size)
    else:
        direction = exp_avg / denom
        if basis is not None:
            direction = project_back(direction, basis, side, scale)
        param.add_(direction, alpha=-step_size)
    if weight_decay != 0 and hf:
        param.add_(param, alpha=-lr * weight_decay)
