"""LoRA (arXiv 2106.09685, https://arxiv.org/abs/2106.09685) through peft: frozen base, trained low-rank adapters.

The run saves the adapter (``final/adapter_model.safetensors``); ``eval/*.py --model BASE --adapter DIR`` loads
it. The optimizer is the Trainer's (``training.optim``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from owlore.methods.base import BuildContext, MemoryProfile, Method, MethodParts


@dataclass
class LoraSettings:
    """peft ``LoraConfig`` fields (defaults: r=8, α=16 (so α/r=2), dropout 0.05, on every linear but the head)."""

    r: int = 8
    """Adapter rank."""
    alpha: int = 16
    """LoRA α; the update is scaled by α/r (α/√r with use_rslora)."""
    dropout: float = 0.05
    target_modules: str | list[str] = "all-linear"
    """all-linear (every linear but the head), or module names such as [q_proj, v_proj]."""
    bias: str = "none"
    """none, all or lora_only."""
    use_rslora: bool = False
    use_dora: bool = False
    modules_to_save: list[str] | None = None
    """Modules trained in full and saved with the adapter (e.g. [lm_head])."""

    def problems(self, prefix: str = "lora.") -> list[str]:
        out = []
        if self.r < 1:
            out.append(f"{prefix}r={self.r}: must be >= 1 (common: 8-64)")
        if self.alpha <= 0:
            out.append(f"{prefix}alpha={self.alpha}: must be > 0 (common: 2*r)")
        if not 0 <= self.dropout < 1:
            out.append(f"{prefix}dropout={self.dropout}: must be in [0, 1)")
        if self.bias not in ("none", "all", "lora_only"):
            out.append(f"{prefix}bias={self.bias!r}: must be none, all or lora_only")
        return out

    def peft_config(self) -> Any:
        from peft import LoraConfig

        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          target_modules=self.target_modules, bias=self.bias, use_rslora=self.use_rslora,
                          use_dora=self.use_dora, modules_to_save=self.modules_to_save, task_type="CAUSAL_LM")


def wrap_with_lora(model: nn.Module, settings: LoraSettings, *, gradient_checkpointing: bool) -> nn.Module:
    """``get_peft_model``; with checkpointing, inputs require grad so reentrant checkpointing sees a graph."""
    from peft import get_peft_model

    peft_model = get_peft_model(model, settings.peft_config())
    if gradient_checkpointing:
        peft_model.enable_input_require_grads()
    return peft_model


def build(ctx: BuildContext) -> MethodParts:
    model = wrap_with_lora(ctx.model, ctx.section("lora"), gradient_checkpointing=ctx.args.gradient_checkpointing)
    return MethodParts(model)


def memory_options(cfg) -> dict:
    """The estimator's keywords from the ``lora`` section."""
    lo = cfg.sections["lora"]
    targets = lo.target_modules if isinstance(lo.target_modules, str) else tuple(lo.target_modules)
    return {"lora_rank": lo.r, "lora_targets": targets, "lora_dropout": lo.dropout}


METHOD = Method(
    name="lora",
    summary="frozen base + peft LoRA adapters, the Trainer's optimizer; saves the adapter",
    build=build,
    sections={"lora": LoraSettings},
    zero_stages=(0, 1, 2, 3),
    memory=MemoryProfile(trains="adapters", options=memory_options),
)
