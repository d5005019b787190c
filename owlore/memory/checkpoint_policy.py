"""Activation checkpointing only where it pays, under layer sampling (``memory.checkpointing=frozen``).

Which decoder layers hold activations for backward depends on what trains:

- a *trained* layer saves the inputs of its linears (for the weight gradients) and of its nonlinearities;
- a *frozen* layer that backward still runs through (it lies above the lowest trained layer, or the embeddings
  train) saves no linear inputs (PyTorch keeps only what the backward needs: a frozen ``y = x Wᵀ`` keeps ``W``,
  not ``x``) but still saves its norms', attention's and SwiGLU's inputs;
- a frozen layer below the lowest trained one, with frozen embeddings, saves nothing (no input requires grad).

Under OwLore / LISA / BAdam the frozen layers are all but γ, so checkpointing them (keep the layer input,
recompute its forward in backward) removes most saved activations at the cost of the frozen layers' forward,
while the γ trained layers keep theirs (no recompute where the weight gradients are computed). Layers that
save nothing are not checkpointed. The choice is re-made after every layer switch.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn
from transformers import TrainerCallback

from owlore.memory.option import MemoryOption, OptionContext

logger = logging.getLogger(__name__)


def checkpoint_plan(num_layers: int, active: list[int] | set[int], *, embeddings_train: bool) -> list[bool]:
    """Per decoder layer: checkpoint it? True for frozen layers that backward runs through."""
    active = set(active)
    lowest = 0 if embeddings_train else min(active, default=num_layers)
    return [lowest <= i and i not in active for i in range(num_layers)]


def _embeddings_train(model: nn.Module) -> bool:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return isinstance(emb, nn.Module) and any(p.requires_grad for p in emb.parameters())


class FrozenLayerCheckpointing(TrainerCallback):
    """Checkpoint the frozen decoder layers backward runs through, after every switch of ``layer_callback``.

    Goes after the layer-switching callback in the Trainer's list (``owlore.memory.options`` puts it there), so
    at each ``on_step_begin`` it sees the layers just chosen. Needs the Trainer's own checkpointing enabled
    (``memory.checkpointing=frozen`` turns on ``TrainingArguments.gradient_checkpointing``): this callback only
    toggles the per-layer flag of transformers' ``GradientCheckpointingLayer``.
    """

    def __init__(self, layer_callback: Any) -> None:
        if layer_callback is None:
            raise ValueError("memory.checkpointing=frozen needs a layer-switching method (owlore, lisa, badam)")
        self.layer_callback = layer_callback
        self.model: nn.Module | None = None
        self.plan: list[bool] = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        layers = self.layer_callback.layers
        missing = [i for i, layer in enumerate(layers) if not hasattr(layer, "gradient_checkpointing")
                   or getattr(layer, "_gradient_checkpointing_func", None) is None]
        if missing:
            raise RuntimeError(
                f"memory.checkpointing=frozen: decoder layers {missing[:5]} of {type(model).__name__} are not "
                "transformers GradientCheckpointingLayers with checkpointing enabled (is "
                "TrainingArguments.gradient_checkpointing on? does the model support it?)")
        self.model = model
        self.apply()

    def on_step_begin(self, args, state, control, **kwargs):
        self.apply()

    def apply(self) -> list[bool]:
        """Set each layer's checkpointing flag from the current active layers; returns the plan."""
        cb = self.layer_callback
        plan = checkpoint_plan(len(cb.layers), cb.active, embeddings_train=_embeddings_train(self.model))
        if plan != self.plan:
            for layer, on in zip(cb.layers, plan, strict=True):
                layer.gradient_checkpointing = on
            logger.debug("checkpointing %d frozen layers, trained layers %s keep their activations",
                         sum(plan), sorted(cb.active))
            self.plan = plan
        return plan


# ------------------------------------------------------------------------------------------------ the option
CHECKPOINTING = ("off", "all", "frozen")


def _conflicts(mode: str, ctx: OptionContext) -> list[str]:
    from owlore.methods import listed_where

    out = []
    if mode == "frozen" and not ctx.method.switches_layers:
        switching = listed_where(lambda m: m.switches_layers)
        out.append(f"memory.checkpointing=frozen: only layer-switching methods ({switching}) have frozen "
                   f"layers to checkpoint; method {ctx.method.name} trains every layer it trains at once, use "
                   "memory.checkpointing=all")
    if mode == "frozen" and ctx.parallel is not None and ctx.parallel.fsdp2:
        out.append("parallel.fsdp2=true with memory.checkpointing=frozen: the per-layer policy re-wraps layers the "
                   "shards own and is not supported on shards yet; use memory.checkpointing=all")
    return out


def _apply(mode: str, parts: Any, cfg: Any) -> list[Any]:
    # "all": the Trainer checkpoints every layer (owlore.memory.options.checkpointing_enabled); nothing to add
    return [FrozenLayerCheckpointing(parts.layer_callback)] if mode == "frozen" else []


def _estimate(mode: str, cfg: Any) -> dict[str, Any]:
    return {"checkpointing": mode if mode != "off" else ("all" if cfg.model.gradient_checkpointing else "off")}


OPTION = MemoryOption(
    name="checkpointing", default="off",
    doc="activation checkpointing: all decoder layers, or (layer-switching methods) only the frozen ones",
    check=lambda v: None if v in CHECKPOINTING else f"must be one of {', '.join(CHECKPOINTING)}",
    conflicts=_conflicts, apply=_apply, estimate=_estimate)
