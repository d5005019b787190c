"""BAdam: the pure ``BlockSchedule``, and the method's parts (``GaLoreAdamW`` + ``OwLoreCallback(schedule=...)``) in a
stock ``transformers.Trainer`` on a tiny Llama: state reset on every switch, frozen non-block parameters, fp32
master copies for the active block only."""

from __future__ import annotations

import io
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaForCausalLM, Trainer, TrainerCallback

from owlore.layerwise.layers import find_decoder_layers
from owlore.methods import BuildContext, OptimizerConfig, get_method
from owlore.methods.badam import BAdamConfig, BlockSchedule
from owlore.optim.state import params_with_state, unwrap_optimizer
from tests.conftest import tiny_llama_config
from tests.test_callback import RandomLM, _args


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """One intra-op thread: on the shared 2-core machines two threads spin against other processes (a 2-step
    SmolLM2 GaLore run took 163 s on two threads next to one busy process, 21 s on one; 13 s on two when idle)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _draws(schedule: BlockSchedule, n: int) -> list[list[int]]:
    return [schedule.sample() for _ in range(n)]


# ------------------------------------------------------------------------------------------- BlockSchedule
def test_ascending_and_descending_orders_cycle():
    asc = BlockSchedule(6, block_size=2, mode="ascending")
    assert asc.blocks == [[0, 1], [2, 3], [4, 5]]
    assert _draws(asc, 7) == [[0, 1], [2, 3], [4, 5], [0, 1], [2, 3], [4, 5], [0, 1]]
    desc = BlockSchedule(6, block_size=2, mode="descending")
    assert _draws(desc, 4) == [[4, 5], [2, 3], [0, 1], [4, 5]]


def test_start_block_rotates_the_order():
    assert _draws(BlockSchedule(4, mode="ascending", start_block=2), 6) == [[2], [3], [0], [1], [2], [3]]
    assert _draws(BlockSchedule(4, mode="descending", start_block=1), 6) == [[1], [0], [3], [2], [1], [0]]
    assert _draws(BlockSchedule(4, mode="ascending", start_block=0), 2) == [[0], [1]]


def test_random_mode_is_a_fresh_permutation_every_pass():
    n_blocks, passes = 5, 12
    s = BlockSchedule(10, block_size=2, mode="random", seed=3)
    draws = _draws(s, n_blocks * passes)
    orders = []
    for k in range(passes):
        blocks = [s.blocks.index(b) for b in draws[k * n_blocks:(k + 1) * n_blocks]]
        assert sorted(blocks) == list(range(n_blocks)), f"pass {k} is not a permutation: {blocks}"
        orders.append(tuple(blocks))
    assert len(set(orders)) > passes // 2  # re-permuted per pass, not one order repeated
    # its own seeded generator: reproducible, seed-dependent, and independent of the global RNG
    torch.manual_seed(123)
    again = _draws(BlockSchedule(10, block_size=2, mode="random", seed=3), n_blocks * passes)
    assert again == draws
    assert _draws(BlockSchedule(10, block_size=2, mode="random", seed=4), n_blocks * passes) != draws


def test_shorter_last_block_and_counts():
    s = BlockSchedule(5, block_size=2, mode="ascending")
    assert s.blocks == [[0, 1], [2, 3], [4]]
    assert _draws(s, 4) == [[0, 1], [2, 3], [4], [0, 1]]
    assert s.counts.tolist() == [2, 2, 1, 1, 1] and s.num_draws == 4
    r = BlockSchedule(7, block_size=3, mode="random", seed=0)
    assert r.blocks == [[0, 1, 2], [3, 4, 5], [6]]
    _draws(r, 3 * 4)
    assert r.counts.tolist() == [4] * 7 and r.num_draws == 12  # every block once per pass
    one = BlockSchedule(4, block_size=4, mode="random")
    assert _draws(one, 3) == [[0, 1, 2, 3]] * 3 and one.counts.tolist() == [3] * 4


@pytest.mark.parametrize("mode", ["random", "ascending", "descending"])
def test_state_dict_round_trip_continues_identically(mode):
    s = BlockSchedule(7, block_size=2, mode=mode, seed=5, start_block=None if mode == "random" else 1)
    _draws(s, 6)  # mid-pass (4 blocks): the order and the position must both survive
    buf = io.BytesIO()
    torch.save(s.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    restored = BlockSchedule(7, block_size=2, mode=mode, seed=999)  # a different seed: the state must win
    restored.load_state_dict(state)
    assert torch.equal(restored.counts, s.counts) and restored.num_draws == s.num_draws
    assert _draws(restored, 13) == _draws(s, 13)  # crosses several pass boundaries (new permutations)
    assert torch.equal(restored.counts, s.counts)


def test_bad_arguments_raise_value_error():
    with pytest.raises(ValueError, match="mode='sideways'"):
        BlockSchedule(4, mode="sideways")
    with pytest.raises(ValueError, match="block_size=0"):
        BlockSchedule(4, block_size=0)
    with pytest.raises(ValueError, match="block_size=5"):
        BlockSchedule(4, block_size=5)
    with pytest.raises(ValueError, match=r"start_block=2 must be in \[0, 1\]"):
        BlockSchedule(4, block_size=2, mode="ascending", start_block=2)
    with pytest.raises(ValueError, match="start_block=-1"):
        BlockSchedule(4, mode="descending", start_block=-1)
    with pytest.raises(ValueError, match="for 4 layers, this one has 6"):
        BlockSchedule(6).load_state_dict(BlockSchedule(4).state_dict())
    assert "badam.block_size=0" in BAdamConfig(block_size=0).problems()[0]
    assert any("badam.switch_mode='x'" in p for p in BAdamConfig(switch_mode="x", switch_every=0).problems())


# ------------------------------------------------------------------------------ BAdam in a stock Trainer
class StateProbe(TrainerCallback):
    """After every optimizer step: the active layers, the layers holding optimizer state (and which state keys),
    the Adam step counts of the active layers' parameters, and whether the non-block parameters are trainable."""

    def __init__(self, model, callback):
        self.model, self.cb = model, callback
        self.layers = find_decoder_layers(model)
        self.rows = []

    def on_step_end(self, args, state, control, optimizer=None, **kw):
        opt = unwrap_optimizer(optimizer)
        with_state = params_with_state(opt)
        per_layer = [[opt.state[p] for p in layer.parameters() if id(p) in with_state] for layer in self.layers]
        outside = [p for n, p in self.model.named_parameters() if not n.startswith("model.layers.")]
        self.rows.append({
            "step": state.global_step,
            "active": list(self.cb.active),
            "with_state": [i for i, sts in enumerate(per_layer) if sts],
            "outside_state": [id(p) in with_state for p in outside],
            "outside_trainable": [p.requires_grad for p in outside],
            "steps": {i: sorted({s["step"] for s in sts}) for i, sts in enumerate(per_layer) if sts},
            "master": {i: [("master" in s) for s in sts] for i, sts in enumerate(per_layer) if sts},
            "master_ok": all(s["master"].dtype == torch.float32 and torch.equal(s["master"].to(p.dtype), p)
                             for layer in self.layers for p in layer.parameters() if id(p) in with_state
                             for s in [opt.state[p]] if "master" in s),
        })


def _run_badam(tmp_path, *, layers=4, dtype=torch.float32, steps=8, optimizer=None, **knobs):
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(layers)).to(dtype)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = _args(tmp_path, max_steps=steps)
    config = SimpleNamespace(sections={"badam": BAdamConfig(**knobs), "optimizer": optimizer or OptimizerConfig()})
    parts = get_method("badam").build(BuildContext(model=model, config=config, args=args))
    probe = StateProbe(model, parts.layer_callback)
    trainer = Trainer(model=parts.model, args=args, train_dataset=RandomLM(n=32, t=12),
                      optimizers=(parts.optimizer, None),
                      callbacks=[*parts.callbacks, probe])
    result = trainer.train()
    return SimpleNamespace(model=model, before=before, probe=probe, cb=parts.layer_callback, result=result,
                           trainer=trainer)


def _changed_layers(run) -> list[int]:
    layers = find_decoder_layers(run.model)
    return [i for i in range(len(layers)) if any(
        not torch.equal(run.before[n], p) for n, p in run.model.named_parameters() if n.startswith(f"model.layers.{i}."))]


def test_adam_state_is_reset_on_every_switch(tmp_path):
    run = _run_badam(tmp_path, block_size=1, switch_every=2, switch_mode="ascending")
    assert [(s, ls) for s, ls in run.cb.history] == [(0, [0]), (2, [1]), (4, [2]), (6, [3])]
    for row in run.probe.rows:
        g = row["step"]
        # only the new block holds state, and its Adam step count restarted at the switch
        assert row["with_state"] == row["active"] == [(g - 1) // 2], row
        assert row["steps"] == {row["active"][0]: [(g - 1) % 2 + 1]}, row
        assert not any(row["outside_state"]) and not any(row["outside_trainable"]), row
    assert _changed_layers(run) == [0, 1, 2, 3]
    for n in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        assert torch.equal(run.before[n], dict(run.model.named_parameters())[n]), n


def test_state_is_reset_when_the_same_block_is_drawn_again(tmp_path):
    """BAdam clears the whole optimizer state at every switch, even if the next block is the current one (one block
    in all, or the last block of a random pass drawn first in the next)."""
    run = _run_badam(tmp_path, layers=2, steps=6, block_size=2, switch_every=2, switch_mode="random")
    assert [s for s, _ in run.cb.history] == [0, 2, 4] and all(ls == [0, 1] for _, ls in run.cb.history)
    assert [row["steps"] for row in run.probe.rows] == [{0: [k], 1: [k]} for k in (1, 2, 1, 2, 1, 2)]


def test_only_sampled_blocks_change_and_the_rest_stays_frozen(tmp_path):
    run = _run_badam(tmp_path, layers=6, steps=4, block_size=2, switch_every=2, switch_mode="random", seed=1)
    visited = sorted({i for _, ls in run.cb.history for i in ls})
    assert len(visited) == 4 and _changed_layers(run) == visited
    for n, p in run.model.named_parameters():
        if not n.startswith("model.layers."):
            assert not p.requires_grad and torch.equal(run.before[n], p), n
    record = run.cb.record()
    assert record["schedule"].startswith("BlockSchedule(blocks=3, block_size=2")
    assert record["outlier_ratios"] is None and sum(record["activation_counts"]) == 4
    assert torch.isfinite(torch.tensor(run.result.training_loss))


def test_bf16_master_copies_only_for_the_active_block(tmp_path):
    run = _run_badam(tmp_path, layers=3, steps=4, dtype=torch.bfloat16, block_size=1, switch_every=2,
                     switch_mode="descending")
    assert [ls for _, ls in run.cb.history] == [[2], [1]]
    for row in run.probe.rows:
        (active,) = row["active"]
        assert row["with_state"] == [active], row
        assert row["master"] == {active: [True] * 9}, row  # 7 linears + 2 norms, each with an fp32 master
        assert row["master_ok"], row  # the bf16 weight is the rounded fp32 master
        assert not any(row["outside_state"]), row
    assert all(p.dtype == torch.bfloat16 for p in run.model.parameters())
    assert _changed_layers(run) == [1, 2]
    # master_weights is forced on for BAdam even when the optimizer section says otherwise
    assert all(g["master_weights"] for g in unwrap_optimizer(run.trainer.optimizer).param_groups)


def test_random_mode_honours_start_block_on_the_first_pass():
    s = BlockSchedule(8, block_size=2, mode="random", start_block=3, seed=5)
    first_pass = [s.sample() for _ in range(4)]
    assert first_pass[0] == [6, 7]  # block 3
    assert sorted(b[0] for b in first_pass) == [0, 2, 4, 6]  # still a permutation of all blocks


def test_master_weights_default_per_method():
    assert OptimizerConfig().optimizer_kwargs()["master_weights"] is False
    assert OptimizerConfig().optimizer_kwargs(master_weights_default=True)["master_weights"] is True  # BAdam
    assert OptimizerConfig(master_weights=False).optimizer_kwargs(master_weights_default=True)["master_weights"] is False
