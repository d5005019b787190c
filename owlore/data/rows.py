"""Rows of fine-tuning data and the checks that need no tokenizer, so a file can be vetted while it is read.

Three row formats are recognised per row:
* instruction: ``instruction`` (+ optional ``input``) and ``output`` (alpaca, commonsense-170k);
* chat: ``messages`` = list of ``{"role", "content"}``; only assistant turns are trained on;
* plain text: ``text``; every token is trained on.
"""

from __future__ import annotations

from typing import Any

from owlore.errors import UsageError


class DataError(UsageError):
    """Unusable data; the message names the file, and the rows (0-based) and JSONL lines at fault."""

    kind = "data error"


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


