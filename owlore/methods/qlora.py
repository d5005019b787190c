"""QLoRA (arXiv 2305.14314, https://arxiv.org/abs/2305.14314): LoRA on a base loaded in 4-bit NF4.

The base is quantised at load time by bitsandbytes (``BitsAndBytesConfig``), prepared with peft's
``prepare_model_for_kbit_training`` (norms in fp32, inputs require grad), then wrapped with LoRA as in
``owlore.methods.lora``. bitsandbytes 4-bit runs on CUDA and, since bitsandbytes 0.46, on CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from owlore.methods.base import BuildContext, MemoryProfile, Method, MethodParts
from owlore.methods.lora import LoraSettings, wrap_with_lora
from owlore.run.config import ConfigError


@dataclass
class QuantizationConfig:
    """How the frozen base is stored (QLoRA paper: NF4, double quantisation, bf16 compute)."""

    quant_type: str = "nf4"
    """nf4 or fp4."""
    double_quant: bool = True
    """Quantise the quantisation constants too (~0.4 bit/param saved)."""
    compute_dtype: str = "auto"
    """dtype of the 4-bit matmuls: auto (bfloat16 on a CUDA GPU with bf16, float16 on one without, e.g. T4 or V100;
    float32 on CPU), bfloat16, float16, float32."""

    def problems(self, prefix: str = "quantization.") -> list[str]:
        out = []
        if self.quant_type not in ("nf4", "fp4"):
            out.append(f"{prefix}quant_type={self.quant_type!r}: must be nf4 or fp4")
        if self.compute_dtype not in ("auto", "bfloat16", "float16", "float32"):
            out.append(f"{prefix}compute_dtype={self.compute_dtype!r}: must be auto, bfloat16, float16 or float32")
        return out

    def torch_compute_dtype(self) -> torch.dtype:
        if self.compute_dtype == "auto":
            if not torch.cuda.is_available():
                return torch.float32
            return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
        return getattr(torch, self.compute_dtype)


def check_bitsandbytes_4bit(device: str) -> None:
    """Fail before loading weights if bitsandbytes cannot quantise to 4 bits on ``device``."""
    try:
        import bitsandbytes.functional as bnbf

        bnbf.quantize_4bit(torch.ones(64, 64, device=device), quant_type="nf4")
    except Exception as e:  # ImportError, or a backend without 4-bit kernels for this device
        raise ConfigError(
            f"method=qlora: bitsandbytes cannot quantise to 4 bits on {device} ({type(e).__name__}: {e}). Install a "
            "bitsandbytes build for this device (pip install 'bitsandbytes>=0.46'; CPU support needs >= 0.46), or "
            "use method=lora (same adapters on an unquantised base).") from None


def model_kwargs(cfg: Any) -> dict[str, Any]:
    from transformers import BitsAndBytesConfig

    q: QuantizationConfig = cfg.sections["quantization"]
    device = "cuda" if torch.cuda.is_available() and not cfg.training.get("use_cpu") else "cpu"
    check_bitsandbytes_4bit(device)
    # bitsandbytes places the quantised weights at load time: on the device the Trainer will train on (by default
    # transformers would pick the current CUDA device even for a use_cpu run)
    device_map = {"": "cpu"} if device == "cpu" else {"": int(os.environ.get("LOCAL_RANK", 0))}  # one GPU per rank
    return {"device_map": device_map, "quantization_config": BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=q.quant_type, bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=q.torch_compute_dtype())}


def keep_4bit_weights_trainable(model: torch.nn.Module) -> int:
    """Undo, and switch off, bitsandbytes' in-place CPU inference repacking of the 4-bit weights; returns how many
    weights were repacked.

    On CPUs with AVX-512 bf16, bitsandbytes (seen with 0.50.2) rewrites a ``Linear4bit`` weight into a packed layout
    at its first forward in eval mode without grad (train.py's evaluation before training, for one) and from then on
    multiplies with ``gemv_4bit``, which has no autograd kernel (torch warns "an autograd kernel was not registered
    ... silently incorrect"): no gradient flows back through the base weights any more, so the LoRA gradients of all
    but the last layers come out wrong by tens of percent. Repacked weights are converted back with bitsandbytes' own inverse (the one its
    ``.cuda()`` uses; the quantisation constants went through bf16, so they round-trip to within bf16 precision),
    and the repacking is disabled for the model's lifetime, so later evaluations use the training kernels too.
    """
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnbf
    except ImportError:
        return 0
    inverse = getattr(bnbf, "_convert_weight_packed_for_cpu_inverse", None)
    repacked = 0
    for module in model.modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        module.support_avx512bf16_for_cpu = False
        weight = module.weight
        state = getattr(weight, "quant_state", None)
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            if inverse is None:
                raise RuntimeError("a 4-bit weight is in bitsandbytes' CPU inference layout and this bitsandbytes "
                                   "has no inverse for it; run no evaluation before QLoRA training (eval.demo=false)")
            weight.data, weight.quant_state = inverse(weight.data, state)
            repacked += 1
    return repacked


def build(ctx: BuildContext) -> MethodParts:
    from peft import prepare_model_for_kbit_training

    keep_4bit_weights_trainable(ctx.model)
    gc = bool(ctx.args.gradient_checkpointing)
    model = prepare_model_for_kbit_training(ctx.model, use_gradient_checkpointing=gc,
                                            gradient_checkpointing_kwargs=ctx.args.gradient_checkpointing_kwargs)
    return MethodParts(wrap_with_lora(model, ctx.section("lora"), gradient_checkpointing=gc))


def memory_options(cfg) -> dict:
    """The estimator's keywords from the ``lora`` section (and ``quantization``)."""
    lo = cfg.sections["lora"]
    targets = lo.target_modules if isinstance(lo.target_modules, str) else tuple(lo.target_modules)
    return {"lora_rank": lo.r, "lora_targets": targets, "lora_dropout": lo.dropout,
            "double_quant": cfg.sections["quantization"].double_quant}


METHOD = Method(
    name="qlora",
    summary="LoRA adapters on a 4-bit NF4 base (bitsandbytes), the Trainer's optimizer",
    build=build,
    sections={"lora": LoraSettings, "quantization": QuantizationConfig},
    model_kwargs=model_kwargs,
    zero_stages=(0, 1, 2, 3),
    memory=MemoryProfile(trains="adapters", quantized_base=True, options=memory_options),
)
