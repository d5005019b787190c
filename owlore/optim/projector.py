"""GaLore low-rank gradient projection as pure tensor functions.

GaLore (arXiv 2403.03507, https://arxiv.org/abs/2403.03507) runs Adam on ``R = Pᵀ G`` (or ``G Qᵀ``), the gradient
projected onto its top-r singular subspace, and maps the Adam step back with ``P N`` (or ``N Q``). OwLore
(arXiv 2405.18380, https://arxiv.org/abs/2405.18380) applies it to the sampled decoder layers.

Everything here is stateless: the basis is a plain tensor and the side a plain int, so the optimizer can keep both in
its ``state_dict`` (``torch.load(weights_only=True)`` safe) instead of pickling a projector object as galore-torch
does.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

ProjType = Literal["std", "reverse_std", "left", "right"]
PROJ_TYPES: tuple[str, ...] = ("std", "reverse_std", "left", "right")

LEFT: int = 0
"""Project with ``P`` (m×r, left singular vectors): ``R = Pᵀ G`` is r×n."""
RIGHT: int = 1
"""Project with ``Q`` (r×n, right singular vectors): ``R = G Qᵀ`` is m×r."""


def choose_side(proj_type: str, shape: tuple[int, ...] | torch.Size) -> int:
    """Pick the projection side for an m×n matrix.

    ``std`` puts the basis on the smaller dimension (basis r×min(m, n), moments r×max(m, n)), as in GaLore;
    ``reverse_std`` does the opposite (kept for reproducing GaLore ablations).

    Args:
        proj_type: one of ``std``, ``reverse_std``, ``left``, ``right``.
        shape: the matrix shape ``(m, n)``.

    Returns:
        ``LEFT`` or ``RIGHT``.

    Raises:
        ValueError: unknown ``proj_type``.
    """
    m, n = shape
    if proj_type == "std":
        return RIGHT if m >= n else LEFT
    if proj_type == "reverse_std":
        return LEFT if m >= n else RIGHT
    if proj_type == "left":
        return LEFT
    if proj_type == "right":
        return RIGHT
    raise ValueError(f"Unknown proj_type {proj_type!r}; expected one of {', '.join(PROJ_TYPES)}.")


def compute_basis(grad: Tensor, rank: int, side: int) -> Tensor:
    """Orthonormal basis of the top-``rank`` singular subspace of ``grad`` on the given side.

    The SVD runs in fp32 because bf16/fp16 SVD is unsupported or unstable; the basis is cast back to the gradient's
    dtype so projections stay in the training precision. The result is a contiguous copy, so it does not keep the
    full ``U``/``Vh`` alive (they are m×min(m, n) / min(m, n)×n).

    Args:
        grad: an m×n gradient.
        rank: requested rank; clamped to ``min(m, n)``.
        side: ``LEFT`` (returns ``P``, m×r with orthonormal columns) or ``RIGHT`` (returns ``Q``, r×n with
            orthonormal rows).

    Returns:
        The basis tensor, dtype and device of ``grad``.

    Raises:
        torch.linalg.LinAlgError: the SVD did not converge (the caller decides the fallback).
    """
    r = min(rank, *grad.shape)
    u, _, vh = torch.linalg.svd(grad.float(), full_matrices=False)
    basis = u[:, :r] if side == LEFT else vh[:r, :]
    return basis.to(grad.dtype).contiguous()


BASIS_METHODS: tuple[str, ...] = ("svd", "randomized")


def randomized_basis(grad: Tensor, rank: int, side: int, *, warm: Tensor | None = None, oversample: int = 8,
                     power_iters: int = 2, seed: int = 0) -> Tensor:
    """The top-``rank`` subspace of ``grad`` by a randomized range finder (Halko, Martinsson & Tropp, 2011,
    arXiv 0909.4061): O(m·n·(r+p)) per pass instead of a full SVD's O(m·n·min(m, n)).

    The sketch is ``G Ω`` for a Gaussian ``Ω`` with ``rank + oversample`` columns, sharpened by ``power_iters``
    subspace iterations (QR between them for stability), then an SVD of the small ``(r+p)×n`` matrix ``QᵀG``
    picks the top ``rank`` directions inside it. ``warm`` (the previous basis, same ``side``) replaces the first
    ``rank`` random columns by ``Gᵀ P_prev``, so when the gradient's subspace drifts slowly (GaLore refreshes every
    ``update_proj_gap`` steps) one iteration recovers it. Same return convention as ``compute_basis``; ``seed``
    makes the sketch reproducible (the optimizer derives it from the parameter and its step, so a resumed run
    draws the same basis).
    """
    a = grad.float() if side == LEFT else grad.float().t()  # work on A (m×n) and return its left basis
    m, n = a.shape
    r = min(rank, m, n)
    k = min(r + oversample, m, n)
    gen = torch.Generator(device=a.device).manual_seed(seed)
    omega = torch.randn(n, k, generator=gen, device=a.device, dtype=a.dtype)
    if warm is not None:
        prev = warm.float() if side == LEFT else warm.float().t()  # m×r
        if prev.shape[0] == m:
            cols = min(prev.shape[1], k)
            omega[:, :cols] = a.t() @ prev[:, :cols]
    y = a @ omega
    for _ in range(power_iters):
        q, _ = torch.linalg.qr(y)
        z, _ = torch.linalg.qr(a.t() @ q)
        y = a @ z
    q, _ = torch.linalg.qr(y)
    u_small, _, _ = torch.linalg.svd(q.t() @ a, full_matrices=False)
    basis = q @ u_small[:, :r]  # m×r, orthonormal columns
    basis = basis if side == LEFT else basis.t()
    return basis.to(grad.dtype).contiguous()


def captured_energy(grad: Tensor, basis: Tensor, side: int) -> float:
    """``‖project(G)‖² / ‖G‖²``: the share of the gradient a basis keeps (1.0 = nothing lost)."""
    g = grad.float()
    return float(project(g, basis.float(), side).pow(2).sum() / g.pow(2).sum().clamp_min(1e-30))


def project(grad: Tensor, basis: Tensor, side: int) -> Tensor:
    """Low-rank gradient: ``Pᵀ G`` (r×n) for ``LEFT``, ``G Qᵀ`` (m×r) for ``RIGHT``."""
    return basis.t() @ grad if side == LEFT else grad @ basis.t()


def project_back(low: Tensor, basis: Tensor, side: int, scale: float = 1.0) -> Tensor:
    """Full-size update ``scale · P N`` (``LEFT``) or ``scale · N Q`` (``RIGHT``).

    The side is explicit rather than guessed from ``low``'s shape, which is what breaks galore-torch's
    ``reverse_std`` back-projection when the rank reaches the matrix size.
    """
    full = basis @ low if side == LEFT else low @ basis
    return full.mul_(scale) if scale != 1.0 else full


def projected_shape(shape: tuple[int, ...] | torch.Size, basis: Tensor, side: int) -> tuple[int, int]:
    """Shape of ``project(grad, basis, side)`` for a gradient of ``shape``; the Adam moments have this shape."""
    m, n = shape
    return (basis.shape[1], n) if side == LEFT else (m, basis.shape[0])
