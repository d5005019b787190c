"""Tests for GaLoreAdamW and the param-group factory (owlore/optim/galore_adamw.py)."""

from __future__ import annotations

import copy
import logging
import re
import warnings

import pytest
import torch
from torch import nn

from owlore.layerwise.layers import find_decoder_layers, set_layers_trainable
from owlore.optim.galore_adamw import GaLoreAdamW, create_galore_optimizer, make_param_groups
from owlore.optim.projector import choose_side, compute_basis, project, project_back

ORIENTATIONS = {"tall": (12, 8), "wide": (8, 12)}
GALORE = {"rank": 4, "update_proj_gap": 5, "scale": 0.5}


def _grads(shape: tuple[int, ...], n: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(n)]


def _param(shape: tuple[int, ...], seed: int = 1) -> nn.Parameter:
    return nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(seed)))


def _run(opt: torch.optim.Optimizer, params: list[nn.Parameter], grads: list[list[torch.Tensor]]) -> None:
    """Feed explicit gradients: grads[step][i] goes to params[i]."""
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()


def _oracle(params: list[dict], **kwargs) -> torch.optim.Optimizer:
    galore_torch = pytest.importorskip("galore_torch")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return galore_torch.GaLoreAdamW(params, no_deprecation_warning=True, **kwargs)


def _svd_spy(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, ...]]:
    calls: list[tuple[int, ...]] = []
    real_svd = torch.linalg.svd

    def spy(a: torch.Tensor, *args, **kwargs):
        calls.append(tuple(a.shape))
        return real_svd(a, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", spy)
    return calls


# ---------------------------------------------------------------- reference equivalence


@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "left", "right"])
@pytest.mark.parametrize("orientation", ["tall", "wide"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_hf_convention_matches_galore_torch(proj_type: str, orientation: str, weight_decay: float) -> None:
    # convention="hf" reproduces galore-torch's AdamW order (eps before bias correction, decay after the update).
    shape = ORIENTATIONS[orientation]
    ours, ref = _param(shape), _param(shape)
    group = {**GALORE, "proj_type": proj_type, "weight_decay": weight_decay}
    opt = GaLoreAdamW([{"params": [ours], **group}], lr=1e-2, convention="hf")
    oracle = _oracle([{"params": [ref], **group}], lr=1e-2)
    grads = [[g] for g in _grads(shape, 12)]  # gap 5: bases from steps 1, 6 and 11
    _run(opt, [ours], grads)
    _run(oracle, [ref], grads)
    # only the matmul layout of the (contiguous vs view) basis differs: ~1 ulp
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(opt.state[ours]["exp_avg"], oracle.state[ref]["exp_avg"], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "left", "right"])
@pytest.mark.parametrize("orientation", ["tall", "wide"])
def test_torch_convention_matches_galore_torch_where_eps_placement_vanishes(
    proj_type: str, orientation: str
) -> None:
    # At wd=0 the conventions differ only in eps vs eps/sqrt(1-beta2^t); with a tiny eps both are negligible.
    shape = ORIENTATIONS[orientation]
    ours, ref = _param(shape), _param(shape)
    group = {**GALORE, "proj_type": proj_type}
    opt = GaLoreAdamW([{"params": [ours], **group}], lr=1e-2, eps=1e-12)
    oracle = _oracle([{"params": [ref], **group}], lr=1e-2, eps=1e-12)
    grads = [[g] for g in _grads(shape, 12)]
    _run(opt, [ours], grads)
    _run(oracle, [ref], grads)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-6)


def test_conventions_differ_when_eps_and_decay_matter() -> None:
    a, b = _param((12, 8)), _param((12, 8))
    kw = {**GALORE, "weight_decay": 0.5}
    grads = [[g] for g in _grads((12, 8), 4)]
    _run(GaLoreAdamW([{"params": [a], **kw}], lr=0.1, eps=1e-2), [a], grads)
    _run(GaLoreAdamW([{"params": [b], **kw}], lr=0.1, eps=1e-2, convention="hf"), [b], grads)
    assert (a - b).abs().max() > 1e-4


def test_reverse_std_full_rank_wide_where_galore_torch_breaks() -> None:
    # galore-torch bug (cf. ms-swift PR #10146): for a wide matrix with rank >= m, reverse_std projects on the
    # right but project_back guesses the side from the low-rank shape (m x m) and multiplies on the left, which
    # raises. Mathematically reverse_std on a wide matrix *is* the right projection, so compare with that.
    shape = (8, 12)
    ours, ref, broken = _param(shape), _param(shape), _param(shape)
    group = {"rank": 8, "update_proj_gap": 5, "scale": 0.5}
    grads = [[g] for g in _grads(shape, 12)]
    with pytest.raises(RuntimeError):
        _run(_oracle([{"params": [broken], **group, "proj_type": "reverse_std"}], lr=1e-2), [broken], grads)
    _run(
        GaLoreAdamW([{"params": [ours], **group, "proj_type": "reverse_std"}], lr=1e-2, convention="hf"),
        [ours],
        grads,
    )
    _run(_oracle([{"params": [ref], **group, "proj_type": "right"}], lr=1e-2), [ref], grads)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-6)


IMPLEMENTATIONS = {  # GaLoreAdamW's kernel options -> the torch.optim.AdamW options it must equal bit for bit
    "fused": ({}, {"fused": True}),
    "foreach": ({"fused": False}, {"foreach": True}),
    "loop": ({"fused": False, "foreach": False}, {"foreach": False}),
}


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("state_dtype", [torch.float32, None])
def test_full_rank_groups_match_torch_adamw_exactly(state_dtype: torch.dtype | None, impl: str) -> None:
    ours_options, torch_options = IMPLEMENTATIONS[impl]
    shapes = [(6, 4), (5,), (3, 7), (4,)]
    ours = [_param(s, seed=i) for i, s in enumerate(shapes)]
    ref = [_param(s, seed=i) for i, s in enumerate(shapes)]
    settings = [
        {"lr": 1e-2, "weight_decay": 0.1},
        {"lr": 3e-3, "weight_decay": 0.0},
        {"lr": 5e-3, "weight_decay": 0.05},
    ]
    # the third group carries `rank` but holds only a 1-D param: documented as plain AdamW
    opt = GaLoreAdamW(
        [
            {"params": ours[:2], **settings[0]},
            {"params": [ours[2]], **settings[1]},
            {"params": [ours[3]], **settings[2], "rank": 2},
        ],
        betas=(0.8, 0.99),
        state_dtype=state_dtype,  # fp32 params: the default fp32 state and "follow the gradient" are the same
        **ours_options,
    )
    torch_opt = torch.optim.AdamW(
        [
            {"params": ref[:2], **settings[0]},
            {"params": [ref[2]], **settings[1]},
            {"params": [ref[3]], **settings[2]},
        ],
        betas=(0.8, 0.99),
        eps=1e-6,
        **torch_options,
    )
    grads = [[_grads(s, 1, seed=10 * step + i)[0] for i, s in enumerate(shapes)] for step in range(10)]
    _run(opt, ours, grads)
    _run(torch_opt, ref, grads)
    for a, b in zip(ours, ref):
        assert torch.equal(a, b)
        assert torch.equal(opt.state[a]["exp_avg_sq"], torch_opt.state[b]["exp_avg_sq"])


def test_plain_params_take_one_torch_call_per_group_and_step_count(monkeypatch: pytest.MonkeyPatch) -> None:
    import owlore.optim.galore_adamw as optim_module

    calls: list[int] = []
    real = optim_module.torch_adamw
    monkeypatch.setattr(optim_module, "torch_adamw", lambda ps, *a, **k: calls.append(len(ps)) or real(ps, *a, **k))
    params = [_param((6, 4), seed=1), _param((5,), seed=2), _param((3, 7), seed=3), _param((12, 8), seed=4)]
    opt = GaLoreAdamW([{"params": params[:3]}, {"params": params[3:], **GALORE}], lr=1e-2)
    grads = [[_grads(p.shape, 1, seed=10 * s + i)[0] for i, p in enumerate(params)] for s in range(2)]
    _run(opt, params, grads)
    assert calls == [3, 3]  # the projected (12, 8) weight steps on its own path
    opt.drop_state(params[:1])  # params[0] restarts at step 1: a second bucket in the same group
    _run(opt, params, grads[:1])
    assert calls[:2] == [3, 3] and sorted(calls[2:]) == [1, 2]


def test_plain_params_with_different_step_counts_match_the_loop() -> None:
    shapes = [(6, 4), (5,), (3, 7)]
    runs = {}
    for name, options in (("loop", {"fused": False, "foreach": False}), ("fused", {}), ("foreach", {"fused": False})):
        params = [_param(s, seed=i) for i, s in enumerate(shapes)]
        opt = GaLoreAdamW([{"params": params, "weight_decay": 0.1}], lr=1e-2, **options)
        grads = [[_grads(s, 1, seed=10 * step + i)[0] for i, s in enumerate(shapes)] for step in range(6)]
        _run(opt, params, grads[:3])
        opt.drop_state(params[1:2])  # its bias correction restarts while the others go on
        _run(opt, params, grads[3:])
        assert [opt.state[p]["step"] for p in params] == [6, 3, 6]
        runs[name] = params
    for name in ("fused", "foreach"):
        for a, b in zip(runs[name], runs["loop"]):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)  # fused rounds differently in the last bit


def test_first_galore_step_by_hand_torch_convention() -> None:
    # torch convention: decay the weight first, then W -= lr * scale * backproject(m_hat / (sqrt(v_hat) + eps))
    p = _param((12, 8))
    w0 = p.detach().clone()
    (grad,) = _grads((12, 8), 1)
    lr, wd, eps = 0.1, 0.2, 1e-3
    opt = GaLoreAdamW([{"params": [p], **GALORE, "weight_decay": wd}], lr=lr, eps=eps)
    _run(opt, [p], [[grad]])
    side = choose_side("std", grad.shape)
    basis = compute_basis(grad, GALORE["rank"], side)
    low = project(grad, basis, side)  # step 1: m_hat = low, v_hat = low**2
    expected = w0 * (1 - lr * wd) - lr * project_back(low / (low.abs() + eps), basis, side, GALORE["scale"])
    torch.testing.assert_close(p.detach(), expected, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------- basis schedule, robustness


def test_basis_refreshed_on_first_step_and_every_gap(monkeypatch: pytest.MonkeyPatch) -> None:
    p = _param((12, 8))
    opt = GaLoreAdamW([{"params": [p], **GALORE}], lr=1e-2)
    calls = _svd_spy(monkeypatch)
    refreshed = []
    for step, (g,) in enumerate([[g] for g in _grads((12, 8), 12)], start=1):
        before = len(calls)
        _run(opt, [p], [[g]])
        if len(calls) > before:
            refreshed.append(step)
    assert refreshed == [1, 6, 11]
    assert opt.state[p]["step"] == 12


def test_steps_without_grad_do_not_count(monkeypatch: pytest.MonkeyPatch) -> None:
    p = _param((12, 8))
    opt = GaLoreAdamW([{"params": [p], **GALORE}], lr=1e-2)
    _run(opt, [p], [[g] for g in _grads((12, 8), 3)])
    p.grad = None
    opt.step()
    assert opt.state[p]["step"] == 3


def test_frozen_params_untouched_and_stateless() -> None:
    frozen, active = _param((12, 8), seed=1), _param((12, 8), seed=2)
    frozen.requires_grad_(False)
    before = frozen.detach().clone()
    opt = GaLoreAdamW([{"params": [frozen, active], **GALORE, "weight_decay": 0.1}], lr=1e-2)
    _run(opt, [active], [[g] for g in _grads((12, 8), 3)])
    assert frozen.grad is None and torch.equal(frozen, before)
    assert frozen not in opt.state and opt.state[active]["step"] == 3


def test_non_finite_grad_on_refresh_step_keeps_basis_and_skips(caplog: pytest.LogCaptureFixture) -> None:
    p = _param((12, 8))
    opt = GaLoreAdamW([{"params": [p], **GALORE, "update_proj_gap": 2}], lr=1e-2)
    _run(opt, [p], [[g] for g in _grads((12, 8), 2)])
    basis = opt.state[p]["basis"].clone()
    bad = _grads((12, 8), 1, seed=5)[0]
    bad[0, 0] = float("nan")
    with caplog.at_level(logging.WARNING, logger="owlore.optim.galore_adamw"):
        _run(opt, [p], [[bad]])  # step 3 is a refresh step
    assert "not finite for param 0 (12, 8) of group 0" in caplog.text and "skipping its update" in caplog.text
    assert torch.equal(opt.state[p]["basis"], basis) and opt.state[p]["step"] == 2


def test_non_finite_skips_are_counted_and_logged_rate_limited(caplog: pytest.LogCaptureFixture) -> None:
    a, b = _param((12, 8)), _param((5,))
    opt = GaLoreAdamW([{"params": [a], **GALORE, "name": "galore"}, {"params": [b]}], lr=1e-2)
    with caplog.at_level(logging.WARNING, logger="owlore.optim.galore_adamw"):
        # a: 5 NaN steps; b: 5 finite steps, then 4 inf ones
        _run(opt, [a, b], [[torch.full((12, 8), float("nan")), torch.ones(5)]] * 5)
        _run(opt, [a, b], [[torch.ones(12, 8), torch.full((5,), -float("inf"))]] * 4)
    assert opt.skipped_updates == 9 and "skipped_updates" not in str(opt.state_dict())
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 4  # skips 1, 2, 4 and 8
    assert "param 0 (12, 8) of group 'galore'" in messages[0] and "1 update(s) skipped" in messages[0]
    assert "param 0 (5,) of group 1" in messages[-1] and "8 update(s) skipped" in messages[-1]
    assert opt.state[a]["step"] == 4 and opt.state[b]["step"] == 5


def test_finiteness_costs_one_foreach_norm_per_step(monkeypatch: pytest.MonkeyPatch) -> None:
    params = [_param((12, 8), seed=1), _param((6,), seed=2), _param((8, 12), seed=3)]
    opt = GaLoreAdamW([{"params": params[::2], **GALORE}, {"params": params[1:2]}], lr=1e-2)
    calls: list[int] = []
    real = torch._foreach_norm
    monkeypatch.setattr(
        torch, "_foreach_norm", lambda ts, *a, **k: calls.append(len(ts)) or real(ts, *a, **k)
    )
    monkeypatch.setattr(torch, "isfinite", lambda *a: pytest.fail("per-tensor finiteness check"))
    _run(
        opt,
        params,
        [[g.clone() for g in (_grads((12, 8), 1)[0], _grads((6,), 1)[0], _grads((8, 12), 1)[0])]] * 3,
    )
    assert calls == [3, 3, 3]


def test_finite_grad_with_overflowing_norm_is_not_skipped() -> None:
    p = _param((64,))
    opt = GaLoreAdamW([p], lr=1e-2)
    _run(opt, [p], [[torch.full((64,), 1e30)]])  # the fp32 2-norm overflows, the gradient is finite
    assert opt.skipped_updates == 0 and opt.state[p]["step"] == 1


def _with_bad(grads: list[torch.Tensor], at: int | None, value: float) -> list[torch.Tensor]:
    """``grads`` with a copy of ``grads[0]`` holding one ``value`` entry inserted as call number ``at``."""
    if at is None:
        return grads
    bad = grads[0].clone()
    bad.view(-1)[3] = value
    return grads[:at] + [bad] + grads[at:]


def test_non_finite_grad_skips_whole_update_on_refresh_and_ordinary_steps() -> None:
    # Regression: a NaN gradient on a basis-refresh step kept the old basis but still entered the Adam moments
    # (and on ordinary steps nothing was checked), so the param's moments and weight were NaN forever after.
    # Now the whole update of that param is skipped: as if the optimizer never saw that step.
    shapes = {"refresh": (12, 8), "ordinary": (8, 12), "full_rank": (6,), "healthy": (12, 8)}
    # 0-based call at which each param gets its bad gradient; with gap 2 the refreshes are at calls 0, 2, 4
    bad_at = {"refresh": 2, "ordinary": 3, "full_rank": 1, "healthy": None}
    bad_value = {"refresh": float("nan"), "ordinary": float("nan"), "full_rank": float("inf"), "healthy": 0.0}
    galore = {**GALORE, "update_proj_gap": 2, "weight_decay": 0.1}

    def make(params: dict[str, nn.Parameter]) -> GaLoreAdamW:
        projected = [params[k] for k in ("refresh", "ordinary", "healthy") if k in params]
        groups = [{"params": projected, **galore}] if projected else []
        groups += [{"params": [params["full_rank"]], "weight_decay": 0.1}] if "full_rank" in params else []
        return GaLoreAdamW(groups, lr=1e-2)

    params = {k: _param(s, seed=i) for i, (k, s) in enumerate(shapes.items())}
    clean = {k: _grads(s, 6, seed=10 + i) for i, (k, s) in enumerate(shapes.items())}
    clean["healthy"] = _grads(shapes["healthy"], 7, seed=13)
    fed = {k: _with_bad(clean[k], bad_at[k], bad_value[k]) for k in shapes}
    opt = make(params)
    for step in range(7):
        snapshot = {
            k: (
                p.detach().clone(),
                {n: v.clone() for n, v in opt.state[p].items() if torch.is_tensor(v)},
                opt.state[p].get("step"),
            )
            for k, p in params.items()
            if bad_at[k] == step and p in opt.state
        }
        _run(opt, list(params.values()), [[fed[k][step] for k in shapes]])
        for k, (weight, tensors, count) in snapshot.items():
            p = params[k]
            assert torch.equal(p, weight), k
            assert opt.state[p]["step"] == count, k
            for name, value in tensors.items():
                assert torch.isfinite(opt.state[p][name]).all() and torch.equal(opt.state[p][name], value), (
                    k,
                    name,
                )
    for i, (k, s) in enumerate(shapes.items()):
        ref = {k: _param(s, seed=i)}
        _run(make(ref), [ref[k]], [[g] for g in clean[k]])  # the same run without the bad step
        assert torch.isfinite(params[k]).all() and torch.equal(params[k], ref[k]), k
    assert opt.skipped_updates == 3


def test_non_finite_grad_without_basis_skips_update(caplog: pytest.LogCaptureFixture) -> None:
    p, fresh = _param((12, 8)), _param((12, 8))
    before = p.detach().clone()
    opt = GaLoreAdamW([{"params": [p], **GALORE}], lr=1e-2)
    with caplog.at_level(logging.WARNING, logger="owlore.optim.galore_adamw"):
        _run(opt, [p], [[torch.full((12, 8), float("inf"))]])
    assert "skipping its update" in caplog.text
    assert torch.equal(p, before) and p not in opt.state
    # the next finite step is a first step
    grads = [[g] for g in _grads((12, 8), 1)]
    _run(opt, [p], grads)
    _run(GaLoreAdamW([{"params": [fresh], **GALORE}], lr=1e-2), [fresh], grads)
    assert opt.state[p]["step"] == 1 and torch.equal(p, fresh)


def test_svd_failure_keeps_previous_basis(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    p = _param((12, 8))
    opt = GaLoreAdamW([{"params": [p], **GALORE, "update_proj_gap": 2}], lr=1e-2)
    _run(opt, [p], [[g] for g in _grads((12, 8), 2)])
    basis, w = opt.state[p]["basis"].clone(), p.detach().clone()

    def boom(*args, **kwargs):
        raise torch.linalg.LinAlgError("did not converge")

    monkeypatch.setattr(torch.linalg, "svd", boom)
    with caplog.at_level(logging.WARNING, logger="owlore.optim.galore_adamw"):
        _run(opt, [p], [_grads((12, 8), 1, seed=7)])
    assert "SVD failed" in caplog.text
    assert torch.equal(opt.state[p]["basis"], basis)
    assert not torch.equal(p, w) and opt.state[p]["step"] == 3  # the step still happened, in the old subspace


def test_svd_failure_on_first_step_skips(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    p = _param((12, 8))
    before = p.detach().clone()
    opt = GaLoreAdamW([{"params": [p], **GALORE}], lr=1e-2)
    monkeypatch.setattr(torch.linalg, "svd", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    with caplog.at_level(logging.WARNING, logger="owlore.optim.galore_adamw"):
        _run(opt, [p], [_grads((12, 8), 1)])
    assert "SVD failed" in caplog.text and "skipping" in caplog.text
    assert torch.equal(p, before) and p not in opt.state


def test_svd_seconds_accumulate_on_refresh_only() -> None:
    p = _param((12, 8))
    opt = GaLoreAdamW([{"params": [p], **GALORE}], lr=1e-2)
    grads = [[g] for g in _grads((12, 8), 6)]
    _run(opt, [p], grads[:1])
    first = opt.svd_seconds
    _run(opt, [p], grads[1:5])
    assert first > 0 and opt.svd_seconds == first
    _run(opt, [p], grads[5:])
    assert opt.svd_seconds > first
    assert "svd_seconds" not in str(opt.state_dict())


# ---------------------------------------------------------------- state lifecycle


def test_drop_state_frees_and_restarts(monkeypatch: pytest.MonkeyPatch) -> None:
    a, b, fresh = _param((12, 8), seed=1), _param((8, 12), seed=2), _param((12, 8), seed=1)
    opt = GaLoreAdamW([{"params": [a, b], **GALORE}], lr=1e-2)
    grads = [[ga, gb] for ga, gb in zip(_grads((12, 8), 4), _grads((8, 12), 4, seed=1))]
    _run(opt, [a, b], grads[:3])
    _run(GaLoreAdamW([{"params": [fresh], **GALORE}], lr=1e-2), [fresh], [[g] for g, _ in grads[:3]])
    total, bytes_a = opt.state_bytes(), opt.state_bytes([a])
    # a: moments 12x4 twice + basis 4x8; b: moments 4x12 twice + basis 8x4 (fp32)
    assert bytes_a == (2 * 12 * 4 + 4 * 8) * 4 and total == bytes_a + (2 * 4 * 12 + 8 * 4) * 4
    assert opt.drop_state([a]) == bytes_a
    assert a not in opt.state and opt.state_bytes() == total - bytes_a and opt.state_bytes([a]) == 0
    calls = _svd_spy(monkeypatch)
    _run(opt, [a, b], grads[3:])
    assert calls == [(12, 8)]  # only a recomputes its basis (b is at its 4th step, gap 5)
    assert opt.state[a]["step"] == 1 and opt.state[b]["step"] == 4
    # a's update after the drop is a first step from a fresh optimizer, starting where a was
    restart = nn.Parameter(fresh.detach().clone())
    _run(GaLoreAdamW([{"params": [restart], **GALORE}], lr=1e-2), [restart], [grads[3][:1]])
    assert torch.equal(a, restart)


def test_move_state_only_moves_given_params() -> None:
    a, b = _param((12, 8), seed=1), _param((6,), seed=2)
    opt = GaLoreAdamW([{"params": [a], **GALORE}, {"params": [b]}], lr=1e-2)
    _run(opt, [a, b], [[_grads((12, 8), 1)[0], _grads((6,), 1)[0]]])
    total = opt.state_bytes()
    opt.move_state([a], "meta")
    assert {v.device.type for v in opt.state[a].values() if torch.is_tensor(v)} == {"meta"}
    assert {v.device.type for v in opt.state[b].values() if torch.is_tensor(v)} == {"cpu"}
    assert opt.state_bytes() == total and opt.state[a]["step"] == 1 and isinstance(opt.state[a]["side"], int)


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_move_state_round_trip_continues_identically(device: str) -> None:
    a, ref = _param((12, 8)), _param((12, 8))
    opt = GaLoreAdamW([{"params": [a], **GALORE}], lr=1e-2)
    ref_opt = GaLoreAdamW([{"params": [ref], **GALORE}], lr=1e-2)
    grads = [[g] for g in _grads((12, 8), 8)]
    _run(opt, [a], grads[:3])
    _run(ref_opt, [ref], grads[:3])
    saved = {k: v.clone() for k, v in opt.state[a].items() if torch.is_tensor(v)}
    opt.move_state([a], device)
    opt.move_state([a], "cpu")
    assert all(torch.equal(opt.state[a][k], v) for k, v in saved.items())
    _run(opt, [a], grads[3:])
    _run(ref_opt, [ref], grads[3:])
    assert torch.equal(a, ref)


def _batches(n: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128, (2, 8), generator=g) for _ in range(n)]


def _train(model: nn.Module, opt: torch.optim.Optimizer, batches: list[torch.Tensor]) -> None:
    for ids in batches:
        opt.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()


def test_save_load_continue_equals_uninterrupted_run(tiny_llama: nn.Module, tmp_path) -> None:
    set_layers_trainable(find_decoder_layers(tiny_llama), [0, 1])  # layers 2, 3 frozen: no grad, no state
    kwargs = {"lr": 1e-2, "rank": 4, "update_proj_gap": 3, "weight_decay": 0.1}
    opt = create_galore_optimizer(tiny_llama, **kwargs)
    batches = _batches(7)
    _train(tiny_llama, opt, batches[:3])
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    resumed_model = copy.deepcopy(tiny_llama)
    resumed = create_galore_optimizer(resumed_model, **kwargs)
    state = torch.load(tmp_path / "opt.pt", weights_only=True)
    for s in state["state"].values():
        assert all(isinstance(v, torch.Tensor | int) for v in s.values())
        assert "basis" not in s or isinstance(s["side"], int)
    resumed.load_state_dict(state)
    _train(tiny_llama, opt, batches[3:])  # the 4th step refreshes the bases (gap 3)
    _train(resumed_model, resumed, batches[3:])
    for (name, p), q in zip(tiny_llama.named_parameters(), resumed_model.parameters()):
        assert torch.equal(p, q), name
    frozen = list(find_decoder_layers(tiny_llama)[2].parameters())
    assert frozen and all(p not in opt.state for p in frozen)
    assert sum("basis" in s for s in opt.state.values()) == 14  # 7 linears x 2 active layers


def test_lambda_lr_scheduler_drives_group_lrs() -> None:
    a, b, ref_a, ref_b = _param((12, 8)), _param((5,)), _param((12, 8)), _param((5,))
    opt = GaLoreAdamW([{"params": [a], **GALORE, "lr": 2e-2}, {"params": [b], "lr": 4e-2}])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5)
    ref = GaLoreAdamW([{"params": [ref_a], **GALORE, "lr": 1e-2}, {"params": [ref_b], "lr": 2e-2}])
    grads = [[ga, gb] for ga, gb in zip(_grads((12, 8), 3), _grads((5,), 3, seed=1))]
    for step_grads in grads:
        _run(opt, [a, b], [step_grads])
        sched.step()
    _run(ref, [ref_a, ref_b], grads)
    assert [g["lr"] for g in opt.param_groups] == [1e-2, 2e-2]
    assert torch.equal(a, ref_a) and torch.equal(b, ref_b)


@pytest.mark.parametrize(
    ("group", "match"),
    [
        ({"rank": 0}, "rank"),
        ({"rank": 4, "proj_type": "full"}, "proj_type"),
        ({"rank": 4, "update_proj_gap": 0}, "gap"),
    ],
)
def test_invalid_galore_groups_rejected(group: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        GaLoreAdamW([{"params": [_param((4, 4))], **group}])


def test_invalid_convention_rejected() -> None:
    with pytest.raises(ValueError, match="convention"):
        GaLoreAdamW([_param((4, 4))], convention="tf")  # type: ignore[arg-type]


# ---------------------------------------------------------------- precision: state dtype, master weights


def _bf16(shape: tuple[int, ...], seed: int = 1) -> nn.Parameter:
    """A bf16 weight near 1, where a bf16 ulp (2^-7 on [1, 2), 2^-8 below) dwarfs a 1e-4 step."""
    g = torch.Generator().manual_seed(seed)
    return nn.Parameter((1 + 0.1 * torch.randn(shape, generator=g)).bfloat16())


def _bf16_groups(params: list[nn.Parameter], **options) -> list[dict]:
    return [
        {"params": [params[0]], **GALORE, "weight_decay": 0.1, **options},
        {"params": params[1:], **options},
    ]


BF16_SHAPES = [(12, 8), (16,)]


def _bf16_grads(n: int, drift: float = 0.0) -> list[list[torch.Tensor]]:
    """bf16 gradients; ``drift`` adds a constant part, so that Adam keeps moving the weights the same way."""
    return [
        [(drift + _grads(s, 1, seed=100 * t + i)[0]).bfloat16() for i, s in enumerate(BF16_SHAPES)]
        for t in range(n)
    ]


def test_default_state_is_fp32_for_bf16_params_and_none_follows_the_gradient() -> None:
    fp32_state, old = (
        [_bf16(s, i) for i, s in enumerate(BF16_SHAPES)],
        [_bf16(s, i) for i, s in enumerate(BF16_SHAPES)],
    )
    opt = GaLoreAdamW(_bf16_groups(fp32_state), lr=1e-2)
    legacy = GaLoreAdamW(_bf16_groups(old), lr=1e-2, state_dtype=None)
    grads = _bf16_grads(3)
    _run(opt, fp32_state, grads)
    _run(legacy, old, grads)
    for p, q in zip(fp32_state, old):
        assert p.dtype == q.dtype == torch.bfloat16
        assert opt.state[p]["exp_avg"].dtype == opt.state[p]["exp_avg_sq"].dtype == torch.float32
        assert legacy.state[q]["exp_avg"].dtype == legacy.state[q]["exp_avg_sq"].dtype == torch.bfloat16
    assert opt.state[fp32_state[0]]["basis"].dtype == torch.float32
    assert legacy.state[old[0]]["basis"].dtype == torch.bfloat16
    per_group = GaLoreAdamW(_bf16_groups(old, state_dtype=torch.bfloat16), lr=1e-2)  # per-group override
    _run(per_group, old, grads[:1])
    assert all(per_group.state[p]["exp_avg"].dtype == torch.bfloat16 for p in old)


def test_bf16_param_update_is_computed_in_fp32_and_rounded_once() -> None:
    # one step: the bf16 weight is the fp32 update of its own value, rounded to bf16 once
    params = [_bf16(s, i) for i, s in enumerate(BF16_SHAPES)]
    ref = [nn.Parameter(p.detach().float()) for p in params]
    groups = [{"params": [params[0]], **GALORE}, {"params": params[1:]}]
    ref_groups = [{"params": [ref[0]], **GALORE}, {"params": ref[1:]}]
    grads = _bf16_grads(1)
    _run(GaLoreAdamW(groups, lr=1e-2), params, grads)
    _run(GaLoreAdamW(ref_groups, lr=1e-2), ref, [[g.float() for g in grads[0]]])
    for p, r in zip(params, ref):
        assert p.dtype == torch.bfloat16 and torch.equal(p, r.bfloat16())


def test_master_weights_keep_small_updates_that_bf16_loses() -> None:
    n, lr = 100, 1e-4  # ~1e-2 of drift in total, but every single step is below half a bf16 ulp
    plain = [_bf16(s, i) for i, s in enumerate(BF16_SHAPES)]
    mastered = [_bf16(s, i) for i, s in enumerate(BF16_SHAPES)]
    ref = [nn.Parameter(p.detach().float()) for p in mastered]  # fp32 run from the same (bf16) start
    start = [p.detach().clone() for p in plain]
    grads = _bf16_grads(n, drift=2.0)
    _run(GaLoreAdamW(_bf16_groups(plain), lr=lr), plain, grads)
    opt = GaLoreAdamW(_bf16_groups(mastered), lr=lr, master_weights=True)
    _run(opt, mastered, grads)
    _run(GaLoreAdamW(_bf16_groups(ref), lr=lr), ref, [[g.float() for g in step] for step in grads])
    for p, p0, q, r in zip(plain, start, mastered, ref):
        assert (p == p0).float().mean() > 0.9  # without master weights (almost) every update was rounded away
        assert (q != p0).float().mean() > 0.5  # with them the accumulated update shows
        assert opt.state[q]["master"].dtype == torch.float32
        assert torch.equal(opt.state[q]["master"], r)  # the master *is* the fp32 run ...
        assert torch.equal(q, r.bfloat16())  # ... and the bf16 weight is its rounding


def test_master_weights_lifecycle() -> None:
    params = [_bf16(s, i) for i, s in enumerate(BF16_SHAPES)]
    fp32 = _param((5,))
    opt = GaLoreAdamW([*_bf16_groups(params), {"params": [fp32]}], lr=1e-2, master_weights=True)
    grads = _bf16_grads(3)
    _run(opt, params, grads[:1])
    assert all(opt.state[p]["master"].dtype == torch.float32 for p in params)
    p = params[1]
    assert opt.state_bytes([p]) == 3 * 16 * 4  # exp_avg, exp_avg_sq and master, all fp32
    fp32.grad = torch.ones(5)
    opt.step()
    assert "master" not in opt.state[fp32]  # fp32 params need no copy
    opt.move_state([p], "meta")
    assert opt.state[p]["master"].device.type == "meta"
    assert opt.drop_state([p]) == 3 * 16 * 4 and p not in opt.state
    fresh = nn.Parameter(p.detach().clone())
    _run(opt, params, grads[1:2])  # the master is re-created from the current bf16 weight
    fresh_opt = GaLoreAdamW([{"params": [fresh]}], lr=1e-2, master_weights=True)
    _run(fresh_opt, [fresh], [grads[1][1:]])
    assert opt.state[p]["step"] == 1 and torch.equal(p, fresh)
    assert torch.equal(opt.state[p]["master"], fresh_opt.state[fresh]["master"])


def test_save_load_keeps_state_dtypes_of_bf16_params(tmp_path) -> None:
    # torch's load_state_dict casts state to the param dtype; fp32 moments and masters must survive as fp32
    params = [_bf16(s, i) for i, s in enumerate(BF16_SHAPES)]
    resumed = [nn.Parameter(p.detach().clone()) for p in params]
    opt = GaLoreAdamW(_bf16_groups(params), lr=1e-3, master_weights=True)
    grads = _bf16_grads(8)
    _run(opt, params, grads[:4])
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    for p, q in zip(params, resumed):
        q.data.copy_(p.detach())
    loaded = GaLoreAdamW(_bf16_groups(resumed), lr=1e-3, master_weights=True)
    loaded.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    for p, q in zip(params, resumed):
        for key, value in opt.state[p].items():
            if torch.is_tensor(value):
                assert loaded.state[q][key].dtype == value.dtype and torch.equal(
                    loaded.state[q][key], value
                ), key
    _run(opt, params, grads[4:])  # step 5 refreshes the GaLore basis (gap 5)
    _run(loaded, resumed, grads[4:])
    assert all(torch.equal(p, q) for p, q in zip(params, resumed))


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"state_dtype": torch.int8}, "state_dtype"),
        ({"state_dtype": "float32"}, "state_dtype"),
        ({"state_bits": 4}, "state_bits"),
        ({"master_weights": "yes"}, "master_weights"),
    ],
)
def test_invalid_precision_options_rejected(options: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        GaLoreAdamW([_param((4, 4))], **options)
    with pytest.raises(ValueError, match=match):
        GaLoreAdamW([{"params": [_param((4, 4))], **options}])


# ---------------------------------------------------------------- param groups


def _ids(groups: list[dict]) -> list[int]:
    return [id(p) for g in groups for p in g["params"]]


def _by_name(groups: list[dict]) -> dict[str, dict]:
    return {g["name"]: g for g in groups}


def test_default_groups_target_all_decoder_linears(tiny_llama: nn.Module) -> None:
    find_decoder_layers(tiny_llama)[0].requires_grad_(False)  # frozen params must still be grouped
    groups = _by_name(make_param_groups(tiny_llama, rank=8, weight_decay=0.1))
    decoder_linears = [
        m for n, m in tiny_llama.named_modules() if isinstance(m, nn.Linear) and ".layers." in n
    ]
    assert len(decoder_linears) == 4 * 7
    assert _ids([groups["galore"]]) == [id(m.weight) for m in decoder_linears]
    assert groups["galore"]["rank"] == 8 and groups["galore"]["proj_type"] == "std"
    assert groups["galore"]["weight_decay"] == 0.1
    no_decay = groups["adamw_no_decay"]
    assert (
        len(no_decay["params"]) == 4 * 2 + 1 and no_decay["weight_decay"] == 0.0
    )  # 2 norms per layer + final
    assert set(_ids([groups["adamw"]])) == {
        id(tiny_llama.lm_head.weight),
        id(tiny_llama.model.embed_tokens.weight),
    }


def test_every_param_exactly_once(tiny_llama: nn.Module) -> None:
    groups = make_param_groups(tiny_llama)
    ids = _ids(groups)
    assert len(ids) == len(set(ids)) == len(list(tiny_llama.parameters()))


def test_tied_weights_appear_once(tiny_llama: nn.Module) -> None:
    model = tiny_llama
    model.lm_head.weight = model.model.embed_tokens.weight
    for target in ("decoder-linear", "all-linear"):
        ids = _ids(make_param_groups(model, target_modules=target))
        assert len(ids) == len(set(ids)) == len(list(model.parameters()))
        assert id(model.lm_head.weight) not in _ids(
            [_by_name(make_param_groups(model, target_modules=target))["galore"]]
        )


def test_all_linear_includes_non_decoder_linears_but_not_lm_head(tiny_llama: nn.Module) -> None:
    tiny_llama.extra_head = nn.Linear(32, 4)
    decoder = _ids([_by_name(make_param_groups(tiny_llama))["galore"]])
    all_linear = _ids([_by_name(make_param_groups(tiny_llama, target_modules="all-linear"))["galore"]])
    assert set(all_linear) == set(decoder) | {id(tiny_llama.extra_head.weight)}
    assert id(tiny_llama.lm_head.weight) not in all_linear
    assert id(tiny_llama.extra_head.bias) in _ids([_by_name(make_param_groups(tiny_llama))["adamw_no_decay"]])


def test_regex_targets(tiny_llama: nn.Module) -> None:
    groups = _by_name(
        make_param_groups(
            tiny_llama, target_modules=[r".*\.mlp\.(gate|up)_proj", r".*\.0\.self_attn\.q_proj"]
        )
    )
    expected = [m.gate_proj.weight for m in [layer.mlp for layer in find_decoder_layers(tiny_llama)]]
    expected += [layer.mlp.up_proj.weight for layer in find_decoder_layers(tiny_llama)]
    expected.append(find_decoder_layers(tiny_llama)[0].self_attn.q_proj.weight)
    assert set(_ids([groups["galore"]])) == {id(p) for p in expected}


@pytest.mark.parametrize("pattern", [r"mlp", r".*\.nonexistent_proj", "("])
def test_bad_regex_raises_naming_pattern(tiny_llama: nn.Module, pattern: str) -> None:
    with pytest.raises(ValueError, match=re.escape(repr(pattern))):
        make_param_groups(tiny_llama, target_modules=[pattern])


def test_create_galore_optimizer_trains_tiny_llama(tiny_llama: nn.Module) -> None:
    opt = create_galore_optimizer(tiny_llama, lr=1e-2, rank=4, scale=1.0)
    q = find_decoder_layers(tiny_llama)[0].self_attn.q_proj.weight
    before = q.detach().clone()
    ids = _batches(1)[0]
    loss0 = tiny_llama(input_ids=ids, labels=ids).loss.item()
    _train(tiny_llama, opt, _batches(5))
    assert not torch.equal(q, before) and opt.state[q]["basis"].shape == (4, 32)  # q_proj 32x32: right basis
    assert tiny_llama(input_ids=ids, labels=ids).loss.item() < loss0


def test_skip_non_finite_false_makes_no_finiteness_test(monkeypatch: pytest.MonkeyPatch) -> None:
    params = [_param((12, 8), seed=1), _param((6,), seed=2)]
    opt = GaLoreAdamW([{"params": params[:1], **GALORE}, {"params": params[1:]}], lr=1e-2, skip_non_finite=False)
    monkeypatch.setattr(torch, "_foreach_norm", lambda *a, **k: pytest.fail("a finiteness test"))
    _run(opt, params, [[_grads((12, 8), 1)[0], _grads((6,), 1)[0]]])
    assert opt.state[params[0]]["step"] == 1 and opt.skipped_updates == 0


def test_optimizer_section_passes_skip_non_finite():
    from owlore.methods.base import OptimizerConfig

    assert OptimizerConfig(skip_non_finite=False).optimizer_kwargs()["skip_non_finite"] is False
    assert OptimizerConfig().optimizer_kwargs()["skip_non_finite"] is True
