"""LayerSampler: realised inclusion frequencies, modes, determinism, state round trip."""

import io

import pytest
import torch

from owlore.layerwise.sampler import LayerSampler, capped_inclusion, inclusion_units, sampling_weights

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


# A real LOD-like case whose float cumsum of inclusion probabilities, in the seed-0 permutation, ends at
# γ - 8.9e-16 with a capped (π = 1) layer last.
AWKWARD = torch.tensor([0.0379, 0.0003, 0.0521, 0.0001, 0.3439, 0.2187, 0.5359, 0.0254, 0.026, 0.0, 0.7019, 0.6415,
                        0.7239, 0.5665, 0.2074, 0.3426, 0.3021, 0.0198], dtype=torch.float64)
TOP_OF_RAND = 1.0 - 2.0**-53  # the largest double torch.rand can return


@pytest.mark.parametrize("u", [TOP_OF_RAND, 0.0, 0.5])
def test_systematic_draw_distinct_when_float_cumsum_falls_short_of_gamma(monkeypatch, u):
    sampler = LayerSampler(AWKWARD, gamma=7, seed=0)
    order = torch.randperm(len(AWKWARD), generator=torch.Generator().manual_seed(0))  # the sampler's first draw
    cum = torch.cumsum(sampler.inclusion_probabilities()[order], 0)
    assert cum[-1] < 7 and sampler.inclusion_probabilities()[order[-1]] == 1.0  # the case really is awkward
    monkeypatch.setattr(torch, "rand", lambda *a, **k: torch.tensor(u, dtype=torch.float64))
    draw = sampler.sample()  # the old float search drew the last layer twice here and raised "sampler drew ..."
    assert len(draw) == len(set(draw)) == 7
    assert AWKWARD[draw].gt(0).all()  # never the zero-probability layer
    pi = sampler.inclusion_probabilities()
    assert set(torch.nonzero(pi == 1.0).flatten().tolist()) <= set(draw)  # capped layers are always drawn


def test_systematic_draw_distinct_for_extreme_uniforms(monkeypatch):
    """γ = L (every π = 1) and u at the top of its range: u + j rounds to an integer in floats."""
    for u in (TOP_OF_RAND, 0.0):
        monkeypatch.setattr(torch, "rand", lambda *a, u=u, **k: torch.tensor(u, dtype=torch.float64))
        for L, gamma, mode in [(3, 3, "uniform"), (6, 6, "owl"), (32, 5, "owl"), (32, 31, "increase")]:
            s = LayerSampler(SCORES[:L], gamma=gamma, mode=mode, seed=L)
            for _ in range(5):
                draw = s.sample()
                assert len(draw) == len(set(draw)) == gamma, (L, gamma, u, draw)


def test_inclusion_units_sum_to_gamma_exactly():
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        L = int(torch.randint(2, 64, (), generator=g))
        gamma = int(torch.randint(1, L + 1, (), generator=g))
        p = torch.rand(L, generator=g, dtype=torch.float64).pow(6)
        p[torch.rand(L, generator=g) < 0.2] = 0.0
        if int((p > 0).sum()) < gamma:
            continue
        pi = capped_inclusion(p / p.sum(), gamma)
        units = inclusion_units(pi, gamma, 52)
        assert int(units.sum()) == gamma * 2**52
        assert (units >= 0).all() and (units <= 2**52).all() and (units[p == 0] == 0).all()
        assert (units.double() / 2**52 - pi).abs().max() < 1e-13
