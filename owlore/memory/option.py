"""``MemoryOption``: what one option of the ``memory`` section is, declared once beside its implementation.

A declaration says everything the rest of owlore needs to know about the option: its default (off), which values
it takes (``check``), what it cannot run with (``conflicts``, and ``fsdp2``), what it does to a built run
(``apply``), and how the memory estimator counts it (``estimate``: keywords of ``owlore.memory.plan.Options``
for what the estimator's arithmetic models; ``adjust``: a change to a finished estimate, for an option the
arithmetic does not know). The registry (``owlore.memory.options``) reads these fields; the config checks,
``train.py``, the estimator and the benchmark read the registry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


def checkpointing_on(memory: Any, model: Any) -> bool:
    """Whether a run checkpoints activations: ``memory.checkpointing`` all/frozen or ``model.gradient_checkpointing``."""
    return bool(model.gradient_checkpointing) or memory.checkpointing in ("all", "frozen")


@dataclass(frozen=True)
class OptionContext:
    """What an option's ``conflicts`` may read: the run's method (a ``Method``) and its validated sections."""

    method: Any
    memory: Any
    model: Any
    parallel: Any
    training: dict[str, Any]
    sections: dict[str, Any]

    @property
    def checkpointed(self) -> bool:
        return checkpointing_on(self.memory, self.model)


@dataclass(frozen=True)
class MemoryOption:
    """One memory-saving option, ``memory.<name>`` in a config. Every hook is optional and gets the option's value.

    An option is *on* when its value differs from ``default``; only an option that is on is checked against the
    run (``conflicts``, ``fsdp2``), applied and adjusted. ``check`` and ``estimate`` see every value.
    """

    name: str
    default: Any
    """The off value; its type is the option's type (a plugin option's YAML value is read against it)."""
    doc: str
    """One line for users: what it saves, what it costs."""
    check: Callable[[Any], str | None] | None = None
    """A problem with the value itself (the text after ``memory.<name>=<value>: ``), or None."""
    conflicts: Callable[[Any, OptionContext], list[str]] | None = None
    """Problems with the rest of the run (each a whole message naming the keys and the fix)."""
    fsdp2: bool = True
    """False: refused with ``parallel.fsdp2=true`` (it swaps or wraps weights the shards own)."""
    apply: Callable[[Any, Any, Any], list[Any] | None] | None = None
    """``(value, parts, cfg)``: change the built ``MethodParts`` / model; return Trainer callbacks (after the
    method's own, so a per-layer policy sees the layers a switch has just chosen)."""
    estimate: Callable[[Any, Any], dict[str, Any]] | None = None
    """``(value, cfg)``: keywords of ``owlore.memory.plan.Options`` that model this option."""
    adjust: Callable[[Any, Any, Any], None] | None = None
    """``(value, estimate, cfg)``: change a ``MemoryEstimate`` in place (move bytes, add a note) for an option the
    estimator's arithmetic does not model."""

    def on(self, value: Any) -> bool:
        return value != self.default
