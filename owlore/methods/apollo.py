"""APOLLO (arXiv 2412.05270, https://arxiv.org/abs/2412.05270): SGD-like memory, AdamW-level quality.

Every parameter trains. For the targeted linears the optimizer keeps Adam moments of a *random* low-rank
projection of the gradient (no SVD) and uses them only to estimate a per-channel (or per-tensor) learning-rate
scale for the raw gradient; the rest takes plain AdamW steps. We do not re-implement it: transformers calls the
authors' package through ``optim="apollo_adamw"`` / ``"apollo_adamw_layerwise"``, and this method sets those
``TrainingArguments`` from the ``apollo`` section. ``apollo-torch`` is CC-BY-NC (not a free licence), so it is an
optional extra (``pip install --no-deps apollo-torch`` or ``pip install .[apollo]``), never a core dependency.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field

from owlore.methods.base import BuildContext, MemoryProfile, Method, MethodParts
from owlore.run.config import PROJ_TYPES

DECODER_LINEARS = [r".*\.self_attn\..*_proj", r".*\.mlp\..*_proj"]
"""Default targets: the attention and MLP projections of every decoder layer (Llama/Mistral/Qwen names)."""


@dataclass
class ApolloConfig:
    """APOLLO's knobs (defaults: the paper's APOLLO setting; ``rank=1, scale_type=tensor`` is APOLLO-Mini)."""

    rank: int = 256
    """Rank of the random projection of each targeted gradient."""
    proj: str = "random"
    """random (the paper) or svd."""
    scale_type: str = "channel"
    """channel (per-row scaling, APOLLO) or tensor (one scale per matrix, APOLLO-Mini)."""
    update_proj_gap: int = 200
    """Steps between fresh random projections."""
    scale: float = 1.0
    """Multiplier of the scaled update (the paper uses sqrt(128) for APOLLO-Mini)."""
    proj_type: str = "std"
    """std, reverse_std, left or right (which side is projected)."""
    layerwise: bool = False
    """apollo_adamw_layerwise: update inside backward, per parameter (no gradient accumulation, one process)."""
    target_modules: list[str] = field(default_factory=lambda: list(DECODER_LINEARS))
    """Regexes on module names (transformers' ``optim_target_modules``), or ['all-linear']."""

    def problems(self, prefix: str = "apollo.") -> list[str]:
        out = []
        if self.rank < 1:
            out.append(f"{prefix}rank={self.rank}: must be >= 1 (APOLLO: 256, APOLLO-Mini: 1)")
        if self.proj not in ("random", "svd"):
            out.append(f"{prefix}proj={self.proj!r}: must be random or svd")
        if self.scale_type not in ("channel", "tensor"):
            out.append(f"{prefix}scale_type={self.scale_type!r}: must be channel or tensor")
        if self.update_proj_gap < 1 or not self.scale > 0:
            out.append(f"{prefix}update_proj_gap={self.update_proj_gap}, scale={self.scale}: need a gap >= 1 "
                       "and a scale > 0")
        if self.proj_type not in PROJ_TYPES:
            out.append(f"{prefix}proj_type={self.proj_type!r}: must be one of {', '.join(PROJ_TYPES)}")
        if not self.target_modules:
            out.append(f"{prefix}target_modules: must name at least one module regex (or all-linear)")
        return out

    def optim_args(self) -> str:
        """transformers' ``optim_args`` string for ``_get_apollo_optimizer``."""
        return (f"rank={self.rank},proj={self.proj},scale_type={self.scale_type},"
                f"update_proj_gap={self.update_proj_gap},scale={self.scale},proj_type={self.proj_type}")


def available() -> bool:
    """Whether the optional ``apollo-torch`` package is installed."""
    return importlib.util.find_spec("apollo_torch") is not None


def _preflight(cfg, num_layers: int) -> list[str]:
    problems = []
    if not available():
        problems.append("method=apollo needs the optional package apollo-torch (CC-BY-NC licence): "
                        "pip install --no-deps apollo-torch==1.0.3, or pip install .[apollo]")
    optim = str(cfg.training.get("optim") or "adamw_torch")
    if optim not in ("adamw_torch", "apollo_adamw", "apollo_adamw_layerwise"):
        problems.append(f"training.optim={optim!r}: method=apollo sets the optimizer itself (apollo_adamw); "
                        "remove training.optim or use apollo.layerwise=true for the layer-wise variant")
    return problems


def build(ctx: BuildContext) -> MethodParts:
    from transformers.training_args import OptimizerNames

    cfg: ApolloConfig = ctx.section("apollo")
    for p in ctx.model.parameters():
        if p.is_floating_point():
            p.requires_grad_(True)
    ctx.args.optim = OptimizerNames.APOLLO_ADAMW_LAYERWISE if cfg.layerwise else OptimizerNames.APOLLO_ADAMW
    targets = cfg.target_modules
    ctx.args.optim_target_modules = "all-linear" if targets == ["all-linear"] else list(targets)
    ctx.args.optim_args = cfg.optim_args()
    return MethodParts(ctx.model)  # the Trainer builds APOLLOAdamW from these arguments


def memory_options(cfg) -> dict:
    """Counted as GaLore: rank-r moments of the projected gradients on the decoder linears, full-rank AdamW
    elsewhere; its random projection needs no SVD workspace (the randomized range finder's small one)."""
    return {"rank": cfg.sections["apollo"].rank, "basis_method": "randomized"}


METHOD = Method(name="apollo", summary="all parameters, APOLLO's random-projection scaled AdamW (optional extra)",
                build=build, sections={"apollo": ApolloConfig}, preflight=_preflight, extras=("apollo",),
                memory=MemoryProfile(lowrank=True, projected_state=True, options=memory_options))
