import pytest
import torch
from torch import nn

from owlore.pruning import (
    mlp_jacobian_kernel,
    random_unit_directions,
    sads_select,
    zoo_sensitivity,
    zoo_sensitivity_exact,
)
from owlore.pruning.flops import VisionShape, zoo_estimator_flops, zoo_exact_flops

from .reference import greedy_loop, spearman

# torch.func.jvp lazily scripts decompositions inside torch; that deprecation is torch's, not ours.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")


def _mlp(dv=32, hidden=64, dl=64, seed=0):
    torch.manual_seed(seed)
    l1, act, l2 = nn.Linear(dv, hidden), nn.GELU(), nn.Linear(hidden, dl)
    return l1, act, l2, (lambda x: l2(act(l1(x))))


def test_estimator_matches_loop():
    l1, act, l2, proj = _mlp(dv=6, hidden=8, dl=5)
    x = torch.randn(2, 4, 6)
    dirs = random_unit_directions(3, 6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = zoo_sensitivity(proj, x, directions=dirs, step=0.01, chunk_size=2)
        for b in range(2):
            for i in range(4):
                norms = [
                    float((proj(x[b, i] + 0.01 * u) - proj(x[b, i] - 0.01 * u)).norm()) / 0.02 for u in dirs
                ]
                assert abs(float(got[b, i]) - sum(norms) / 3) < 1e-4 * max(norms)


def test_directions_are_unit_and_shared():
    dirs = random_unit_directions(16, 10, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(dirs.norm(dim=-1), torch.ones(16))


def test_exact_equals_jacobian_frobenius_norm():
    l1, act, l2, proj = _mlp(dv=12, hidden=20, dl=9)
    x = torch.randn(1, 10, 12)
    with torch.no_grad():
        got = zoo_sensitivity_exact(
            x,
            weight1=l1.weight,
            bias1=l1.bias,
            activation=act,
            kernel=mlp_jacobian_kernel(l1.weight, l2.weight),
        )
    for i in range(10):
        jac = torch.autograd.functional.jacobian(proj, x[0, i])  # (dl, dv)
        torch.testing.assert_close(got[0, i], jac.norm() / 12**0.5, rtol=1e-4, atol=1e-6)


def test_estimator_and_exact_rank_alike():
    """m=64 central differences in fp32 vs the closed form: Spearman > 0.9 on a random MLP projector."""
    l1, act, l2, proj = _mlp(seed=3)
    x = torch.randn(2, 100, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        dirs = random_unit_directions(64, 32, generator=torch.Generator().manual_seed(0))
        est = zoo_sensitivity(proj, x, directions=dirs, step=0.01)
        exact = zoo_sensitivity_exact(
            x,
            weight1=l1.weight,
            bias1=l1.bias,
            activation=act,
            kernel=mlp_jacobian_kernel(l1.weight, l2.weight),
        )
    for b in range(2):
        assert spearman(est[b], exact[b]) > 0.9
        # and the signal is more than the feature norm of the output
        assert spearman(est[b], proj(x[b]).norm(dim=-1).detach()) < spearman(est[b], exact[b])


def test_exact_costs_50x_less_at_llava_shape():
    llava = VisionShape()  # CLIP-L/336 -> 4096 mlp2x_gelu
    assert zoo_estimator_flops(576, llava, directions=64) / zoo_exact_flops(576, llava) >= 50


def test_sads_matches_naive_greedy():
    g = torch.Generator().manual_seed(4)
    sens = torch.rand(2, 30, generator=g)
    proj = torch.randn(2, 30, 8, generator=g)
    got = sads_select(sens, proj, 7)
    for b in range(2):
        s = sens[b].double()
        s_hat = ((s - s.min()) / (s.max() - s.min() + 1e-8)).tolist()
        first = max(range(30), key=lambda i: s_hat[i])
        assert got[b].tolist() == greedy_loop(proj[b], 7, first, weight=s_hat)
        assert first in got[b].tolist()
