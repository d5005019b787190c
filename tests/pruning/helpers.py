"""Prompt builders for the tiny-LLaVA tests."""

from __future__ import annotations

import torch

IMAGE_TOKEN = 255
TOKENS_PER_IMAGE = 16  # 32x32 image, 8x8 patches -> 4x4 grid


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
