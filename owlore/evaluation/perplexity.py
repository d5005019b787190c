"""Held-out perplexity of text rows: the domain-adaptation score and the forgetting probe.

Rows are tokenised and cut into blocks of ``seq_len`` tokens (a row longer than a block gives several, a shorter
one its own block; no packing across rows, so a block never spans two documents). Perplexity is
``exp(total NLL / predicted tokens)`` over all blocks, the corpus-level definition lm-eval's ``word_perplexity``
family uses (token-level here), computed in fp32 whatever the model's dtype.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch


def text_blocks(tokenizer: Any, rows: Sequence[Mapping[str, Any]], *, seq_len: int = 128,
                limit: int | None = None, min_tokens: int = 8) -> list[list[int]]:
    """Blocks of at most ``seq_len`` token ids from ``text`` rows (BOS first when the tokenizer has one), the
    first ``limit`` of them; a trailing piece shorter than ``min_tokens`` is dropped."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    blocks: list[list[int]] = []
    step = seq_len - len(bos)
    for r in rows:
        ids = tokenizer(str(r["text"]), add_special_tokens=False)["input_ids"]
        for i in range(0, len(ids), step):
            piece = ids[i:i + step]
            if len(piece) >= min_tokens:
                blocks.append(bos + piece)
            if limit and len(blocks) >= limit:
                return blocks
    return blocks


@torch.no_grad()
def perplexity(model: Any, tokenizer: Any, rows: Sequence[Mapping[str, Any]], *, seq_len: int = 128,
               limit: int | None = None, batch_size: int = 8) -> dict[str, Any]:
    """``{"perplexity", "nll", "tokens", "blocks"}`` of the rows (mean NLL per predicted token, nats)."""
    blocks = text_blocks(tokenizer, rows, seq_len=seq_len, limit=limit)
    if not blocks:
        raise ValueError("no text blocks to score (empty rows?)")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    total = torch.zeros((), dtype=torch.float64, device=device)  # summed on the device: one host read at the end
    count = 0
    try:
        for i in range(0, len(blocks), batch_size):
            chunk = blocks[i:i + batch_size]
            width = max(len(b) for b in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for j, b in enumerate(chunk):
                ids[j, :len(b)] = torch.tensor(b)
                mask[j, :len(b)] = 1
            ids, mask = ids.to(device), mask.to(device)
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            target = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100,
                                                    reduction="sum")
            total += nll.double()
            count += sum(len(b) - 1 for b in chunk)  # predicted tokens, known on the host without a sync
    finally:
        model.train(was_training)
    mean = float(total) / count
    return {"perplexity": math.exp(mean), "nll": mean, "tokens": count, "blocks": len(blocks),
            "average": math.exp(mean)}
