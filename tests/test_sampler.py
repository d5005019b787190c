"""LayerSampler: realised inclusion frequencies, modes, determinism, state round trip."""

import io

import pytest
import torch

from owlore.sampler import LayerSampler, capped_inclusion, sampling_weights

# Shaped like the shipped LLaMA2-7B LOD file: high first layers, low middle, a bump at the end.
SCORES = torch.tensor([0.27, 0.29, 0.20, 0.17, 0.15, 0.14, 0.12, 0.11, 0.10, 0.09, 0.08, 0.07, 0.06, 0.05, 0.04,
                       0.04, 0.03, 0.03, 0.03, 0.02, 0.02, 0.02, 0.03, 0.02, 0.03, 0.02, 0.03, 0.03, 0.04, 0.05,
                       0.06, 0.08], dtype=torch.float64)


def _frequencies(sampler, n):
    counts = torch.zeros(sampler.num_layers)
    for _ in range(n):
        draw = sampler.sample()
        assert draw == sorted(set(draw)) and len(draw) == sampler.gamma
        counts[draw] += 1
    return counts / n


@pytest.mark.parametrize("mode", ["owl", "uniform", "owl_reverse", "increase", "decrease"])
def test_exact_scheme_realises_inclusion_probabilities(mode):
    sampler = LayerSampler(SCORES, gamma=5, mode=mode, seed=0)
    pi = sampler.inclusion_probabilities()
    assert pi.sum().item() == pytest.approx(5.0)
    assert (pi <= 1 + 1e-12).all()
    n = 20_000
    freq = _frequencies(sampler, n)
    se = (pi * (1 - pi) / n).sqrt()
    assert ((freq - pi).abs() <= 5 * se + 1e-9).all(), (freq - pi).abs().max()
    assert torch.equal(sampler.counts, (freq * n).round().long())


def test_exact_inclusion_is_proportional_where_uncapped():
    sampler = LayerSampler(SCORES, gamma=5, mode="owl")
    p = SCORES / SCORES.sum()
    assert torch.allclose(sampler.inclusion_probabilities(), 5 * p)  # no layer capped here


def test_capping_redistributes_mass():
    pi = capped_inclusion(torch.tensor([0.5, 0.3, 0.1, 0.05, 0.05], dtype=torch.float64), 3)
    assert pi[0] == 1.0 and pi[1] == 1.0
    assert pi.sum().item() == pytest.approx(3.0)
    assert torch.allclose(pi[2:], torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64))


def test_uniform_is_uniform():
    sampler = LayerSampler(torch.ones(8), gamma=2, mode="uniform", seed=3)
    assert torch.allclose(sampler.inclusion_probabilities(), torch.full((8,), 0.25, dtype=torch.float64))
    freq = _frequencies(sampler, 8000)
    assert (freq - 0.25).abs().max() < 5 * (0.25 * 0.75 / 8000) ** 0.5


def test_sequential_scheme_matches_numpy_choice_and_differs_from_exact():
    """The official draw: numpy.random.choice(L, γ, replace=False, p=p) (the oracle)."""
    import numpy as np

    p = (SCORES / SCORES.sum()).numpy()
    rng = np.random.default_rng(0)
    n = 20_000
    ref = np.zeros(len(p))
    for _ in range(n):
        ref[rng.choice(len(p), 5, replace=False, p=p)] += 1
    ref = torch.tensor(ref / n)
    seq = LayerSampler(SCORES, gamma=5, mode="owl", scheme="sequential", seed=0)
    est = seq.inclusion_probabilities()
    assert est.sum().item() == pytest.approx(5.0)
    assert (est - ref).abs().max() < 0.015
    freq = _frequencies(seq, n)
    assert (freq - ref).abs().max() < 0.02
    # Sequential sampling compresses the high-probability layers: 5·p_1 = 0.63 but inclusion is ~0.55.
    exact = LayerSampler(SCORES, gamma=5, mode="owl").inclusion_probabilities()
    assert exact[1] - est[1] > 0.05


def test_modes_and_options():
    L = len(SCORES)
    assert torch.allclose(sampling_weights(SCORES, "increase"), torch.arange(1, L + 1).double() / (L * (L + 1) / 2))
    rev = sampling_weights(SCORES, "owl_reverse")
    assert rev[1] == 0 and rev.argmax() == SCORES.argmin()
    sharp = sampling_weights(SCORES, "owl", temperature=0.5)
    assert sharp.max() > sampling_weights(SCORES, "owl").max()
    floored = sampling_weights(SCORES, "owl", floor=0.5)
    assert floored.min() >= 0.5 / L - 1e-12
    assert floored.sum().item() == pytest.approx(1.0)


def test_determinism_and_state_round_trip():
    a = LayerSampler(SCORES, gamma=5, seed=7)
    b = LayerSampler(SCORES, gamma=5, seed=7)
    assert [a.sample() for _ in range(10)] == [b.sample() for _ in range(10)]
    assert [a.sample() for _ in range(3)] != [LayerSampler(SCORES, gamma=5, seed=8).sample() for _ in range(3)]

    for scheme in ("exact", "sequential"):
        s = LayerSampler(SCORES, gamma=5, seed=1, scheme=scheme)
        for _ in range(4):
            s.sample()
        buf = io.BytesIO()
        torch.save(s.state_dict(), buf)
        buf.seek(0)
        state = torch.load(buf, weights_only=True)
        future = [s.sample() for _ in range(6)]
        resumed = LayerSampler(SCORES, gamma=5, seed=999, scheme=scheme)
        resumed.load_state_dict(state)
        assert [resumed.sample() for _ in range(6)] == future
        assert torch.equal(resumed.counts, s.counts) and resumed.num_draws == s.num_draws == 10


def test_global_rng_untouched():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    s = LayerSampler(SCORES, gamma=5, seed=0)
    s.sample()
    assert torch.equal(torch.rand(3), expected)


def test_invalid_arguments_all_reported():
    with pytest.raises(ValueError) as e:
        LayerSampler(SCORES, gamma=40, mode="bogus", temperature=0, floor=2, scheme="x")
    msg = str(e.value)
    for part in ("gamma=40", "temperature=0", "floor=2", "mode='bogus'", "scheme='x'"):
        assert part in msg
    with pytest.raises(ValueError, match="non-negative"):
        LayerSampler(torch.tensor([1.0, -1.0]), gamma=1)
    with pytest.raises(ValueError, match="non-zero probability"):
        LayerSampler(torch.tensor([1.0, 0.0, 0.0]), gamma=2)
