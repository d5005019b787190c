"""OwLore (arXiv 2405.18380, https://arxiv.org/abs/2405.18380): outlier-weighted layer sampling + GaLore.

γ decoder layers, drawn with probabilities from their outlier ratios (OWL's LOD), train at a time and are
re-drawn every K optimizer steps; their linears take GaLore low-rank steps inside ``GaLoreAdamW``.
"""

from __future__ import annotations

from owlore.config import OwLoreConfig
from owlore.methods.base import LAYER_STATE_FILE, BuildContext, Method, MethodParts, adam_kwargs


def build(ctx: BuildContext) -> MethodParts:
    from owlore.callback import OwLoreCallback
    from owlore.trainer import create_owlore_optimizer

    config: OwLoreConfig = ctx.section("owlore")
    optimizer = create_owlore_optimizer(ctx.model, config, **adam_kwargs(ctx.args),
                                        **ctx.section("optimizer").optimizer_kwargs())
    callback = OwLoreCallback(config, tokenizer=ctx.tokenizer)
    return MethodParts(ctx.model, optimizer, [callback], layer_callback=callback)


def preflight(cfg, num_layers: int) -> list[str]:
    gamma = cfg.sections["owlore"].gamma
    return [] if gamma <= num_layers else [f"owlore.gamma={gamma}: the model has only {num_layers} decoder layers; "
                                           f"set owlore.gamma <= {num_layers}"]


METHOD = Method(
    name="owlore",
    summary="γ outlier-weighted sampled layers, re-drawn every K steps, GaLore low-rank steps (ours)",
    build=build,
    sections={"owlore": OwLoreConfig},
    own_optimizer=True,
    preflight=preflight,
    state_files=(LAYER_STATE_FILE,),
)
