"""OwLore (arXiv 2405.18380, https://arxiv.org/abs/2405.18380): outlier-weighted layer sampling + GaLore.

γ decoder layers, drawn with probabilities from their outlier ratios (OWL's LOD), train at a time and are
re-drawn every K optimizer steps; their linears take GaLore low-rank steps inside ``GaLoreAdamW``.
"""

from __future__ import annotations

from owlore.methods.base import (
    LAYER_STATE_FILE,
    BuildContext,
    MemoryProfile,
    Method,
    MethodParts,
    layer_count_problems,
    layer_switching_parts,
)
from owlore.run.config import OwLoreConfig


def build(ctx: BuildContext) -> MethodParts:
    return layer_switching_parts(ctx, ctx.section("owlore"))


def preflight(cfg, num_layers: int) -> list[str]:
    return layer_count_problems("owlore.gamma", cfg.sections["owlore"].gamma, num_layers)


def memory_options(cfg) -> dict:
    """The estimator's keywords from the ``owlore`` section (``owlore.memory.plan.Options``)."""
    s = cfg.sections["owlore"]
    return dict(gamma=s.gamma, rank=s.rank, state_policy=s.state_policy, train_embeddings=s.train_embeddings,
                train_lm_head=s.train_lm_head, train_norms=s.train_norms, basis_method=s.basis_method)


METHOD = Method(
    name="owlore",
    summary="γ outlier-weighted sampled layers, re-drawn every K steps, GaLore low-rank steps (ours)",
    build=build,
    sections={"owlore": OwLoreConfig},
    own_optimizer=True,
    preflight=preflight,
    state_files=(LAYER_STATE_FILE,),
    switches_layers=True,
    seed_key="owlore.seed",
    vision=True,
    fsdp2=True,
    memory=MemoryProfile(trains="sampled", lowrank=True, options=memory_options),
)
