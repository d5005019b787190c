"""Outlier ratios (OWL's LOD) against a naive reference, planted outliers, padding, cache, and the real SmolLM2."""

import pytest
import torch

from owlore.layerwise.calibration import (
    CalibrationSpec,
    OutlierCache,
    calibration_batches,
    outlier_ratios_from_spec,
)
from owlore.layerwise.layers import find_decoder_layers, linear_modules
from owlore.layerwise.outliers import compute_outlier_ratios


def naive_ratios(model, batches, threshold):
    """Store every linear input, build each layer's full score vector explicitly, count outliers."""
    layers = find_decoder_layers(model)
    inputs = {}
    hooks = []
    for li, layer in enumerate(layers):
        for name, m in linear_modules(layer):
            inputs[(li, name)] = []
            hooks.append(m.register_forward_pre_hook(
                lambda mod, args, key=(li, name): inputs[key].append(args[0].detach().reshape(-1, args[0].shape[-1]))))
    with torch.no_grad():
        for b in batches:
            model(input_ids=b)
    for h in hooks:
        h.remove()
    out = []
    for li, layer in enumerate(layers):
        scores = []
        for name, m in linear_modules(layer):
            x = torch.cat(inputs[(li, name)]).double()
            col = x.pow(2).mean(0).sqrt()
            scores.append((m.weight.double().abs() * col).flatten())
        s = torch.cat(scores)
        out.append(100.0 * (s > threshold * s.mean()).double().mean().item())
    return torch.tensor(out, dtype=torch.float64)


def _batches(vocab=128, n=3, b=2, t=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (b, t), generator=g) for _ in range(n)]


@pytest.mark.parametrize("threshold", [1.5, 3.0, 5.0])
def test_matches_naive_reference(tiny_llama, threshold):
    batches = _batches()
    ours = compute_outlier_ratios(tiny_llama, batches, threshold=threshold)
    ref = naive_ratios(tiny_llama, batches, threshold)
    assert ours.shape == (4,)
    # Scores exactly at the cut-off could flip with summation order; allow one weight of difference per layer.
    n_weights = sum(m.weight.numel() for _, m in linear_modules(find_decoder_layers(tiny_llama)[0]))
    assert torch.allclose(ours, ref, atol=100.0 / n_weights + 1e-9), (ours, ref)
    assert (ours > 0).all()


def test_planted_outliers_get_highest_ratio(tiny_llama):
    layer = find_decoder_layers(tiny_llama)[2]
    with torch.no_grad():
        w = layer.mlp.gate_proj.weight  # input is the RMS-normed hidden state (~1)
        idx = torch.randperm(w.numel(), generator=torch.Generator().manual_seed(1))[: w.numel() // 20]
        w.view(-1)[idx] *= 50.0
    ratios = compute_outlier_ratios(tiny_llama, _batches(), threshold=5.0)
    assert int(ratios.argmax()) == 2
    assert ratios[2] > 1.3 * max(ratios[i] for i in (0, 1, 3))


def test_padding_is_ignored(tiny_llama):
    g = torch.Generator().manual_seed(3)
    a, b = torch.randint(0, 128, (1, 10), generator=g), torch.randint(0, 128, (1, 6), generator=g)
    # Right padding with arbitrary token ids; causal attention keeps real tokens' activations unchanged.
    padded = torch.cat([a, torch.cat([b, torch.randint(0, 128, (1, 4), generator=g)], 1)])
    mask = torch.tensor([[1] * 10, [1] * 6 + [0] * 4])
    with_mask = compute_outlier_ratios(tiny_llama, [{"input_ids": padded, "attention_mask": mask}], threshold=2.0)
    separate = compute_outlier_ratios(tiny_llama, [a, b], threshold=2.0)
    no_mask = compute_outlier_ratios(tiny_llama, [padded], threshold=2.0)
    assert torch.allclose(with_mask, separate, atol=1e-6)
    assert not torch.allclose(no_mask, separate, atol=1e-6)  # the test can see padding


def test_errors(tiny_llama):
    with pytest.raises(ValueError, match="no calibration batches"):
        compute_outlier_ratios(tiny_llama, [], threshold=5.0)
    with pytest.raises(ValueError, match="threshold"):
        compute_outlier_ratios(tiny_llama, _batches(), threshold=0)
    with pytest.raises(ValueError, match="input_ids"):
        compute_outlier_ratios(tiny_llama, [{"ids": torch.zeros(1, 3, dtype=torch.long)}], threshold=5.0)


class _CharTokenizer:
    eos_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [1 + (ord(c) % 127) for c in text]}


def test_calibration_from_local_file_and_cache(tiny_llama, tmp_path, monkeypatch):
    import owlore.layerwise.outliers as outliers_mod

    src = tmp_path / "calib.jsonl"
    src.write_text("\n".join(f'{{"text": "document number {i} has some words in it"}}' for i in range(20)))
    spec = CalibrationSpec(source=str(src), nsamples=4, seqlen=16, seed=0)
    batches = calibration_batches(_CharTokenizer(), spec, batch_size=3)
    assert [b.shape for b in batches] == [(3, 16), (1, 16)]
    assert torch.equal(torch.cat(batches), torch.cat(calibration_batches(_CharTokenizer(), spec, batch_size=3)))

    first = outlier_ratios_from_spec(tiny_llama, _CharTokenizer(), spec, threshold=3.0, cache_dir=tmp_path / "c")
    calls = []
    monkeypatch.setattr(outliers_mod, "compute_outlier_ratios", lambda *a, **k: calls.append(1))
    again = outlier_ratios_from_spec(tiny_llama, _CharTokenizer(), spec, threshold=3.0, cache_dir=tmp_path / "c")
    assert torch.equal(first, again) and not calls  # served from the cache
    assert len(list((tmp_path / "c").glob("lod-*.json"))) == 1
    key_other = OutlierCache.key(tiny_llama, 4.0, spec)
    assert OutlierCache(tmp_path / "c").get(key_other) is None  # other threshold: miss


def test_calibration_from_txt(tmp_path):
    src = tmp_path / "calib.txt"
    src.write_text("first doc\n\nsecond doc here\n\nthird")
    spec = CalibrationSpec(source=str(src), nsamples=2, seqlen=8, seed=1)
    batches = calibration_batches(_CharTokenizer(), spec)
    assert batches[0].shape == (2, 8)


@pytest.mark.slow
def test_smollm2_gives_30_distinct_ratios(smollm2_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from owlore.data import build_demo_tasks

    tok = AutoTokenizer.from_pretrained(smollm2_path)
    model = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32)
    text = [f"{x['instruction']} {x['output']}" for x in build_demo_tasks("train", 64)]
    ids = tok(" ".join(text), return_tensors="pt")["input_ids"][:, :512]
    ratios = compute_outlier_ratios(model, list(ids.view(4, 128).split(2)), threshold=5.0)
    assert ratios.shape == (30,)
    assert len(set(ratios.tolist())) == 30
    assert (ratios > 0).all() and (ratios < 100).all()


class _FailsAfterLayers(torch.nn.Module):
    """Accepts ``**kwargs``, runs the whole LM, then rejects ``logits_to_keep`` (like a head that cannot take it)."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, attention_mask=None, **kwargs):
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask)
        if "logits_to_keep" in kwargs or "num_logits_to_keep" in kwargs:
            raise TypeError("forward() got an unexpected keyword argument 'logits_to_keep'")
        return out


def _count_layer_calls(model):
    calls = []
    hooks = [layer.register_forward_pre_hook(lambda m, a, i=i: calls.append(i))
             for i, layer in enumerate(find_decoder_layers(model))]
    return calls, hooks


def test_late_type_error_is_not_retried_into_double_counting(tiny_llama):
    """A TypeError raised after the decoder layers ran must not trigger a second forward over the same batch."""
    batches = _batches()
    plain = compute_outlier_ratios(tiny_llama, batches, threshold=1.5)
    wrapped = _FailsAfterLayers(tiny_llama)
    calls, hooks = _count_layer_calls(tiny_llama)
    ours = compute_outlier_ratios(wrapped, batches, threshold=1.5, layers=find_decoder_layers(tiny_llama))
    for h in hooks:
        h.remove()
    assert len(calls) == len(batches) * 4  # each layer saw each batch once (the old retry ran every batch twice)
    assert torch.equal(ours, plain)


def test_logits_to_keep_passed_only_when_forward_names_it(tiny_llama):
    seen = []

    class Explicit(torch.nn.Module):
        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def forward(self, input_ids, attention_mask=None, use_cache=None, logits_to_keep=0):
            seen.append(logits_to_keep)
            if logits_to_keep:
                raise TypeError("boom from deep inside")  # a real error: propagate it, never retry
            return self.lm(input_ids=input_ids, attention_mask=attention_mask)

    model = Explicit(tiny_llama).train()
    with pytest.raises(TypeError, match="boom from deep inside"):
        compute_outlier_ratios(model, _batches(), layers=find_decoder_layers(tiny_llama))
    assert seen == [1]  # called once, with logits_to_keep=1, and not called again without it
    assert model.training and tiny_llama.training  # train mode restored although the forward raised
    assert not any(m._forward_pre_hooks for m in tiny_llama.modules())  # hooks removed too
