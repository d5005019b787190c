"""GaLore on FSDP2 shards: the projection of a row-sharded gradient, without gathering the weights.

FSDP2 (``torch.distributed.fsdp.fully_shard``) holds each parameter as a ``DTensor`` sharded on dim 0: rank k owns
rows ``[o_k, o_k + m_k)`` of an m×n weight and of its gradient G. GaLore (arXiv 2403.03507) needs, per step:

* the basis, from an SVD of the whole G every ``update_proj_gap`` steps: the refresh all-gathers G of that one
  matrix (only the active layers' matrices have gradients), computes the basis on rank 0's view and broadcasts it,
  so every rank holds the same basis bit for bit;
* ``RIGHT`` side (m ≥ n, Q r×n): R = G Qᵀ is m×r and row-sharded like G, so each rank projects, keeps moments for
  and back-projects (N Q) its own rows: no communication;
* ``LEFT`` side (m < n, P m×r): R = Pᵀ G = Σ_k P_kᵀ G_k, with P_k the rows of P that rank k owns: one r×n
  all-reduce of the projected gradient; the moments (r×n) are then the same on every rank, and each rank
  back-projects its own rows, P_k N.

Everything else in ``GaLoreAdamW`` (elementwise AdamW, 8-bit moments, master weights) works on the local shard
unchanged. The state keeps the full basis, so a sharded and an unsharded run hold the same state.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

try:
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # torch without DTensor: nothing is ever sharded
    DTensor = Shard = None


def is_sharded(t: Tensor | None) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t: Tensor) -> Tensor:
    """The part of ``t`` this rank holds (``t`` itself when not sharded); writes go into the parameter."""
    return t.to_local() if is_sharded(t) else t


def row_offset(p: Tensor) -> int:
    """First global row of this rank's shard of a dim-0-sharded ``DTensor`` (``NotImplementedError`` for other
    layouts, e.g. tensor parallelism or 2-D meshes)."""
    if len(p.placements) != 1 or not isinstance(p.placements[0], Shard) or p.placements[0].dim != 0:
        raise NotImplementedError(f"GaLore on a DTensor needs FSDP2's row sharding (one mesh dimension, Shard(0)); "
                                  f"got placements {p.placements}")
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return int(offset[0])


def full_gradient(p: Tensor) -> Tensor:
    """All-gather this parameter's whole gradient (for a basis refresh)."""
    return p.grad.full_tensor()


def is_mesh_rank0(p: Tensor) -> bool:
    """Whether this process is rank 0 of ``p``'s mesh (the one that computes a shared GaLore basis)."""
    return p.device_mesh.get_local_rank() == 0


def broadcast_outcome(p: Tensor, basis: Tensor | None, shape: tuple[int, int], dtype: torch.dtype
                      ) -> Tensor | None:
    """Rank 0's basis (or its failure, ``None``) on every rank of ``p``'s mesh: first a success flag, so that a
    failed SVD on rank 0 makes every rank keep its old basis instead of leaving the others waiting for it."""
    group = p.device_mesh.get_group()
    src = dist.get_global_rank(group, 0)
    device = p.grad.to_local().device if hasattr(p.grad, "to_local") else p.device
    flag = torch.tensor([basis is not None], dtype=torch.int32, device=device)
    dist.broadcast(flag, src=src, group=group)
    if not bool(flag.item()):
        return None
    if basis is None:
        basis = torch.empty(shape, dtype=dtype, device=device)
    basis = basis.contiguous()
    dist.broadcast(basis, src=src, group=group)
    return basis


def reduce_projected(p: Tensor) -> callable:
    """``in-place sum over the mesh`` for a LEFT-side projected gradient of ``p``."""
    group = p.device_mesh.get_group()

    def reduce(r: Tensor) -> None:
        dist.all_reduce(r, group=group)

    return reduce


def agree_finite(flags: list[bool], params: list[Tensor]) -> list[bool]:
    """Each sharded parameter's flag AND-ed over ranks, so all ranks skip or step it together (the LEFT side's
    all-reduce would hang if one rank skipped it); unsharded parameters keep their own flag."""
    idx = [i for i, p in enumerate(params) if is_sharded(p)]
    if not idx:
        return flags
    t = torch.tensor([1 if flags[i] else 0 for i in idx], dtype=torch.int32)
    device = params[idx[0]].to_local().device
    t = t.to(device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=params[idx[0]].device_mesh.get_group())
    out = list(flags)
    for i, ok in zip(idx, t.tolist()):
        out[i] = bool(ok)
    return out
