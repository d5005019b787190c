"""Full fine-tuning: every parameter trains with the Trainer's optimizer (``training.optim``: adamw_torch,
adamw_bnb_8bit, adafactor, ...), the reference every memory-saving method is measured against."""

from __future__ import annotations

from owlore.methods.base import BuildContext, Method, MethodParts


def build(ctx: BuildContext) -> MethodParts:
    for p in ctx.model.parameters():
        if p.is_floating_point():
            p.requires_grad_(True)
    return MethodParts(ctx.model)


METHOD = Method(name="full", summary="all parameters, the Trainer's optimizer (training.optim)", build=build,
                vision=True, zero_stages=(0, 1, 2, 3), fsdp2=True)
