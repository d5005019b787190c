"""Optimizer steps inside backward: each tensor is updated, and its gradient freed, as soon as it is complete.

The idea is PyTorch's tutorial "How to save memory by fusing the optimizer step into the backward pass"
(``Tensor.register_post_accumulate_grad_hook``), GaLore's per-layer weight updates (arXiv 2403.03507 §4,
https://arxiv.org/abs/2403.03507) and LOMO's fused gradient computation and update (arXiv 2306.09782,
https://arxiv.org/abs/2306.09782). ``InBackwardGaLoreAdamW`` does ``GaLoreAdamW``'s per-param step from a hook, so
the gradients of different tensors never coexist beyond the autograd engine's own buffers: a step holds the largest
trained gradient instead of all of them, saving their sum minus the largest (under OwLore: the γ sampled layers'
gradients plus the embedding's and head's, minus one matrix).

What it cannot do:

* Global gradient-norm clipping. The global norm needs every gradient, but the first tensors have stepped (and
  dropped their gradients) before the last gradients exist. Per-tensor clipping would be a different algorithm, so
  there is none: the config refuses ``optimizer.update_in_backward=true`` unless ``training.max_grad_norm=0``.
* Anything that needs all gradients before any update: a loss scaler that unscales and skips whole steps (fp16
  ``GradScaler``), DDP / FSDP (a hook would step on its rank's local gradient, before the all-reduce),
  optimizers with a global step rule.
* Save memory under gradient accumulation: the first n-1 micro-batches must keep every trained gradient (in
  ``.grad``), only the n-th one updates and frees them, so the saving is gone; prefer a larger micro-batch.
"""

from __future__ import annotations

import functools
import logging
import math
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from transformers import TrainerCallback

from owlore.optim.galore_adamw import GaLoreAdamW
from owlore.optim.state import unwrap_optimizer

logger = logging.getLogger(__name__)

Where = tuple[int, int]
"""(group index, param index): a param's place in ``param_groups``, as ``GaLoreAdamW.step`` numbers it."""


class InBackwardGaLoreAdamW(GaLoreAdamW):
    """``GaLoreAdamW`` whose per-param updates run in post-accumulate-grad hooks, each freeing its gradient.

    Every param of every group gets one hook at construction (params are unique across groups, so a tied
    embedding / head gets one). When it fires, the param's gradient is complete; on the ``accumulation_steps``-th
    firing since the last optimizer step the hook applies exactly ``GaLoreAdamW.step``'s update for that param
    (non-finite skip, 8-bit moments, master weights, basis refresh and ``svd_seconds``), reading the group's
    ``lr`` as it is then, and sets ``p.grad = None``. An LR scheduler therefore works as usual: backward of step t
    uses the lr set after step t-1, then ``step()`` and ``scheduler.step()`` follow, as in the normal path.

    Assumptions: one backward per micro-batch, every trained param gets its gradient in each of the
    ``accumulation_steps`` micro-batches, and layers switch only between optimizer steps (the layer-switching
    callback switches in ``on_step_begin``), so every count starts from zero for a newly trained param. A param
    used both inside and outside a *reentrant* activation-checkpointed segment would fire twice per backward; use
    non-reentrant checkpointing (train.py's default). ``step()`` is the safety net: it applies the same update to
    every gradient still pending (an epoch's shorter last accumulation, a param that missed a micro-batch, or
    gradients set by hand), frees them and resets all counts. Normally it has nothing to do.

    Measurements, set by ``step()`` for the optimizer step it ends: ``peak_grad_bytes``, the most ``.grad`` bytes
    of this optimizer's params alive at once (counted in the hooks) and ``max_peak_grad_bytes`` over all steps;
    ``last_grad_norm``, the global 2-norm of the gradients that stepped (what the Trainer would log; see
    ``InBackwardGradNorm``), or None if nothing stepped.

    ``state_dict`` / ``load_state_dict`` are ``GaLoreAdamW``'s: the counts are zero at every optimizer step, so
    nothing else needs saving. Cost: the non-finite test reads one float per tensor on the host (``step()`` reads
    one per device), so on a GPU backward waits for each gradient before queueing the next kernels;
    ``skip_non_finite=False`` (``optimizer.skip_non_finite=false``) drops the test and keeps the gradient norm on
    the device, read once per step. Step pre/post hooks (``register_step_pre_hook``) run around ``step()``, not around
    the per-param updates. The hooks hold the optimizer weakly; ``remove_hooks()`` turns it back into a plain
    ``GaLoreAdamW`` (whose ``step()`` also frees the gradients).

    Args:
        params, lr, betas, eps, weight_decay, **options: as for ``GaLoreAdamW``.
        accumulation_steps: micro-batches per optimizer step (``TrainingArguments.gradient_accumulation_steps``).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        *,
        accumulation_steps: int = 1,
        **options: Any,
    ) -> None:
        if not (isinstance(accumulation_steps, int) and accumulation_steps >= 1):
            raise ValueError(f"accumulation_steps must be a positive int, got {accumulation_steps!r}")
        self.accumulation_steps = accumulation_steps
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._counts: dict[Where, int] = {}  # gradients accumulated since the param last stepped
        self._live: dict[Where, int] = {}  # bytes of the .grad tensors alive now
        self._live_bytes = self._step_peak = 0
        self._sq_norm, self._stepped = 0.0, False
        self._sq_norms: list[Tensor] = []  # device-side squared norms, read once in step()
        self.peak_grad_bytes = self.max_peak_grad_bytes = 0
        self.last_grad_norm: float | None = None
        super().__init__(params, lr, betas, eps, weight_decay, **options)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add the group, then one hook per param (a frozen one is unfrozen for the registration only)."""
        super().add_param_group(param_group)
        group_index = len(self.param_groups) - 1
        ref = weakref.ref(self)
        for index, p in enumerate(self.param_groups[group_index]["params"]):
            frozen = not p.requires_grad
            p.requires_grad_(True)  # torch refuses hooks on tensors that do not require grad
            self._handles.append(p.register_post_accumulate_grad_hook(
                functools.partial(_fire, ref, (group_index, index))))
            p.requires_grad_(not frozen)

    def remove_hooks(self) -> None:
        """Unregister every hook; from then on only ``step()`` updates (all pending gradients at once)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @torch.no_grad()
    def _grad_ready(self, p: Tensor, where: Where) -> None:
        """Hook body: note the gradient, and update the param on its ``accumulation_steps``-th gradient."""
        self._note_live(p.grad, where)
        count = self._counts.get(where, 0) + 1
        if count < self.accumulation_steps:
            self._counts[where] = count
            return
        self._counts.pop(where, None)
        self._update(p, where)

    def _note_live(self, grad: Tensor, where: Where) -> None:
        if grad.is_sparse:
            nbytes = grad._values().nbytes + grad._indices().nbytes
        else:
            nbytes = grad.numel() * grad.element_size()
        self._live_bytes += nbytes - self._live.get(where, 0)
        self._live[where] = nbytes
        self._step_peak = max(self._step_peak, self._live_bytes)

    def _update(self, p: Tensor, where: Where) -> None:
        """``GaLoreAdamW.step`` for one param (same finiteness test), then free its gradient."""
        if p.grad.is_sparse:  # a row-sparse input-embedding gradient: the update is the dense one
            p.grad = p.grad.to_dense()
        grad = p.grad
        group = self.param_groups[where[0]]  # looked up now: load_state_dict replaces the group dicts
        if not self.skip_non_finite:  # no host read: the squared norm stays on the device until step()
            self._sq_norms.append(torch.linalg.vector_norm(grad, dtype=torch.float32) ** 2)
            self._step_one(p, group, where)
        else:
            norm = float(torch.linalg.vector_norm(grad, dtype=torch.float32))  # the host sync (see the class doc)
            finite = math.isfinite(norm) or bool(torch.isfinite(grad).all())  # a finite grad whose norm overflows
            if finite:
                self._step_one(p, group, where)
            else:
                self._skip_non_finite(p, group, where)
            self._sq_norm += norm * norm
        self._stepped = True
        p.grad = None
        self._live_bytes -= self._live.pop(where, 0)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Run ``closure`` (its backward steps the params), update what is still pending, end the step."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        pending = [(p, (gi, i)) for gi, group in enumerate(self.param_groups)
                   for i, p in enumerate(group["params"]) if p.grad is not None]
        for p, where in pending:  # gradients set by hand were never seen by a hook
            self._note_live(p.grad, where)
        for p, where in pending:
            self._update(p, where)
        self.peak_grad_bytes = self._step_peak
        self.max_peak_grad_bytes = max(self.max_peak_grad_bytes, self._step_peak)
        if self._sq_norms:  # one host read per step (skip_non_finite=False)
            self._sq_norm += float(sum(t.to(self._sq_norms[0].device) for t in self._sq_norms))
            self._sq_norms.clear()
        self.last_grad_norm = math.sqrt(self._sq_norm) if self._stepped else None
        self._counts.clear()
        self._live.clear()
        self._live_bytes = self._step_peak = 0
        self._sq_norm, self._stepped = 0.0, False
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop pending gradients and their counts (between optimizer steps there are none)."""
        super().zero_grad(set_to_none=set_to_none)
        self._counts.clear()
        self._live = {(gi, i): p.grad.numel() * p.grad.element_size()
                      for gi, group in enumerate(self.param_groups)
                      for i, p in enumerate(group["params"]) if p.grad is not None}
        self._live_bytes = sum(self._live.values())


def _fire(ref: weakref.ReferenceType, where: Where, p: Tensor) -> None:
    optimizer = ref()
    if optimizer is not None:  # a discarded optimizer's hooks do nothing
        optimizer._grad_ready(p, where)


def training_args_problems(args: Any, accumulation_steps: int) -> list[str]:
    """What in ``TrainingArguments`` breaks in-backward updates (``[]`` if nothing)."""
    out = []
    if args.max_grad_norm and args.max_grad_norm > 0:
        out.append(f"training.max_grad_norm={args.max_grad_norm}: no global gradient norm exists when a tensor "
                   "steps inside backward; set training.max_grad_norm=0")
    if args.gradient_accumulation_steps != accumulation_steps:
        out.append(f"training.gradient_accumulation_steps={args.gradient_accumulation_steps} but the optimizer "
                   f"was built with accumulation_steps={accumulation_steps}; build it from the same value")
    if args.fp16:
        out.append("training.fp16=true: the GradScaler unscales and skips whole steps after backward, but the "
                   "tensors step inside it; use bf16 or fp32")
    if args.world_size > 1:
        out.append(f"{args.world_size} processes: the hooks would step on each rank's gradient before DDP "
                   "all-reduces it; train on one process")
    return out


def _check(args: Any, accumulation_steps: int) -> None:
    problems = training_args_problems(args, accumulation_steps)
    if problems:
        raise ValueError("optimizer.update_in_backward=true: " + "; ".join(problems))


def in_backward_kwargs(enabled: bool, args: Any) -> dict[str, Any]:
    """Optimizer keyword arguments for a method: ``{}`` or ``optimizer_cls`` + ``accumulation_steps``.

    Raises:
        ValueError: ``args`` cannot work with in-backward updates (see ``training_args_problems``).
    """
    if not enabled:
        return {}
    _check(args, args.gradient_accumulation_steps)
    logger.info("optimizer.update_in_backward: every tensor steps inside backward (accumulation_steps=%d)",
                args.gradient_accumulation_steps)
    return {"optimizer_cls": InBackwardGaLoreAdamW, "accumulation_steps": args.gradient_accumulation_steps}


def in_backward_callbacks(optimizer: torch.optim.Optimizer) -> list[TrainerCallback]:
    """``[InBackwardGradNorm()]`` for an in-backward optimizer, else ``[]``."""
    return [InBackwardGradNorm()] if isinstance(optimizer, InBackwardGaLoreAdamW) else []


class InBackwardGradNorm(TrainerCallback):
    """Makes the Trainer's ``grad_norm`` honest for ``InBackwardGaLoreAdamW``, and checks its arguments.

    The Trainer computes ``grad_norm`` after backward with ``clip_grad_norm_(model.parameters(), inf)``; by then
    every gradient has been freed, so it would log 0.0. ``on_log`` replaces it (in the logs and in
    ``state.log_history``, i.e. ``trainer_state.json``) with the optimizer's ``last_grad_norm``, the same global
    norm measured in the hooks. Reporting callbacks that run before this one (``report_to``: tensorboard, wandb,
    which the Trainer puts first) still receive the 0.0.
    """

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        opt = unwrap_optimizer(optimizer) if optimizer is not None else None
        if isinstance(opt, InBackwardGaLoreAdamW):
            _check(args, opt.accumulation_steps)

    def on_log(self, args, state, control, logs=None, optimizer=None, **kwargs):
        opt = unwrap_optimizer(optimizer) if optimizer is not None else None
        if not isinstance(opt, InBackwardGaLoreAdamW) or logs is None or "grad_norm" not in logs:
            return
        logs["grad_norm"] = opt.last_grad_norm
        if state.log_history and "grad_norm" in state.log_history[-1]:
            state.log_history[-1]["grad_norm"] = opt.last_grad_norm
