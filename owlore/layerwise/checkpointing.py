"""Gradient checkpointing under layer sampling: make sure the sampled layers get gradients, and no more.

torch's reentrant ``checkpoint`` builds a graph only if a tensor *input* of the checkpointed block requires grad;
with frozen embeddings (peft, or OwLore's CPU demo) that is never true, and the sampled layers silently get no
gradient. Non-reentrant checkpointing needs no help, and then the opposite matters: nothing should make the
embedding output require grad, or backward runs through every frozen layer below the lowest sampled one.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

logger = logging.getLogger(__name__)


def prepare_checkpointing(model: nn.Module, *, peft: bool) -> RemovableHandle | None:
    """Make the sampled layers get their gradients under the checkpointing actually in effect.

    Decided from the model (the Trainer enables checkpointing in ``train()`` before ``on_train_begin``), not
    from ``TrainingArguments``: which modules are checkpointed and whether their checkpoint function is
    reentrant. Reentrant ``torch.utils.checkpoint`` builds a graph only if a *tensor input* of the checkpointed
    layer requires grad (parameters do not count), so with frozen input embeddings (peft, or
    ``train_embeddings=False``) a sampled layer, and every one above it, would silently get no gradient: the
    embedding output is made to require grad. Non-reentrant checkpointing needs nothing; there, with frozen
    embeddings and no peft, transformers' own ``enable_input_require_grads`` hook is removed, so backward
    stops at the lowest sampled layer instead of running through every frozen layer below it.
    """
    checkpointed = [m for m in model.modules() if getattr(m, "gradient_checkpointing", None) is True]
    if not checkpointed:
        return None
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    emb_trains = isinstance(emb, nn.Module) and any(p.requires_grad for p in emb.parameters())
    if emb_trains:  # the embedding output requires grad by itself
        return None
    if any(_maybe_reentrant(m) for m in checkpointed):
        if not isinstance(emb, nn.Module):
            raise RuntimeError(
                f"reentrant gradient checkpointing is enabled on {type(model).__name__}, whose input embeddings "
                "are frozen (or not exposed by get_input_embeddings), so no tensor input of the checkpointed "
                "decoder layers requires grad and the sampled layers would get no gradient. Use non-reentrant "
                "checkpointing (gradient_checkpointing_kwargs={'use_reentrant': False}), or train the embeddings "
                "(owlore.train_embeddings=true).")
        logger.info("reentrant gradient checkpointing with frozen embeddings: the embedding output is made "
                    "to require grad so the sampled layers get gradients (use_reentrant=False is cheaper)")
        return emb.register_forward_hook(_output_requires_grad)
    elif not peft:
        for m in model.modules():
            if getattr(m, "_require_grads_hooks", None) and hasattr(m, "disable_input_require_grads"):
                m.disable_input_require_grads()
                logger.info("non-reentrant checkpointing with frozen embeddings: removed the input-require-grad "
                            "hook, so backward stops at the lowest sampled layer")
    return None


def _maybe_reentrant(module: nn.Module) -> bool:
    """Whether ``module``'s checkpoint function may be reentrant: False only for an explicit ``use_reentrant=False``
    (transformers stores ``functools.partial(checkpoint, **kwargs)``; torch itself defaults to reentrant)."""
    fn = getattr(module, "_gradient_checkpointing_func", None)
    return not (isinstance(fn, functools.partial) and fn.keywords.get("use_reentrant", True) is False)


def _output_requires_grad(module: nn.Module, inputs: Any, output: Any) -> None:
    if torch.is_grad_enabled() and isinstance(output, torch.Tensor) and not output.requires_grad:
        output.requires_grad_(True)
