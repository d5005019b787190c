"""Visual-token pruning during training: each training forward of a LLaVA sees only the tokens a pruner keeps.

Why train with pruning on: a model fine-tuned on all its visual tokens and pruned only at inference meets token
sets it never saw; training with the same pruner lets it adapt to them (and each step is cheaper, since the language
model runs on the shorter prompt). ``VisualTokenPruner.prepare`` already shortens ``input_ids``, ``attention_mask``
and ``labels`` together, computes the kept features with gradients (selection itself runs under ``no_grad``), so
the loss reaches the projector and the tower through the kept tokens.

Pruning applies in ``train()`` mode only: evaluation and ``generate`` choose their own pruner, or none.
"""

from __future__ import annotations

import functools
from types import MethodType
from typing import Any

from torch import nn

__all__ = ["disable_training_pruning", "enable_training_pruning"]

_MARK = "_owlore_training_pruner"


def enable_training_pruning(model: nn.Module, pruner: Any) -> None:
    """Patch ``model``'s instance ``forward``: in training mode, inputs with ``pixel_values`` are pruned by ``pruner``
    (a ``VisualTokenPruner``) first. Wraps whatever forward is there (e.g. the chunked loss's), keeping its
    signature, so the Trainer passes the same columns."""
    if getattr(model.__dict__.get("forward"), _MARK, None) is not None:
        getattr(model.forward, _MARK)[0] = pruner  # already patched: swap the pruner
        return
    inner = model.forward
    slot = [pruner]

    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        if self.training and not args and kwargs.get("pixel_values") is not None and kwargs.get("input_ids") is not None:
            prepared = slot[0].prepare(self, input_ids=kwargs.pop("input_ids"), pixel_values=kwargs.pop("pixel_values"),
                                       attention_mask=kwargs.pop("attention_mask", None),
                                       labels=kwargs.pop("labels", None))
            kwargs.update(prepared)
        return inner(*args, **kwargs)

    functools.update_wrapper(forward, type(model).forward)
    setattr(forward, _MARK, slot)
    forward._owlore_inner = inner
    model.forward = MethodType(forward, model)


def disable_training_pruning(model: nn.Module) -> None:
    """Undo ``enable_training_pruning`` (no-op if it is not on)."""
    current = model.__dict__.get("forward")
    if getattr(current, _MARK, None) is None:
        return
    inner = current._owlore_inner
    if getattr(inner, "__self__", None) is model and inner.__func__ is type(model).forward:
        del model.forward
    else:
        model.forward = inner
