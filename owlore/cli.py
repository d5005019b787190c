"""What every entry point does with a user's mistake: one message and exit 2, never a traceback.

``train.py``, ``eval/*.py``, ``python -m owlore.memory`` and ``benchmarks/*.py`` decorate their ``main`` with
``@entry_point`` and end in ``raise SystemExit(exit_code(main()))``. A ``UsageError`` (``owlore.errors``: config,
data, a missing model or file, an unknown task or method) prints ``<kind>: <message>`` to stderr and exits 2;
Ctrl-C outside training prints one line and exits 130 (inside training the run checkpoints first:
``owlore.run.interrupt``). ``OWLORE_DEBUG=1`` or ``--debug`` adds the traceback. Any other exception is a bug and
keeps its traceback.

This is the only module of the library that writes to the terminal; it is for entry points, not library code.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import traceback
import warnings
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from owlore.errors import UsageError

DEBUG_ENV = "OWLORE_DEBUG"
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C
T = TypeVar("T")


def debug_requested(argv: Sequence[str] = ()) -> bool:
    """``--debug`` on the command line or ``OWLORE_DEBUG`` set to anything but 0/false/no."""
    return "--debug" in argv or os.environ.get(DEBUG_ENV, "").lower() not in ("", "0", "false", "no")


class _DropMessage(logging.Filter):
    """Drops one logger's records that start with ``prefix`` and mention ``detail``; everything else passes."""

    def __init__(self, prefix: str, detail: str) -> None:
        super().__init__()
        self.prefix, self.detail = prefix, detail

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith(self.prefix) and self.detail in message)


KNOWN_NOISE = (
    # bitsandbytes on an AVX-512-bf16 CPU tries the optional `kernels` package at import and falls back to its own
    # kernel when it is missing: harmless, printed on every command. Other failures of that load still show.
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community",
     "No module named 'kernels'"),
)
KNOWN_WARNINGS = (
    # transformers 5 deprecates the name peft still calls; nothing a user can change
    r"`is_gradient_checkpointing` is deprecated",
)


def quiet_known_noise() -> None:
    """Silence the import-time messages listed in ``KNOWN_NOISE`` / ``KNOWN_WARNINGS`` (exact matches only, so
    real warnings of the same loggers still show). Idempotent."""
    for name, prefix, detail in KNOWN_NOISE:
        log = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) and f.prefix == prefix for f in log.filters):
            log.addFilter(_DropMessage(prefix, detail))
    for message in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)


def entry_point(main: Callable[[list[str]], T]) -> Callable[[Sequence[str] | None], T]:
    """Wrap ``main(argv)``: ``argv`` defaults to ``sys.argv[1:]`` without ``--debug``; a ``UsageError`` becomes
    ``<kind>: <message>`` on stderr and ``SystemExit(2)``, Ctrl-C ``SystemExit(130)``; the result is returned."""

    @functools.wraps(main)
    def wrapped(argv: Sequence[str] | None = None) -> T:
        args = list(sys.argv[1:] if argv is None else argv)
        debug = debug_requested(args)
        quiet_known_noise()
        try:
            return main([a for a in args if a != "--debug"])
        except UsageError as e:
            if debug:
                traceback.print_exc()
            print(f"{e.kind}: {e}", file=sys.stderr)
            raise SystemExit(EXIT_USAGE) from None
        except KeyboardInterrupt:
            if debug:
                traceback.print_exc()
            print("interrupted (Ctrl-C)", file=sys.stderr)
            raise SystemExit(EXIT_INTERRUPTED) from None

    return wrapped


def exit_code(result: Any) -> int:
    """A ``main``'s result as a process exit code: an int is one, anything else is success."""
    return result if isinstance(result, int) and not isinstance(result, bool) else 0
