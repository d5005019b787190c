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
