"""Training-free visual-token pruning for vision-language models (LLaVA in transformers 5.x).

Methods live in a registry (``owlore.pruning.registry``): one module per method, one ``register`` call each.
``VisualTokenPruner(method, keep).prepare(model, input_ids=..., pixel_values=..., ...)`` returns inputs
for ``model(**inputs)`` / ``model.generate(**inputs)`` with fewer visual tokens. The scoring and
selection functions work on plain tensors and are exported for reuse.
"""

from owlore.pruning.divprune import cosine_similarity_matrix, divprune_select, greedy_max_min
from owlore.pruning.fopru import fopru_rank_select, fopru_row_select, fopru_significance
from owlore.pruning.pruner import Method, VisualTokenPruner
from owlore.pruning.registry import (
    PruningMethod,
    Selection,
    SelectionContext,
    get_method,
    method_names,
    register,
)
from owlore.pruning.select import random_scores, resolve_keep, topk_select
from owlore.pruning.sequence import shrink_sequences
from owlore.pruning.support import support_table
from owlore.pruning.vit_attention import capture_qk, cls_attention_scores, head_mean_attention
from owlore.pruning.zoo import (
    mlp_jacobian_kernel,
    random_unit_directions,
    sads_select,
    zoo_sensitivity,
    zoo_sensitivity_exact,
)

__all__ = [
    "Method",
    "PruningMethod",
    "Selection",
    "SelectionContext",
    "get_method",
    "method_names",
    "register",
    "support_table",
    "VisualTokenPruner",
    "capture_qk",
    "cls_attention_scores",
    "cosine_similarity_matrix",
    "divprune_select",
    "fopru_rank_select",
    "fopru_row_select",
    "fopru_significance",
    "greedy_max_min",
    "head_mean_attention",
    "mlp_jacobian_kernel",
    "random_scores",
    "random_unit_directions",
    "resolve_keep",
    "sads_select",
    "shrink_sequences",
    "topk_select",
    "zoo_sensitivity",
    "zoo_sensitivity_exact",
]
