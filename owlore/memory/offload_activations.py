"""Checkpointed layer inputs in host memory (``memory.offload_activations``).

With activation checkpointing each decoder layer keeps only its input for backward; for a 7B model at batch × seq
of 4 × 2048 that is 32 × 64 MiB = 2 GiB of the device's peak (the estimator's figure for the paper's setting).
Here every tensor that autograd saves *outside* the checkpointed layers, which under checkpointing means those
inputs plus the final norm's and head's inputs, goes to host memory during forward (pinned on CUDA, so the copy is
asynchronous) and comes back when backward needs it, through PyTorch's ``torch.autograd.graph.save_on_cpu``
(https://pytorch.org/docs/stable/autograd.html#torch.autograd.graph.save_on_cpu). Idea as in DeepSpeed's
activation-checkpoint CPU offload and ZeRO-Offload (arXiv 2101.06840).

What it costs: one device→host copy per saved tensor in forward and one host→device copy in backward, each of the
layer input's size; the copy back happens when the recompute asks for it (no prefetch ahead of the layer), so on
a GPU it sits on backward's critical path unless the link outruns the recompute. On a CPU the host *is* the
device: nothing is saved, and the option only shows its cost. Gradients are identical (tested).
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch
from torch import nn

from owlore.memory.option import MemoryOption, OptionContext

logger = logging.getLogger(__name__)


def enable_activation_offload(model: nn.Module) -> None:
    """Make ``model``'s training forward save its autograd tensors in host memory (idempotent)."""
    if getattr(model, "_owlore_offload", False):
        return
    forward = model.forward

    @functools.wraps(forward)
    def offloaded(*args: Any, **kwargs: Any) -> Any:
        if not (model.training and torch.is_grad_enabled()):
            return forward(*args, **kwargs)
        pin = next(model.parameters()).is_cuda  # pinned host buffers make the copies asynchronous
        with torch.autograd.graph.save_on_cpu(pin_memory=pin):
            return forward(*args, **kwargs)

    model.forward = offloaded
    model._owlore_offload = True
    logger.info("activation offload: tensors saved for backward outside checkpointed layers go to host memory")


def disable_activation_offload(model: nn.Module) -> None:
    """Undo ``enable_activation_offload``."""
    if getattr(model, "_owlore_offload", False):
        del model.forward
        model._owlore_offload = False


# ------------------------------------------------------------------------------------------------ the option
def _conflicts(on: bool, ctx: OptionContext) -> list[str]:
    if ctx.checkpointed:
        return []
    return ["memory.offload_activations=true without activation checkpointing: every activation of every layer "
            "would cross to the host and back each step; set memory.checkpointing=all (or frozen), so that only "
            "the layers' inputs are offloaded"]


OPTION = MemoryOption(
    name="offload_activations", default=False,
    doc="with checkpointing: the checkpointed layer inputs in host memory, copied back for the recompute",
    conflicts=_conflicts, fsdp2=False, apply=lambda on, parts, cfg: enable_activation_offload(parts.model),
    estimate=lambda v, cfg: {"offload_activations": bool(v)})
