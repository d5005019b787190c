"""Tests for the pure GaLore projection functions (owlore/optim/projector.py)."""

from __future__ import annotations

import pytest
import torch

from owlore.optim.projector import (
    LEFT,
    PROJ_TYPES,
    RIGHT,
    choose_side,
    compute_basis,
    project,
    project_back,
    projected_shape,
)

SHAPES = [(12, 8), (8, 12), (10, 10)]  # tall, wide, square


def _grad(shape: tuple[int, int], seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize(
    ("proj_type", "shape", "side"),
    [
        ("std", (12, 8), RIGHT),
        ("std", (8, 12), LEFT),
        ("std", (10, 10), RIGHT),
        ("reverse_std", (12, 8), LEFT),
        ("reverse_std", (8, 12), RIGHT),
        ("reverse_std", (10, 10), LEFT),
        ("left", (12, 8), LEFT),
        ("left", (8, 12), LEFT),
        ("right", (12, 8), RIGHT),
        ("right", (8, 12), RIGHT),
    ],
)
def test_choose_side(proj_type: str, shape: tuple[int, int], side: int) -> None:
    assert choose_side(proj_type, shape) == side


@pytest.mark.parametrize("proj_type", ["full", "STD", ""])
def test_choose_side_rejects_unknown(proj_type: str) -> None:
    with pytest.raises(ValueError, match="proj_type"):
        choose_side(proj_type, (4, 4))


def test_sides_are_plain_ints() -> None:
    # stored in the optimizer state; must survive torch.load(weights_only=True)
    assert {type(LEFT), type(RIGHT)} == {int} and LEFT != RIGHT


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("side", [LEFT, RIGHT])
@pytest.mark.parametrize("rank", [1, 3, 8])
def test_basis_is_orthonormal(shape: tuple[int, int], side: int, rank: int) -> None:
    basis = compute_basis(_grad(shape), rank, side)
    r = min(rank, *shape)
    gram = basis.t() @ basis if side == LEFT else basis @ basis.t()
    assert basis.shape == ((shape[0], r) if side == LEFT else (r, shape[1]))
    torch.testing.assert_close(gram, torch.eye(r), atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("proj_type", PROJ_TYPES)
def test_project_and_back_shapes(shape: tuple[int, int], proj_type: str) -> None:
    grad = _grad(shape)
    side = choose_side(proj_type, shape)
    basis = compute_basis(grad, 3, side)
    low = project(grad, basis, side)
    expected_low = (3, shape[1]) if side == LEFT else (shape[0], 3)
    assert low.shape == expected_low == projected_shape(shape, basis, side)
    assert project_back(low, basis, side, 0.5).shape == shape


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("side", [LEFT, RIGHT])
def test_rank_clamped_to_matrix_size(shape: tuple[int, int], side: int) -> None:
    basis = compute_basis(_grad(shape), 1000, side)
    assert min(basis.shape) == min(shape)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("side", [LEFT, RIGHT])
def test_full_rank_round_trip_is_identity(shape: tuple[int, int], side: int) -> None:
    grad = _grad(shape)
    basis = compute_basis(grad, min(shape), side)
    torch.testing.assert_close(
        project_back(project(grad, basis, side), basis, side), grad, atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("shape", SHAPES)
def test_full_rank_basis_on_small_side_is_identity_for_any_matrix(shape: tuple[int, int]) -> None:
    # std puts the basis on the smaller dimension: at full rank it is square orthogonal, so even a gradient the
    # basis was not computed from survives the round trip.
    side = choose_side("std", shape)
    basis = compute_basis(_grad(shape, seed=0), 100, side)
    other = _grad(shape, seed=1)
    torch.testing.assert_close(
        project_back(project(other, basis, side), basis, side), other, atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("side", [LEFT, RIGHT])
def test_projection_is_best_rank_r_approximation(side: int) -> None:
    # Eckart-Young: the residual of the rank-r round trip is the norm of the discarded singular values.
    grad = _grad((16, 10))
    s = torch.linalg.svdvals(grad)
    basis = compute_basis(grad, 4, side)
    residual = grad - project_back(project(grad, basis, side), basis, side)
    torch.testing.assert_close(residual.norm(), s[4:].norm(), atol=1e-4, rtol=1e-4)


def test_scale_multiplies_back_projection() -> None:
    grad = _grad((12, 8))
    basis = compute_basis(grad, 3, RIGHT)
    low = project(grad, basis, RIGHT)
    torch.testing.assert_close(project_back(low, basis, RIGHT, 0.25), 0.25 * (low @ basis))
    assert torch.equal(project_back(low, basis, RIGHT), low @ basis)


def test_svd_runs_in_fp32_and_basis_keeps_grad_dtype(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []
    real_svd = torch.linalg.svd

    def spy(a: torch.Tensor, *args, **kwargs):
        seen.append(a.dtype)
        return real_svd(a, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", spy)
    grad = _grad((12, 8), dtype=torch.bfloat16)
    basis = compute_basis(grad, 3, LEFT)
    assert seen == [torch.float32]
    assert basis.dtype == torch.bfloat16
    assert project(grad, basis, LEFT).dtype == torch.bfloat16


def test_basis_does_not_keep_full_svd_factors_alive() -> None:
    # the state_dict serialises whole storages; a view into U (m x min(m, n)) would waste memory and disk
    basis = compute_basis(_grad((64, 48)), 4, LEFT)
    assert basis.is_contiguous()
    assert basis.untyped_storage().nbytes() == basis.numel() * basis.element_size()
