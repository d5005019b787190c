"""LISA (arXiv 2403.17919, https://arxiv.org/abs/2403.17919): γ uniformly sampled layers, full-rank AdamW.

LMFlow's semantics: layers re-drawn uniformly every K optimizer steps, embeddings, head and final norm always
train. Unlike LMFlow, the Adam state of a layer that is switched off is freed (``state_policy: reset``), so state
memory stays O(γ); ``state_policy: keep`` reproduces the original's growth.
"""

from __future__ import annotations

from dataclasses import dataclass

from owlore.methods.base import (
    LAYER_STATE_FILE,
    BuildContext,
    MemoryProfile,
    Method,
    MethodParts,
    layer_count_problems,
    layer_switching_parts,
)
from owlore.run.config import STATE_POLICIES, OwLoreConfig


@dataclass
class LisaConfig:
    """LISA's knobs (defaults: LMFlow's ``lisa_activated_layers=2``, ``lisa_interval_steps=20``)."""

    gamma: int = 2
    """Decoder layers trained at once."""
    interval: int = 20
    """Optimizer steps between re-draws (K)."""
    state_policy: str = "reset"
    """Adam state of a switched-off layer: reset (freed), keep (LMFlow's behaviour), offload (to CPU)."""
    seed: int = 0
    """Seed of the sampler's own generator."""
    train_embeddings: bool = True
    train_lm_head: bool = True
    train_norms: bool = True
    layers_path: str | None = None
    """Attribute path of the decoder layers when auto-discovery fails."""

    def problems(self, prefix: str = "lisa.") -> list[str]:
        out = []
        if self.gamma < 1:
            out.append(f"{prefix}gamma={self.gamma}: must be >= 1 (LMFlow's default: 2)")
        if self.interval < 1:
            out.append(f"{prefix}interval={self.interval}: must be >= 1 (LMFlow's default: 20)")
        if self.state_policy not in STATE_POLICIES:
            out.append(f"{prefix}state_policy={self.state_policy!r}: must be one of {', '.join(STATE_POLICIES)}")
        return out

    def sampling_config(self) -> OwLoreConfig:
        """The same schedule in the layer-sampling callback's terms: uniform draws, no projection."""
        return OwLoreConfig(gamma=self.gamma, interval=self.interval, mode="uniform", rank=None,
                            state_policy=self.state_policy, seed=self.seed, train_embeddings=self.train_embeddings,
                            train_lm_head=self.train_lm_head, train_norms=self.train_norms,
                            layers_path=self.layers_path)


def build(ctx: BuildContext) -> MethodParts:
    # rank=None: no group is projected, so GaLoreAdamW is torch.optim.AdamW op for op (tested)
    return layer_switching_parts(ctx, ctx.section("lisa").sampling_config())


def preflight(cfg, num_layers: int) -> list[str]:
    return layer_count_problems("lisa.gamma", cfg.sections["lisa"].gamma, num_layers)


def memory_options(cfg) -> dict:
    """The estimator's keywords from the ``lisa`` section (``owlore.memory.plan.Options``)."""
    s = cfg.sections["lisa"]
    return dict(gamma=s.gamma, rank=None, state_policy=s.state_policy, train_embeddings=s.train_embeddings,
                train_lm_head=s.train_lm_head, train_norms=s.train_norms)


METHOD = Method(
    name="lisa",
    summary="γ uniformly sampled layers + embeddings/head, full-rank AdamW, state freed on a switch",
    build=build,
    sections={"lisa": LisaConfig},
    own_optimizer=True,
    preflight=preflight,
    state_files=(LAYER_STATE_FILE,),
    switches_layers=True,
    seed_key="lisa.seed",
    vision=True,
    fsdp2=True,
    memory=MemoryProfile(trains="sampled", options=memory_options),
)
