"""Reading device scalars on the host with one transfer per device, not one (and a sync) per tensor.

Per-parameter checks (finiteness, fingerprints, replica digests) make one 0-d tensor per parameter; reading each
with ``float()`` / ``.item()`` would stall a GPU once per parameter.
"""

from __future__ import annotations

import torch
from torch import Tensor


def by_device(tensors: list[Tensor]) -> dict[torch.device, list[int]]:
    """Indices of ``tensors`` grouped by device, in order (for per-device foreach kernels and reads)."""
    out: dict[torch.device, list[int]] = {}
    for i, t in enumerate(tensors):
        out.setdefault(t.device, []).append(i)
    return out


def read_floats(scalars: list[Tensor]) -> list[float]:
    """The values of 0-d tensors as Python floats, in order: one ``tolist`` (host transfer) per device."""
    values = [0.0] * len(scalars)
    for indices in by_device(scalars).values():
        for i, v in zip(indices, torch.stack([scalars[i] for i in indices]).tolist()):
            values[i] = v
    return values
