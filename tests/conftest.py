"""Shared fixtures: offline mode, tiny models built from config, and the real embedded SmolLM2."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


def tiny_llama_config(num_layers: int = 4, **overrides):
    from transformers import LlamaConfig

    kw = dict(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    kw.update(overrides)
    return LlamaConfig(**kw)


@pytest.fixture
def tiny_llama():
    """A 4-layer Llama (~60 k params), fp32, fixed init."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config()).float()


@pytest.fixture(scope="session")
def smollm2_path():
    """The converted real SmolLM2-135M-Instruct checkpoint (converted on first use, ~30 s)."""
    from owlore.assets import embedded_model_path

    return embedded_model_path()


@pytest.fixture(scope="session")
def other_device() -> torch.device:
    """A second, real-computing device on a CPU-only machine: PyTorch's lazy tensor backend ("lazy", run by the
    TorchScript executor on the CPU).

    Moving a model there and running a pipeline makes every tensor that code creates on the default device (the
    GPU-only bug class: batches, masks or index tensors left on the CPU) fail loudly with "Input tensor is not a
    lazy tensor", while forward, backward, ``.item()`` and ``generate`` work. What it cannot catch: faults that
    need a real GPU (CUDA kernels, NCCL, streams, out-of-memory) and host syncs, which it does not count (they are
    cheap here); ops the lazy backend lacks fall back to the CPU silently, so a pass is not proof for those ops.
    ``torch._lazy`` is a private API: when a torch build lacks it the tests using this fixture are skipped with
    that reason.
    """
    try:
        import torch._lazy
        import torch._lazy.ts_backend

        torch._lazy.ts_backend.init()
        probe = torch.ones(2, device="lazy")
        try:
            _ = probe + torch.ones(2)
        except RuntimeError:
            return torch.device("lazy")
    except Exception as err:  # noqa: BLE001 - any failure means "no second device here"
        pytest.skip(f"no lazy tensor backend in this torch build ({err})")
    pytest.skip("the lazy backend accepts CPU tensors in this torch build, so it cannot catch device mistakes")
