"""Supervised fine-tuning data: load rows (demo, a local file, a hub dataset), tokenise with the prompt masked out.

The row formats and their checks are ``owlore.data.rows``; local files (JSON, JSONL, CSV, TSV, Parquet) are read by
``owlore.data.files``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from owlore.data.files import LOCAL_SUFFIXES, read_rows
from owlore.data.formatting import build_prompt
from owlore.data.rows import (  # noqa: F401  (re-exported: the public names of the data API)
    MAX_LISTED,
    DataError,
    RowList,
    _listing,
    _plural,
    check_row,
    row_format,
    row_problems,
)

logger = logging.getLogger(__name__)
IGNORE_INDEX = -100


def load_rows(source: str, *, split: str = "train", limit: int | None = None) -> RowList:
    """Rows from a local file (``.json`` list or ``{"data": [...]}``, ``.jsonl``, ``.csv``, ``.tsv``,
    ``.parquet``), the demo set, or a hub dataset (or a local dataset folder ``datasets`` can read).

    ``source="demo"`` (or ``demo:train`` / ``demo:test``) is the synthetic demo task set (``owlore.data.demo_tasks``).
    A JSON / JSONL file is read whole before anything is raised, so one ``DataError`` lists every unparsable line
    (and, then, the rows that would fail too); an empty source is an error here, where its name is known.
    """
    path = Path(source)
    if source == "demo" or source.startswith("demo:"):
        from owlore.data.demo_tasks import build_demo_tasks

        rows = RowList(build_demo_tasks(source.split(":", 1)[1] if ":" in source else split), source=source)
    elif path.is_file():
        rows = read_rows(path)
    elif path.suffix.lower() in LOCAL_SUFFIXES:
        raise DataError(f"data file {source} does not exist")
    else:
        from datasets import load_dataset

        try:
            rows = RowList(load_dataset(source, split=split), source=source)
        except (OSError, ValueError, ConnectionError) as e:  # DatasetNotFoundError is a FileNotFoundError
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            what = "a folder that datasets cannot read" if path.is_dir() else "not a local file, not demo, and the " \
                "datasets hub could not load it"
            raise DataError(f"{source!r}: {what} ({first}). Give a {'/'.join(LOCAL_SUFFIXES)} file, demo, or a "
                            "hub dataset name (needs network access or a filled HF cache).") from None
        if not rows:
            raise DataError(f"{source}: no rows (split {split!r} is empty)")
    return rows.head(limit) if limit else rows


def _tokens(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _encode_instruction(tokenizer: Any, row: dict[str, Any]) -> tuple[list[int], list[int]]:
    prompt = _tokens(tokenizer, build_prompt(tokenizer, row))
    if tokenizer.bos_token_id is not None and not getattr(tokenizer, "chat_template", None):
        prompt = [tokenizer.bos_token_id, *prompt]
    answer = _tokens(tokenizer, row["output"])
    if tokenizer.eos_token_id is not None:
        answer.append(tokenizer.eos_token_id)
    return prompt + answer, [IGNORE_INDEX] * len(prompt) + answer


def _encode_chat(tokenizer: Any, row: dict[str, Any]) -> tuple[list[int], list[int]]:
    msgs = row["messages"]
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
    fmt = check_row(row)
    if fmt == "instruction":
        return _encode_instruction(tokenizer, row)
    if fmt == "chat":
        return _encode_chat(tokenizer, row)
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


def vet_rows(rows: list[Any], *, source: str | None = None) -> None:
    """Raise the ``DataError`` ``tokenize_rows`` would raise for rows that need no tokenizer to judge, so a run
    can stop before it loads any weights."""
    problems = row_problems(rows)
    if problems:
        source = source if source is not None else getattr(rows, "source", None)
        _raise_bad_rows(problems, f" in {source}" if source else "")


def _raise_bad_rows(problems: list[str], where: str) -> None:
    them = "the row" if len(problems) == 1 else "them"
    raise DataError(f"{_listing(problems)}\n{_plural(len(problems), 'bad row')}{where}. Fix {them}, "
                    "or set data.skip_bad_rows=true to skip such rows.")


def tokenize_rows(
    rows: list[dict[str, Any]],
    tokenizer: Any,
    *,
    max_seq_length: int = 512,
    packing: bool = False,
    skip_bad_rows: bool = False,
    source: str | None = None,
) -> TokenizedDataset:
    """Tokenise rows, truncate to ``max_seq_length`` (or pack into blocks of exactly that length).

    Every row is tried before anything is raised, so one ``DataError`` lists all bad rows (the first
    ``MAX_LISTED``), with their JSONL line numbers when ``rows`` came from ``load_rows``.

    Args:
        skip_bad_rows: count and skip unusable rows (logged) instead of raising ``DataError``.
        source: where the rows came from, for messages; defaults to ``rows.source`` of a ``RowList``.
    """
    source = source if source is not None else getattr(rows, "source", None)
    lines = getattr(rows, "lines", None)
    encoded, problems = [], []
    for i, row in enumerate(rows):
        at = f" (line {lines[i]})" if lines is not None and i < len(lines) else ""
        try:
            ids, labels = encode_row(tokenizer, row)
        except (DataError, KeyError, TypeError) as e:
            problems.append(f"row {i}: {f'missing field {e}' if isinstance(e, KeyError) else e}{at}")
            continue
        if all(lab == IGNORE_INDEX for lab in labels[:max_seq_length]) and not packing:
            problems.append(f"row {i}: the prompt fills all {max_seq_length} tokens, nothing left to train on "
                            f"(raise data.max_seq_length){at}")
            continue
        encoded.append((ids, labels))
    where = f" in {source}" if source else ""
    if problems and not skip_bad_rows:
        _raise_bad_rows(problems, where)
    if problems:
        logger.warning("skipped %s%s (first: %s)", _plural(len(problems), "bad row"), where, problems[0])
    if not encoded:
        why = f"all {len(problems)} rows were bad and skipped" if problems else "there are no rows"
        raise DataError(f"{source + ': ' if source else ''}no usable rows ({why})")
    examples = _pack(encoded, max_seq_length, where) if packing else [
        (ids[:max_seq_length], labels[:max_seq_length]) for ids, labels in encoded]
    return TokenizedDataset([{"input_ids": list(ids), "labels": list(labels), "attention_mask": [1] * len(ids)}
                             for ids, labels in examples])


def _pack(encoded: list[tuple[list[int], list[int]]], block: int,
          where: str = "") -> list[tuple[list[int], list[int]]]:
    """Concatenate examples and cut blocks of ``block`` tokens (the official scripts' "grouped texts")."""
    ids = [t for e, _ in encoded for t in e]
    labels = [t for _, lab in encoded for t in lab]
    n = len(ids) // block * block
    if n == 0:
        raise DataError(f"packing needs at least {block} tokens, the data{where} has {len(ids)}")
    return [(ids[i : i + block], labels[i : i + block]) for i in range(0, n, block)]
