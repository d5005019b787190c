"""Optimizer-state lifecycle for any ``torch.optim.Optimizer``: free, move and measure per-parameter state.

``GaLoreAdamW`` has these as methods; the functions below delegate to them when present and otherwise work on
``optimizer.state`` directly, so the layer-sampling callback also works with e.g. ``torch.optim.AdamW`` (LISA).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def unwrap_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The real optimizer inside accelerate's ``AcceleratedOptimizer`` (and similar wrappers)."""
    seen = 0
    while hasattr(optimizer, "optimizer") and isinstance(optimizer.optimizer, torch.optim.Optimizer) and seen < 8:
        optimizer = optimizer.optimizer
        seen += 1
    return optimizer


def drop_state(optimizer: torch.optim.Optimizer, params: Iterable[torch.Tensor]) -> int:
    """Free the state of ``params``; returns the bytes freed. Their next step starts from fresh state."""
    optimizer = unwrap_optimizer(optimizer)
    if hasattr(optimizer, "drop_state"):
        return int(optimizer.drop_state(params))
    freed = 0
    for p in params:
        st = optimizer.state.pop(p, None)
        if st:
            freed += sum(v.numel() * v.element_size() for v in st.values() if torch.is_tensor(v))
    return freed


def move_state(optimizer: torch.optim.Optimizer, params: Iterable[torch.Tensor], device: str | torch.device) -> None:
    """Move the state tensors of ``params`` to ``device`` (offload to CPU, or back to the parameter's device)."""
    optimizer = unwrap_optimizer(optimizer)
    params = list(params)
    if hasattr(optimizer, "move_state"):
        optimizer.move_state(params, device)
        return
    for p in params:
        st = optimizer.state.get(p)
        if not st:
            continue
        for k, v in st.items():
            # torch optimizers keep a CPU scalar "step"; leave it where it is.
            if torch.is_tensor(v) and v.dim() > 0:
                st[k] = v.to(device)


def state_bytes(optimizer: torch.optim.Optimizer, params: Iterable[torch.Tensor] | None = None) -> int:
    """Bytes of optimizer state this process holds (all of it, or only for ``params``; an FSDP2 ``DTensor`` state
    counts its local shard)."""
    from owlore.parallel.sharded import local

    optimizer = unwrap_optimizer(optimizer)
    if hasattr(optimizer, "state_bytes"):
        return int(optimizer.state_bytes(params))
    keys = optimizer.state.keys() if params is None else [p for p in params if p in optimizer.state]
    return sum(local(v).numel() * v.element_size() for p in keys for v in optimizer.state[p].values()
               if torch.is_tensor(v))


def params_with_state(optimizer: torch.optim.Optimizer) -> set[int]:
    """``id`` of every parameter that currently has non-empty optimizer state."""
    optimizer = unwrap_optimizer(optimizer)
    return {id(p) for p, st in optimizer.state.items() if st}
