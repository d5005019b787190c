"""The input embedding's gradient as the row-sparse tensor it is (``memory.sparse_embedding_grad``).

An embedding's gradient has non-zero rows only for the batch's tokens, but ``nn.Embedding`` materialises all
V·d of it. With ``sparse=True`` backward accumulates only those rows; a post-accumulate hook makes it dense once
backward is done (the Trainer's gradient norm and the optimizers take no sparse tensors), so through backward it
holds the batch's rows only, and a tied head's dense gradient takes the embedding's rows in place instead of a
second vocabulary-sized buffer. Methods with their own optimizer only.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from owlore.memory.option import MemoryOption, OptionContext


def _densify(p: Any) -> None:
    if p.grad is not None and p.grad.is_sparse:
        p.grad = p.grad.to_dense()


def enable_sparse_embedding_grad(model: nn.Module) -> None:
    """Make ``model``'s input embedding produce a row-sparse gradient, dense again after backward."""
    emb = model.get_input_embeddings()
    if not isinstance(emb, nn.Embedding):
        raise ValueError(f"memory.sparse_embedding_grad=true: the input embedding of {type(model).__name__} is a "
                         f"{type(emb).__name__}, not an nn.Embedding")
    emb.sparse = True
    emb.weight.register_post_accumulate_grad_hook(_densify)


def _conflicts(on: bool, ctx: OptionContext) -> list[str]:
    if ctx.method.own_optimizer:
        return []
    from owlore.methods import listed_where

    return [f"memory.sparse_embedding_grad=true: method {ctx.method.name} uses the Trainer's optimizer "
            f"({ctx.training.get('optim', 'adamw_torch')}), which takes no sparse gradients; use a method with its "
            f"own optimizer ({listed_where(lambda m: m.own_optimizer)}) or remove the option"]


OPTION = MemoryOption(
    name="sparse_embedding_grad", default=False,
    doc="methods with their own optimizer: the input embedding's gradient holds only the batch's rows in backward",
    conflicts=_conflicts, fsdp2=False, apply=lambda on, parts, cfg: enable_sparse_embedding_grad(parts.model))
