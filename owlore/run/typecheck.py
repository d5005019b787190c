"""Check (and gently coerce) YAML values against type hints, and suggest the key a typo meant.

Config values arrive from YAML files and ``section.key=value`` overrides. They are read against the type of the
field they land in, so a string field gets a string (``save_strategy=no`` is the strategy "no", not YAML 1.1's
boolean ``false``) and a float field gets a float; anything that still does not fit becomes a problem line that
names the key, the bad value and what was expected.
"""

from __future__ import annotations

import difflib
import enum
import types
import typing
from collections.abc import Iterable
from typing import Any

_BOOL_WORDS = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}


def suggest(name: str, valid: Iterable[str]) -> str:
    """``" (did you mean 'rank'?)"`` for a close match of ``name`` among ``valid``, else ``""``."""
    close = difflib.get_close_matches(str(name), [str(v) for v in valid], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def describe(hint: Any) -> str:
    """A short human name for a type hint (``float``, ``int | None``, ``one of linear, cosine``)."""
    if hint is Any:
        return "any value"
    if _is_enum(hint):
        return "one of " + ", ".join(str(m.value) for m in hint)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(describe(a) for a in typing.get_args(hint))
    if origin is typing.Literal:
        return "one of " + ", ".join(map(str, typing.get_args(hint)))
    if hint is type(None):
        return "null"
    if origin in (list, tuple):
        args = typing.get_args(hint)
        return f"a list of {describe(args[0])}" if args else "a list"
    if origin is dict or hint is dict:
        return "a mapping"
    return getattr(hint, "__name__", str(hint))


def coerce(value: Any, hint: Any, *, raw: str | None = None) -> tuple[Any, str | None]:
    """Fit ``value`` to ``hint``.

    Args:
        value: the parsed YAML value.
        hint: the field's resolved type hint.
        raw: the value's original text (for command-line overrides), so a string field can take it verbatim.

    Returns:
        ``(value, None)`` when it fits (possibly converted), else ``(value, "expected <type>")``.
    """
    options = list(typing.get_args(hint)) if typing.get_origin(hint) in (typing.Union, types.UnionType) else [hint]
    for option in options:  # an exact fit wins over any conversion
        if _fits(value, option):
            return _plain(value), _enum_problem(value, options)
    for option in options:
        ok, converted = _convert(value, option, raw)
        if ok:
            return _plain(converted), _enum_problem(converted, options)
    return value, f"expected {describe(hint)}"


def _plain(value: Any) -> Any:
    """Built-in ``int``/``float`` again for numbers that carried their YAML text (see ``owlore.run.recipe``)."""
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, int) and not isinstance(value, bool) and type(value) is not int:
        return int(value)
    if isinstance(value, float) and type(value) is not float:
        return float(value)
    return value


def _is_enum(hint: Any) -> bool:
    return isinstance(hint, type) and issubclass(hint, enum.Enum)


def _enum_problem(value: Any, options: list[Any]) -> str | None:
    """HF types many choices as ``SomeEnum | str``; check the string against the enum's values anyway."""
    enums = [o for o in options if _is_enum(o)]
    if not enums or not isinstance(value, str):
        return None
    allowed = [str(m.value) for e in enums for m in e]
    return None if value in allowed else f"must be one of {', '.join(allowed)}{suggest(value, allowed)}"


def _fits(value: Any, hint: Any) -> bool:
    if hint is Any or hint is object:
        return True
    if hint is type(None) or hint is None:
        return value is None
    if _is_enum(hint):
        return isinstance(value, hint)
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if origin in (list, tuple) or hint in (list, tuple):
        args = typing.get_args(hint)
        return isinstance(value, list) and (not args or all(_fits(v, args[0]) for v in value))
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, float)
    if hint is str:
        return isinstance(value, str)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True  # a hint we do not understand: let the consumer judge


def _convert(value: Any, hint: Any, raw: str | None) -> tuple[bool, Any]:
    if hint is bool and isinstance(value, str) and value.lower() in _BOOL_WORDS:
        return True, _BOOL_WORDS[value.lower()]
    if hint is float and isinstance(value, int | str) and not isinstance(value, bool):
        try:
            return True, float(value)
        except ValueError:
            return False, value
    if hint is int and isinstance(value, float) and value.is_integer():
        return True, int(value)
    if hint is str and value is not None and raw is not None:
        return True, raw  # an override's text, verbatim (``run_name=a: b`` is the string, not a mapping)
    if hint is str and value is not None and not isinstance(value, list | dict):
        text = getattr(value, "yaml_text", None)  # a number from a YAML file keeps its text (007, 1e3)
        return True, text if text is not None else (str(value).lower() if isinstance(value, bool) else str(value))
    origin = typing.get_origin(hint)
    if (origin in (list, tuple) or hint in (list, tuple)) and not isinstance(value, list | dict) and value is not None:
        args = typing.get_args(hint)
        if not args or _fits(value, args[0]):
            return True, [value]
    return False, value
