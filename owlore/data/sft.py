"""Supervised fine-tuning data: load rows (hub name or local JSON/JSONL), tokenise with the prompt masked out.

Three row formats are recognised per row:
* instruction: ``instruction`` (+ optional ``input``) and ``output`` (alpaca, commonsense-170k);
* chat: ``messages`` = list of ``{"role", "content"}``; only assistant turns are trained on;
* plain text: ``text``; every token is trained on.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from owlore.data.formatting import build_prompt

logger = logging.getLogger(__name__)
IGNORE_INDEX = -100


class DataError(ValueError):
    """A dataset row that cannot be used; the message names the row index."""


def load_rows(source: str, *, split: str = "train", limit: int | None = None) -> list[dict[str, Any]]:
    """Rows from a local ``.json`` (list or ``{"data": [...]}``) / ``.jsonl`` file, the demo set, or a hub dataset.

    ``source="demo"`` (or ``demo:train`` / ``demo:test``) is the synthetic demo task set (``owlore.data.demo_tasks``).
    """
    path = Path(source)
    if source == "demo" or source.startswith("demo:"):
        from owlore.data.demo_tasks import build_demo_tasks

        rows = build_demo_tasks(source.split(":", 1)[1] if ":" in source else split)
    elif path.exists():
        rows = _read_json_rows(path)
    elif path.suffix in (".json", ".jsonl"):
        raise DataError(f"data file {source} does not exist")
    else:
        from datasets import load_dataset

        rows = list(load_dataset(source, split=split))
    return rows[:limit] if limit else rows


def _read_json_rows(path: Path) -> list[dict[str, Any]]:
    text = path.read_text()
    if path.suffix == ".jsonl":
        rows = []
        for i, line in enumerate(text.splitlines()):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {i + 1} is not valid JSON ({e.msg})") from e
        return rows
    data = json.loads(text)
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of rows (or JSONL), got {type(data).__name__}")
    return data


def row_format(row: Any) -> str:
    if not isinstance(row, dict):
        raise DataError(f"expected a JSON object, got {type(row).__name__}")
    if "messages" in row:
        return "chat"
    if "instruction" in row:
        return "instruction"
    if "text" in row:
        return "text"
    raise DataError(f"has none of the fields 'instruction'/'output', 'messages' or 'text' (keys: {sorted(row)})")


def _tokens(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _encode_instruction(tokenizer: Any, row: dict[str, Any]) -> tuple[list[int], list[int]]:
    if not isinstance(row.get("output"), str) or not row["output"].strip():
        raise DataError("field 'output' is missing or empty")
    if not isinstance(row["instruction"], str) or not row["instruction"].strip():
        raise DataError("field 'instruction' is empty")
    prompt = _tokens(tokenizer, build_prompt(tokenizer, row))
    if tokenizer.bos_token_id is not None and not getattr(tokenizer, "chat_template", None):
        prompt = [tokenizer.bos_token_id, *prompt]
    answer = _tokens(tokenizer, row["output"])
    if tokenizer.eos_token_id is not None:
        answer.append(tokenizer.eos_token_id)
    return prompt + answer, [IGNORE_INDEX] * len(prompt) + answer


def _encode_chat(tokenizer: Any, row: dict[str, Any]) -> tuple[list[int], list[int]]:
    msgs = row["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise DataError("'messages' must be a non-empty list")
    for j, m in enumerate(msgs):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"messages[{j}] needs 'role' and 'content'")
    if not any(m["role"] == "assistant" for m in msgs):
        raise DataError("no assistant message to train on")
    if not getattr(tokenizer, "chat_template", None):
        text_ids, labels = [], []
        for m in msgs:
            ids = _tokens(tokenizer, f"{m['role']}: {m['content']}\n")
            if m["role"] == "assistant" and tokenizer.eos_token_id is not None:
                ids.append(tokenizer.eos_token_id)  # so the model learns where its turn ends
            text_ids += ids
            labels += ids if m["role"] == "assistant" else [IGNORE_INDEX] * len(ids)
        return text_ids, labels
    # Render growing prefixes; the tokens each assistant turn adds are trained on, everything else is masked.
    ids: list[int] = []
    labels: list[int] = []
    rendered = ""
    for j, m in enumerate(msgs):
        full = tokenizer.apply_chat_template(msgs[: j + 1], tokenize=False)
        if m["role"] == "assistant":
            head = tokenizer.apply_chat_template(msgs[:j], tokenize=False, add_generation_prompt=True) if j else ""
            if not head.startswith(rendered) or not full.startswith(head):
                raise DataError("the tokenizer's chat template does not render conversations prefix by prefix")
            head_ids = _tokens(tokenizer, head[len(rendered):])
            ids += head_ids
            labels += [IGNORE_INDEX] * len(head_ids)
            turn = _tokens(tokenizer, full[len(head):])
            ids += turn
            labels += turn
        else:
            if not full.startswith(rendered):
                raise DataError("the tokenizer's chat template does not render conversations prefix by prefix")
            new = _tokens(tokenizer, full[len(rendered):])
            ids += new
            labels += [IGNORE_INDEX] * len(new)
        rendered = full
    return ids, labels


def encode_row(tokenizer: Any, row: dict[str, Any]) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of one row, labels ``-100`` on prompt tokens."""
    fmt = row_format(row)
    if fmt == "instruction":
        return _encode_instruction(tokenizer, row)
    if fmt == "chat":
        return _encode_chat(tokenizer, row)
    if not isinstance(row["text"], str) or not row["text"].strip():
        raise DataError("field 'text' is empty")
    ids = _tokens(tokenizer, row["text"])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return ids, list(ids)


@dataclass
class TokenizedDataset(torch.utils.data.Dataset):
    """Already tokenised examples: each item is ``{"input_ids", "labels", "attention_mask"}`` lists of ints.

    Lists (not tensors) are what ``transformers.DataCollatorForSeq2Seq`` pads fastest.
    """

    examples: list[dict[str, list[int]]]

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return self.examples[i]


def tokenize_rows(
    rows: list[dict[str, Any]],
    tokenizer: Any,
    *,
    max_seq_length: int = 512,
    packing: bool = False,
    skip_bad_rows: bool = False,
) -> TokenizedDataset:
    """Tokenise rows, truncate to ``max_seq_length`` (or pack into blocks of exactly that length).

    Args:
        skip_bad_rows: count and skip unusable rows (logged) instead of raising ``DataError`` at the first one.
    """
    encoded, bad = [], []
    for i, row in enumerate(rows):
        try:
            ids, labels = encode_row(tokenizer, row)
        except (DataError, KeyError, TypeError) as e:
            if not skip_bad_rows:
                raise DataError(f"row {i}: {e}. Fix the row, or set data.skip_bad_rows=true to skip such rows.") from e
            bad.append(i)
            continue
        if all(lab == IGNORE_INDEX for lab in labels[:max_seq_length]) and not packing:
            if not skip_bad_rows:
                raise DataError(f"row {i}: the prompt fills all {max_seq_length} tokens, nothing left to train on. "
                                "Raise data.max_seq_length or set data.skip_bad_rows=true.")
            bad.append(i)
            continue
        encoded.append((ids, labels))
    if bad:
        logger.warning("skipped %d bad rows (first: %s)", len(bad), bad[:10])
    if not encoded:
        raise DataError("no usable rows")
    examples = _pack(encoded, max_seq_length) if packing else [
        (ids[:max_seq_length], labels[:max_seq_length]) for ids, labels in encoded]
    return TokenizedDataset([{"input_ids": list(ids), "labels": list(labels), "attention_mask": [1] * len(ids)}
                             for ids, labels in examples])


def _pack(encoded: list[tuple[list[int], list[int]]], block: int) -> list[tuple[list[int], list[int]]]:
    """Concatenate examples and cut blocks of ``block`` tokens (the official scripts' "grouped texts")."""
    ids = [t for e, _ in encoded for t in e]
    labels = [t for _, lab in encoded for t in lab]
    n = len(ids) // block * block
    if n == 0:
        raise DataError(f"packing needs at least {block} tokens, the data has {len(ids)}")
    return [(ids[i : i + block], labels[i : i + block]) for i in range(0, n, block)]
