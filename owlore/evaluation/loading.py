"""Load a model to evaluate: an HF id, a ``save_pretrained`` directory, the embedded SmolLM2, or base + adapter.

A directory that holds only a peft adapter (``adapter_config.json``, no ``config.json``), as a LoRA run of
``train.py`` writes it, is loaded on top of the base model it names. Remote code is never trusted unless asked.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from owlore.errors import UsageError
from owlore.run.sources import ModelSourceError, check_model_source

logger = logging.getLogger(__name__)

DTYPES = ("auto", "float32", "bfloat16", "float16")


def resolve_device(device: str = "auto") -> str:
    """``"auto"`` -> ``"cuda"`` if available, else ``"cpu"``; anything else passes through."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(dtype: str, device: str) -> Any:
    """``"auto"`` -> bfloat16 on CUDA, float32 elsewhere (CPUs without bf16 instructions run bf16 very slowly)."""
    import torch

    if dtype not in DTYPES:
        raise UsageError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, dtype)


def _has_tokenizer(path: Path) -> bool:
    return any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))


def load_model(model: str, *, adapter: str | None = None, merge_adapter: bool = False, dtype: str = "auto",
               device: str = "auto", trust_remote_code: bool = False, load_in_4bit: bool = False) -> tuple[Any, Any]:
    """Model and tokenizer ready for ``evaluate``, in eval mode on ``device``.

    Args:
        model: HF hub id, local checkpoint directory, adapter-only directory, or ``"smollm2-135m-instruct"``.
        adapter: peft adapter directory (or hub id) applied with ``PeftModel.from_pretrained``.
        merge_adapter: fold the adapter into the base weights (``merge_and_unload``); same scores, faster.
        dtype: ``"auto"`` (bfloat16 on CUDA, float32 on CPU), ``"float32"``, ``"bfloat16"`` or ``"float16"``.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...
        trust_remote_code: allow custom modelling code from the checkpoint (off unless asked for).
        load_in_4bit: load the base in 4-bit NF4 with double quantisation (bitsandbytes), as a QLoRA run of
            ``train.py`` trained it, so a QLoRA adapter is scored on the base it was trained on.

    Returns:
        ``(model, tokenizer)``. The tokenizer comes from the adapter directory if it has one (a fine-tuning run
        may have added tokens), else from the base model.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from owlore.assets import resolve_model_name

    base = check_model_source(model, key="--model", adapter_ok=True)
    local = Path(base)
    if adapter is None and (local / "adapter_config.json").is_file() and not (local / "config.json").is_file():
        adapter = base
        base = resolve_model_name(json.loads((local / "adapter_config.json").read_text())["base_model_name_or_path"])
        logger.info("%s is a peft adapter; base model %s", model, base)
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    tok_source = adapter if adapter is not None and _has_tokenizer(Path(adapter)) else base
    try:
        tokenizer = AutoTokenizer.from_pretrained(tok_source, trust_remote_code=trust_remote_code)
    except OSError as e:  # a hub id that is not there, or not reachable offline
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelSourceError(f"--model {model!r}: cannot load it ({first}). Give a local save_pretrained "
                               "directory, or a hub id with network access or a filled HF cache") from None
    kw: dict[str, Any] = {}
    if load_in_4bit:
        from transformers import BitsAndBytesConfig

        kw["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                       bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch_dtype)
        if merge_adapter:
            raise UsageError("merge_adapter cannot fold an adapter into 4-bit weights; drop one of the two options")
    lm = AutoModelForCausalLM.from_pretrained(base, dtype=torch_dtype, trust_remote_code=trust_remote_code, **kw)
    if adapter is not None:
        from peft import PeftModel

        lm = PeftModel.from_pretrained(lm, adapter)
        if merge_adapter:
            lm = lm.merge_and_unload()
        logger.info("loaded adapter %s (%s)", adapter, "merged" if merge_adapter else "unmerged")
    if not load_in_4bit:  # bitsandbytes places quantised weights itself
        lm = lm.to(device)
    return lm.eval(), tokenizer
