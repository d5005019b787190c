"""Rows from a local file: JSON, JSON Lines, CSV, TSV or Parquet, with errors that name the file and the place.

JSON and JSONL are parsed here, so every unparsable line is listed at once with its number; CSV, TSV and Parquet
go through ``datasets`` (pandas / pyarrow underneath), and their rows are named by number. A UTF-8 byte-order mark
is accepted; text that is not UTF-8 is reported with its line and byte offset, before any parser sees it.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from owlore.data.rows import DataError, RowList, _listing, _plural, check_row

LOCAL_SUFFIXES = (".json", ".jsonl", ".csv", ".tsv", ".parquet")


def read_rows(path: Path) -> RowList:
    """Every row of a local data file (``LOCAL_SUFFIXES``); raises ``DataError`` naming the file."""
    suffix = path.suffix.lower()
    if suffix not in LOCAL_SUFFIXES:
        raise DataError(f"{path}: unsupported file type {path.suffix or '(no suffix)'!r}; give "
                        f"{', '.join(LOCAL_SUFFIXES[:-1])} or {LOCAL_SUFFIXES[-1]} (or a hub dataset name)")
    if suffix == ".parquet":
        return _read_table(path, "parquet", {})
    text = decode_utf8(path)
    if not text.strip():
        raise DataError(f"{path}: no rows (the file is empty)")
    if suffix in (".csv", ".tsv"):
        sep = "\t" if suffix == ".tsv" else ","
        from datasets import Features, Value

        header = next(csv.reader(io.StringIO(text), delimiter=sep), [])  # every column text: "42" stays "42"
        return _read_table(path, "csv", {"sep": sep, "encoding": "utf-8-sig",
                                          "features": Features({c: Value("string") for c in header})})
    return _read_jsonl(path, text) if suffix == ".jsonl" else _read_json(path, text)


def decode_utf8(path: Path) -> str:
    """The file's text, without a leading UTF-8 byte-order mark; invalid UTF-8 names its line and byte offset."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        col = e.start - (data.rfind(b"\n", 0, e.start) + 1)
        raise DataError(f"{path}: not UTF-8 text at line {line}, byte offset {e.start} (byte {col} of the line: "
                        f"{data[e.start:e.start + 1]!r}, {e.reason}). Re-save the file as UTF-8, e.g. "
                        f"iconv -f latin1 -t utf-8 {path.name}") from None


def _read_table(path: Path, builder: str, kwargs: dict[str, Any]) -> RowList:
    """CSV / TSV / Parquet through ``datasets``; empty cells are dropped, so an empty ``input`` is no input."""
    from datasets import load_dataset

    try:
        ds = load_dataset(builder, data_files=str(path), split="train", **kwargs)
    except Exception as e:  # pandas / pyarrow parse errors have many types; all mean "this file does not parse"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{path}: cannot be read as {path.suffix.lstrip('.').upper()} ({first})") from None
    rows = [{k: v for k, v in row.items() if v is not None} for row in ds]
    if not rows:
        raise DataError(f"{path}: no rows (only a header?)")
    return RowList(rows, source=str(path))


def _read_json(path: Path, text: str) -> RowList:
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


