"""Tiny LLaVA (random init, built from config) for the pruning tests: 16 visual tokens per image."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

IMAGE_TOKEN = 255
TOKENS_PER_IMAGE = 16  # 32x32 image, 8x8 patches -> 4x4 grid


def tiny_llava_config():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8
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


def make_prompt(
    text_before: list[int], num_images: int = 1, text_after: list[int] | None = None
) -> list[int]:
    """``text_before + <image> x 16 per image + text_after`` as a list of ids."""
    return text_before + [IMAGE_TOKEN] * (TOKENS_PER_IMAGE * num_images) + (text_after or [])


def pad_batch(rows: list[list[int]], *, side: str, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad id lists to a rectangle on ``side``; returns ``(input_ids, attention_mask)``."""
    length = max(map(len, rows))
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(length - len(row), length) if side == "left" else slice(0, len(row))
        ids[i, span] = torch.tensor(row)
        mask[i, span] = 1
    return ids, mask


@pytest.fixture
def pixels():
    """Two random images."""
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
