"""InBackwardGaLoreAdamW (owlore/memory/in_backward.py): the same weights as GaLoreAdamW / torch AdamW, one gradient
alive at a time, checkpoint round trip, the Trainer's grad_norm, and owlore/galore/lisa/badam through train.py with
``optimizer.update_in_backward=true`` logging the same losses as without it (also under gradient accumulation and
across an interrupted + resumed run)."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
import transformers
from torch import nn

import train
from owlore.memory.in_backward import InBackwardGaLoreAdamW, InBackwardGradNorm, training_args_problems
from owlore.optim.galore_adamw import GaLoreAdamW
from owlore.optim.state import unwrap_optimizer
from owlore.run.config import ConfigError
from tests.conftest import tiny_llama_config
from tests.test_callback import RandomLM, _args
from tests.test_methods import _one_torch_thread, _StopAt, _train, ms  # noqa: F401 (an autouse fixture)

WIDTH = 64  # 64 x 64 = 4096 elements: the smallest moment that 8-bit state quantises
GALORE = {"rank": 4, "update_proj_gap": 2, "scale": 0.5}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return ms.save_checkpoint(tmp_path_factory.mktemp("tiny4"))


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    return ms.write_rows(tmp_path_factory.mktemp("sft") / "train.jsonl")


def _stack(dtype: torch.dtype = torch.float32, depth: int = 3, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(WIDTH, WIDTH), nn.Tanh()]
    return nn.Sequential(*layers).to(dtype)


def _groups(model: nn.Module, galore: dict | None) -> list[dict]:
    if galore is None:
        return [{"params": list(model.parameters())}]
    return [{"params": [p for p in model.parameters() if p.dim() == 2], **galore},
            {"params": [p for p in model.parameters() if p.dim() != 2]}]


def _batches(n: int, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(8, WIDTH, generator=g).to(dtype) for _ in range(n)]


def _fit(model: nn.Module, opt: torch.optim.Optimizer, batches: list[torch.Tensor], *, accumulation: int = 1,
         schedule: bool = True) -> None:
    """The Trainer's order: backward per micro-batch, step, scheduler step, zero_grad (lr changes every step)."""
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s)) if schedule else None
    for start in range(0, len(batches), accumulation):
        for x in batches[start:start + accumulation]:
            (model(x).float().pow(2).mean() / accumulation).backward()
        opt.step()
        if sched is not None:
            sched.step()
        opt.zero_grad()


CASES = {  # name: (param dtype, GaLore group keys, optimizer options)
    "adamw": (torch.float32, None, {}),
    "galore": (torch.float32, GALORE, {}),
    "galore-randomized": (torch.float32, {**GALORE, "basis_method": "randomized"}, {}),
    "8bit": (torch.float32, GALORE, {"state_bits": 8}),
    "bf16-master": (torch.bfloat16, GALORE, {"master_weights": True}),
}


@pytest.mark.parametrize("accumulation", [1, 2])
@pytest.mark.parametrize("case", list(CASES))
def test_same_weights_as_the_normal_step(case: str, accumulation: int) -> None:
    dtype, galore, options = CASES[case]
    if options.get("state_bits") == 8:
        pytest.importorskip("bitsandbytes")
    ref_model, model = _stack(dtype), _stack(dtype)
    kw = {"lr": 1e-2, "weight_decay": 0.1, **options}
    if case == "adamw":  # plain groups: exactly torch.optim.AdamW
        ref = torch.optim.AdamW(_groups(ref_model, None), eps=1e-6, **kw)
    else:
        ref = GaLoreAdamW(_groups(ref_model, galore), **kw)
    opt = InBackwardGaLoreAdamW(_groups(model, galore), accumulation_steps=accumulation, **kw)
    batches = _batches(5 * accumulation, dtype)
    _fit(ref_model, ref, batches, accumulation=accumulation)  # gap 2: bases from steps 1, 3 and 5
    _fit(model, opt, batches, accumulation=accumulation)
    for p, q in zip(model.parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)
    if case != "adamw":
        assert all(opt.state[p]["step"] == 5 for p in model.parameters())
        assert (opt.svd_seconds > 0) == (ref.svd_seconds > 0)


def test_hooks_update_and_free_each_gradient_so_one_is_alive_at_a_time() -> None:
    model = _stack(depth=4)
    params = list(model.parameters())
    holders: list[int] = []
    for p in params:  # registered first, so it runs before the optimizer's hook frees the gradient
        p.register_post_accumulate_grad_hook(lambda _: holders.append(sum(q.grad is not None for q in params)))
    opt = InBackwardGaLoreAdamW(_groups(model, GALORE), lr=1e-2)
    before = [p.detach().clone() for p in params]
    model(torch.randn(8, WIDTH)).pow(2).mean().backward()
    assert holders == [1] * len(params)
    assert all(p.grad is None for p in params)
    assert all(not torch.equal(p, b) for p, b in zip(params, before))  # updated inside backward
    opt.step()  # no-op: nothing pending
    largest = max(p.numel() * p.element_size() for p in params)
    assert opt.peak_grad_bytes == largest  # the normal path holds all of them: see the next test
    assert opt.last_grad_norm is not None and opt.last_grad_norm > 0


def test_peak_grad_bytes_on_a_tiny_llama_vs_the_normal_step() -> None:
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(tiny_llama_config())
    params = list(model.parameters())
    opt = InBackwardGaLoreAdamW(params, lr=1e-3)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    normal = sum(p.numel() * p.element_size() for p in params)  # all alive at GaLoreAdamW.step
    assert opt.peak_grad_bytes == max(p.numel() * p.element_size() for p in params) < normal



def test_accumulation_keeps_every_gradient_until_the_last_micro_batch() -> None:
    model = _stack()
    params = list(model.parameters())
    opt = InBackwardGaLoreAdamW(params, lr=1e-2, accumulation_steps=2)
    x = torch.randn(8, WIDTH)
    model(x).pow(2).mean().backward()
    assert all(p.grad is not None for p in params)  # first micro-batch: accumulate only
    model(x).pow(2).mean().backward()
    assert all(p.grad is None for p in params)
    opt.step()
    assert opt.peak_grad_bytes == sum(p.numel() * p.element_size() for p in params)


def test_step_flushes_a_short_accumulation_like_the_normal_step() -> None:
    ref_model, model = _stack(), _stack()
    ref = GaLoreAdamW(_groups(ref_model, GALORE), lr=1e-2)
    opt = InBackwardGaLoreAdamW(_groups(model, GALORE), lr=1e-2, accumulation_steps=3)
    _fit(ref_model, ref, _batches(4), accumulation=2)  # 2 micro-batches where 3 were announced (an epoch's end)
    _fit(model, opt, _batches(4), accumulation=2)
    for p, q in zip(model.parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)
    assert not opt._counts and all(p.grad is None for p in model.parameters())


def test_non_finite_gradient_skips_that_param_only() -> None:
    ref_model, model = _stack(), _stack()
    ref = GaLoreAdamW(_groups(ref_model, GALORE), lr=1e-2)
    opt = InBackwardGaLoreAdamW(_groups(model, GALORE), lr=1e-2)
    calls = {"ref": 0, "ours": 0}

    def poison(key: str):
        def hook(g: torch.Tensor) -> torch.Tensor:
            calls[key] += 1
            return g * float("nan") if calls[key] == 3 else g  # third step: a NaN gradient
        return hook

    ref_model[2].weight.register_hook(poison("ref"))
    model[2].weight.register_hook(poison("ours"))
    _fit(ref_model, ref, _batches(5))
    _fit(model, opt, _batches(5))
    assert opt.skipped_updates == ref.skipped_updates == 1
    assert opt.state[model[2].weight]["step"] == 4 and opt.state[model[0].weight]["step"] == 5
    for p, q in zip(model.parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)


def test_tied_weights_get_one_hook_and_match_the_normal_step() -> None:
    torch.manual_seed(0)
    ref_model = transformers.LlamaForCausalLM(tiny_llama_config(2, tie_word_embeddings=True))
    model = copy.deepcopy(ref_model)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ref = GaLoreAdamW(ref_model.parameters(), lr=1e-2)
    opt = InBackwardGaLoreAdamW(model.parameters(), lr=1e-2)
    assert len(opt._handles) == len(list(model.parameters()))  # parameters() yields a tied tensor once
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    for m, o in ((ref_model, ref), (model, opt)):
        for _ in range(3):
            m(input_ids=ids, labels=ids).loss.backward()
            o.step()
            o.zero_grad()
    for p, q in zip(model.parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)


def test_frozen_params_get_hooks_and_train_once_unfrozen() -> None:
    model = _stack()
    model[0].weight.requires_grad_(False)
    opt = InBackwardGaLoreAdamW(model.parameters(), lr=1e-2)
    assert not model[0].weight.requires_grad
    before = model[0].weight.detach().clone()
    model(torch.randn(4, WIDTH)).sum().backward()
    assert torch.equal(model[0].weight, before) and model[0].weight not in opt.state
    model[0].weight.requires_grad_(True)  # a layer switch between optimizer steps
    model(torch.randn(4, WIDTH)).sum().backward()
    assert not torch.equal(model[0].weight, before) and model[0].weight.grad is None


def test_remove_hooks_gives_the_normal_step() -> None:
    ref_model, model = _stack(), _stack()
    ref = GaLoreAdamW(_groups(ref_model, GALORE), lr=1e-2)
    opt = InBackwardGaLoreAdamW(_groups(model, GALORE), lr=1e-2)
    opt.remove_hooks()
    model(torch.randn(4, WIDTH)).sum().backward()
    assert all(p.grad is not None for p in model.parameters())  # nothing happened in backward
    opt.zero_grad()
    _fit(ref_model, ref, _batches(3))
    _fit(model, opt, _batches(3))
    for p, q in zip(model.parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)


def test_save_load_continue_equals_an_uninterrupted_run(tmp_path) -> None:
    batches = _batches(6)
    whole_model, model, resumed_model = _stack(), _stack(), _stack(seed=7)
    whole = InBackwardGaLoreAdamW(_groups(whole_model, GALORE), lr=1e-2)
    _fit(whole_model, whole, batches, schedule=False)
    opt = InBackwardGaLoreAdamW(_groups(model, GALORE), lr=1e-2)
    _fit(model, opt, batches[:3], schedule=False)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    GaLoreAdamW(_groups(_stack(), GALORE), lr=1e-2).load_state_dict(saved["opt"])  # GaLoreAdamW's format
    resumed_model.load_state_dict(saved["model"])
    resumed = InBackwardGaLoreAdamW(_groups(resumed_model, GALORE), lr=1e-2)
    resumed.load_state_dict(saved["opt"])  # replaces the group dicts: the hooks look them up when they fire
    _fit(resumed_model, resumed, batches[3:], schedule=False)
    for p, q in zip(resumed_model.parameters(), whole_model.parameters(), strict=True):
        assert torch.equal(p, q)


# ---------------------------------------------------------------------------------------------- the Trainer
def _trainer_run(tmp_path, optimizer_cls: type, callbacks: list) -> list[dict]:
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(tiny_llama_config(2))
    opt = optimizer_cls(model.parameters(), lr=1e-2)
    trainer = transformers.Trainer(model=model, args=_args(tmp_path, max_steps=3, max_grad_norm=0),
                                   train_dataset=RandomLM(), optimizers=(opt, None), callbacks=callbacks)
    trainer.train()
    return [h for h in trainer.state.log_history if "loss" in h]


def test_trainer_grad_norm_is_zero_without_the_callback_and_the_true_norm_with_it(tmp_path) -> None:
    normal = _trainer_run(tmp_path / "a", GaLoreAdamW, [])
    bare = _trainer_run(tmp_path / "b", InBackwardGaLoreAdamW, [])
    fixed = _trainer_run(tmp_path / "c", InBackwardGaLoreAdamW, [InBackwardGradNorm()])
    assert [h["loss"] for h in bare] == [h["loss"] for h in fixed] == [h["loss"] for h in normal]
    assert [h["grad_norm"] for h in bare] == [0.0] * 3  # every .grad was freed before the Trainer measured
    assert [h["grad_norm"] for h in fixed] == pytest.approx([h["grad_norm"] for h in normal], rel=1e-5)


def test_training_args_problems() -> None:
    ok = SimpleNamespace(max_grad_norm=0.0, gradient_accumulation_steps=2, fp16=False, world_size=1)
    assert training_args_problems(ok, 2) == []
    bad = SimpleNamespace(max_grad_norm=1.0, gradient_accumulation_steps=2, fp16=True, world_size=2)
    problems = " | ".join(training_args_problems(bad, 1))
    for part in ("training.max_grad_norm=1.0", "accumulation_steps=1", "training.fp16=true", "2 processes"):
        assert part in problems


def test_config_refuses_in_backward_updates_with_clipping() -> None:
    base = ms.ROOT / "configs/smollm2_owlore.yaml"
    for clip in ([], ["training.max_grad_norm=1.0"]):
        with pytest.raises(ConfigError, match=r"optimizer.update_in_backward=true with training.max_grad_norm=1"
                                              r".*set training.max_grad_norm=0"):
            train.load_config(base, ["optimizer.update_in_backward=true", *clip])
    train.load_config(base, ["optimizer.update_in_backward=true", "training.max_grad_norm=0"])


NO_CLIP = ["training.max_grad_norm=0"]


@pytest.mark.parametrize(("method", "accumulation", "extra"), [
    ("owlore", 1, []), ("galore", 1, []), ("lisa", 1, []), ("badam", 1, []),
    ("owlore", 2, []), ("galore", 2, []), ("lisa", 2, []), ("badam", 2, []),
    ("galore", 3, []), ("owlore", 1, ["memory.checkpointing=all"]),
])
def test_train_py_logs_the_same_losses_with_and_without(method, accumulation, extra, tiny_dir, rows, tmp_path):
    """Accumulation 3: 8 micro-batches per epoch, so the third step has 2 and ``step()`` flushes them.
    Checkpointing: a layer's forward is recomputed before any of its weights steps. The memory probe reports the
    optimizer's ``peak_grad_bytes``: the largest trained gradient without accumulation, all of them (as without
    in-backward updates) with it."""
    argv = [*NO_CLIP, f"training.gradient_accumulation_steps={accumulation}", "memory.profile=true", *extra]
    ref = _train(ms.train_argv(method, tiny_dir, rows, tmp_path / "ref", *argv))
    run = _train(ms.train_argv(method, tiny_dir, rows, tmp_path / "ib", *argv, "optimizer.update_in_backward=true"))
    opt = unwrap_optimizer(run.trainer.optimizer)
    assert isinstance(opt, InBackwardGaLoreAdamW) and opt.accumulation_steps == accumulation
    logs = [[h for h in r.trainer.state.log_history if "loss" in h] for r in (ref, run)]
    assert len(logs[1]) == 3 and (logs[1][-1]["epoch"] == 1.0) == (accumulation == 3)
    assert [h["loss"] for h in logs[1]] == pytest.approx([h["loss"] for h in logs[0]], rel=1e-6, abs=0)
    assert [h["grad_norm"] for h in logs[1]] == pytest.approx([h["grad_norm"] for h in logs[0]], rel=1e-5)
    assert all(math.isfinite(h["grad_norm"]) and h["grad_norm"] > 0 for h in logs[1])
    for name, p in run.params.items():
        torch.testing.assert_close(p, ref.params[name], atol=1e-6, rtol=0)
    grads = [r.summary["memory_profile"]["max"]["gradients"] for r in (ref, run)]
    largest = max(p.numel() * p.element_size() for p in run.trainer.model.parameters() if p.requires_grad)
    assert grads[1] == largest < grads[0] if accumulation == 1 else grads[1] == grads[0]


@pytest.mark.parametrize("accumulation", [1, 2])
def test_resume_through_train_py_continues_exactly(accumulation, tiny_dir, rows, tmp_path):
    argv = ["lisa.interval=3", "training.save_total_limit=null", *NO_CLIP, "optimizer.update_in_backward=true",
            f"training.gradient_accumulation_steps={accumulation}"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    _train(ms.train_argv("lisa", tiny_dir, rows, whole, *argv, steps=6))
    real_train = transformers.Trainer.train

    def interrupted(self, *a, **k):
        self.add_callback(_StopAt(4))
        return real_train(self, *a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(transformers.Trainer, "train", interrupted)
        train.main(ms.train_argv("lisa", tiny_dir, rows, cut, *argv, steps=6))
    assert len(ms.logged_losses(cut)) == 4  # stopped at the checkpoint of step 4, mid-interval
    train.main(ms.train_argv("lisa", tiny_dir, rows, cut, *argv, "training.resume_from_checkpoint=last", steps=6))
    assert len(ms.logged_losses(whole)) == 6
    assert ms.logged_losses(cut) == ms.logged_losses(whole)


def test_without_the_finite_test_the_hooks_never_read_the_host(monkeypatch) -> None:
    """optimizer.skip_non_finite=false: the same weights, the gradient norm read once per step, not per tensor."""
    ref_model, model = _stack(), _stack()
    ref = InBackwardGaLoreAdamW(_groups(ref_model, GALORE), lr=1e-2)
    opt = InBackwardGaLoreAdamW(_groups(model, GALORE), lr=1e-2, skip_non_finite=False)
    batches = _batches(3)
    _fit(ref_model, ref, batches)
    reads: list[str] = []
    for name in ("__float__", "item", "tolist"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _r=real, _n=name, **k: reads.append(_n) or _r(
            self, *a, **k))
    x = batches[0]
    model(x).float().pow(2).mean().backward()  # every hook fires here
    assert reads == []  # the hooks made no host read
    opt.step()
    assert reads == ["__float__"] and opt.last_grad_norm > 0  # one read for the step's gradient norm
    monkeypatch.undo()
    opt.zero_grad()
    model2 = _stack()
    opt2 = InBackwardGaLoreAdamW(_groups(model2, GALORE), lr=1e-2, skip_non_finite=False)
    _fit(model2, opt2, batches)
    for p, q in zip(model2.parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)
    assert opt2.last_grad_norm == pytest.approx(ref.last_grad_norm, rel=1e-5)
