"""Frozen decoder layers in int8 on the device, exact weights on the host (``memory.frozen_weights=int8``).

Under layer sampling only γ of L decoder layers train at a time; the others are only read, in forward and (for
the input gradient) in backward. Here their linears hold int8 codes with one fp32 scale per output row (absmax,
symmetric) on the device, and their exact weights live in host memory. When a layer is sampled, its exact weight
comes back to the device and trains; when it leaves, the (updated) weight goes to the host and is quantised
again. So the trained weights are never rounded: only the frozen layers' forward and their input gradients see
int8 weights. On a GPU this holds L-γ layers at ~1 byte per weight instead of 2 (bf16); on a CPU the host *is*
the device, so the option saves nothing there and is useful only to measure its cost in time and loss.

Idea from weight-quantised memory-efficient training: Q-GaLore (arXiv 2407.08296, int8 weights with
stochastic-rounding updates) and QLoRA (arXiv 2305.14314, a frozen quantised base); unlike them, the trained
layers here stay in full precision and no update is ever rounded to int8.

A quantised layer's ``weight`` parameter is emptied (the same ``Parameter`` object, so the optimizer's groups
stay valid); ``state_dict`` returns the exact host weight in its place, so checkpoints and the saved model are
exact. ``on_train_end`` restores every layer, so evaluation after training uses the exact model; an evaluation
*during* training (``eval_strategy``) sees the frozen layers in int8, and ``load_best_model_at_end`` is refused.
"""

from __future__ import annotations

import logging
import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import TrainerCallback

from owlore.memory.option import MemoryOption, OptionContext

logger = logging.getLogger(__name__)


def quantize_rows(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-output-row int8: ``weight ≈ codes * scale[:, None]``; codes in [-127, 127]."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp_(min=1e-12) / 127.0
    codes = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return codes, scale


def dequantize_rows(codes: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    return codes.to(dtype) * scale.to(dtype)[:, None]


class _Int8Linear(torch.autograd.Function):
    """``x Wᵀ + b`` with W in int8: saves the codes (not a dequantised copy) and rebuilds W in backward."""

    @staticmethod
    def forward(ctx, x: Tensor, codes: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(codes, scale)
        return F.linear(x, dequantize_rows(codes, scale, x.dtype), bias)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        codes, scale = ctx.saved_tensors
        grad_x = grad_out @ dequantize_rows(codes, scale, grad_out.dtype) if ctx.needs_input_grad[0] else None
        return grad_x, None, None, None


def _int8_forward(self: nn.Linear, x: Tensor) -> Tensor:
    return _Int8Linear.apply(x, self.int8_codes, self.int8_scale, self.bias)


def _exact_weight_hook(module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    master = getattr(module, "_int8_master", None)
    if master is not None:
        ready = getattr(module, "_int8_ready", None)
        if ready is not None:  # the asynchronous device -> host copy must have landed before anyone reads it
            ready.synchronize()
        state_dict[prefix + "weight"] = master


class Int8Store:
    """Quantise / restore the plain ``nn.Linear`` modules of decoder layers; exact weights kept on ``host``."""

    def __init__(self, layers: nn.ModuleList, host: torch.device | str = "cpu") -> None:
        self.layers = layers
        self.host = torch.device(host)
        self.quantized: set[int] = set()
        self.linears = [[m for m in layer.modules() if type(m) is nn.Linear] for layer in layers]
        for linears in self.linears:
            for m in linears:
                m.register_state_dict_post_hook(_exact_weight_hook)

    def quantize(self, index: int) -> None:
        if index in self.quantized:
            return
        for m in self.linears[index]:
            w = m.weight
            if w.requires_grad:
                raise RuntimeError(f"decoder layer {index} trains: only frozen layers are held in int8")
            codes, scale = quantize_rows(w)
            m._int8_master, m._int8_ready = self._to_host(w.detach())
            m.register_buffer("int8_codes", codes, persistent=False)
            m.register_buffer("int8_scale", scale, persistent=False)
            m._int8_shape = w.shape
            w.data = torch.empty(0, dtype=w.dtype, device=w.device)
            m.forward = types.MethodType(_int8_forward, m)
        self.quantized.add(index)

    def restore(self, index: int) -> None:
        if index not in self.quantized:
            return
        for m in self.linears[index]:
            device = m.int8_codes.device
            # from pinned memory the copy is asynchronous (the caching host allocator keeps the buffer alive
            # until it has been read); on the CPU the host weight is the weight
            m.weight.data = m._int8_master.to(device, copy=m._int8_master.device != device, non_blocking=True)
            del m._int8_master, m._int8_ready, m.int8_codes, m.int8_scale, m._int8_shape, m.forward
        self.quantized.discard(index)

    def _to_host(self, w: Tensor) -> tuple[Tensor, Any]:
        """One copy of ``w`` into host memory: straight into a pinned buffer, asynchronously, from a CUDA device
        (then also the event that marks it done); ``w`` itself when it already lives on the host."""
        if w.device == self.host:
            return w, None
        if w.device.type != "cuda":
            return w.to(self.host, copy=True), None
        master = torch.empty(w.shape, dtype=w.dtype, device=self.host, pin_memory=True)
        master.copy_(w, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return master, ready

    def sync(self, active: list[int] | set[int]) -> None:
        """Active layers exact on the device, every other layer int8."""
        active = set(active)
        for i in range(len(self.layers)):
            (self.restore if i in active else self.quantize)(i)

    def device_bytes(self) -> int:
        """Bytes of the quantised layers' codes and scales (what they hold on the device)."""
        return sum(m.int8_codes.nbytes + m.int8_scale.nbytes for i in self.quantized for m in self.linears[i])


class Int8FrozenLayers(TrainerCallback):
    """Keep the frozen decoder layers of a layer-switching method in int8, re-synced after every switch.

    Goes after the layer-switching callback (``owlore.memory.options`` puts it there), so its ``on_step_begin``
    sees the layers just chosen; outlier scores are computed before any layer is quantised.
    """

    def __init__(self, layer_callback: Any) -> None:
        if layer_callback is None:
            raise ValueError("memory.frozen_weights=int8 needs a layer-switching method (owlore, lisa, badam)")
        self.layer_callback = layer_callback
        self.store: Int8Store | None = None
        self.peak_int8_bytes = 0

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if hasattr(model, "peft_config"):
            raise ValueError("memory.frozen_weights=int8 does not combine with peft adapters (their base weights "
                             "are frozen everywhere; quantise the base with method=qlora instead)")
        self.store = Int8Store(self.layer_callback.layers)

    def on_step_begin(self, args, state, control, **kwargs):
        self.store.sync(self.layer_callback.active)
        self.peak_int8_bytes = max(self.peak_int8_bytes, self.store.device_bytes())

    def on_train_end(self, args, state, control, **kwargs):
        for i in sorted(self.store.quantized):
            self.store.restore(i)

    def summary(self) -> dict[str, Any]:
        """For the run record: the most bytes the int8 layers held (codes + scales)."""
        return {"int8_frozen_layer_bytes": self.peak_int8_bytes}


# ------------------------------------------------------------------------------------------------ the option
def _conflicts(mode: str, ctx: OptionContext) -> list[str]:
    from owlore.methods import listed_where

    out = []
    if not ctx.method.switches_layers:
        switching = listed_where(lambda m: m.switches_layers)
        out.append(f"memory.frozen_weights=int8: only layer-switching methods ({switching}) keep frozen "
                   f"decoder layers; for method {ctx.method.name} quantise the base with method=qlora, or remove "
                   "memory.frozen_weights")
    if ctx.training.get("load_best_model_at_end"):
        out.append("memory.frozen_weights=int8 with training.load_best_model_at_end=true: the Trainer loads the best "
                   "checkpoint while frozen layers still hold int8 codes (their exact weights come back only at the "
                   "end of training); set training.load_best_model_at_end=false")
    return out


OPTION = MemoryOption(
    name="frozen_weights", default="full",
    doc="layer-switching methods: frozen decoder layers as int8 on the device, exact weights on the host",
    check=lambda v: None if v in ("full", "int8") else "must be full or int8",
    conflicts=_conflicts, fsdp2=False,
    apply=lambda mode, parts, cfg: [Int8FrozenLayers(parts.layer_callback)],
    estimate=lambda v, cfg: {"frozen_int8": v == "int8"})
