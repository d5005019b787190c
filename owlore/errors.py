"""The one exception type for a user's mistake, so every entry point can tell it from a bug.

A ``UsageError`` says which input is wrong (the key, flag, file or row), the value, and the fix; entry points
turn it into one line on stderr and exit code 2 (``owlore.cli``). Anything else is a bug and keeps its
traceback. ``ConfigError`` (``owlore.run.config``) and ``DataError`` (``owlore.data.sft``) are kinds of it; it is a
``ValueError`` so code that caught ``ValueError`` before keeps working.
"""

from __future__ import annotations


class UsageError(ValueError):
    """A user's mistake; the message names the input and how to fix it."""

    kind = "error"
    """The word the command line prints before the message (``config error: ...``)."""
