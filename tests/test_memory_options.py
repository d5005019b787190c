"""The ``memory`` section and the embedding-state options: config checks, selective checkpointing (same losses
and gradients, fewer saved activations), and the embedding's optimizer state (8bit / lowrank / factored)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
import method_support as ms  # noqa: E402

import train  # noqa: E402
from owlore.memory.checkpoint_policy import checkpoint_plan  # noqa: E402
from owlore.optim.galore_adamw import GaLoreAdamW  # noqa: E402
from owlore.optim.param_groups import make_param_groups  # noqa: E402
from owlore.run.config import ConfigError  # noqa: E402
from owlore.run.recipe import load_config  # noqa: E402

CONFIGS = ms.ROOT / "configs"


@pytest.fixture(autouse=True)
def _one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return ms.save_checkpoint(tmp_path_factory.mktemp("tiny4"))


@pytest.fixture(scope="module")
def rows(tmp_path_factory) -> Path:
    return ms.write_rows(tmp_path_factory.mktemp("sft") / "train.jsonl")


def _losses(out: Path) -> list[float]:
    record = json.loads((out / "owlore_record.json").read_text())
    return record["summary"]["log_losses"]


# ------------------------------------------------------------------------------------------------ config
def test_memory_section_errors_name_key_value_and_fix():
    with pytest.raises(ConfigError) as e:
        load_config(CONFIGS / "smollm2_owlore.yaml", ["memory.chunked_loss=-1", "memory.checkpointing=some",
                                                        "optimizer.embedding_state=tiny"])
    text = str(e.value)
    assert "memory.chunked_loss=-1" in text and "memory.checkpointing='some'" in text
    assert "optimizer.embedding_state='tiny'" in text and "full, 8bit, lowrank, factored" in text


def test_frozen_checkpointing_needs_a_layer_switching_method():
    with pytest.raises(ConfigError, match="memory.checkpointing=frozen: only layer-switching methods"):
        load_config(CONFIGS / "smollm2_full.yaml", ["memory.checkpointing=frozen"])
    assert load_config(CONFIGS / "smollm2_lisa.yaml", ["memory.checkpointing=frozen"]).memory.checkpointing == "frozen"


def test_update_in_backward_refuses_global_clipping():
    with pytest.raises(ConfigError, match=r"training.max_grad_norm=1.0.*set training.max_grad_norm=0"):
        load_config(CONFIGS / "smollm2_owlore.yaml", ["optimizer.update_in_backward=true"])
    cfg = load_config(CONFIGS / "smollm2_owlore.yaml", ["optimizer.update_in_backward=true",
                                                        "training.max_grad_norm=0"])
    assert cfg.sections["optimizer"].update_in_backward
    with pytest.raises(ConfigError, match="training.fp16=true: the GradScaler"):
        load_config(CONFIGS / "smollm2_owlore.yaml", ["optimizer.update_in_backward=true",
                                                      "training.max_grad_norm=0", "training.fp16=true"])


# ------------------------------------------------------------------------------------------------ checkpointing
def test_checkpoint_plan():
    # frozen embeddings: layers below the lowest trained one save nothing, so they are not checkpointed
    assert checkpoint_plan(6, [2, 4], embeddings_train=False) == [False, False, False, True, False, True]
    # trained embeddings: backward runs through every layer, every frozen one is checkpointed
    assert checkpoint_plan(6, [2, 4], embeddings_train=True) == [True, True, False, True, False, True]
    assert checkpoint_plan(3, [], embeddings_train=False) == [False] * 3


def _saved_bytes(model, batch) -> int:
    seen: dict[int, int] = {}
    params = {p.data_ptr() for p in model.parameters()}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch).loss
    loss.backward()
    return sum(seen.values())


def test_frozen_layer_checkpointing_keeps_gradients_and_saves_less():
    """Checkpointing the frozen layers changes no gradient and keeps fewer activations than no checkpointing;
    checkpointing everything keeps fewer still (the trained layers' activations are the difference)."""
    from owlore.layerwise.layers import find_decoder_layers, set_layers_trainable

    torch.manual_seed(0)
    ids = torch.randint(2, 200, (2, 48))
    batch = {"input_ids": ids, "labels": ids}
    results = {}
    for mode in ("off", "frozen", "all"):
        model = ms.tiny_model().train()
        layers = find_decoder_layers(model)
        set_layers_trainable(layers, [2])
        if mode != "off":
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            plan = checkpoint_plan(len(layers), [2], embeddings_train=True) if mode == "frozen" else [True] * 4
            for layer, on in zip(layers, plan):
                layer.gradient_checkpointing = on
        saved = _saved_bytes(model, batch)
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[mode] = saved, grads
    assert set(results["frozen"][1]) == set(results["off"][1]) and "model.layers.2.mlp.up_proj.weight" in \
        results["off"][1]
    for name, g in results["off"][1].items():
        torch.testing.assert_close(results["frozen"][1][name], g, rtol=0, atol=1e-6)
        torch.testing.assert_close(results["all"][1][name], g, rtol=0, atol=1e-6)
    assert results["all"][0] < results["frozen"][0] < results["off"][0], {k: v[0] for k, v in results.items()}


def test_frozen_checkpointing_through_train_py_gives_the_same_losses(tmp_path, tiny_dir, rows):
    base = ms.train_argv("owlore", tiny_dir, rows, tmp_path / "off", steps=4)
    train.main(base)
    train.main([*ms.train_argv("owlore", tiny_dir, rows, tmp_path / "frozen", steps=4),
                "memory.checkpointing=frozen"])
    off, frozen = _losses(tmp_path / "off"), _losses(tmp_path / "frozen")
    assert len(off) == 4 and frozen == pytest.approx(off, abs=1e-5)


# ------------------------------------------------------------------------------------------------ embedding state
def test_embedding_groups():
    model = ms.tiny_model()
    full = {g["name"]: g for g in make_param_groups(model, rank=4)}
    assert "embedding" not in full  # full: embeddings stay in the AdamW group, as before
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    for state, key in (("8bit", "state_bits"), ("lowrank", "rank"), ("factored", "factored")):
        groups = {g["name"]: g for g in make_param_groups(model, rank=4, embedding_state=state, embedding_rank=8)}
        ids = {id(p) for p in groups["embedding"]["params"]}
        assert ids == {id(emb), id(head)} and key in groups["embedding"], state
        assert not ids & {id(p) for g in groups.values() if g["name"] != "embedding" for p in g["params"]}
        if state == "lowrank":
            assert groups["embedding"]["rank"] == 8 and groups["embedding"]["scale"] == 1.0
    with pytest.raises(ValueError, match="embedding_state must be one of"):
        make_param_groups(model, embedding_state="half")


def test_lowrank_embedding_state_is_rank_sized():
    model = ms.tiny_model()
    opt = GaLoreAdamW(make_param_groups(model, rank=4, embedding_state="lowrank", embedding_rank=8), lr=1e-3)
    ids = torch.randint(2, 200, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    emb = model.get_input_embeddings().weight
    vocab, width = emb.shape
    assert opt.state[emb]["exp_avg"].shape == (vocab, 8) and opt.state[emb]["basis"].numel() == width * 8


@pytest.mark.parametrize("state", ["8bit", "lowrank"])
def test_embedding_state_through_train_py(tmp_path, tiny_dir, rows, state):
    summary = train.main([*ms.train_argv("lisa", tiny_dir, rows, tmp_path, steps=3),
                          f"optimizer.embedding_state={state}", "optimizer.embedding_rank=8"])
    full = train.main(ms.train_argv("lisa", tiny_dir, rows, tmp_path / "full", steps=3))
    assert summary["optimizer_state_bytes"] < full["optimizer_state_bytes"]
    assert all(torch.isfinite(torch.tensor(_losses(tmp_path))))


def test_factored_update_matches_transformers_adafactor(monkeypatch):
    from transformers.optimization import Adafactor

    from owlore.optim.factored import factored_state_bytes, factored_update

    torch.manual_seed(0)
    monkeypatch.setattr("owlore.optim.factored.CHUNK_ELEMENTS", 100)  # 8 rows per chunk: several chunks, a short last one
    w0 = torch.randn(40, 12)
    ours, ref = w0.clone(), torch.nn.Parameter(w0.clone())
    oracle = Adafactor([ref], lr=1e-2, scale_parameter=False, relative_step=False, warmup_init=False,
                       beta1=None, weight_decay=0.1)
    state: dict = {}
    for _ in range(5):
        g = torch.randn(40, 12)
        ref.grad = g.clone()
        oracle.step()
        factored_update(ours, g, state, lr=1e-2, weight_decay=0.1)
    torch.testing.assert_close(ours, ref.detach(), rtol=1e-5, atol=1e-6)
    assert state["step"] == 5 and factored_state_bytes(w0.shape) == 4 * 52
    assert sum(t.numel() * 4 for t in state.values() if isinstance(t, torch.Tensor)) == 4 * 52


# ------------------------------------------------------------------------------------------------ int8 frozen layers
def test_int8_rows_round_trip():
    from owlore.memory.int8_frozen import dequantize_rows, quantize_rows

    torch.manual_seed(0)
    w = torch.randn(32, 48)
    codes, scale = quantize_rows(w)
    assert codes.dtype == torch.int8 and scale.shape == (32,)
    err = (dequantize_rows(codes, scale, torch.float32) - w).abs()
    assert (err <= scale[:, None] / 2 + 1e-7).all()  # within half a step of each row's grid


def test_int8_store_keeps_exact_weights_and_close_gradients():
    from owlore.layerwise.layers import find_decoder_layers, set_layers_trainable
    from owlore.memory.int8_frozen import Int8Store

    torch.manual_seed(0)
    ids = torch.randint(2, 200, (2, 32))
    ref = ms.tiny_model().train()
    model = ms.tiny_model().train()
    exact = {k: v.clone() for k, v in model.state_dict().items()}
    for m in (ref, model):
        set_layers_trainable(find_decoder_layers(m), [2])
    store = Int8Store(find_decoder_layers(model))
    store.sync([2])
    assert store.quantized == {0, 1, 3} and model.model.layers[0].mlp.up_proj.weight.numel() == 0
    linears = [m for m in ref.model.layers[0].modules() if type(m) is torch.nn.Linear]
    per_layer = sum(m.weight.numel() + 4 * m.out_features for m in linears)  # 1-byte codes + fp32 row scales
    assert store.device_bytes() == 3 * per_layer
    for name, value in model.state_dict().items():  # checkpoints see the exact weights
        assert torch.equal(value, exact[name]), name
    loss_ref, loss = ref(input_ids=ids, labels=ids).loss, model(input_ids=ids, labels=ids).loss
    assert abs(loss.item() - loss_ref.item()) < 1e-2 * loss_ref.item()
    loss_ref.backward()
    loss.backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        if q.grad is not None:
            cos = torch.nn.functional.cosine_similarity(p.grad.flatten(), q.grad.flatten(), dim=0)
            assert cos > 0.999, (name, cos.item())
    set_layers_trainable(find_decoder_layers(model), [0])
    store.sync([0])  # layer 2 leaves (int8), layer 0 comes back exactly as it was
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, exact["model.layers.0.mlp.up_proj.weight"])
    assert 2 in store.quantized


def test_int8_frozen_layers_through_train_py(tmp_path, tiny_dir, rows):
    """Same draws, losses within int8 noise of the exact run; never-sampled layers saved bit-exact; the run is
    evaluated and saved with every layer exact again."""
    summary = train.main([*ms.train_argv("lisa", tiny_dir, rows, tmp_path / "int8", steps=4),
                          "memory.frozen_weights=int8"])
    train.main(ms.train_argv("lisa", tiny_dir, rows, tmp_path / "exact", steps=4))
    assert summary["int8_frozen_layer_bytes"] > 0
    record = json.loads((tmp_path / "int8" / "owlore_record.json").read_text())
    exact_record = json.loads((tmp_path / "exact" / "owlore_record.json").read_text())
    assert record["history"] == exact_record["history"]
    assert _losses(tmp_path / "int8") == pytest.approx(_losses(tmp_path / "exact"), rel=2e-2)
    initial = ms.load_safetensors(tiny_dir / "model.safetensors")
    final = ms.load_safetensors(tmp_path / "int8" / "final" / "model.safetensors")
    sampled = {i for h in record["history"] for i in h["layers"]}
    unsampled = set(range(ms.NUM_LAYERS)) - sampled
    assert unsampled
    for name, value in initial.items():
        if name.startswith("model.layers.") and int(name.split(".")[2]) in unsampled:
            assert torch.equal(final[name], value), name


def test_int8_frozen_needs_a_layer_switching_method():
    with pytest.raises(ConfigError, match="memory.frozen_weights=int8: only layer-switching methods"):
        load_config(CONFIGS / "smollm2_galore.yaml", ["memory.frozen_weights=int8"])
    with pytest.raises(ConfigError, match="training.load_best_model_at_end=true: the Trainer loads the best"):
        load_config(CONFIGS / "smollm2_lisa.yaml", ["memory.frozen_weights=int8",
                                                    "training.load_best_model_at_end=true"])


def test_factored_embedding_state_steps_with_adafactor(tmp_path, tiny_dir, rows):
    """GaLoreAdamW's factored group takes owlore.optim.factored's step: row/column state only, the weight moves."""
    model = ms.tiny_model()
    opt = GaLoreAdamW(make_param_groups(model, rank=4, embedding_state="factored"), lr=1e-3)
    emb = model.get_input_embeddings().weight
    before = emb.detach().clone()
    ids = torch.randint(2, 200, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    assert set(opt.state[emb]) == {"step", "exp_avg_sq_row", "exp_avg_sq_col"} and not torch.equal(emb, before)
    summary = train.main([*ms.train_argv("owlore", tiny_dir, rows, tmp_path, steps=3),
                          "optimizer.embedding_state=factored", "owlore.train_embeddings=true",
                          "owlore.train_lm_head=true"])
    assert all(torch.isfinite(torch.tensor(_losses(tmp_path)))) and summary["optimizer_state_bytes"] > 0


@pytest.mark.parametrize("in_backward", [False, True])
def test_sparse_embedding_grad_gives_the_same_losses(tmp_path, tiny_dir, rows, in_backward):
    """The row-sparse input-embedding gradient steps exactly like the dense one (untied tiny model: the sparse
    gradient reaches the optimizer), with the normal and the in-backward optimizer."""
    extra = ["owlore.train_embeddings=true", "owlore.train_lm_head=true", "training.max_grad_norm=0"]
    if in_backward:
        extra.append("optimizer.update_in_backward=true")
    train.main([*ms.train_argv("owlore", tiny_dir, rows, tmp_path / "dense", steps=3), *extra])
    train.main([*ms.train_argv("owlore", tiny_dir, rows, tmp_path / "sparse", steps=3), *extra,
                "memory.sparse_embedding_grad=true"])
    assert _losses(tmp_path / "sparse") == pytest.approx(_losses(tmp_path / "dense"), abs=1e-6)
    dense = ms.load_safetensors(tmp_path / "dense" / "final" / "model.safetensors")
    sparse = ms.load_safetensors(tmp_path / "sparse" / "final" / "model.safetensors")
    torch.testing.assert_close(sparse["model.embed_tokens.weight"], dense["model.embed_tokens.weight"],
                               rtol=0, atol=1e-6)
    assert not torch.equal(dense["model.embed_tokens.weight"],
                           ms.load_safetensors(tiny_dir / "model.safetensors")["model.embed_tokens.weight"])


def test_sparse_embedding_grad_needs_an_own_optimizer():
    with pytest.raises(ConfigError, match="memory.sparse_embedding_grad=true: method full"):
        load_config(CONFIGS / "smollm2_full.yaml", ["memory.sparse_embedding_grad=true"])


def test_offload_activations_gives_the_same_gradients_and_needs_checkpointing():
    """The checkpointed inputs go through host memory (a no-op copy on a CPU): identical loss and gradients."""
    from owlore.memory.offload_activations import disable_activation_offload, enable_activation_offload

    model = ms.tiny_model(3).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))

    def grads():
        model.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    ref_loss, ref = grads()
    enable_activation_offload(model)
    packed = []
    real = torch.autograd.graph.save_on_cpu.__init__

    def spy(self, *a, **k):
        packed.append(k.get("pin_memory"))
        real(self, *a, **k)

    torch.autograd.graph.save_on_cpu.__init__ = spy
    try:
        loss, got = grads()
    finally:
        torch.autograd.graph.save_on_cpu.__init__ = real
    assert packed == [False]  # entered once per training forward, unpinned on a CPU
    assert torch.equal(loss, ref_loss) and all(torch.equal(got[n], ref[n]) for n in ref)
    disable_activation_offload(model)
    assert "offloaded" not in model.forward.__qualname__
    with pytest.raises(ConfigError, match="offload_activations=true without activation checkpointing"):
        load_config(CONFIGS / "smollm2_owlore.yaml", ["memory.offload_activations=true"])
    load_config(CONFIGS / "smollm2_owlore.yaml", ["memory.offload_activations=true", "memory.checkpointing=all"])


def test_offload_activations_through_train_py_gives_the_same_losses(tmp_path, tiny_dir, rows):
    train.main([*ms.train_argv("owlore", tiny_dir, rows, tmp_path / "ckpt", steps=4), "memory.checkpointing=all"])
    train.main([*ms.train_argv("owlore", tiny_dir, rows, tmp_path / "offload", steps=4), "memory.checkpointing=all",
                "memory.offload_activations=true"])
    assert _losses(tmp_path / "offload") == _losses(tmp_path / "ckpt")
