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
    """Unusable data; the message names the file, and the rows (0-based) and JSONL lines at fault."""


MAX_LISTED = 20  # problems listed in one DataError; the rest are counted


class RowList(list):
    """Rows that remember their ``source`` and, for JSONL, each row's 1-based ``lines`` number, for error messages."""

    def __init__(self, rows: Any = (), *, source: str | None = None, lines: list[int] | None = None) -> None:
        super().__init__(rows)
        self.source = source
        self.lines = lines

    def head(self, n: int) -> RowList:
        return RowList(self[:n], source=self.source, lines=None if self.lines is None else self.lines[:n])


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _listing(problems: list[str]) -> str:
    """The first ``MAX_LISTED`` problems, one a line, and how many more there are."""
    shown = problems[:MAX_LISTED]
    rest = len(problems) - len(shown)
    return "\n".join(shown + ([f"... and {rest} more"] if rest else []))


def load_rows(source: str, *, split: str = "train", limit: int | None = None) -> RowList:
    """Rows from a local ``.json`` (list or ``{"data": [...]}``) / ``.jsonl`` file, the demo set, or a hub dataset.

    ``source="demo"`` (or ``demo:train`` / ``demo:test``) is the synthetic demo task set (``owlore.data.demo_tasks``).
    A file is read whole before anything is raised, so one ``DataError`` lists every unparsable line (and, then,
    the rows that would fail too); an empty source is an error here, where its name is known.
    """
    path = Path(source)
    if source == "demo" or source.startswith("demo:"):
        from owlore.data.demo_tasks import build_demo_tasks

        rows = RowList(build_demo_tasks(source.split(":", 1)[1] if ":" in source else split), source=source)
    elif path.exists():
        rows = _read_json_rows(path)
    elif path.suffix in (".json", ".jsonl"):
        raise DataError(f"data file {source} does not exist")
    else:
        from datasets import load_dataset

        try:
            rows = RowList(load_dataset(source, split=split), source=source)
        except (OSError, ValueError, ConnectionError) as e:  # DatasetNotFoundError is a FileNotFoundError
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DataError(f"data.train={source!r}: not a local file, not demo, and the datasets hub could not "
                            f"load it ({first}). Give a .json/.jsonl path, demo, or a hub dataset name "
                            "(needs network access or a filled HF cache).") from None
        if not rows:
            raise DataError(f"{source}: no rows (split {split!r} is empty)")
    return rows.head(limit) if limit else rows


def _read_json_rows(path: Path) -> RowList:
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise DataError(f"{path}: no rows (the file is empty)")
    if path.suffix == ".jsonl":
        return _read_jsonl(path, text)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        hint = " (one JSON object per line is JSON Lines: name the file .jsonl)" if e.msg == "Extra data" else ""
        raise DataError(f"{path}: not valid JSON at line {e.lineno} column {e.colno} ({e.msg}){hint}") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of rows (or JSONL), got {type(data).__name__}")
    if not data:
        raise DataError(f"{path}: no rows (the JSON list is empty)")
    return RowList(data, source=str(path))


def _read_jsonl(path: Path, text: str) -> RowList:
    """Parse every line; if any fails, raise once with all unparsable lines and the rows that are bad as well.

    Row ``i`` is the ``i``-th non-blank line, so row numbers do not shift when a broken line is fixed.
    """
    rows: list[Any] = []
    lines: list[int] = []
    indices: list[int] = []
    unparsable: list[tuple[int, str]] = []
    index = 0
    for n, line in enumerate(text.split("\n"), 1):  # not splitlines(): JSON strings may hold U+2028 etc.
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
            lines.append(n)
            indices.append(index)
        except json.JSONDecodeError as e:
            unparsable.append((n, f"line {n} is not valid JSON ({e.msg} at column {e.colno})"))
        index += 1
    if unparsable:
        bad: list[tuple[int, str]] = []
        for i, n, row in zip(indices, lines, rows, strict=True):
            try:
                check_row(row)
            except DataError as e:
                bad.append((n, f"row {i}: {e} (line {n})"))
        k = len(unparsable)
        head = f"{path}: {_plural(k, 'line')} {'is' if k == 1 else 'are'} not valid JSON"
        if bad:
            head += f" and {_plural(len(bad), 'row')} {'is' if len(bad) == 1 else 'are'} bad"
        problems = [msg for _, msg in sorted(unparsable + bad)]
        raise DataError(f"{head}:\n{_listing(problems)}\nFix the file (data.skip_bad_rows=true skips bad rows, "
                        "not unparsable lines).")
    if not rows:
        raise DataError(f"{path}: no rows (the file is empty)")
    return RowList(rows, source=str(path), lines=lines)


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


def check_row(row: Any) -> str:
    """The row's format, after every check that needs no tokenizer (so a file can be vetted while it is read)."""
    fmt = row_format(row)
    if fmt == "instruction":
        if not isinstance(row.get("output"), str) or not row["output"].strip():
            raise DataError("field 'output' is missing or empty")
        if not isinstance(row["instruction"], str) or not row["instruction"].strip():
            raise DataError("field 'instruction' is empty")
    elif fmt == "chat":
        msgs = row["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DataError("'messages' must be a non-empty list")
        for j, m in enumerate(msgs):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise DataError(f"messages[{j}] needs 'role' and 'content'")
        if not any(m["role"] == "assistant" for m in msgs):
            raise DataError("no assistant message to train on")
    elif not isinstance(row["text"], str) or not row["text"].strip():
        raise DataError("field 'text' is empty")
    return fmt


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


def row_problems(rows: list[Any]) -> list[str]:
    """Every row that fails the checks that need no tokenizer, as ``row i: why (line n)`` lines."""
    lines = getattr(rows, "lines", None)
    out = []
    for i, row in enumerate(rows):
        try:
            check_row(row)
        except (DataError, KeyError, TypeError) as e:
            at = f" (line {lines[i]})" if lines is not None and i < len(lines) else ""
            out.append(f"row {i}: {f'missing field {e}' if isinstance(e, KeyError) else e}{at}")
    return out


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
