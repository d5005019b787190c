"""The optimizer: GaLoreAdamW and what it is made of.

``galore_adamw`` (the optimizer: AdamW on full-rank tensors, GaLore's projected moments on the low-rank ones,
per-layer state that can be dropped or moved), ``adamw`` (the update maths, torch's and the papers' conventions),
``projector`` (GaLore bases: SVD, randomized, rank/side), ``quant_state`` / ``factored`` (8-bit and factored
states), ``param_groups`` (which tensors go low-rank), ``state`` (sizing, dropping and moving optimizer state),
``host`` (grouped host reads).
"""

from owlore.optim.adamw import adamw_update
from owlore.optim.galore_adamw import GaLoreAdamW, create_galore_optimizer
from owlore.optim.param_groups import make_param_groups

__all__ = ["GaLoreAdamW", "adamw_update", "create_galore_optimizer", "make_param_groups"]
