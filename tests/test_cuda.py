"""The checks only a CUDA GPU can make (``pytest -m cuda``; ``benchmarks/device_check.py`` runs them first).

Skipped here, with that reason, on machines without CUDA, which is every CI machine. Each test compares the CUDA
path with the CPU path or with torch's own implementation on the same inputs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; run "
                                 "`python benchmarks/device_check.py` on a machine with one")]
CUDA = torch.device("cuda")


def _params(shapes, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in shapes]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_galore_adamw_fused_path_equals_torch_fused_adamw_on_cuda(dtype):
    from owlore.optim.galore_adamw import GaLoreAdamW

    shapes = [(64, 32), (32,), (128, 64)]
    ours = [p.to(CUDA) for p in _params(shapes, dtype)]
    ref = [nn.Parameter(p.detach().clone()) for p in ours]
    opt = GaLoreAdamW([{"params": ours, "weight_decay": 0.1}], lr=1e-2, state_dtype=None)
    torch_opt = torch.optim.AdamW([{"params": ref, "weight_decay": 0.1}], lr=1e-2, eps=1e-6, fused=True)
    for _ in range(5):
        for a, b in zip(ours, ref):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        opt.step()
        torch_opt.step()
    for a, b in zip(ours, ref):
        assert torch.equal(a, b)


def test_galore_projected_step_on_cuda_matches_cpu():
    from owlore.optim.galore_adamw import GaLoreAdamW

    cpu = _params([(64, 48)], torch.float32)
    gpu = [nn.Parameter(p.detach().to(CUDA)) for p in cpu]
    runs = []
    for params in (cpu, gpu):
        opt = GaLoreAdamW([{"params": params, "rank": 8, "update_proj_gap": 3}], lr=1e-2)
        g = torch.Generator().manual_seed(1)
        for _ in range(4):
            params[0].grad = torch.randn(64, 48, generator=g).to(params[0].device)
            opt.step()
        runs.append(params[0].detach().cpu())
    torch.testing.assert_close(runs[1], runs[0], atol=1e-4, rtol=1e-4)  # SVD differs in the last bits


def test_chunked_loss_bf16_on_cuda_matches_full_logits():
    import torch.nn.functional as F

    from owlore.memory.chunked_loss import chunked_linear_cross_entropy

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 64, 32, generator=g).to(CUDA, torch.bfloat16).requires_grad_(True)
    weight = torch.randn(500, 32, generator=g).to(CUDA, torch.bfloat16).requires_grad_(True)
    labels = torch.randint(0, 500, (2, 64), generator=g).to(CUDA)
    got = chunked_linear_cross_entropy(hidden, weight, labels, chunk_size=16)
    logits = F.linear(hidden, weight).float()
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, 500), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(got, ref, atol=2e-2, rtol=2e-2)
    gw, = torch.autograd.grad(got, weight)
    rw, = torch.autograd.grad(ref, weight)
    torch.testing.assert_close(gw.float(), rw.float(), atol=2e-3, rtol=5e-2)


def test_int8_store_round_trip_on_cuda_is_exact_and_state_dict_reads_the_host_copy():
    from owlore.memory.int8_frozen import Int8Store

    layers = nn.ModuleList([nn.Sequential(nn.Linear(64, 32)) for _ in range(3)]).to(CUDA, torch.bfloat16)
    layers.requires_grad_(False)
    exact = {k: v.detach().cpu().clone() for k, v in layers.state_dict().items()}
    store = Int8Store(layers)
    store.sync([1])
    assert store.quantized == {0, 2} and layers[0][0].weight.numel() == 0
    assert layers[0][0]._int8_master.is_pinned()
    for k, v in layers.state_dict().items():  # the exact weights, read after the asynchronous copy landed
        assert torch.equal(v.cpu(), exact[k]), k
    store.sync([0, 1, 2])
    for k, v in layers.state_dict().items():
        assert torch.equal(v.cpu(), exact[k]) and v.device.type == "cuda", k


def test_in_backward_updates_on_cuda_equal_the_normal_step():
    from owlore.memory.in_backward import InBackwardGaLoreAdamW
    from owlore.optim.galore_adamw import GaLoreAdamW

    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16)).to(CUDA) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [GaLoreAdamW(models[0].parameters(), lr=1e-2),
            InBackwardGaLoreAdamW(models[1].parameters(), lr=1e-2)]
    x = torch.randn(8, 16, device=CUDA)
    for model, opt in zip(models, opts):
        for _ in range(3):
            model(x).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
    for a, b in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_step_timer_reads_cuda_events():
    from types import SimpleNamespace

    from owlore.run.metrics import StepTimer

    torch.cuda.init()
    timer = StepTimer()
    args, state = SimpleNamespace(include_num_input_tokens_seen="no"), SimpleNamespace(num_input_tokens_seen=0)
    a = torch.randn(2048, 2048, device=CUDA)
    for _ in range(3):
        timer.on_step_begin(args, state, None)
        a @ a
        timer.on_step_end(args, state, None)
    assert len(timer.seconds) == 3 and all(s > 0 for s in timer.seconds)


def test_pruned_generate_and_vqa_accuracy_on_cuda():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
    import eval_support
    import method_support as ms

    from owlore.data.fashion_vqa import as_records, build_vqa
    from owlore.pruning import VisualTokenPruner
    from owlore.pruning.accuracy import vqa_accuracy
    from owlore.vision.llava import VisionTowerConfig, build_llava, llava_processor

    tower = VisionTowerConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2)
    model, tok = build_llava(ms.tiny_model(2), eval_support.tokenizer(), tower)
    rng = np.random.default_rng(5)
    examples = build_vqa(rng.integers(0, 256, (20, 28, 28), dtype=np.uint8), np.arange(20) % 10, 4)
    on_cpu = vqa_accuracy(model.eval(), llava_processor(model.config, tok), as_records(examples), batch_size=4)
    on_gpu = vqa_accuracy(model.to(CUDA), llava_processor(model.config, tok), as_records(examples), batch_size=4)
    assert on_gpu["predictions"] == on_cpu["predictions"]
    pruned = vqa_accuracy(model, llava_processor(model.config, tok), as_records(examples), batch_size=4,
                          pruner=VisualTokenPruner("divprune", tower.num_tokens // 4))
    assert pruned["n"] == 4
