"""Which γ decoder layers to train next: outlier-weighted (OwLore) or uniform (LISA) layer sampling.

OwLore, arXiv 2405.18380: layers with more outliers (higher LOD ratio, see ``owlore.layerwise.outliers``) are sampled more
often. LISA, arXiv 2403.17919: uniform sampling. Both draw γ distinct layers every K optimizer steps.

The official code draws with ``numpy.random.choice(L, γ, replace=False, p=p)``: sequential sampling, under which a
layer's chance of being in a draw is *not* ``γ·p_l`` (a layer with p=0.12 and γ=5 is included about 52 % of the
time, not 60 %). ``scheme="exact"`` instead realises the inclusion probabilities ``π_l = min(1, c·p_l)`` (capped,
summing to γ) exactly, by randomised systematic sampling (Madow, 1949): permute the layers, lay the π's end to end
on ``[0, γ)`` and take the layers hit by ``u, u+1, ..., u+γ-1``. ``scheme="sequential"`` keeps the official
behaviour (in distribution) for paper comparisons, via Gumbel-top-k, which is equivalent to successive sampling.

The systematic draw runs in integers (π in units of 2^-52, summing to exactly γ·2^52): in floats the cumulative
sum can end at γ - 1e-15 and ``u + j`` can round up to an integer, so a layer could be hit twice.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch

Mode = Literal["owl", "uniform", "owl_reverse", "increase", "decrease"]
Scheme = Literal["exact", "sequential"]
MODES: tuple[str, ...] = ("owl", "uniform", "owl_reverse", "increase", "decrease")
SCHEMES: tuple[str, ...] = ("exact", "sequential")


def sampling_weights(scores: torch.Tensor, mode: str, *, temperature: float = 1.0, floor: float = 0.0) -> torch.Tensor:
    """Per-layer sampling distribution ``p`` (sums to 1) for a mode.

    ``owl``: ``p ∝ ratio^(1/temperature)`` (temperature 1 is the paper's linear normalisation), then
    ``floor`` mixes in uniform mass, ``p = (1 - floor)·p + floor/L``, so no layer starves.
    ``owl_reverse``: ``p ∝ max(p_owl) - p_owl`` (official). ``increase``/``decrease``: ``p ∝ l+1`` / ``L-l``.
    """
    s = scores.detach().double().cpu()
    L = s.numel()
    if mode == "uniform":
        p = torch.ones(L, dtype=torch.float64)
    elif mode == "increase":
        p = torch.arange(1, L + 1, dtype=torch.float64)
    elif mode == "decrease":
        p = torch.arange(L, 0, -1, dtype=torch.float64)
    elif mode in ("owl", "owl_reverse"):
        if (s < 0).any() or not torch.isfinite(s).all() or s.sum() <= 0:
            raise ValueError(f"outlier scores must be finite, non-negative and not all zero; got {s.tolist()}")
        p = s.pow(1.0 / temperature)
        if mode == "owl_reverse":
            p = p / p.sum()
            p = p.max() - p
            if p.sum() <= 0:  # all layers equal
                p = torch.ones(L, dtype=torch.float64)
    else:
        raise ValueError(f"unknown sampling mode {mode!r}; choose one of {MODES}")
    p = p / p.sum()
    return (1.0 - floor) * p + floor / L


def capped_inclusion(p: torch.Tensor, gamma: int) -> torch.Tensor:
    """Inclusion probabilities ``π = min(1, c·p)`` with ``c`` chosen so that ``sum(π) = γ``."""
    pi = torch.zeros_like(p)
    capped = torch.zeros_like(p, dtype=torch.bool)
    positive = p > 0
    if int(positive.sum()) < gamma:
        raise ValueError(f"only {int(positive.sum())} layers have non-zero probability, cannot draw gamma={gamma}; "
                         "use floor > 0, a lower threshold, or a smaller gamma")
    for _ in range(p.numel() + 1):
        free = ~capped
        rest = gamma - int(capped.sum())
        pi[free] = p[free] * rest / p[free].sum()
        pi[capped] = 1.0
        over = free & (pi > 1.0)
        if not over.any():
            break
        capped |= over
    return pi


def inclusion_units(pi: torch.Tensor, gamma: int, bits: int) -> torch.Tensor:
    """``π`` as int64 multiples of ``2^-bits``, each in ``[0, 2^bits]``, summing to exactly ``γ·2^bits``.

    Floors ``π·2^bits`` (exact: a power-of-two scale), then hands the few units that float round-off left over (or
    took too many) to the layers with the largest (smallest) remainders, so no layer moves by more than ~1 unit.
    """
    one = 1 << bits
    scaled = pi.double() * float(one)
    units = scaled.floor().long().clamp_(0, one)
    remainder = scaled - units.double()
    deficit = gamma * one - int(units.sum())
    step = 1 if deficit > 0 else -1
    while deficit:
        eligible = units < one if step > 0 else units > 0
        candidates = torch.nonzero(eligible & (pi > 0) if step > 0 else eligible).flatten()
        if candidates.numel() == 0:
            raise ValueError(f"inclusion probabilities {pi.tolist()} cannot sum to gamma={gamma}")
        ranked = candidates[torch.argsort(remainder[candidates], descending=step > 0, stable=True)]
        take = ranked[: abs(deficit)]
        units[take] += step
        deficit -= step * take.numel()
    return units


class LayerSampler:
    """Draws γ distinct decoder-layer indices per call, from its own ``torch.Generator``.

    Args:
        scores: per-layer outlier ratios ``[L]`` (ignored except for their count in non-``owl`` modes).
        gamma: layers per draw (OwLore paper: 5).
        mode: ``owl``, ``uniform`` (LISA), ``owl_reverse``, ``increase`` or ``decrease``.
        temperature: ``owl`` weights are ``ratio^(1/temperature)``; larger flattens, smaller sharpens.
        floor: share of uniform mass mixed in, in [0, 1].
        seed: seed of the sampler's private generator (global RNGs are never touched).
        scheme: ``exact`` (inclusion probabilities realised exactly) or ``sequential`` (official numpy behaviour).
    """

    def __init__(
        self,
        scores: torch.Tensor | Sequence[float],
        *,
        gamma: int,
        mode: str = "owl",
        temperature: float = 1.0,
        floor: float = 0.0,
        seed: int = 0,
        scheme: str = "exact",
    ) -> None:
        scores = torch.as_tensor(scores, dtype=torch.float64).flatten()
        errors = []
        if scores.numel() == 0:
            errors.append("scores is empty")
        if not 1 <= gamma <= max(scores.numel(), 1):
            errors.append(f"gamma={gamma} must be in [1, {scores.numel()}] (number of layers)")
        if temperature <= 0:
            errors.append(f"temperature={temperature} must be > 0")
        if not 0.0 <= floor <= 1.0:
            errors.append(f"floor={floor} must be in [0, 1]")
        if mode not in MODES:
            errors.append(f"mode={mode!r} must be one of {MODES}")
        if scheme not in SCHEMES:
            errors.append(f"scheme={scheme!r} must be one of {SCHEMES}")
        if errors:
            raise ValueError("invalid LayerSampler arguments: " + "; ".join(errors))
        self.scores = scores
        self.gamma = gamma
        self.mode = mode
        self.scheme = scheme
        self.probabilities = sampling_weights(scores, mode, temperature=temperature, floor=floor)
        self._pi = capped_inclusion(self.probabilities, gamma)
        # γ·2^bits must fit in int64; 52 bits is the resolution of torch.rand's float64 output.
        self._bits = min(52, 62 - scores.numel().bit_length())
        self._units = inclusion_units(self._pi, gamma, self._bits)
        self._estimates: dict[int, torch.Tensor] = {}
        self.generator = torch.Generator().manual_seed(seed)
        self.counts = torch.zeros(scores.numel(), dtype=torch.long)
        self.num_draws = 0

    @property
    def num_layers(self) -> int:
        return self.scores.numel()

    def inclusion_probabilities(self, *, num_draws: int = 200_000) -> torch.Tensor:
        """Probability of each layer being in one draw (sums to γ).

        Exact for ``scheme="exact"``. For ``sequential`` there is no closed form; it is estimated from
        ``num_draws`` Gumbel-top-k draws of a separate, fixed-seed generator (standard error < 0.0012).
        """
        if self.scheme == "exact":
            return self._pi.clone()
        if num_draws not in self._estimates:
            gen = torch.Generator().manual_seed(12345)
            draws = self._gumbel_topk(num_draws, gen)
            self._estimates[num_draws] = torch.bincount(draws.flatten(), minlength=self.num_layers).double() / num_draws
        return self._estimates[num_draws].clone()

    def _gumbel_topk(self, n: int, gen: torch.Generator) -> torch.Tensor:
        logp = self.probabilities.log()
        u = torch.rand(n, self.num_layers, generator=gen, dtype=torch.float64).clamp_min(1e-300)
        return torch.topk(logp - (-u.log()).log(), self.gamma, dim=1).indices

    def _systematic(self) -> list[int]:
        """Madow's draw in exact integer arithmetic, so it always hits γ distinct layers.

        Layer ``order[k]`` owns ``[cum[k-1], cum[k])``, at most one unit ``2^bits`` long; the points
        ``u + j·2^bits`` are one unit apart, so each interval holds at most one, and ``cum[-1] = γ·2^bits``
        exactly, so all γ of them land.
        """
        order = torch.randperm(self.num_layers, generator=self.generator)
        cum = torch.cumsum(self._units[order], 0)
        u = torch.rand((), generator=self.generator, dtype=torch.float64).item()
        one = 1 << self._bits
        u_units = min(math.floor(u * one), one - 1)  # exact: u has 53 bits, the scale is a power of two
        points = torch.arange(self.gamma, dtype=torch.long) * one + u_units
        hits = torch.searchsorted(cum, points, right=True)
        return order[hits].tolist()

    def sample(self) -> list[int]:
        """γ distinct layer indices, sorted; updates the per-layer activation counts."""
        if self.scheme == "exact":
            picked = self._systematic()
        else:
            picked = self._gumbel_topk(1, self.generator)[0].tolist()
        picked = sorted(set(picked))
        if len(picked) != self.gamma:  # a bug, not round-off: both schemes draw γ distinct layers by construction
            raise RuntimeError(f"sampler drew {picked}, expected {self.gamma} distinct layers")
        self.counts[picked] += 1
        self.num_draws += 1
        return picked

    def state_dict(self) -> dict[str, Any]:
        """Generator state, counts and draw number: tensors and ints only (``weights_only``-loadable)."""
        return {"generator": self.generator.get_state(), "counts": self.counts.clone(), "num_draws": self.num_draws}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["counts"].numel() != self.num_layers:
            raise ValueError(f"sampler state is for {state['counts'].numel()} layers, this sampler has {self.num_layers}")
        self.generator.set_state(state["generator"])
        self.counts = state["counts"].clone().long()
        self.num_draws = int(state["num_draws"])

    def __repr__(self) -> str:
        return (f"LayerSampler(L={self.num_layers}, gamma={self.gamma}, mode={self.mode!r}, scheme={self.scheme!r}, "
                f"max/min p={self.probabilities.max() / max(self.probabilities.min(), 1e-12):.3g})")

