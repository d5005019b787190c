"""``MemoryProbe``: live tensor bytes by kind (weights, gradients, optimizer state, saved activations) per step.

Process memory (peak RSS, CUDA ``max_memory_allocated``) says how much a run costs but not what for, and on a
CPU it is blurred by the allocator: glibc keeps freed activations between steps, hundreds of MiB. The probe
counts the tensors themselves, so a method's saving can be attributed (LoRA: gradients and optimizer state;
GaLore: optimizer state; OwLore: both; checkpointing and chunked loss: activations):

- weights: parameters and buffers, unique storages (a tied head counts once);
- gradients: the most ``.grad`` bytes alive at once during the step, from post-accumulate-grad hooks on every
  trained parameter plus a reading before the optimizer step; an optimizer that frees gradients inside backward
  reports its own ``peak_grad_bytes``, which is used instead;
- optimizer state: ``owlore.optim.state.state_bytes`` before and after the step (the larger);
- activations: bytes saved for backward during the model's forward, via ``torch.autograd.graph.
  saved_tensors_hooks`` entered by hooks on the top model; unique storages, parameters' storages excluded
  (``W`` saved by a linear is a weight, not an activation; the bf16 copy of it that autocast saves counts as
  an activation). ``logits`` is the part in tensors whose last dimension is the vocabulary (the logits and the
  loss's log-softmax), included in ``activations``.

Activations peak at the end of the forward and gradients at the end of the backward, so the two maxima do not
coexist: ``activations_and_gradients`` is the most of both alive at once, with a saved storage counted until
backward has unpacked it as often as forward packed it (its node has run). The step's live total is weights +
optimizer state + that. The hooks record storage addresses and sizes only, never a reference (the pack hook
returns the tensor itself, as autograd would store it), so nothing lives longer and the losses are the same
with and without the probe. Not counted: temporaries (attention scores, the logits' gradient, the optimizer's
per-tensor scratch), the layer inputs that non-reentrant activation checkpointing keeps in its closure, and
allocator overhead; so the live total is a lower bound of what a step holds.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from owlore.memory.option import MemoryOption
from owlore.optim.state import state_bytes, unwrap_optimizer
from owlore.run.metrics import current_memory_bytes

logger = logging.getLogger(__name__)

KINDS = ("weights", "gradients", "optimizer_state", "activations", "logits", "activations_and_gradients")
"""Per-step byte counts, each the step's maximum; ``logits`` is the vocabulary-wide part of ``activations``."""
SERIES = ("step", *KINDS, "total", "svd_seconds", "memory_bytes")
"""``summary()["memory_profile"]["series"]`` keys: one list each, one entry per optimizer step."""


def _storage(t: torch.Tensor) -> tuple[int, int]:
    """(key, bytes) of the storage behind ``t``; a tensor subclass without one is keyed by its id.

    The key is the data pointer: unique across devices too, since CUDA's unified addressing keeps device
    allocations out of the host's address range."""
    try:
        s = t.untyped_storage()
        return s.data_ptr(), s.nbytes()
    except (RuntimeError, NotImplementedError, TypeError):
        return -id(t), t.numel() * t.element_size()


def weight_storages(model: nn.Module) -> dict[int, int]:
    """``{storage key: bytes}`` of the model's parameters and buffers (shared storages once)."""
    return dict(_storage(t) for t in (*model.parameters(), *model.buffers()) if t.device.type != "meta")


def live_grad_bytes(params: list[torch.Tensor]) -> int:
    """Bytes of the ``.grad`` tensors alive now."""
    return sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)


def _vocab_size(model: nn.Module) -> int | None:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if weight is not None and weight.dim() == 2:
        return int(weight.shape[0])
    return getattr(getattr(model, "config", None), "vocab_size", None)


class MemoryProbe(TrainerCallback):
    """Live tensor bytes by kind for every optimizer step; ``summary()`` gives the series and the peak step.

    Goes after the method's callbacks (``owlore.memory.options`` puts it there), so a layer switch made in their
    ``on_step_begin`` is in place when the probe hooks the newly trained parameters. Its bookkeeping after each
    step runs after ``StepTimer``'s ``on_step_end``, outside the timed step; the hooks inside forward and
    backward are timed (a few Python calls per saved tensor and per gradient).
    """

    def __init__(self) -> None:
        self.series: dict[str, list[Any]] = {k: [] for k in SERIES}
        self.gradients_source = "hooks"
        self._model: nn.Module | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._handles: list[Any] = []
        self._grad_hooked: set[int] = set()
        self._ctx: torch.autograd.graph.saved_tensors_hooks | None = None
        self._depth = 0
        self._vocab: int | None = None
        self._weights: dict[int, int] = {}
        self._saved: dict[int, int] = {}  # storage key -> bytes, of the last forward
        self._packs: dict[int, int] = {}  # storage key -> packs not yet unpacked by backward
        self._saved_logits: set[int] = set()
        self._remaining = 0  # saved bytes whose nodes have not run yet
        self._svd0: float | None = None
        self._reset_step()

    def _reset_step(self) -> None:
        self._act = self._logits = self._both = self._grad_peak = self._grad_running = self._state = 0
        self._grad_seen: set[int] = set()

    # ------------------------------------------------------------------------------------------- hooks
    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        key, nbytes = _storage(t)
        if key not in self._weights:
            if key not in self._saved:
                self._saved[key] = nbytes
                self._remaining += nbytes
                if self._vocab is not None and t.dim() and t.shape[-1] == self._vocab:
                    self._saved_logits.add(key)
            self._packs[key] = self._packs.get(key, 0) + 1
        return t

    def _unpack(self, t: torch.Tensor) -> torch.Tensor:
        key = _storage(t)[0]
        left = self._packs.get(key)
        if left is not None:
            if left <= 1:  # its last user has run: autograd lets go of it after this node
                del self._packs[key]
                self._remaining -= self._saved.get(key, 0)
            else:
                self._packs[key] = left - 1
        return t

    def _enter_forward(self, module: nn.Module, args: Any) -> None:
        if self._depth == 0:
            self._saved, self._packs, self._saved_logits, self._remaining = {}, {}, set(), 0
            self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
            self._ctx.__enter__()
        self._depth += 1

    def _exit_forward(self, module: nn.Module, args: Any, output: Any) -> None:
        self._depth -= 1
        if self._depth or self._ctx is None:
            return
        self._ctx.__exit__(None, None, None)
        self._ctx = None
        # One micro-batch's saved tensors are all alive at the end of its forward; the step keeps the largest.
        saved = sum(self._saved.values())
        self._act = max(self._act, saved)
        self._logits = max(self._logits, sum(self._saved[k] for k in self._saved_logits))
        self._both = max(self._both, saved + self._grad_running)

    def _on_grad(self, p: torch.Tensor) -> None:
        g = p.grad
        if g is not None and id(p) not in self._grad_seen:  # accumulation into an existing grad adds no bytes
            self._grad_seen.add(id(p))
            self._grad_running += g.numel() * g.element_size()
            self._grad_peak = max(self._grad_peak, self._grad_running)
        self._both = max(self._both, self._remaining + self._grad_running)

    def _hook_trained_params(self) -> None:
        """Grad hooks on the parameters that train now and have none yet (a layer switch adds some)."""
        for p in self._model.parameters():
            if p.requires_grad and id(p) not in self._grad_hooked:
                self._handles.append(p.register_post_accumulate_grad_hook(self._on_grad))
                self._grad_hooked.add(id(p))

    # ------------------------------------------------------------------------------------------- callback
    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if model is None:
            raise RuntimeError("MemoryProbe needs the Trainer's model in on_train_begin")
        self._model = model
        self._optimizer = unwrap_optimizer(optimizer) if optimizer is not None else None
        self._vocab = _vocab_size(model)
        self._svd0 = self._svd_seconds()
        self._handles += [model.register_forward_pre_hook(self._enter_forward),
                          model.register_forward_hook(self._exit_forward, always_call=True)]
        logger.info("memory probe: counting weights, gradients, optimizer state and saved activations per step")

    def on_step_begin(self, args, state, control, **kwargs):
        self._reset_step()
        self._weights = weight_storages(self._model)
        self._hook_trained_params()
        # Gradients alive before backward (normally none: the Trainer zeroes them with set_to_none).
        self._grad_running = self._grad_peak = live_grad_bytes(list(self._model.parameters()))
        self._state = self._state_bytes()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self._grad_peak = max(self._grad_peak, live_grad_bytes(list(self._model.parameters())))
        self._state = max(self._state, self._state_bytes())

    def on_step_end(self, args, state, control, **kwargs):
        grads, both = self._grad_peak, self._both
        own = getattr(self._optimizer, "peak_grad_bytes", None)
        if own is not None:  # it frees gradients inside backward, which the running sum cannot see
            grads, self.gradients_source = int(own), "optimizer"
            # both readings overcount here (the running sum keeps freed gradients): the smaller bound
            both = max(self._act, grads, min(self._both, self._act + grads))
        svd = self._svd_seconds()
        row = {"step": state.global_step, "weights": sum(weight_storages(self._model).values()),
               "gradients": grads, "optimizer_state": max(self._state, self._state_bytes()),
               "activations": self._act, "logits": self._logits, "activations_and_gradients": both}
        row["total"] = row["weights"] + row["optimizer_state"] + both
        row["svd_seconds"] = None if svd is None else svd - (self._svd0 or 0.0)
        row["memory_bytes"] = current_memory_bytes()
        self._svd0 = svd
        self._saved, self._packs, self._saved_logits = {}, {}, set()
        for k, v in row.items():
            self.series[k].append(v)

    def on_train_end(self, args, state, control, **kwargs):
        for h in self._handles:
            h.remove()
        self._handles, self._grad_hooked = [], set()

    # ------------------------------------------------------------------------------------------- readings
    def _state_bytes(self) -> int:
        return state_bytes(self._optimizer) if self._optimizer is not None else 0

    def _svd_seconds(self) -> float | None:
        svd = getattr(self._optimizer, "svd_seconds", None)
        return None if svd is None else float(svd)

    def summary(self) -> dict[str, Any]:
        """``{"memory_profile": ...}`` for the run record: the per-step series, each kind's maximum, and the kinds
        at the step with the largest live total (weights + optimizer state + activations and gradients)."""
        totals = self.series["total"]
        peak: dict[str, Any] | None = None
        if totals:
            i = max(range(len(totals)), key=totals.__getitem__)
            peak = {k: self.series[k][i] for k in ("step", *KINDS, "total")}
        return {"memory_profile": {
            "kinds": list(KINDS), "gradients_source": self.gradients_source, "peak": peak,
            "max": {k: max(self.series[k], default=None) for k in (*KINDS, "total")}, "series": self.series}}


# ------------------------------------------------------------------------------------------------ the option
OPTION = MemoryOption(
    name="profile", default=False,
    doc="record live tensor bytes by kind at each step's peak into owlore_record.json (eval/bench.py sets it)",
    apply=lambda on, parts, cfg: [MemoryProbe()])
