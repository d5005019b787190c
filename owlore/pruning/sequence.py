"""Shrinking the text side after visual tokens are dropped.

Pruning before the language model means the prompt itself gets shorter: the unselected ``<image>``
placeholders are removed from ``input_ids``, ``attention_mask`` and ``labels`` so ``generate``, the KV
cache and SDPA all see an ordinary, shorter prompt. Padding is rebuilt on the side it was on, so rows
that lose different counts (different numbers of images per row) still form a rectangular batch.
"""

from __future__ import annotations

from typing import Literal

import torch

__all__ = ["PositionPolicy", "compactor", "mask_positions", "padding_side", "sequence_keep_mask", "shrink_sequences"]

PositionPolicy = Literal["contiguous", "original"]


def padding_side(attention_mask: torch.Tensor) -> Literal["left", "right"]:
    """Infer the padding side: right if any row ends in padding, else left (also when unpadded)."""
    return "right" if bool((attention_mask[:, -1] == 0).any()) else "left"


def sequence_keep_mask(image_mask: torch.Tensor, token_keep: torch.Tensor) -> torch.Tensor:
    """Per-position keep flags: every text token, plus the image tokens that survived selection.

    Args:
        image_mask: ``(batch, L)`` bool, True at ``<image>`` placeholders.
        token_keep: ``(num_images, N)`` bool, True for kept visual tokens; images are in the order their
            placeholders appear (row-major), the order ``masked_scatter`` fills them in.

    Returns:
        ``(batch, L)`` bool.
    """
    keep = ~image_mask
    keep[image_mask] = token_keep.reshape(-1)
    return keep


def mask_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids from a 2-D mask: 0, 1, ... over the real tokens of each row, 0 at padding."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 0)


def shrink_sequences(
    input_ids: torch.Tensor,
    *,
    keep: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor | None = None,
    pad_token_id: int = 0,
    position_policy: PositionPolicy = "contiguous",
) -> dict[str, torch.Tensor]:
    """Drop the positions where ``keep`` is False and return a rectangular batch again.

    Args:
        input_ids: ``(batch, L)`` token ids.
        keep: ``(batch, L)`` bool positions to keep.
        attention_mask: ``(batch, L)`` mask of the unpruned batch.
        labels: Optional ``(batch, L)`` labels; dropped columns go with their tokens.
        pad_token_id: Id written into the rebuilt padding.
        position_policy: ``"contiguous"`` renumbers the kept tokens 0..n-1 (what DivPrune, ZOO-Prune and
            FasterVLM effectively do); ``"original"`` keeps each token's unpruned position, so RoPE
            distances match the full image and decoding continues after the unpruned length.

    Returns:
        ``input_ids``, ``attention_mask``, ``position_ids`` (and ``labels``) of the shorter batch.
    """
    compact = compactor(keep, attention_mask)
    out = {"input_ids": compact(input_ids, pad_token_id), "attention_mask": compact(attention_mask, 0)}
    if position_policy == "original":
        out["position_ids"] = compact(mask_positions(attention_mask), 0)
    else:
        out["position_ids"] = mask_positions(out["attention_mask"])
    if labels is not None:
        out["labels"] = compact(labels, -100)
    return out


def compactor(keep: torch.Tensor, attention_mask: torch.Tensor):
    """A function ``compact(values, fill)`` that drops the columns where ``keep`` is False from ``(..., batch, L)``
    values and re-pads each row on the side it was padded, exactly as :func:`shrink_sequences` does (used for
    Qwen2-VL's ``(3, batch, L)`` M-RoPE positions)."""
    batch = attention_mask.shape[0]
    keep = keep & attention_mask.bool()  # old padding is dropped and rebuilt, so rows can shrink unequally
    counts = keep.sum(dim=1)
    length = int(counts.max())
    offset = (length - counts) if padding_side(attention_mask) == "left" else torch.zeros_like(counts)
    rows, cols = keep.nonzero(as_tuple=True)
    target = (keep.long().cumsum(dim=1) - 1)[rows, cols] + offset[rows]

    def compact(values: torch.Tensor, fill: int) -> torch.Tensor:
        out = values.new_full((*values.shape[:-2], batch, length), fill)
        out[..., rows, target] = values[..., rows, cols]
        return out

    return compact
