"""OwLoreCallback + create_owlore_optimizer in the stock transformers.Trainer, and OwLoreTrainer, on a tiny Llama."""

import pytest
import torch
from transformers import LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

from owlore import OwLoreCallback, OwLoreConfig, OwLoreTrainer, create_owlore_optimizer
from owlore.layerwise.layers import find_decoder_layers
from owlore.optim.state import params_with_state, unwrap_optimizer
from tests.conftest import tiny_llama_config


class RandomLM(torch.utils.data.Dataset):
    def __init__(self, n=64, t=16, vocab=128, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, vocab, (n, t), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i].clone(), "attention_mask": torch.ones_like(self.ids[i])}


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), use_cpu=True, report_to=[], save_strategy="no", max_steps=6,
                per_device_train_batch_size=4, learning_rate=1e-2, logging_steps=1, disable_tqdm=True, seed=0,
                lr_scheduler_type="constant")
    base.update(kw)
    return TrainingArguments(**base)


class Probe(TrainerCallback):
    """After every optimizer step: which decoder layers hold optimizer state, and which are trainable."""

    def __init__(self, layers):
        self.layers, self.with_state, self.trainable = layers, [], []

    def on_step_end(self, args, state, control, optimizer=None, **kw):
        ids = params_with_state(unwrap_optimizer(optimizer))
        self.with_state.append([i for i, layer in enumerate(self.layers) if any(id(p) in ids for p in layer.parameters())])
        self.trainable.append([i for i, layer in enumerate(self.layers) if any(p.requires_grad for p in layer.parameters())])


def _model(layers=6):
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config(layers))


@pytest.mark.parametrize("rank", [4, None])
def test_stock_trainer_drop_in(tmp_path, rank):
    model = _model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = OwLoreConfig(gamma=2, interval=2, rank=rank, update_proj_gap=2, scale=1.0, seed=3)
    opt = create_owlore_optimizer(model, cfg, lr=1e-2)
    cb = OwLoreCallback(cfg)
    probe = Probe(find_decoder_layers(model))
    trainer = Trainer(model=model, args=_args(tmp_path), train_dataset=RandomLM(), optimizers=(opt, None),
                      callbacks=[cb, probe])
    trainer.train()

    assert [s for s, _ in cb.history] == [0, 2, 4]  # a new draw every `interval` optimizer steps
    sampled = {i for _, layers in cb.history for i in layers}
    assert 0 < len(sampled) < 6
    for i in range(6):
        changed = any(not torch.equal(before[n], p) for n, p in model.named_parameters()
                      if n.startswith(f"model.layers.{i}."))
        assert changed == (i in sampled), f"layer {i}: changed={changed}, sampled={i in sampled}"
    assert not torch.equal(before["model.embed_tokens.weight"], model.model.embed_tokens.weight)
    assert not torch.equal(before["lm_head.weight"], model.lm_head.weight)
    assert all(len(s) <= 2 for s in probe.with_state)  # state for at most γ decoder layers at any time
    for (_, layers), trainable in zip(cb.history, probe.trainable[::2], strict=True):
        assert trainable == layers
    assert cb.sampler.counts.sum() == 6
    record = (tmp_path / "owlore_record.json").read_text()
    assert '"outlier_ratios"' in record and '"history"' in record


def test_gradient_accumulation_counts_optimizer_steps(tmp_path):
    model = _model(4)
    cfg = OwLoreConfig(gamma=1, interval=2, rank=4, update_proj_gap=5)
    cb = OwLoreCallback(cfg)
    trainer = Trainer(model=model, args=_args(tmp_path, max_steps=4, gradient_accumulation_steps=3,
                                             per_device_train_batch_size=2),
                      train_dataset=RandomLM(), optimizers=(create_owlore_optimizer(model, cfg, lr=1e-2), None),
                      callbacks=[cb])
    trainer.train()
    assert [s for s, _ in cb.history] == [0, 2]
    assert trainer.state.global_step == 4


@pytest.mark.parametrize("policy", ["keep", "offload"])
def test_state_policies(tmp_path, policy, monkeypatch):
    import owlore.layerwise.callback as callback_mod

    moves = []
    real_move = callback_mod.move_state
    monkeypatch.setattr(callback_mod, "move_state",
                        lambda opt, params, device: (moves.append((len(list(params)), str(device))),
                                                     real_move(opt, params, device)))
    model = _model(4)
    cfg = OwLoreConfig(gamma=1, interval=1, rank=4, state_policy=policy, mode="uniform", seed=1)
    probe = Probe(find_decoder_layers(model))
    cb = OwLoreCallback(cfg)
    Trainer(model=model, args=_args(tmp_path, max_steps=8), train_dataset=RandomLM(),
            optimizers=(create_owlore_optimizer(model, cfg, lr=1e-2), None), callbacks=[cb, probe]).train()
    visited = {i for _, ls in cb.history for i in ls}
    # keep/offload: every layer ever visited still has state (offload only moves it).
    assert set(probe.with_state[-1]) == visited and len(visited) > 1
    if policy == "offload":  # layers leaving go to the CPU, layers entering go back to their parameters' device
        assert any(dev == "cpu" and n > 0 for n, dev in moves) and len(moves) >= 2
    else:
        assert not moves


def test_owlore_trainer_with_gradient_checkpointing_and_frozen_embeddings(tmp_path):
    model = _model(4)
    emb = model.model.embed_tokens.weight.detach().clone()
    cfg = OwLoreConfig(gamma=2, interval=3, rank=4, train_embeddings=False, train_lm_head=True)
    args = _args(tmp_path, gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": True})
    trainer = OwLoreTrainer(model=model, args=args, train_dataset=RandomLM(), owlore_config=cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = trainer.train()
    assert torch.isfinite(torch.tensor(out.training_loss))
    assert torch.equal(emb, model.model.embed_tokens.weight)
    sampled = {i for _, ls in trainer.owlore_callback.history for i in ls}
    for i in range(4):  # reentrant checkpointing still trains the sampled layers (and only those)
        changed = not torch.equal(before[f"model.layers.{i}.self_attn.q_proj.weight"],
                                  model.model.layers[i].self_attn.q_proj.weight)
        assert changed == (i in sampled)
    assert trainer.owlore_callback.history[0][0] == 0


def test_frozen_embeddings_stop_backward_at_lowest_sampled_layer(tmp_path):
    model = _model(4)
    layers = find_decoder_layers(model)
    seen = []
    for i, layer in enumerate(layers):
        layer.register_forward_hook(lambda m, a, out, i=i: seen.append((i, out[0].requires_grad)) if m.training else None)
    cfg = OwLoreConfig(gamma=1, interval=1, rank=4, train_embeddings=False, train_lm_head=False, seed=4)
    cb = OwLoreCallback(cfg)
    Trainer(model=model, args=_args(tmp_path, max_steps=4), train_dataset=RandomLM(),
            optimizers=(create_owlore_optimizer(model, cfg, lr=1e-2), None), callbacks=[cb]).train()
    for step, (_, active) in enumerate(cb.history):
        flags = dict(seen[4 * step: 4 * step + 4])
        # Below the sampled layer nothing needs a gradient, so autograd never goes there.
        assert all(not flags[i] for i in range(active[0])) and all(flags[i] for i in range(active[0], 4))
    assert any(active[0] > 0 for _, active in cb.history)


def test_llava_trains_language_model_layers_only(tmp_path):
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(0)
    cfg = LlavaConfig(vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                     num_attention_heads=4, image_size=32, patch_size=8),
                      text_config=tiny_llama_config(3, vocab_size=256), image_token_id=255)
    model = LlavaForConditionalGeneration(cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ocfg = OwLoreConfig(gamma=1, interval=2, rank=4)
    cb = OwLoreCallback(ocfg)
    Trainer(model=model, args=_args(tmp_path, max_steps=4), train_dataset=RandomLM(vocab=200),
            optimizers=(create_owlore_optimizer(model, ocfg, lr=1e-2), None), callbacks=[cb]).train()
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    assert not any("vision_tower" in n or "multi_modal_projector" in n for n in changed)
    assert any("language_model.layers" in n for n in changed) and any("embed_tokens" in n for n in changed)


@pytest.mark.parametrize(("policy", "save_steps"), [("reset", 3), ("reset", 2), ("keep", 2), ("offload", 3)])
def test_resume_gives_same_losses(tmp_path, policy, save_steps):
    """Resume mid-interval (3) and exactly where a switch is pending (2), for every state policy."""

    def run(out, max_steps, resume=None):
        model = _model(4)
        cfg = OwLoreConfig(gamma=2, interval=2, rank=4, update_proj_gap=3, seed=5, state_policy=policy)
        t = OwLoreTrainer(model=model, args=_args(out, max_steps=max_steps, save_strategy="steps",
                                                  save_steps=save_steps),
                          train_dataset=RandomLM(), owlore_config=cfg)
        t.train(resume_from_checkpoint=resume)
        return [h["loss"] for h in t.state.log_history if "loss" in h], t.owlore_callback

    full, cb_full = run(tmp_path / "a", 8)
    resumed, cb_res = run(tmp_path / "b", 8, resume=str(tmp_path / "a" / f"checkpoint-{save_steps * 2}"))
    assert (tmp_path / "a" / f"checkpoint-{save_steps}" / "owlore_state.pt").is_file()
    assert resumed == full  # history restored from the checkpoint + bit-identical losses after it
    assert cb_res.history == cb_full.history
    state = torch.load(tmp_path / "a" / f"checkpoint-{save_steps}" / "owlore_state.pt", weights_only=True)
    assert state["active"].numel() == 2 and state["global_step"] == save_steps


def test_errors(tmp_path):
    model = _model(4)
    for p in find_decoder_layers(model)[1].parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    trainer = Trainer(model=model, args=_args(tmp_path), train_dataset=RandomLM(), optimizers=(opt, None),
                      callbacks=[OwLoreCallback(OwLoreConfig(gamma=1))])
    with pytest.raises(RuntimeError, match=r"decoder layers \[1\].*not in the optimizer"):
        trainer.train()
    with pytest.raises(ValueError, match="gamma=9 exceeds"):
        model = _model(4)
        Trainer(model=model, args=_args(tmp_path), train_dataset=RandomLM(),
                optimizers=(create_owlore_optimizer(model, lr=1e-3), None),
                callbacks=[OwLoreCallback(OwLoreConfig(gamma=9))]).train()


def test_lisa_with_plain_adamw(tmp_path):
    """uniform mode + torch.optim.AdamW = LISA with freed state, through the same callback."""
    model = _model(4)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    probe = Probe(find_decoder_layers(model))
    cb = OwLoreCallback(OwLoreConfig(gamma=1, interval=1, mode="uniform", rank=None))
    Trainer(model=model, args=_args(tmp_path, max_steps=5), train_dataset=RandomLM(),
            optimizers=(torch.optim.AdamW(model.parameters(), lr=1e-3), None), callbacks=[cb, probe]).train()
    drawn = [layers for _, layers in cb.history]
    assert len(drawn) == 5 and all(len(d) == 1 for d in drawn)
    # after each step exactly the drawn layer trains and holds AdamW state: the others' state was freed
    assert probe.with_state == drawn and probe.trainable == drawn
    sampled = {i for d in drawn for i in d}
    for i in range(4):  # and the drawn layers, only those, changed
        changed = any(not torch.equal(before[n], p) for n, p in model.named_parameters()
                      if n.startswith(f"model.layers.{i}."))
        assert changed == (i in sampled), f"layer {i}: changed={changed}, sampled={i in sampled}"


def test_zero_partitioning_with_layer_switching_is_refused():
    """ZeRO >= 1 flattens every layer into partitions at start: no GaLore projection, no O(gamma) state, and
    frozen layers stepped with zero gradients; stage 0 (gradient all-reduce only) is accepted."""
    from types import SimpleNamespace

    def zero(stage):
        return SimpleNamespace(hf_deepspeed_config=SimpleNamespace(config={"zero_optimization": {"stage": stage}}),
                               deepspeed="ds.json", world_size=2, fsdp=None)

    for rank in (8, None):
        with pytest.raises(NotImplementedError, match="ZeRO stage 2.*zero0.json"):
            OwLoreCallback(OwLoreConfig(rank=rank))._check_distributed(zero(2))
    OwLoreCallback(OwLoreConfig(rank=8))._check_distributed(zero(0))


def test_peft_lora_trains_only_sampled_layers_lora_weights(tmp_path):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_model(4), LoraConfig(r=2, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                                                   init_lora_weights=False))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = OwLoreConfig(gamma=1, interval=2, rank=None, seed=2)
    cb = OwLoreCallback(cfg)
    Trainer(model=model, args=_args(tmp_path, max_steps=4), train_dataset=RandomLM(),
            optimizers=(create_owlore_optimizer(model, cfg, lr=1e-2), None), callbacks=[cb]).train()
    sampled = {i for _, ls in cb.history for i in ls}
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    assert changed and all("lora_" in n for n in changed)  # base weights and embeddings stay frozen
    assert {int(n.split("layers.")[1].split(".")[0]) for n in changed} == sampled



class _FixedSchedule:
    """A deterministic layer schedule: layer 2 first (two frozen checkpointed layers below it), then [1, 3]."""

    def __init__(self, num_layers, plan=((2,), (1, 3))):
        self.plan, self.i = [list(p) for p in plan], 0
        self.counts = torch.zeros(num_layers, dtype=torch.long)

    def sample(self):
        out = self.plan[self.i % len(self.plan)]
        self.i += 1
        self.counts[out] += 1
        return out

    def state_dict(self):
        return {"i": self.i, "counts": self.counts.clone()}

    def load_state_dict(self, sd):
        self.i, self.counts = int(sd["i"]), sd["counts"].clone()


# "no_flag": kwargs without use_reentrant, so torch's own default (reentrant) applies; "unset": transformers'.
_CKPT = {"reentrant": {"use_reentrant": True}, "non_reentrant": {"use_reentrant": False}, "unset": None,
         "no_flag": {"preserve_rng_state": True}}


def _run_checkpointed(tmp_path, peft, ckpt, train_embeddings):
    """4 Trainer steps with checkpointing; layers [2] then [1, 3]. Returns (changed names, per-step flags
    ``{layer: output requires grad}``, the callback)."""
    model = _model(4)
    if peft:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(
            r=2, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, init_lora_weights=False,
            modules_to_save=["embed_tokens"] if train_embeddings else None))
    layers = find_decoder_layers(model)
    seen = []
    for i, layer in enumerate(layers):
        layer.register_forward_hook(lambda m, a, out, i=i: seen.append((i, out[0].requires_grad)) if m.training else None)
    # lm_head and norms train (the defaults), so a graph without the sampled layers still backpropagates: silently
    cfg = OwLoreConfig(gamma=1, interval=2, rank=None, train_embeddings=train_embeddings)
    cb = OwLoreCallback(cfg, schedule=_FixedSchedule)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = _args(tmp_path, max_steps=4, gradient_checkpointing=True, gradient_checkpointing_kwargs=_CKPT[ckpt])
    Trainer(model=model, args=args, train_dataset=RandomLM(),
            optimizers=(create_owlore_optimizer(model, cfg, lr=1e-2), None), callbacks=[cb]).train()
    assert all(layer.gradient_checkpointing for layer in layers)  # checkpointing really was on
    assert [ls for _, ls in cb.history] == [[2], [1, 3]]
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    flags = [dict(seen[4 * s: 4 * s + 4]) for s in range(4)]
    return changed, flags, cb


@pytest.mark.parametrize("train_embeddings", [True, False], ids=["emb_trained", "emb_frozen"])
@pytest.mark.parametrize("ckpt", list(_CKPT))
@pytest.mark.parametrize("peft", [False, True], ids=["full", "peft"])
def test_gradient_checkpointing_trains_sampled_layers(tmp_path, monkeypatch, peft, ckpt, train_embeddings):
    """Every checkpointing setting x peft or not x embeddings trained or frozen: the sampled layers (also those above
    frozen checkpointed layers) change and layer 0, never sampled, does not. Reentrant checkpointing builds no
    graph unless a tensor input of the checkpointed layer requires grad, which frozen embeddings / peft do not give.

    transformers 5.23 makes the embedding output require grad whenever checkpointing is enabled, earlier releases
    (setup.cfg allows >= 5.0) only for its own integrated peft: that hook is removed here, so OwLore must not rely
    on it."""
    from transformers import PreTrainedModel

    enable = PreTrainedModel._activation_checkpointing_enable

    def enable_without_input_grads(self, *a, **kw):
        enable(self, *a, **kw)
        self.disable_input_require_grads()

    monkeypatch.setattr(PreTrainedModel, "_activation_checkpointing_enable", enable_without_input_grads)
    changed, flags, _ = _run_checkpointed(tmp_path, peft, ckpt, train_embeddings)
    for i in range(4):
        mine = [n for n in changed if f"layers.{i}." in n]
        if i == 0:
            assert not mine, f"layer 0 was never sampled but changed: {mine}"
        else:
            assert mine, f"sampled layer {i} got no update"
            assert not peft or all("lora_" in n for n in mine)
    assert any("embed_tokens" in n for n in changed) == train_embeddings
    if not peft and not train_embeddings and ckpt in ("non_reentrant", "unset"):
        # Non-reentrant checkpointing needs no input that requires grad: backward stops at the lowest sampled layer.
        assert [tuple(f.values()) for f in flags] == [(False, False, True, True)] * 2 + [(False, True, True, True)] * 2


@pytest.mark.parametrize("ckpt", ["non_reentrant", "unset"])
def test_non_reentrant_checkpointing_backward_stops_at_lowest_sampled_layer(tmp_path, ckpt):
    """With the stock transformers (which makes the embedding output require grad when checkpointing is enabled)
    and frozen embeddings, non-reentrant checkpointing still does not backpropagate below the sampled layers."""
    changed, flags, _ = _run_checkpointed(tmp_path, False, ckpt, False)
    assert not any("layers.0." in n or "embed_tokens" in n for n in changed)
    assert all(any(f"layers.{i}." in n for n in changed) for i in (1, 2, 3))
    assert [tuple(f.values()) for f in flags] == [(False, False, True, True)] * 2 + [(False, True, True, True)] * 2


def test_reentrant_checkpointing_without_input_embeddings_is_refused():
    """Reentrant checkpointing (explicit, or torch's default when use_reentrant is not passed) with frozen
    embeddings gets an input-require-grad hook, removed again at the end; without embeddings to hook it is refused."""
    import functools

    from torch.utils.checkpoint import checkpoint

    class Tiny(torch.nn.Module):
        def __init__(self, func, emb=True):
            super().__init__()
            self.emb = torch.nn.Embedding(8, 4).requires_grad_(False) if emb else None
            self.layers = torch.nn.ModuleList([torch.nn.Linear(4, 4)])
            self.layers[0].gradient_checkpointing, self.layers[0]._gradient_checkpointing_func = True, func

        def get_input_embeddings(self):
            return self.emb

    cb = OwLoreCallback(OwLoreConfig(train_embeddings=False))
    with pytest.raises(RuntimeError, match=r"reentrant gradient checkpointing.*use_reentrant': False"):
        cb._prepare_checkpointing(Tiny(functools.partial(checkpoint, use_reentrant=True), emb=False))
    cb._prepare_checkpointing(Tiny(functools.partial(checkpoint, use_reentrant=False), emb=False))  # nothing needed
    model = Tiny(functools.partial(checkpoint, preserve_rng_state=True))  # torch's default: reentrant
    cb._prepare_checkpointing(model)
    assert model.emb(torch.tensor([1, 2])).requires_grad
    cb.on_train_end(None, None, None)
    assert not model.emb(torch.tensor([1, 2])).requires_grad
