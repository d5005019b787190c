"""Device placement, checked without a GPU: pipelines run with the model on a second device (the ``other_device``
fixture in conftest.py: PyTorch's lazy backend on the CPU), so a tensor left on the CPU fails loudly."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
import eval_support  # noqa: E402
import method_support as ms  # noqa: E402

from owlore.data.fashion_vqa import build_vqa  # noqa: E402
from owlore.vision.llava import VisionTowerConfig, build_llava  # noqa: E402

TOWER = VisionTowerConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2)


def _llava():
    model, tok = build_llava(ms.tiny_model(2), eval_support.tokenizer(), TOWER)
    return model, tok


def test_the_fixture_catches_a_cpu_tensor(other_device):
    layer = torch.nn.Linear(3, 2).to(other_device)
    try:
        layer(torch.ones(1, 3))
    except RuntimeError as e:
        assert "lazy" in str(e)
    else:
        raise AssertionError("a CPU input to a model on the other device must fail")


def _lazy_masked_scatter(monkeypatch, device: torch.device) -> None:
    """LLaVA merges image features with ``masked_scatter``, which has no lazy kernel: run that one op on the CPU,
    after checking that all three tensors are on the other device (so it hides no placement mistake)."""
    real = torch.Tensor.masked_scatter

    def masked_scatter(self, mask, source):
        if self.device.type != device.type:
            return real(self, mask, source)
        assert mask.device.type == source.device.type == device.type, "masked_scatter across devices"
        return real(self.cpu(), mask.cpu(), source.cpu()).to(device)

    monkeypatch.setattr(torch.Tensor, "masked_scatter", masked_scatter)


def test_vqa_accuracy_builds_its_batches_on_the_models_device(other_device, monkeypatch):
    from owlore.data.fashion_vqa import as_records
    from owlore.pruning.accuracy import vqa_accuracy
    from owlore.vision.llava import llava_processor

    _lazy_masked_scatter(monkeypatch, other_device)
    model, tok = _llava()
    rng = np.random.default_rng(5)
    examples = build_vqa(rng.integers(0, 256, (20, 28, 28), dtype=np.uint8), np.arange(20) % 10, 3)
    on_cpu = vqa_accuracy(model.eval(), llava_processor(model.config, tok), as_records(examples), batch_size=4)
    moved = vqa_accuracy(model.to(other_device), llava_processor(model.config, tok), as_records(examples), batch_size=4)
    assert moved["predictions"] == on_cpu["predictions"] and moved["n"] == 3


def _lazy_image_features(monkeypatch, model, device: torch.device) -> None:
    """LLaVA's ``get_image_features`` returns per-image views (``list(tensor)``), which the lazy backend mishandles
    (ops on them land on the CPU): check the pixels' device, then hand back real copies on the device."""
    real = model.model.get_image_features

    def get_image_features(*, pixel_values, **kw):
        assert pixel_values.device.type == device.type, f"pixels on {pixel_values.device}, model on {device}"
        out = real(pixel_values=pixel_values, **kw)
        out.pooler_output = [t.cpu().to(device) for t in out.pooler_output]
        return out

    monkeypatch.setattr(model.model, "get_image_features", get_image_features)


def test_vision_alignment_runs_where_the_model_is(other_device, monkeypatch):
    from owlore.vision.align import align_vision

    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (40, 28, 28), dtype=np.uint8), rng.integers(0, 10, 40)
    model, tok = _llava()
    _lazy_image_features(monkeypatch, model, other_device)
    result = align_vision(model.to(other_device), tok, images, labels, grid=3, steps=1, batch_size=2, seed=0,
                          progress=False)  # the held-out scoring is the same code as the rescale's forward
    assert len(result["losses"]) == 1 and result["rescale"] > 0
    assert model.model.multi_modal_projector.linear_2.weight.device.type == other_device.type


def test_train_py_places_the_model_on_the_process_device_before_setup(other_device, tiny_llama):
    """Vision alignment, the "before" evaluation and FSDP2 sharding run ahead of the Trainer: on its device."""
    from types import SimpleNamespace

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import train

    train.place_for_setup(tiny_llama, SimpleNamespace(deepspeed=None, device=other_device))
    assert {p.device.type for p in tiny_llama.parameters()} == {other_device.type}
    kept = torch.nn.Linear(2, 2)
    kept.hf_device_map = {"": "cpu"}  # loaded with a device_map (QLoRA): already where it belongs
    train.place_for_setup(kept, SimpleNamespace(deepspeed=None, device=other_device))
    train.place_for_setup(kept, SimpleNamespace(deepspeed="configs/deepspeed/zero2.json", device=other_device))
    assert kept.weight.device.type == "cpu"


def test_evaluations_run_on_the_main_process_unless_the_weights_are_sharded():
    from types import SimpleNamespace

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import train

    def here(rank, world, when, *, fsdp2=False, deepspeed=None):
        cfg = SimpleNamespace(parallel=SimpleNamespace(fsdp2=fsdp2))
        args = SimpleNamespace(world_size=world, process_index=rank, deepspeed=deepspeed)
        return train.evaluates_here(cfg, args, when)

    assert here(0, 1, "before") and here(0, 2, "after") and not here(1, 2, "before") and not here(1, 2, "after")
    assert here(1, 2, "after", fsdp2=True) and not here(1, 2, "before", fsdp2=True)  # sharded only after
    zero3 = {"zero_optimization": {"stage": 3}}
    assert here(1, 2, "before", deepspeed=zero3) and not here(1, 2, "after", deepspeed={"zero_optimization": {}})


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the device check runs its CUDA checks instead")
def test_device_check_runs_its_cpu_subset_and_says_what_it_skipped(tmp_path):
    import json
    import subprocess

    root = Path(__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, "benchmarks/device_check.py", "--quick", "--out", str(tmp_path)], cwd=root,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads((tmp_path / "device_check.json").read_text())
    by_check = {x["check"]: x for x in report["results"]}
    assert by_check["pytest -m cuda"]["result"] == "skipped: no CUDA GPU"
    assert by_check["memory vs estimator"]["result"] == "skipped: needs a CUDA GPU"
    assert "fused" in by_check["optimizer step (fused vs torch fused)"]["figures"]
    assert "unpruned" in next(x for k, x in by_check.items() if k.startswith("prefill"))["figures"]
    assert "| check | ok |" in r.stdout


def test_loaded_optimizer_state_of_host_params_never_visits_the_device(other_device):
    """OwLore's state_policy=offload on resume: the layers' state is loaded into host memory (it used to be
    loaded onto the device first and moved back, a peak of every layer's state where offload should save it)."""
    from owlore.optim.galore_adamw import GaLoreAdamW

    params = [torch.nn.Parameter(torch.randn(6, 4)), torch.nn.Parameter(torch.randn(4))]
    opt = GaLoreAdamW([{"params": params[:1], "rank": 2}, {"params": params[1:]}], lr=1e-2)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    saved = opt.state_dict()
    moved = [torch.nn.Parameter(p.detach().to(other_device)) for p in params]
    fresh = GaLoreAdamW([{"params": moved[:1], "rank": 2}, {"params": moved[1:]}], lr=1e-2)
    fresh.host_state = {id(moved[0])}
    fresh.load_state_dict(saved)
    assert {v.device.type for v in fresh.state[moved[0]].values() if torch.is_tensor(v)} == {"cpu"}
    assert {v.device.type for v in fresh.state[moved[1]].values() if torch.is_tensor(v)} == {other_device.type}
    assert fresh.state[moved[0]]["step"] == 1 and fresh.state[moved[0]]["side"] == opt.state[params[0]]["side"]


def test_offload_policy_marks_every_layer_for_host_loading(tmp_path):
    from transformers import TrainingArguments

    from owlore.run.config import OwLoreConfig
    from owlore.trainer import OwLoreTrainer

    model = ms.tiny_model(3)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to=[], use_cpu=True)
    data = [{"input_ids": torch.arange(8), "labels": torch.arange(8)}] * 4
    t = OwLoreTrainer(model=model, args=args, train_dataset=data, owlore_config=OwLoreConfig(
        gamma=1, rank=2, state_policy="offload"))
    layer_ids = {id(p) for p in model.model.layers.parameters()}
    assert t.create_optimizer().host_state == layer_ids


def test_replica_digest_and_model_fingerprint_read_the_host_once(monkeypatch, tiny_llama):
    """They run at the start and at every checkpoint over every parameter: one host read per device, not one
    (plus an fp32 copy) per parameter."""
    from owlore.layerwise.calibration import model_fingerprint
    from owlore.parallel.distributed import replica_digest

    expected = (replica_digest(tiny_llama.parameters()), model_fingerprint(tiny_llama))
    reads = []
    for name in ("cpu", "tolist", "item", "float"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _r=real, _n=name, **k: reads.append(_n) or _r(
            self, *a, **k))
    got = replica_digest(tiny_llama.parameters())
    assert reads == ["cpu"]
    reads.clear()
    assert model_fingerprint(tiny_llama) == expected[1] and reads == ["tolist"]
    assert torch.equal(got, expected[0])


def test_train_py_runs_whole_on_a_second_device(other_device, tmp_path):
    """OwLore end to end (calibration, sampling, GaLore, layer switches) with the chunked loss, in-backward
    updates and int8 frozen layers, everything on the lazy device: any CPU tensor our code makes fails."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, "tests/fixtures/lazy_train.py", str(tmp_path), "owlore",
                        "memory.chunked_loss=32", "optimizer.update_in_backward=true", "training.max_grad_norm=0",
                        "memory.frozen_weights=int8"], cwd=root, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
