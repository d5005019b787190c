"""owlore/memory/probe.py: each kind against bytes computed by hand on a tiny Llama (weights, gradients of a
frozen/trained split, AdamW state, saved activations and logits), fewer activations when less trains or under
checkpointing, gradient accumulation, an in-backward optimizer's own gradient peak, layer switches, SVD
seconds, no change to the losses and no tensor kept alive, and the profile in a train.py record."""

from __future__ import annotations

import gc
import json
import sys
import weakref
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaForCausalLM

from owlore.memory.probe import KINDS, MemoryProbe
from tests.conftest import tiny_llama_config

sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
import method_support as ms  # noqa: E402

B, T, VOCAB = 2, 16, 128  # T != VOCAB: attention scores (.., T, T) must not look like logits


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def tiny(frozen_layers: int = 0, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config()).float()
    for p in model.model.layers[:frozen_layers].parameters():
        p.requires_grad_(False)
    return model


def batches(n: int = 3, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (B, T), generator=g) for _ in range(n)]


def run(model, optimizer, steps: list[list[torch.Tensor]], probe: MemoryProbe | None = None,
        before_step=None) -> list[float]:
    """A Trainer's loop by hand: the callback events around forward/backward of each micro-batch and the step."""
    state, losses = SimpleNamespace(global_step=0), []
    if probe:
        probe.on_train_begin(None, state, None, model=model, optimizer=optimizer)
    for i, micro in enumerate(steps):
        if before_step:
            before_step(i)
        if probe:
            probe.on_step_begin(None, state, None)
        for ids in micro:
            loss = model(input_ids=ids, labels=ids).loss / len(micro)
            loss.backward()
            losses.append(loss.item())
        if probe:
            probe.on_pre_optimizer_step(None, state, None)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state.global_step += 1
        if probe:
            probe.on_step_end(None, state, None)
    if probe:
        probe.on_train_end(None, state, None)
    return losses


def adamw(model) -> torch.optim.AdamW:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)


def profile_of(frozen_layers: int = 0, **kw) -> dict:
    model = tiny(frozen_layers)
    probe = MemoryProbe()
    run(model, adamw(model), [[ids] for ids in batches(2)], probe, **kw)
    return probe.summary()["memory_profile"]


# ------------------------------------------------------------------------------------------------ kinds
def test_each_kind_matches_the_bytes_computed_by_hand():
    model = tiny(frozen_layers=2)
    trained = [p for p in model.parameters() if p.requires_grad]
    opt = adamw(model)
    probe = MemoryProbe()
    run(model, opt, [[ids] for ids in batches(2)], probe)
    prof = probe.summary()["memory_profile"]
    s = prof["series"]
    assert s["step"] == [1, 2] and set(KINDS) <= set(s)
    assert s["weights"] == [nbytes(model.parameters()) + nbytes(model.buffers())] * 2
    assert s["gradients"] == [nbytes(trained)] * 2  # the frozen layers have none
    # AdamW: exp_avg + exp_avg_sq per trained tensor (fp32) and a 4-byte step counter
    assert s["optimizer_state"] == [2 * nbytes(trained) + 4 * len(trained)] * 2
    # the loss keeps its log-softmax of the (B*T, V) logits, in fp32
    assert s["logits"] == [B * T * VOCAB * 4] * 2
    for i in range(2):
        act, grads, both = s["activations"][i], s["gradients"][i], s["activations_and_gradients"][i]
        assert act > s["logits"][i] and max(act, grads) <= both <= act + grads
        assert s["total"][i] == s["weights"][i] + s["optimizer_state"][i] + both
    assert prof["peak"]["total"] == max(s["total"]) and prof["gradients_source"] == "hooks"
    assert prof["max"]["gradients"] == nbytes(trained)


def test_less_training_saves_fewer_activations():
    everything = profile_of(0)["max"]["activations"]
    lower_frozen = profile_of(2)["max"]["activations"]

    def head_only(model):
        for p in model.model.parameters():
            p.requires_grad_(False)

    model = tiny()
    head_only(model)
    probe = MemoryProbe()
    run(model, adamw(model), [[ids] for ids in batches(1)], probe)
    head = probe.summary()["memory_profile"]["max"]
    # only the head's input and the log-softmax are left to save
    assert everything > lower_frozen > head["activations"] > 0 and head["logits"] == B * T * VOCAB * 4

    model = tiny()
    model.requires_grad_(False)
    probe = MemoryProbe()
    probe.on_train_begin(None, SimpleNamespace(global_step=0), None, model=model)
    probe.on_step_begin(None, SimpleNamespace(global_step=0), None)
    model(input_ids=batches(1)[0])
    probe.on_step_end(None, SimpleNamespace(global_step=1), None)
    assert probe.series["activations"] == [0] and probe.series["gradients"] == [0]


def test_checkpointing_saves_fewer_activations():
    plain = profile_of(0)["max"]["activations"]
    model = tiny()
    model.activation_checkpointing_enable({"use_reentrant": False})
    model.train()
    probe = MemoryProbe()
    run(model, adamw(model), [[ids] for ids in batches(2)], probe)
    assert 0 < probe.summary()["memory_profile"]["max"]["activations"] < plain / 2


def test_gradient_accumulation_counts_each_gradient_once():
    model = tiny(frozen_layers=2)
    trained = [p for p in model.parameters() if p.requires_grad]
    probe = MemoryProbe()
    run(model, adamw(model), [batches(2)], probe)  # one optimizer step of two micro-batches
    single = profile_of(2)["series"]
    assert probe.series["gradients"] == [nbytes(trained)]
    assert probe.series["activations"] == single["activations"][:1]  # the larger micro-batch, not the sum


def test_layer_switch_hooks_the_newly_trained_parameters():
    model = tiny(frozen_layers=4)
    layer = model.model.layers[1]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)  # every tensor, as layer-switching methods do

    def switch(step: int) -> None:
        if step == 1:
            layer.requires_grad_(True)

    probe = MemoryProbe()
    run(model, opt, [[ids] for ids in batches(2)], probe, before_step=switch)
    rest = [p for n, p in model.named_parameters() if not n.startswith("model.layers.")]
    assert probe.series["gradients"] == [nbytes(rest), nbytes(rest) + nbytes(layer.parameters())]


class InBackwardAdamW(torch.optim.AdamW):
    """Stands in for an optimizer that steps inside backward and reports its own gradient peak."""

    peak_grad_bytes = 1234
    svd_seconds = 0.0

    def step(self, closure=None):
        self.svd_seconds += 0.5
        return super().step(closure)


def test_optimizer_gradient_peak_and_svd_clock_are_read():
    model = tiny()
    probe = MemoryProbe()
    run(model, InBackwardAdamW(model.parameters(), lr=1e-2), [[ids] for ids in batches(2)], probe)
    prof = probe.summary()["memory_profile"]
    assert prof["gradients_source"] == "optimizer" and prof["series"]["gradients"] == [1234, 1234]
    assert prof["series"]["svd_seconds"] == [0.5, 0.5]
    assert profile_of(0)["series"]["svd_seconds"] == [None, None]  # torch's AdamW has no SVD clock


# ------------------------------------------------------------------------------------------------ no side effects
def test_probe_changes_no_loss_and_keeps_no_tensor_alive():
    steps = [[ids] for ids in batches(3)]
    plain_model, probed_model = tiny(frozen_layers=1), tiny(frozen_layers=1)
    plain = run(plain_model, adamw(plain_model), steps)
    probe = MemoryProbe()
    probed = run(probed_model, adamw(probed_model), steps, probe)
    assert probed == plain
    for a, b in zip(plain_model.parameters(), probed_model.parameters(), strict=True):
        assert torch.equal(a, b)
    probe.on_train_begin(None, SimpleNamespace(global_step=3), None, model=probed_model)
    probe.on_step_begin(None, SimpleNamespace(global_step=3), None)
    out = probed_model(input_ids=steps[0][0], labels=steps[0][0])
    ref = weakref.ref(out.logits)
    out.loss.backward()
    del out
    gc.collect()
    assert ref() is None  # the probe holds sizes and addresses, never the saved tensors
    assert all(not torch.is_tensor(v) for v in vars(probe).values())


# ------------------------------------------------------------------------------------------------ train.py
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return ms.save_checkpoint(tmp_path_factory.mktemp("tiny4"))


@pytest.fixture(scope="module")
def rows(tmp_path_factory) -> Path:
    return ms.write_rows(tmp_path_factory.mktemp("sft") / "train.jsonl")


def test_train_py_records_the_profile_with_unchanged_losses(tiny_dir, rows, tmp_path):
    import train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        plain = train.main(ms.train_argv("full", tiny_dir, rows, tmp_path / "plain", "training.save_strategy=no"))
        probed = train.main(ms.train_argv("full", tiny_dir, rows, tmp_path / "probed", "training.save_strategy=no",
                                          "memory.profile=true"))
    finally:
        torch.set_num_threads(threads)
    assert "memory_profile" not in plain
    assert probed["log_losses"] == plain["log_losses"]
    record = json.loads((tmp_path / "probed" / "owlore_record.json").read_text())["summary"]["memory_profile"]
    s = record["series"]
    assert s["step"] == [1, 2, 3] and all(v > 0 for v in s["activations"])
    model = ms.tiny_model()
    assert s["weights"] == [nbytes(model.parameters()) + nbytes(model.buffers())] * 3
    assert s["gradients"] == [nbytes(model.parameters())] * 3  # full fine-tuning: every tensor has a gradient
    assert s["optimizer_state"][-1] == probed["optimizer_state_bytes"]
    assert record["peak"]["total"] == max(s["total"])
