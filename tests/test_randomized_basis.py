"""Randomized range finder for GaLore bases: subspace quality against the full SVD, warm starts, and the optimizer
option (deterministic, resumable, validated)."""

import io

import pytest
import torch

from owlore.optim.galore_adamw import GaLoreAdamW
from owlore.optim.projector import LEFT, RIGHT, captured_energy, compute_basis, randomized_basis


def _decaying(m, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, m, generator=g))
    v, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    k = min(m, n)
    return (u[:, :k] * torch.logspace(0, -3, k)) @ v[:, :k].t()


@pytest.mark.parametrize(("shape", "side"), [((96, 40), RIGHT), ((40, 96), LEFT), ((64, 64), LEFT)])
def test_randomized_basis_is_orthonormal_and_nearly_as_good_as_the_svd(shape, side):
    grad = _decaying(*shape)
    exact = captured_energy(grad, compute_basis(grad, 8, side), side)
    basis = randomized_basis(grad, 8, side, power_iters=2)
    gram = basis.t() @ basis if side == LEFT else basis @ basis.t()
    torch.testing.assert_close(gram, torch.eye(8), atol=1e-5, rtol=0)
    assert captured_energy(grad, basis, side) >= 0.98 * exact
    # more power iterations never hurt much and approach the SVD
    assert captured_energy(grad, randomized_basis(grad, 8, side, power_iters=4), side) >= 0.995 * exact


def test_exact_on_a_low_rank_gradient():
    g = torch.Generator().manual_seed(1)
    grad = torch.randn(50, 6, generator=g) @ torch.randn(6, 30, generator=g)  # rank 6
    basis = randomized_basis(grad, 6, LEFT, power_iters=0)
    assert captured_energy(grad, basis, LEFT) == pytest.approx(1.0, abs=1e-5)


def test_warm_start_recovers_a_drifted_subspace_without_power_iterations():
    grad = _decaying(120, 48)
    prev = compute_basis(grad, 8, RIGHT)
    drifted = grad + 1e-4 * torch.randn(120, 48, generator=torch.Generator().manual_seed(3))
    exact = captured_energy(drifted, compute_basis(drifted, 8, RIGHT), RIGHT)
    cold = captured_energy(drifted, randomized_basis(drifted, 8, RIGHT, power_iters=0), RIGHT)
    warm = captured_energy(drifted, randomized_basis(drifted, 8, RIGHT, warm=prev, power_iters=0), RIGHT)
    assert warm >= 0.999 * exact and warm > cold


def test_same_seed_same_basis():
    grad = _decaying(60, 30)
    torch.testing.assert_close(randomized_basis(grad, 4, LEFT, seed=7), randomized_basis(grad, 4, LEFT, seed=7))


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.Tanh(), torch.nn.Linear(48, 16))


def _opt(model, method):
    ws = [model[0].weight, model[2].weight]
    rest = [model[0].bias, model[2].bias]
    return GaLoreAdamW([{"params": ws, "rank": 4, "update_proj_gap": 3, "scale": 1.0, "basis_method": method},
                        {"params": rest}], lr=1e-2)


def _steps(model, opt, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(n):
        x = torch.randn(16, 32, generator=g)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_optimizer_randomized_basis_trains_like_svd_and_resumes_exactly():
    ref_model = _model()
    ref = _steps(ref_model, _opt(ref_model, "svd"), 12)
    model = _model()
    opt = _opt(model, "randomized")
    got = _steps(model, opt, 12)
    assert all(abs(a - b) <= 0.05 * abs(b) for a, b in zip(got, ref, strict=True))
    # resume: save after 5 steps, continue in a fresh optimizer == uninterrupted
    a = _model()
    opt_a = _opt(a, "randomized")
    _steps(a, opt_a, 5)
    buf = io.BytesIO()
    torch.save({"model": a.state_dict(), "opt": opt_a.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    tail_a = _steps(a, opt_a, 6, seed=9)
    b = _model()
    b.load_state_dict(saved["model"])
    opt_b = _opt(b, "randomized")
    opt_b.load_state_dict(saved["opt"])
    assert _steps(b, opt_b, 6, seed=9) == tail_a


def test_bad_basis_options_are_rejected():
    model = _model()
    with pytest.raises(ValueError, match="basis_method must be one of svd, randomized"):
        GaLoreAdamW([{"params": [model[0].weight], "rank": 4, "basis_method": "qr"}])
    with pytest.raises(ValueError, match="power_iters must be an int >= 0"):
        GaLoreAdamW([{"params": [model[0].weight], "rank": 4, "power_iters": -1}])
