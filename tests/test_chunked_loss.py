"""owlore.memory.chunked_loss: the chunked head + cross-entropy equals transformers' causal-LM loss and its
gradients (alone, through a patched tiny Llama, tied/untied, frozen/trainable head, peft LoRA, and through
``train.main``), leaves generation and evaluation alone, refuses what it cannot reproduce, and never saves (or
makes) a tensor of B·T·V elements."""

from __future__ import annotations

import copy
import inspect
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaForCausalLM
from transformers.loss.loss_utils import ForCausalLMLoss

from owlore.memory.chunked_loss import chunked_linear_cross_entropy, disable_chunked_loss, enable_chunked_loss
from tests.conftest import tiny_llama_config

sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
import method_support as ms  # noqa: E402

import train  # noqa: E402

B, T, D, V = 2, 9, 8, 24  # 16 shifted targets


@pytest.fixture(autouse=True)
def _one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------ 1. the function alone
def _inputs(dtype: torch.dtype, *, bias: bool = True, ignore: slice | None = None):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(B, T, D, generator=g, dtype=dtype, requires_grad=True)
    weight = torch.randn(V, D, generator=g, dtype=dtype, requires_grad=True)
    b = torch.randn(V, generator=g, dtype=dtype, requires_grad=True) if bias else None
    labels = torch.randint(0, V, (B, T), generator=g)
    if ignore is not None:
        labels.view(-1)[ignore] = -100
    return hidden, weight, b, labels


def _reference(hidden, weight, bias, labels, num_items_in_batch=None):
    """Full logits: ForCausalLMLoss itself for fp32; the same formula in fp64 (ForCausalLMLoss casts to fp32)."""
    logits = F.linear(hidden, weight, bias)
    if logits.dtype != torch.float64:
        return ForCausalLMLoss(logits, labels, V, num_items_in_batch=num_items_in_batch)
    shifted = F.pad(labels, (0, 1), value=-100)[..., 1:].reshape(-1)
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = F.cross_entropy(logits.reshape(-1, V), shifted, reduction=reduction)
    return loss if num_items_in_batch is None else loss / num_items_in_batch


def _loss_and_grads(fn, hidden, weight, bias, labels, **kw):
    loss = fn(hidden, weight, bias, labels, **kw)
    wanted = [t for t in (hidden, weight, bias) if t is not None and t.requires_grad]
    return loss.detach(), torch.autograd.grad(loss * 3.0, wanted)  # 3: a grad_output other than 1


def _assert_same(dtype, ignore=None, bias=True, num_items_in_batch=None, **kw):
    hidden, weight, b, labels = _inputs(dtype, bias=bias, ignore=ignore)
    ref, ref_grads = _loss_and_grads(_reference, hidden, weight, b, labels, num_items_in_batch=num_items_in_batch)
    got, got_grads = _loss_and_grads(
        lambda h, w, bb, lab, **k: chunked_linear_cross_entropy(h, w, lab, bias=bb, **k),
        hidden, weight, b, labels, num_items_in_batch=num_items_in_batch, **kw)
    tol = dict(rtol=0, atol=1e-12) if dtype == torch.float64 else dict(rtol=0, atol=1e-6)
    torch.testing.assert_close(got, ref, **tol)
    assert len(got_grads) == len(ref_grads)
    for g, r in zip(got_grads, ref_grads):
        torch.testing.assert_close(g, r, **tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("chunk_size", [1, 4, 5, 16, 1000])  # 4 and 16 divide the 16 targets, 1 is one per chunk
def test_loss_and_grads_equal_full_logits(dtype, chunk_size):
    _assert_same(dtype, chunk_size=chunk_size)


@pytest.mark.parametrize("chunk_size", [3, 4, 7])
def test_ignored_labels_including_whole_chunks(chunk_size):
    _assert_same(torch.float64, ignore=slice(1, 12), chunk_size=chunk_size)  # 11 of 18, so whole chunks are gone
    _assert_same(torch.float32, ignore=slice(0, None, 3), chunk_size=chunk_size)


@pytest.mark.parametrize("num_items", [11, torch.tensor(11)])
def test_num_items_in_batch_divides_the_sum(num_items):
    _assert_same(torch.float64, ignore=slice(0, 4), num_items_in_batch=num_items, chunk_size=5)
    _assert_same(torch.float32, ignore=slice(0, 4), num_items_in_batch=num_items, chunk_size=5, bias=False)


def test_frozen_head_gets_no_gradient():
    hidden, weight, _, labels = _inputs(torch.float64, bias=False)
    weight.requires_grad_(False)
    loss = chunked_linear_cross_entropy(hidden, weight, labels, chunk_size=5)
    loss.backward()
    assert weight.grad is None
    ref = hidden.detach().requires_grad_(True)
    _reference(ref, weight, None, labels).backward()
    torch.testing.assert_close(hidden.grad, ref.grad, rtol=0, atol=1e-12)


def test_already_shifted_labels_and_bf16():
    hidden, weight, b, labels = _inputs(torch.float64)
    shifted = F.pad(labels, (0, 1), value=-100)[..., 1:]
    torch.testing.assert_close(chunked_linear_cross_entropy(hidden, weight, shifted, chunk_size=5, bias=b,
                                                            shift_labels=False),
                               _reference(hidden, weight, b, labels), rtol=0, atol=1e-12)
    h16, w16 = hidden.detach().bfloat16(), weight.detach().bfloat16()
    loss = chunked_linear_cross_entropy(h16, w16, labels, chunk_size=5)
    assert loss.dtype == torch.float32  # upcast like HF's loss
    torch.testing.assert_close(loss, ForCausalLMLoss(F.linear(h16, w16), labels, V), rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------ 2. the patched model
def _tiny(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(num_layers=2, **overrides)).float()


def _batch(seed: int = 1, batch: int = 2, seq: int = 12, vocab: int = 128):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    labels = ids.clone()
    labels[0, :5] = -100  # a masked prompt
    labels[1, -3:] = -100  # right padding
    return ids, labels


def _step(model, ids, labels, **kw):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=labels, **kw)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def _assert_model_matches(model, chunk_size: int = 5, **kw):
    ids, labels = _batch()
    ref, ref_grads = _step(model, ids, labels, **kw)
    enable_chunked_loss(model, chunk_size)
    got, got_grads = _step(model, ids, labels, **kw)
    disable_chunked_loss(model)
    assert got.logits is None and ref.logits is not None  # the chunked path ran
    torch.testing.assert_close(got.loss, ref.loss, rtol=0, atol=1e-6)
    assert got_grads.keys() == ref_grads.keys() and ref_grads
    for name, g in got_grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-5, atol=1e-6, msg=name)
    return ref_grads


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("frozen_head", [False, True])
def test_patched_model_equals_hf_loss_and_every_gradient(tied, frozen_head):
    model = _tiny(tie_word_embeddings=tied)
    model.lm_head.weight.requires_grad_(not frozen_head)
    grads = _assert_model_matches(model)
    assert ("lm_head.weight" in grads) == (not tied and not frozen_head)
    _assert_model_matches(model, chunk_size=4, num_items_in_batch=torch.tensor(7))


def test_peft_lora_model_equals_hf():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_tiny(), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                               init_lora_weights=False))
    grads = _assert_model_matches(model)
    assert grads and all("lora_" in n for n in grads)


def test_without_labels_or_without_grad_the_original_forward_runs():
    model = _tiny().eval()
    ids, labels = _batch()
    with torch.no_grad():
        before = model(input_ids=ids)
        before_labelled = model(input_ids=ids, labels=labels)
    enable_chunked_loss(model, 4)
    with torch.no_grad():
        after = model(input_ids=ids)
        after_labelled = model(input_ids=ids, labels=labels)
        generated = model.generate(ids[:1, :4], max_new_tokens=3, do_sample=False)
    torch.testing.assert_close(after.logits, before.logits, rtol=0, atol=0)
    torch.testing.assert_close(after_labelled.logits, before_labelled.logits, rtol=0, atol=0)
    torch.testing.assert_close(after_labelled.loss, before_labelled.loss, rtol=0, atol=0)
    assert generated.shape == (1, 7)
    as_tuple = model(ids, None, labels=labels, return_dict=False)  # positional and return_dict=False too
    assert isinstance(as_tuple, tuple) and as_tuple[0].ndim == 0


def test_enable_is_idempotent_and_disable_restores():
    model = _tiny()
    ids, labels = _batch()
    enable_chunked_loss(model, 4)
    patched = model.forward
    enable_chunked_loss(model, 6)
    assert model.forward.__func__ is patched.__func__ and model._owlore_chunk_size == 6
    assert inspect.signature(model.forward) == inspect.signature(LlamaForCausalLM.forward.__get__(model))
    clone = copy.deepcopy(model)  # the copy's forward runs the copy
    clone.lm_head.weight.data.zero_()
    torch.testing.assert_close(clone(input_ids=ids, labels=labels).loss, torch.tensor(128.0).log())
    assert model(input_ids=ids, labels=labels).logits is None
    disable_chunked_loss(model)
    disable_chunked_loss(model)
    assert "forward" not in model.__dict__
    assert model(input_ids=ids, labels=labels).logits is not None


def test_refuses_what_it_cannot_reproduce():
    from peft import LoraConfig, get_peft_model
    from transformers import Gemma2Config, Gemma2ForCausalLM

    gemma = Gemma2ForCausalLM(Gemma2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, num_key_value_heads=1, head_dim=8))
    with pytest.raises(ValueError, match="Gemma2ForCausalLM.*final_logit_softcapping"):
        enable_chunked_loss(gemma, 8)
    lora_head = get_peft_model(_tiny(), LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    with pytest.raises(ValueError, match="LlamaForCausalLM.*Linear, not a plain nn.Linear"):
        enable_chunked_loss(lora_head, 8)
    saved_head = get_peft_model(_tiny(), LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    with pytest.raises(ValueError, match="ModulesToSaveWrapper"):
        enable_chunked_loss(saved_head, 8)
    with pytest.raises(ValueError, match="chunk_size=0"):
        enable_chunked_loss(_tiny(), 0)
    assert "forward" not in gemma.__dict__


# ------------------------------------------------------------------------------ 3. memory, as correctness
MEM = dict(batch=2, seq=24, vocab=512)  # B·T·V = 24576, above anything else here (V·d = 16384)


def _saved_tensors(model, ids, labels) -> tuple[int, int]:
    """(largest numel, distinct non-parameter storage bytes) saved for backward by one forward."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}
    largest = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal largest
        largest = max(largest, t.numel())
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    return largest, sum(storages.values())


class _LargestOutput(TorchDispatchMode):
    """The most elements any op returns, in forward and backward."""

    largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_tensor_of_batch_times_vocab_is_saved_or_made():
    model = _tiny(vocab_size=MEM["vocab"])
    ids, labels = _batch(**MEM)
    full = MEM["batch"] * MEM["seq"] * MEM["vocab"]
    hf_largest, hf_bytes = _saved_tensors(model, ids, labels)
    with _LargestOutput() as hf_ops:
        model(input_ids=ids, labels=labels).loss.backward()
    enable_chunked_loss(model, 8)
    largest, saved_bytes = _saved_tensors(model, ids, labels)
    with _LargestOutput() as ops:
        model(input_ids=ids, labels=labels).loss.backward()
    assert hf_largest >= full and hf_ops.largest >= full  # the checks can see full logits when there are some
    assert largest < full and ops.largest < full
    assert ops.largest <= max(8 * MEM["vocab"], MEM["vocab"] * 32)  # a chunk's logits, or the V·d head gradient
    # the unpatched model saves the (B·T·V·4 bytes) log-softmax; we save three vectors of B·T instead
    assert saved_bytes <= hf_bytes - full * 4 + 24 * MEM["batch"] * MEM["seq"]


# ------------------------------------------------------------------------------ 4. through train.py
def test_train_main_logs_the_same_losses(tmp_path, monkeypatch):
    """``method=full`` for 3 steps with and without ``memory.chunked_loss=16``: the same logged losses, and the
    Trainer's steps really went through the chunks (with its ``num_items_in_batch``)."""
    from owlore.memory import chunked_loss

    calls = []
    real = chunked_loss.chunked_linear_cross_entropy

    def spy(*args, **kwargs):
        calls.append(kwargs["num_items_in_batch"])
        return real(*args, **kwargs)

    monkeypatch.setattr(chunked_loss, "chunked_linear_cross_entropy", spy)
    tiny_dir, rows = ms.save_checkpoint(tmp_path / "tiny"), ms.write_rows(tmp_path / "train.jsonl")
    runs = {}
    for name, extra in (("hf", []), ("chunked", ["memory.chunked_loss=16"])):
        argv = ms.train_argv("full", tiny_dir, rows, tmp_path / name, *extra, "training.save_steps=100")
        runs[name] = train.main(argv)["log_losses"]
    assert len(runs["hf"]) == 3
    assert len(calls) == 3 and all(n is not None for n in calls)
    assert runs["chunked"] == pytest.approx(runs["hf"], abs=1e-5, rel=0)


def test_bf16_weight_gradient_is_summed_over_chunks_in_fp32_and_rounded_once():
    """Each chunk's share of a bf16 head's gradient goes into the fp32 sum unrounded: the result is the fp64
    truth (same bf16 inputs, same bf16-rounded gradient of the hidden states) rounded to bf16 once."""
    g = torch.Generator().manual_seed(3)
    n, d, v = 256, 16, 40
    hidden = torch.randn(n, d, generator=g).bfloat16()
    weight = torch.randn(v, d, generator=g).bfloat16().requires_grad_(True)
    labels = torch.randint(0, v, (1, n + 1), generator=g)
    got = torch.autograd.grad(chunked_linear_cross_entropy(hidden[None], weight, labels[:, :n], chunk_size=1,
                                                           num_items_in_batch=1), weight)[0]
    shifted = labels[0, 1:n + 1].clone()
    shifted[-1] = -100  # the last position has no next token
    # the chunked loss computes each chunk's logits as a bf16 matmul, then works in fp32: same logits here
    logits = F.linear(hidden, weight.detach()).double().requires_grad_(True)
    truth = torch.autograd.grad(F.cross_entropy(logits, shifted, reduction="sum"), [logits])[0].t() @ hidden.double()
    assert got.dtype == torch.bfloat16
    exact = (got.double() == truth.to(torch.bfloat16).double()).float().mean()
    assert exact > 0.97  # rounded once (a few ties of fp32 vs fp64 rounding may differ by one ulp)
    torch.testing.assert_close(got.double(), truth, rtol=2**-7, atol=1e-3)
