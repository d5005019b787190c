"""Param groups for ``GaLoreAdamW``: which weights are projected, which decay, so the optimizer never walks the model.

The target-module rules follow transformers' ``optim_target_modules`` (regexes fullmatched on module names, or
``all-linear``), plus ``decoder-linear`` (every linear inside the decoder blocks), OwLore's default.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from owlore.layerwise.layers import find_decoder_layers, linear_modules

logger = logging.getLogger(__name__)


def _output_embedding_ids(model: nn.Module) -> set[int]:
    getter = getattr(model, "get_output_embeddings", None)
    out = getter() if callable(getter) else None
    return {id(out)} if out is not None else set()


EMBEDDING_STATES = ("full", "8bit", "lowrank", "factored")


def embedding_param_ids(model: nn.Module) -> set[int]:
    """Ids of the input-embedding and output-head weights (one id when they are tied)."""
    ids = set()
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        fn = getattr(model, getter, None)
        module = fn() if callable(fn) else None
        weight = getattr(module, "weight", None)
        if isinstance(weight, Tensor):
            ids.add(id(weight))
    return ids


def _embedding_group(params: list[Tensor], state: str, rank: int, galore_opts: dict[str, Any],
                     weight_decay: float) -> dict[str, Any]:
    """The ``embedding`` group for ``embedding_state`` other than full.

    8bit: blockwise 8-bit moments. lowrank: GaLore on the V×d matrix (std side: moments V×r, basis d×r) at scale
    1, so the step size matches full-rank AdamW's within the subspace. factored: Adafactor-style second moment
    (a row and a column vector; no first moment), arXiv 1804.04235.
    """
    group: dict[str, Any] = {"name": "embedding", "params": params, "weight_decay": weight_decay}
    if state == "8bit":
        group["state_bits"] = 8
    elif state == "lowrank":
        group.update({**galore_opts, "rank": rank, "scale": 1.0, "proj_type": "std"})
    elif state == "factored":
        group["factored"] = True
    return group


def _target_modules(
    model: nn.Module, target_modules: str | Sequence[str], layers_path: str | None
) -> dict[str, nn.Module]:
    """Name -> module of the linears whose weights GaLore projects."""
    linears = dict(linear_modules(model))
    if target_modules == "decoder-linear":
        inside = {
            id(m) for layer in find_decoder_layers(model, layers_path) for _, m in linear_modules(layer)
        }
        return {name: m for name, m in linears.items() if id(m) in inside}
    if target_modules == "all-linear":
        skip = _output_embedding_ids(model)
        return {n: m for n, m in linears.items() if id(m) not in skip and n.rsplit(".", 1)[-1] != "lm_head"}
    patterns = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    found: dict[str, nn.Module] = {}
    for pattern in patterns:
        try:
            regex = re.compile(pattern)
        except re.error as err:
            raise ValueError(f"target_modules pattern {pattern!r} is not a valid regex: {err}") from err
        hits = {n: m for n, m in linears.items() if regex.fullmatch(n)}
        if not hits:
            examples = ", ".join(list(linears)[:5]) or "(none)"
            raise ValueError(
                f"target_modules pattern {pattern!r} fullmatches no linear module of {type(model).__name__}. "
                f"Linear module names look like: {examples}. Use a regex over full names, e.g. r'.*\\.mlp\\..*', "
                "or 'decoder-linear' / 'all-linear'."
            )
        found.update(hits)
    return found


def make_param_groups(
    model: nn.Module,
    *,
    target_modules: str | Sequence[str] = "decoder-linear",
    rank: int = 128,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    proj_type: str = "std",
    weight_decay: float = 0.0,
    no_decay: Sequence[str] = ("bias", "norm"),
    layers_path: str | None = None,
    basis_method: str = "svd",
    power_iters: int = 2,
    embedding_state: str = "full",
    embedding_rank: int = 128,
) -> list[dict[str, Any]]:
    """Split a model's params into one GaLore group and full-rank AdamW groups, so the optimizer never walks the model.

    Every param appears exactly once (tied weights once), frozen ones included: the layer sampler unfreezes layers
    later and they must already be in the optimizer.

    Args:
        model: the model.
        target_modules: ``"decoder-linear"`` (every linear inside the decoder blocks: attention and MLP),
            ``"all-linear"`` (every linear except the output embedding / ``lm_head``), or regexes fullmatched
            against module names (like transformers' ``optim_target_modules``).
        rank: GaLore rank (clamped per matrix to ``min(m, n)``).
        update_proj_gap: steps between basis refreshes.
        scale: multiplier of the back-projected update.
        proj_type: ``std``, ``reverse_std``, ``left`` or ``right``.
        weight_decay: decay of the GaLore weights and other full-rank weights.
        no_decay: substrings of param names (lower-cased) that get no weight decay (biases, norms).
        layers_path: dotted path to the decoder blocks if ``find_decoder_layers`` cannot find them.
        basis_method: ``svd`` (GaLore's full SVD) or ``randomized`` (range finder, warm-started from the previous
            basis; ``owlore.optim.projector.randomized_basis``).
        power_iters: subspace iterations of the randomized range finder.
        embedding_state: optimizer state of the input embedding and output head: ``full`` (AdamW, in the
            ``adamw`` group), or in their own ``embedding`` group ``8bit``, ``lowrank`` (GaLore at
            ``embedding_rank``) or ``factored`` (Adafactor-style second moment). On a large vocabulary they are the
            largest trained tensors under layer sampling (SmolLM2: 28 M of the 135 M params, 226 MB of AdamW state).
        embedding_rank: rank of the ``lowrank`` embedding projection.

    Returns:
        Non-empty groups named ``"galore"``, ``"adamw"``, ``"adamw_no_decay"`` (and ``"embedding"``).

    Raises:
        ValueError: a regex matches no linear module, or is invalid; an unknown ``embedding_state``.
    """
    if embedding_state not in EMBEDDING_STATES:
        raise ValueError(f"embedding_state must be one of {', '.join(EMBEDDING_STATES)}, got {embedding_state!r}")
    targets = _target_modules(model, target_modules, layers_path)
    galore_ids = {id(m.weight) for m in targets.values() if m.weight.dim() == 2}
    galore: list[Tensor] = []
    decay: list[Tensor] = []
    plain: list[Tensor] = []
    embedding: list[Tensor] = []
    embedding_ids = embedding_param_ids(model) - galore_ids if embedding_state != "full" else set()
    for name, p in model.named_parameters():  # named_parameters yields each shared tensor once
        if id(p) in embedding_ids:
            embedding.append(p)
        elif id(p) in galore_ids:
            galore.append(p)
        elif any(s in name.lower() for s in no_decay):
            plain.append(p)
        else:
            decay.append(p)
    galore_opts = {"rank": rank, "update_proj_gap": update_proj_gap, "scale": scale, "proj_type": proj_type,
                   "basis_method": basis_method, "power_iters": power_iters}
    groups = [
        {"name": "galore", "params": galore, "weight_decay": weight_decay, **galore_opts},
        {"name": "adamw", "params": decay, "weight_decay": weight_decay},
        {"name": "adamw_no_decay", "params": plain, "weight_decay": 0.0},
        _embedding_group(embedding, embedding_state, embedding_rank, galore_opts, weight_decay),
    ]
    groups = [g for g in groups if g["params"]]
    logger.info(
        "GaLore param groups: %s",
        ", ".join(
            f"{g['name']}={len(g['params'])} tensors/{sum(p.numel() for p in g['params'])} params"
            for g in groups
        ),
    )
    return groups
