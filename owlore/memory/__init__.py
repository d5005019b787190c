"""Memory: what a run costs, and the options that make it cost less.

- ``estimator``: ``estimate(...)`` breaks a run's peak into weights, gradients, optimizer state, activations,
  logits and temporaries from the model config alone (``python -m owlore.memory --config ...``).
- ``probe``: live tensor bytes by kind during a real run (``memory.profile``; ``eval/bench.py``).
- ``chunked_loss``: output head + cross-entropy in chunks, never the full logits (``memory.chunked_loss``).
- ``in_backward``: each tensor steps inside backward, so trained gradients never coexist
  (``optimizer.update_in_backward``).
- ``checkpoint_policy``: activation checkpointing of the frozen layers only (``memory.checkpointing=frozen``).
- ``int8_frozen``: frozen decoder layers as int8 on the device, exact weights on the host
  (``memory.frozen_weights=int8``).
- ``offload_activations``: checkpointed layer inputs in host memory (``memory.offload_activations``).
- ``sparse_embedding``: the input embedding's gradient as its batch's rows only (``memory.sparse_embedding_grad``).
- ``option``: ``MemoryOption``, the declaration each of those modules exports as ``OPTION`` (its values,
  conflicts, what it applies, how the estimator counts it); ``options``: the registry of them, which the config
  checks, ``train.py`` and the estimator read (``register`` adds one from outside owlore).
"""

from owlore.memory.estimator import MemoryEstimate, Options, estimate, estimate_run
from owlore.memory.shapes import ModelShape, load_model_shape

__all__ = ["MemoryEstimate", "ModelShape", "Options", "estimate", "estimate_run", "load_model_shape"]
