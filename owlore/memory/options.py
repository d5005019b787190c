"""The ``memory`` section applied to a built run: patches on the model and callbacks for the Trainer."""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

logger = logging.getLogger(__name__)


def _densify(p) -> None:
    if p.grad is not None and p.grad.is_sparse:
        p.grad = p.grad.to_dense()


def checkpointing_enabled(cfg: Any) -> bool:
    """Whether the Trainer must enable activation checkpointing (``model.gradient_checkpointing`` or
    ``memory.checkpointing`` all/frozen)."""
    return bool(cfg.model.gradient_checkpointing) or cfg.memory.checkpointing in ("all", "frozen")


def apply_memory_options(parts: Any, cfg: Any) -> list[Any]:
    """Apply ``cfg.memory`` to ``parts`` (a ``MethodParts``); returns the callbacks to add after the method's.

    The callbacks go after the method's own, so a per-layer policy sees the layers a switch has just chosen.
    """
    memory = cfg.memory
    callbacks: list[Any] = []
    if memory.chunked_loss:
        from owlore.memory.chunked_loss import enable_chunked_loss

        enable_chunked_loss(parts.model, memory.chunked_loss)
        logger.info("chunked loss: output head + cross-entropy in chunks of %d tokens", memory.chunked_loss)
    if memory.sparse_embedding_grad:
        emb = parts.model.get_input_embeddings()
        if not isinstance(emb, nn.Embedding):
            raise ValueError(f"memory.sparse_embedding_grad=true: the input embedding of {type(parts.model).__name__} "
                             f"is a {type(emb).__name__}, not an nn.Embedding")
        emb.sparse = True
        # dense again once backward has accumulated it: the Trainer's gradient norm (clip_grad_norm_) and optimizers
        # take no sparse tensors; until then (through all of backward) it holds only the batch's rows
        emb.weight.register_post_accumulate_grad_hook(_densify)
    if memory.checkpointing == "frozen":
        from owlore.memory.checkpoint_policy import FrozenLayerCheckpointing

        callbacks.append(FrozenLayerCheckpointing(parts.layer_callback))
    if memory.frozen_weights == "int8":
        from owlore.memory.int8_frozen import Int8FrozenLayers

        callbacks.append(Int8FrozenLayers(parts.layer_callback))
    if memory.offload_activations:
        from owlore.memory.offload_activations import enable_activation_offload

        enable_activation_offload(parts.model)
    if memory.profile:
        from owlore.memory.probe import MemoryProbe

        callbacks.append(MemoryProbe())
    return callbacks
