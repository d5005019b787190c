"""A DeepSpeed config (a JSON file or a dict), read only as far as OwLore needs: its ZeRO stage and precision.

A leaf module: the config checks (``owlore.run.recipe``) and the runtime (``owlore.parallel.distributed``) both read it, so
neither has to import the other.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _deepspeed_config(value: Any) -> tuple[dict | None, str | None]:
    """``training.deepspeed`` (a JSON file or a dict) as a dict, or the problem reading it."""
    if isinstance(value, dict):
        return value, None
    path = Path(str(value))
    if not path.is_file():
        return None, (f"training.deepspeed={value!r}: no such file; the shipped DeepSpeed configs are "
                      "configs/deepspeed/zero0.json, zero2.json and zero3.json")
    try:
        return json.loads(path.read_text()), None
    except json.JSONDecodeError as e:
        return None, f"training.deepspeed={value!r}: not valid JSON ({e})"


def deepspeed_precision(value: Any, training: dict[str, Any]) -> str | None:
    """``"bf16"`` or ``"fp16"`` if the DeepSpeed config turns mixed precision on (``"auto"`` follows
    ``training.bf16`` / ``training.fp16``, as the HF integration resolves it), else None."""
    data, _ = _deepspeed_config(value)
    for key in ("bf16", "fp16"):
        enabled = ((data or {}).get(key) or {}).get("enabled", False)
        if enabled is True or (enabled == "auto" and training.get(key)):
            return key
    return None


def deepspeed_config_stage(value: Any) -> tuple[int | None, str | None]:
    """The ZeRO stage of ``training.deepspeed`` (a JSON file or a dict), or the problem reading it."""
    data, why = _deepspeed_config(value)
    if why:
        return None, why
    stage = (data.get("zero_optimization") or {}).get("stage", 0)
    return (stage if isinstance(stage, int) else None,
            None if isinstance(stage, int) else f"training.deepspeed: zero_optimization.stage={stage!r} is not 0-3")
