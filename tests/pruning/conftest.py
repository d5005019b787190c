"""Tiny LLaVA (random init, built from config) for the pruning tests: 16 visual tokens per image."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from .helpers import IMAGE_TOKEN  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core box they contend."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_llava_config():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
    )
    text = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=256,
    )
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN)


@pytest.fixture(scope="session")
def tiny_llava():
    """Session-wide tiny LLaVA in eval mode (tests that train build their own)."""
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(0)
    return LlavaForConditionalGeneration(tiny_llava_config()).eval()


@pytest.fixture
def fresh_llava():
    """A tiny LLaVA that a test may modify or train."""
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(0)
    return LlavaForConditionalGeneration(tiny_llava_config())


@pytest.fixture
def pixels():
    """Two random images."""
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
