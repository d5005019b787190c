"""Every registered method end to end through ``train.main`` on a tiny 4-layer Llama checkpoint (what trains, what
is saved, what the optimizer holds), LoRA/QLoRA adapters back through the evaluation loader, QLoRA's 4-bit base, its
gradients after a CPU evaluation and its error without 4-bit support, LISA's state policies, the Trainer's
``training.optim`` for ``full``, and (slow) every shipped ``configs/smollm2_<method>.yaml`` for two steps on the real
SmolLM2."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import transformers

sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
import eval_support as support  # noqa: E402
import method_support as ms  # noqa: E402

import train  # noqa: E402
from owlore.methods import REGISTRY, BuildContext, OptimizerConfig, get_method  # noqa: E402
from owlore.methods.qlora import keep_4bit_weights_trainable  # noqa: E402
from owlore.optim.state import params_with_state, state_bytes, unwrap_optimizer  # noqa: E402
from owlore.run.config import ConfigError  # noqa: E402
from tests.conftest import tiny_llama_config  # noqa: E402
from tests.test_callback import RandomLM  # noqa: E402

ROOT = ms.ROOT
METHODS = list(REGISTRY)
OUTSIDE = ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight")
TEXT = "The trophy would not fit in the suitcase because it was too big."


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """One intra-op thread: on the shared 2-core machines two threads spin against other processes (a 2-step
    SmolLM2 GaLore run took 163 s on two threads next to one busy process, 21 s on one; 13 s on two when idle)."""
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


def _train(argv: list[str]) -> SimpleNamespace:
    """``train.main(argv)``, keeping the Trainer it built (its model and optimizer after training)."""
    trainers = []
    real_train = transformers.Trainer.train

    def spy(self, *args, **kwargs):
        trainers.append(self)
        return real_train(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(transformers.Trainer, "train", spy)
        summary = train.main(argv)
    out = Path(summary["model_dir"]).parent
    model = trainers[-1].model
    # snapshots right after training, before any later forward can touch the model (bitsandbytes can repack
    # 4-bit weights in place at a CPU inference; see test_qlora_trains_correctly_after_an_evaluation_on_cpu)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    four_bit = {n: SimpleNamespace(dtype=m.weight.dtype, quant_type=m.weight.quant_state.quant_type,
                                   nested=m.weight.quant_state.nested, compute_dtype=m.compute_dtype)
                for n, m in model.named_modules() if _is_4bit(m)}
    return SimpleNamespace(summary=summary, out=out, trainer=trainers[-1], params=params, four_bit=four_bit,
                           record=json.loads((out / "owlore_record.json").read_text()))


def _is_4bit(module) -> bool:
    import bitsandbytes as bnb

    return isinstance(module, bnb.nn.Linear4bit)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_dir, rows):
    """``trained(method)``: the 3-step train.py run of ``method`` on the tiny checkpoint, run once per module."""
    cache: dict[str, SimpleNamespace] = {}

    def get(method: str) -> SimpleNamespace:
        if method not in cache:
            cache[method] = _train(ms.train_argv(method, tiny_dir, rows, tmp_path_factory.mktemp(f"run_{method}")))
        return cache[method]

    return get


def _logits(model, tokenizer, text: str = TEXT) -> torch.Tensor:
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


# ------------------------------------------------------------------------------ 1. every method via train.py
def _layer_of(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[2]) if name.startswith("model.layers.") else None


def _check_layer_sampling(run, initial, changed: set[str], *, outside_trains: dict[str, bool]) -> None:
    sampled = {i for h in run.record["history"] for i in h["layers"]}
    assert run.summary["layers_sampled"] == sorted(sampled)
    assert 0 < len(sampled) < ms.NUM_LAYERS, sampled  # γ=1, two draws: something is left untouched
    for name in initial:
        layer = _layer_of(name)
        if layer is not None:  # every tensor of a sampled layer moved, no tensor of another one did
            assert (name in changed) == (layer in sampled), (name, sorted(sampled))
    for name, trains in outside_trains.items():
        assert (name in changed) == trains, name


def _check_galore_state(run) -> None:
    opt = unwrap_optimizer(run.trainer.optimizer)
    groups = {g["name"]: g for g in opt.param_groups}
    assert len(groups["galore"]["params"]) == 7 * ms.NUM_LAYERS and groups["galore"]["rank"] == 4
    for p in groups["galore"]["params"]:
        st, (m, n) = opt.state[p], p.shape
        # rank-4 moments: the smaller side projected away (std), the larger one kept
        assert st["exp_avg"].shape in {(4, n), (m, 4)} and st["exp_avg"].numel() == 4 * max(m, n), p.shape
        assert st["exp_avg_sq"].shape == st["exp_avg"].shape and "basis" in st and st["step"] == 3
    for name in ("adamw", "adamw_no_decay"):
        for p in groups.get(name, {"params": []})["params"]:
            assert opt.state[p]["exp_avg"].shape == p.shape and "basis" not in opt.state[p]
    assert run.summary["optimizer_state_bytes"] == state_bytes(opt)


def _check_adapter(run, tiny_dir: Path, initial: dict[str, torch.Tensor], *, quantized: bool) -> None:
    final = run.out / "final"
    assert (final / "adapter_model.safetensors").is_file() and not (final / "model.safetensors").exists()
    assert json.loads((final / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_dir)
    adapter = ms.load_safetensors(final / "adapter_model.safetensors")
    assert all("lora_A" in k or "lora_B" in k for k in adapter)  # the adapter only, no base weights
    b_mats = [v for k, v in adapter.items() if "lora_B" in k]
    assert len(b_mats) == 7 * ms.NUM_LAYERS and all(v.abs().max() > 0 for v in b_mats)  # B left its zero init
    model = run.trainer.model
    assert all(p.requires_grad == ("lora_" in n) for n, p in model.named_parameters())
    base_params = {n.replace("base_model.model.", "").replace(".base_layer", ""): p
                   for n, p in run.params.items() if "lora_" not in n}
    assert set(base_params) == set(initial)
    fresh = None
    if quantized:  # 4-bit bytes equal to a fresh quantisation of the untouched checkpoint
        from transformers import AutoModelForCausalLM

        kwargs = get_method("qlora").model_kwargs(train.load_config(ROOT / "configs/smollm2_qlora.yaml"))
        fresh = dict(AutoModelForCausalLM.from_pretrained(tiny_dir, **kwargs).named_parameters())
    for name, p in base_params.items():
        if p.dtype == torch.uint8:
            assert quantized and torch.equal(p, fresh[name].data), name
        else:
            assert torch.equal(p.float(), initial[name]), name


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_three_steps_through_train_py(method, trained, tiny_dir):
    run = trained(method)
    s = run.summary
    assert s["method"] == method and s["optimizer_steps"] == 3 and math.isfinite(s["train_loss"])
    losses = ms.logged_losses(run.out)
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses), losses
    assert run.record["method"] == method and run.record["summary"]["optimizer_steps"] == 3
    assert s["trainable_parameters"] > 0
    initial = ms.load_safetensors(tiny_dir / "model.safetensors")
    if method in ("lora", "qlora"):
        _check_adapter(run, tiny_dir, initial, quantized=method == "qlora")
        return
    saved = ms.load_safetensors(run.out / "final" / "model.safetensors")
    assert set(saved) == set(initial)
    changed = {n for n in initial if not torch.equal(initial[n], saved[n])}
    if method == "full":
        assert changed == set(initial)
    elif method == "galore":  # all layers (low-rank) and everything else (full-rank AdamW)
        assert changed == set(initial)
        _check_galore_state(run)
    elif method == "lisa":  # LMFlow: embeddings, head and final norm always train
        _check_layer_sampling(run, initial, changed, outside_trains=dict.fromkeys(OUTSIDE, True))
    elif method == "badam":  # BAdam's default blocks: decoder layers only
        _check_layer_sampling(run, initial, changed, outside_trains=dict.fromkeys(OUTSIDE, False))
        assert [len(h["layers"]) for h in run.record["history"]] == [1, 1]
    elif method == "owlore":  # smollm2_owlore.yaml freezes embeddings and head, trains the final norm
        _check_layer_sampling(run, initial, changed, outside_trains={
            "model.embed_tokens.weight": False, "lm_head.weight": False, "model.norm.weight": True})
        assert len(run.record["outlier_ratios"]) == ms.NUM_LAYERS
    elif method == "apollo":  # every parameter; the decoder linears in APOLLO's scaled low-rank group
        from apollo_torch import APOLLOAdamW

        assert changed == set(initial)
        opt = unwrap_optimizer(run.trainer.optimizer)
        assert isinstance(opt, APOLLOAdamW)
        low_rank = [g for g in opt.param_groups if "rank" in g]
        assert len(low_rank) == 1 and low_rank[0]["rank"] == 4 and low_rank[0]["scale_type"] == "channel"
        assert len(low_rank[0]["params"]) == 7 * ms.NUM_LAYERS  # q k v o gate up down of every layer
    else:
        pytest.fail(f"no parameter check for method {method!r}: add one")


# --------------------------------------------------------------------- 2. adapters back into the evaluation
def test_lora_adapter_reloads_with_the_trained_logits(trained, tiny_dir):
    from peft import PeftModel

    from owlore.evaluation import load_model

    run = trained("lora")
    final = run.out / "final"
    trained_model = run.trainer.model.eval()
    tok = support.tokenizer()
    ref = _logits(trained_model, tok)
    loaded, loaded_tok = load_model(str(tiny_dir), adapter=str(final))
    auto, _ = load_model(str(final))  # adapter-only directory: the base named in adapter_config.json
    base, _ = load_model(str(tiny_dir))
    assert isinstance(loaded, PeftModel) and loaded_tok.vocab_size == tok.vocab_size
    torch.testing.assert_close(_logits(loaded, tok), ref)
    torch.testing.assert_close(_logits(auto, tok), ref)
    assert (_logits(base, tok) - ref).abs().max() > 0.05  # the adapter is not a no-op


def test_qlora_adapter_reloads(trained, tiny_dir):
    """Same 4-bit quantisation + adapter (transformers + peft directly, or the evaluation loader with
    ``load_in_4bit``): the train-time logits. Without ``load_in_4bit`` the loader puts the adapter on the fp32
    base: the train-time logits up to the base's quantisation error."""
    import bitsandbytes as bnb
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from owlore.evaluation import load_model

    run = trained("qlora")
    final = run.out / "final"
    tok = support.tokenizer()
    ref = _logits(run.trainer.model.eval(), tok)
    with run.trainer.model.disable_adapter():
        ref_base = _logits(run.trainer.model, tok)
    kwargs = get_method("qlora").model_kwargs(train.load_config(ROOT / "configs/smollm2_qlora.yaml"))
    q_reload = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir, **kwargs), final).eval()
    keep_4bit_weights_trainable(q_reload)  # the kernels the trained model uses (no bf16 CPU inference repacking)
    torch.testing.assert_close(_logits(q_reload, tok), ref)

    # the evaluation loader with load_in_4bit (eval/*.py --load-in-4bit): the base the adapter was trained on
    loaded4, _ = load_model(str(tiny_dir), adapter=str(final), load_in_4bit=True)
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in loaded4.modules()) == 28
    got4 = _logits(loaded4, tok)

    # without it, the adapter lands on the fp32 base
    loaded, _ = load_model(str(tiny_dir), adapter=str(final))
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in loaded.modules())
    fp32_base = _logits(load_model(str(tiny_dir))[0], tok)
    got = _logits(loaded, tok)
    quant_error = (ref_base - fp32_base).abs().max()
    adapter_effect = (ref - ref_base).abs().max()
    assert adapter_effect > 2 * quant_error  # the check below can tell a loaded adapter from a missing one
    # 4-bit reload: equal up to bitsandbytes' CPU inference repacking (constants through bf16), a small fraction
    # of what dropping the quantisation costs
    assert (got4 - ref).abs().max() <= 0.1 * quant_error
    assert (got - ref).abs().max() <= 1.5 * quant_error
    cos = torch.nn.functional.cosine_similarity((got - fp32_base).flatten(), (ref - ref_base).flatten(), dim=0)
    assert cos > 0.95  # the adapter moves the fp32 base the way it moved the 4-bit one


def test_eval_script_runs_on_a_trained_adapter(trained, tiny_dir, tmp_path):
    final = trained("lora").out / "final"
    out = tmp_path / "cs.json"
    # without the offline variables: the script must go offline by itself (local model, adapter and data)
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "eval" / "commonsense.py"), "--model", str(tiny_dir), "--adapter", str(final),
         "--data-dir", str(support.DATA_DIR), "--tasks", "piqa,boolq", "--limit", "2", "--output", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["adapter"] == str(final) and list(result["results"]) == ["piqa", "boolq"]
    assert all(r["n"] == 2 for r in result["results"].values())


# --------------------------------------------------------------------------------- 3. QLoRA's 4-bit base
def test_qlora_base_is_4bit(trained):
    run = trained("qlora")
    assert len(run.four_bit) == 7 * ms.NUM_LAYERS and all(".base_layer" in n for n in run.four_bit)
    for q in run.four_bit.values():  # NF4 with double quantisation and fp32 compute, as smollm2_qlora.yaml asks
        assert q.dtype == torch.uint8 and q.quant_type == "nf4" and q.nested and q.compute_dtype == torch.float32
    assert not _is_4bit(run.trainer.model.get_output_embeddings())
    assert run.summary["trainable_parameters"] == sum(p.numel() for n, p in run.params.items() if "lora_" in n)


def _lora_grads(model, ids) -> dict[str, torch.Tensor]:
    model.train()
    model.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_qlora_trains_correctly_after_an_evaluation_on_cpu(tiny_dir):
    """bitsandbytes repacks 4-bit weights in place at an eval-mode no-grad CPU forward (on CPUs with AVX-512 bf16),
    after which the base weights pass no gradient back; qlora's build undoes that, so an evaluation before
    training (train.py's eval.demo) leaves the gradients as they are without it."""
    from bitsandbytes.functional import has_avx512bf16
    from transformers import AutoModelForCausalLM

    from owlore.methods.lora import LoraSettings

    kwargs = get_method("qlora").model_kwargs(train.load_config(ROOT / "configs/smollm2_qlora.yaml"))
    args = transformers.TrainingArguments(output_dir="unused", use_cpu=True, report_to=[])
    config = SimpleNamespace(sections={"lora": LoraSettings(r=4, alpha=8, dropout=0.0)})
    ids = torch.randint(0, support.VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
    grads = {}
    for evaluated in (False, True):
        model = AutoModelForCausalLM.from_pretrained(tiny_dir, **kwargs)
        if evaluated:
            with torch.no_grad():
                model.eval()(input_ids=ids)
            packed = [m for m in model.modules() if _is_4bit(m) and getattr(m.weight.quant_state,
                                                                           "packing_format_for_cpu", False)]
            assert len(packed) == (7 * ms.NUM_LAYERS if has_avx512bf16() else 0)
        torch.manual_seed(1)
        parts = get_method("qlora").build(BuildContext(model=model, config=config, args=args))
        for module in parts.model.modules():  # a non-zero B, so that lora_A gets gradients too
            if hasattr(module, "lora_B"):
                torch.nn.init.normal_(module.lora_B["default"].weight, std=0.02)
        assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False)
                       for m in parts.model.modules() if _is_4bit(m))
        grads[evaluated] = _lora_grads(parts.model, ids)
    assert grads[True].keys() == grads[False].keys() and len(grads[False]) == 2 * 7 * ms.NUM_LAYERS
    for name, g in grads[False].items():  # the repacked constants went through bf16: equal to ~1e-3
        rel = ((grads[True][name] - g).norm() / g.norm()).item()
        assert rel < 2e-2, (name, rel)


def test_qlora_losses_do_not_depend_on_the_evaluation_before_training(trained, tiny_dir, rows, tmp_path):
    without = ms.logged_losses(trained("qlora").out)
    run = _train(ms.train_argv("qlora", tiny_dir, rows, tmp_path, "eval.demo=true", "eval.demo_limit=1"))
    assert "demo" in run.summary["eval_before"] and "demo" in run.summary["eval_after"]
    with_eval = ms.logged_losses(run.out)
    assert len(with_eval) == len(without) == 3
    # without the fix the 2nd and 3rd losses differed by ~5e-2 (gradients lost behind the repacked weights)
    assert max(abs(a - b) for a, b in zip(with_eval, without, strict=True)) < 2e-3, (with_eval, without)


@pytest.mark.parametrize("failure", ["kernel", "import"])
def test_qlora_without_4bit_support_is_a_config_error(failure, monkeypatch, tmp_path, capsys, tiny_dir, rows):
    import bitsandbytes.functional as bnbf

    from owlore.methods import qlora

    if failure == "kernel":
        def no_kernel(*args, **kwargs):
            raise NotImplementedError("no 4-bit kernel for this device")

        monkeypatch.setattr(bnbf, "quantize_4bit", no_kernel)
        why = "NotImplementedError: no 4-bit kernel for this device"
    else:
        monkeypatch.setitem(sys.modules, "bitsandbytes.functional", None)
        why = "ModuleNotFoundError"  # an ImportError
    cfg = train.load_config(ROOT / "configs/smollm2_qlora.yaml", [f"training.output_dir={tmp_path}"])
    with pytest.raises(ConfigError) as e:
        qlora.model_kwargs(cfg)
    msg = str(e.value)
    assert msg.startswith("method=qlora: bitsandbytes cannot quantise to 4 bits on cpu") and why in msg
    assert "use method=lora" in msg

    def no_weights(*args, **kwargs):
        raise AssertionError("weights were loaded before the 4-bit check")

    monkeypatch.setattr(train, "load_model_and_tokenizer", no_weights)
    with pytest.raises(SystemExit) as exit_info:
        train.main(ms.train_argv("qlora", tiny_dir, rows, tmp_path / "out"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "config error: method=qlora: bitsandbytes cannot quantise" in err and "use method=lora" in err
    assert not (tmp_path / "out" / "final").exists()


# --------------------------------------------------------------------------------- 4. LISA's state policies
class StateProbe(transformers.TrainerCallback):
    def __init__(self, model, cb):
        self.model, self.cb, self.rows = model, cb, []

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        opt = unwrap_optimizer(optimizer)
        ids = params_with_state(opt)
        self.rows.append({
            "bytes": state_bytes(opt),
            "layers": [i for i, layer in enumerate(self.cb.layers) if any(id(p) in ids for p in layer.parameters())],
            "visited": sorted({i for _, ls in self.cb.history for i in ls}),
            "active": list(self.cb.active),
            "emb_head_trainable": (self.model.model.embed_tokens.weight.requires_grad,
                                   self.model.lm_head.weight.requires_grad),
        })


def _lisa_run(tmp_path, policy: str, steps: int = 8) -> tuple[StateProbe, torch.nn.Module]:
    from owlore.methods.lisa import LisaConfig

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(tiny_llama_config(6))
    args = transformers.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], save_strategy="no",
                                          max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-2,
                                          logging_steps=1, disable_tqdm=True, lr_scheduler_type="constant")
    config = SimpleNamespace(sections={"lisa": LisaConfig(gamma=1, interval=1, state_policy=policy, seed=2),
                                       "optimizer": OptimizerConfig()})
    parts = get_method("lisa").build(BuildContext(model=model, config=config, args=args))
    probe = StateProbe(model, parts.layer_callback)
    transformers.Trainer(model=parts.model, args=args, train_dataset=RandomLM(n=32, t=12),
                         optimizers=(parts.optimizer, None), callbacks=[*parts.callbacks, probe]).train()
    return probe, model


def test_lisa_keep_grows_state_and_reset_bounds_it(tmp_path):
    keep, model = _lisa_run(tmp_path / "keep", "keep")
    reset, _ = _lisa_run(tmp_path / "reset", "reset")
    # exact bytes: two fp32 moments per element of the always-trained part plus the layers holding state
    per_layer = 8 * sum(p.numel() for p in model.model.layers[0].parameters())
    outside = 8 * sum(p.numel() for n, p in model.named_parameters() if not n.startswith("model.layers."))
    assert keep.rows[-1]["visited"] == reset.rows[-1]["visited"]  # same seed, same draws
    assert len(keep.rows[-1]["visited"]) >= 3
    for row in keep.rows:  # keep (LMFlow): every layer visited so far still holds its state
        assert row["layers"] == row["visited"] and row["bytes"] == outside + per_layer * len(row["visited"])
    assert keep.rows[-1]["bytes"] > keep.rows[0]["bytes"]
    for row in reset.rows:  # reset: only the γ=1 active layer
        assert row["layers"] == row["active"] and row["bytes"] == outside + per_layer
    for row in keep.rows + reset.rows:
        assert row["emb_head_trainable"] == (True, True)


# ------------------------------------------------------------------------ 5. full with the Trainer's optim
def test_full_passes_training_optim_to_the_trainer(tiny_dir, rows, tmp_path):
    """adamw_bnb_8bit runs on CPU (bitsandbytes >= 0.46): the Trainer's optimizer is bitsandbytes' 8-bit AdamW."""
    import bitsandbytes as bnb

    run = _train(ms.train_argv("full", tiny_dir, rows, tmp_path, "training.optim=adamw_bnb_8bit"))
    assert run.summary["optimizer_steps"] == 3 and math.isfinite(run.summary["train_loss"])
    opt = unwrap_optimizer(run.trainer.optimizer)
    assert type(opt) is bnb.optim.AdamW and opt.args.optim_bits == 8
    model = run.trainer.model
    head = opt.state[model.lm_head.weight]
    assert head["state1"].dtype == torch.uint8 and head["state2"].dtype == torch.uint8 and head["step"] == 3
    # transformers keeps embeddings in 32-bit state under bnb optimizers
    assert opt.state[model.model.embed_tokens.weight]["state1"].dtype == torch.float32


# --------------------------------------------------------------------------- 6. the real SmolLM2 (slow)
SMOLLM2_KNOBS = {
    "owlore": ["owlore.gamma=2", "owlore.interval=1", "owlore.rank=8", "owlore.calibration_batches=1",
               "owlore.cache_dir=null"],
    "full": [],
    "lora": [],
    "qlora": [],
    "galore": ["galore.rank=8"],
    "lisa": ["lisa.gamma=2", "lisa.interval=1"],
    "badam": ["badam.block_size=2", "badam.switch_every=1"],
    "apollo": ["apollo.rank=8"],
}


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_every_shipped_smollm2_config_trains_two_steps(method, smollm2_path, tmp_path):
    start = time.perf_counter()
    summary = train.main(["--config", str(ROOT / f"configs/smollm2_{method}.yaml"), f"model.name={smollm2_path}",
                          "data.limit=16", "data.max_seq_length=48", f"training.output_dir={tmp_path}",
                          "training.max_steps=2", "training.per_device_train_batch_size=2", "training.report_to=[]",
                          "training.save_strategy=no", "training.logging_steps=1", "training.disable_tqdm=true",
                          "eval.demo=false", *SMOLLM2_KNOBS[method]])
    assert summary["method"] == method and summary["optimizer_steps"] == 2
    assert math.isfinite(summary["train_loss"]) and summary["train_loss"] > 0
    if method in ("owlore", "lisa", "badam"):
        assert len(summary["layers_sampled"]) >= 2  # switched layers every step
    print(f"{method}: {time.perf_counter() - start:.1f} s, train {summary['train_seconds']:.1f} s, wall {summary['wall_seconds']:.1f} s")


class _StopAt(transformers.TrainerCallback):
    """Ends training after step ``n`` (its checkpoint written), as an interruption would, without changing
    max_steps and so the learning-rate schedule."""

    def __init__(self, n: int) -> None:
        self.n = n

    def on_save(self, args, state, control, **kwargs):
        if state.global_step >= self.n:
            control.should_training_stop = True


@pytest.mark.parametrize("method", ["lisa", "badam", "galore", "lora"])
def test_resume_through_train_py_continues_exactly(method, tiny_dir, rows, tmp_path):
    """Interrupted after a checkpoint, resumed with ``resume_from_checkpoint=last``: the same per-step losses as
    one run (layer-switching methods restore their schedule from owlore_state.pt; the others need only the
    Trainer's files)."""
    knobs = {"lisa": ["lisa.interval=3"], "badam": ["badam.switch_every=3", "badam.block_size=1"]}.get(method, [])
    argv = [*knobs, "training.save_total_limit=null"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    _train(ms.train_argv(method, tiny_dir, rows, whole, *argv, steps=6))
    real_train = transformers.Trainer.train

    def interrupted(self, *a, **k):
        self.add_callback(_StopAt(4))
        return real_train(self, *a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(transformers.Trainer, "train", interrupted)
        train.main(ms.train_argv(method, tiny_dir, rows, cut, *argv, steps=6))
    assert len(ms.logged_losses(cut)) == 4  # stopped at the checkpoint of step 4, mid-interval for lisa/badam
    train.main(ms.train_argv(method, tiny_dir, rows, cut, *argv, "training.resume_from_checkpoint=last", steps=6))
    assert len(ms.logged_losses(whole)) == 6
    assert ms.logged_losses(cut) == ms.logged_losses(whole)


@pytest.mark.parametrize(("cuda", "bf16", "want"), [(False, False, torch.float32), (True, True, torch.bfloat16),
                                                    (True, False, torch.float16)])
def test_qlora_auto_compute_dtype_follows_the_gpus_bf16_support(monkeypatch, cuda, bf16, want):
    """A T4 / V100 has CUDA but no bf16: auto must not pick bfloat16 there."""
    from owlore.methods.qlora import QuantizationConfig

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16)
    assert QuantizationConfig(compute_dtype="auto").torch_compute_dtype() == want
