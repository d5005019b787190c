"""GaLore (arXiv 2403.03507, https://arxiv.org/abs/2403.03507): every decoder linear takes low-rank steps.

No layer sampling: all layers train, each 2-D weight of the targeted linears keeps Adam moments in a rank-r
gradient subspace refreshed by an SVD every ``update_proj_gap`` steps (galore-torch semantics; ``GaLoreAdamW`` is
tested against galore-torch). Everything else (embeddings, head, norms) takes full-rank AdamW steps.
"""

from __future__ import annotations

from dataclasses import dataclass

from owlore.methods.base import BuildContext, MemoryProfile, Method, MethodParts, adam_kwargs
from owlore.run.config import PROJ_TYPES


@dataclass
class GaLoreConfig:
    """GaLore's knobs (defaults: the GaLore repository's 128 / 200 / 0.25 / std)."""

    rank: int = 128
    """Rank of the gradient subspace (clamped per matrix to min(m, n))."""
    update_proj_gap: int = 200
    """Steps between SVD refreshes of the basis."""
    scale: float = 0.25
    """Multiplier of the back-projected update (α)."""
    proj_type: str = "std"
    """std, reverse_std, left or right."""
    convention: str = "torch"
    """torch (torch.optim.AdamW's eps/decay order) or hf (galore-torch's)."""
    basis_method: str = "svd"
    """svd (GaLore's full SVD) or randomized (warm-started range finder)."""
    power_iters: int = 2
    """Subspace iterations of the randomized range finder."""
    target_modules: str | list[str] = "decoder-linear"
    """decoder-linear, all-linear, or regexes fullmatched against module names."""
    layers_path: str | None = None
    """Attribute path of the decoder layers when auto-discovery fails."""

    def problems(self, prefix: str = "galore.") -> list[str]:
        out = []
        if self.rank < 1:
            out.append(f"{prefix}rank={self.rank}: must be >= 1 (GaLore's default: 128)")
        if self.update_proj_gap < 1:
            out.append(f"{prefix}update_proj_gap={self.update_proj_gap}: must be >= 1 (default 200)")
        if not self.scale > 0:
            out.append(f"{prefix}scale={self.scale}: must be > 0 (default 0.25)")
        if self.proj_type not in PROJ_TYPES:
            out.append(f"{prefix}proj_type={self.proj_type!r}: must be one of {', '.join(PROJ_TYPES)}")
        if self.convention not in ("torch", "hf"):
            out.append(f"{prefix}convention={self.convention!r}: must be torch or hf")
        if self.basis_method not in ("svd", "randomized"):
            out.append(f"{prefix}basis_method={self.basis_method!r}: must be svd or randomized")
        if self.power_iters < 0:
            out.append(f"{prefix}power_iters={self.power_iters}: must be >= 0")
        return out


def build(ctx: BuildContext) -> MethodParts:
    from owlore.memory.in_backward import in_backward_callbacks, in_backward_kwargs
    from owlore.optim.galore_adamw import GaLoreAdamW, make_param_groups

    c: GaLoreConfig = ctx.section("galore")
    kw = adam_kwargs(ctx.args)
    groups = make_param_groups(ctx.model, target_modules=c.target_modules, rank=c.rank,
                               update_proj_gap=c.update_proj_gap, scale=c.scale, proj_type=c.proj_type,
                               basis_method=c.basis_method, power_iters=c.power_iters,
                               weight_decay=kw.pop("weight_decay"), layers_path=c.layers_path,
                               **ctx.section("optimizer").group_options())
    section = ctx.section("optimizer")
    extra = in_backward_kwargs(section.update_in_backward, ctx.args)
    optimizer_cls = extra.pop("optimizer_cls", GaLoreAdamW)
    optimizer = optimizer_cls(groups, **kw, convention=c.convention, **section.optimizer_kwargs(), **extra)
    return MethodParts(ctx.model, optimizer, in_backward_callbacks(optimizer))


def memory_options(cfg) -> dict:
    """The estimator's keywords from the ``galore`` section."""
    s = cfg.sections["galore"]
    return {"rank": s.rank, "basis_method": s.basis_method}


METHOD = Method(
    name="galore",
    summary="all layers, GaLore low-rank steps on every decoder linear (no sampling)",
    build=build,
    sections={"galore": GaLoreConfig},
    own_optimizer=True,
    vision=True,
    fsdp2=True,
    memory=MemoryProfile(lowrank=True, options=memory_options),
)
