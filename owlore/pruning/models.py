"""Which VLM families the pruner supports: one adapter per family, found from the model's class.

Adding a model family is a new adapter module (a subclass of ``owlore.pruning.adapters.LlavaAdapter``) plus one
entry in ``all_adapters``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from owlore.pruning.adapters import LlavaAdapter
from owlore.pruning.llava_next import LlavaNextAdapter
from owlore.pruning.qwen2_vl import Qwen2VLAdapter


def all_adapters() -> list[Any]:
    """One instance of every adapter, in the order of the docs table's columns; adding a model is one entry here."""
    return [LlavaAdapter(), LlavaNextAdapter(), Qwen2VLAdapter()]


def adapter_for(model: nn.Module):
    """The adapter whose ``model_classes`` name ``model``'s class (other models with a LLaVA-style
    ``multi_modal_projector`` use LLaVA's).

    Raises:
        TypeError: For a model no adapter supports, naming the supported classes.
    """
    name = type(model).__name__
    adapters = all_adapters()
    for adapter in adapters:
        if name in adapter.model_classes:
            return adapter
    if hasattr(getattr(model, "model", model), "multi_modal_projector"):
        return adapters[0]
    supported = ", ".join(c for a in adapters for c in a.model_classes if c.endswith("ForConditionalGeneration"))
    raise TypeError(f"{name}: visual-token pruning supports {supported}")
