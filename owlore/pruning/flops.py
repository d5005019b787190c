"""Analytic FLOPs and KV-cache sizes for pruned VLM inference.

Two prefill conventions are reported side by side, because papers differ:

* **peer** (FastV paper; DivPrune's ``tflops.py``): ``4nd^2 + 2n^2d + 2ndm`` per layer. It is roughly a
  multiply-accumulate count and treats the FFN as two matrices, so it undercounts a SwiGLU LLM ~2.5x.
* **exact**: ``2n(2d^2 + 2d d_kv + 3dm) + 4n^2 d`` per layer (multiply and add counted, SwiGLU's three
  matrices, K/V projections shrunk by grouped-query attention; ``d_kv = d * kv_heads / heads``). With
  ``kv_heads == heads`` this is the familiar ``2n(4d^2 + 3dm) + 4n^2 d``. The attention term counts the
  full ``n x n`` score and value products (no causal halving), as peers do. Norms, RoPE, softmax and
  the LM head are left out.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

__all__ = [
    "LMShape",
    "VisionShape",
    "decode_flops_exact",
    "kv_cache_bytes",
    "prefill_flops_exact",
    "prefill_flops_peer",
    "pruned_prefill_flops",
    "pruned_prompt_cost",
    "projector_flops",
    "selection_flops",
    "vision_flops",
    "zoo_estimator_flops",
    "zoo_exact_flops",
]


@dataclass(frozen=True)
class LMShape:
    """Shape of a Llama-style language model (defaults: LLaVA-1.5-7B / Vicuna-7B)."""

    hidden: int = 4096
    ffn: int = 11008
    layers: int = 32
    heads: int = 32
    kv_heads: int = 32

    @property
    def kv_dim(self) -> int:
        """Width of the K (or V) projection: ``hidden * kv_heads / heads``."""
        return self.hidden * self.kv_heads // self.heads


@dataclass(frozen=True)
class VisionShape:
    """Shape of a ViT vision tower and LLaVA MLP projector (defaults: CLIP-L/336 + mlp2x_gelu to 4096)."""

    hidden: int = 1024
    ffn: int = 4096
    layers: int = 24
    heads: int = 16
    tokens: int = 577
    lm_hidden: int = 4096


def prefill_flops_peer(n: int, lm: LMShape) -> float:
    """Peers' prefill FLOPs ``T (4nd^2 + 2n^2 d + 2ndm)`` for ``n`` prompt tokens."""
    d, m = lm.hidden, lm.ffn
    return float(lm.layers * (4 * n * d * d + 2 * n * n * d + 2 * n * d * m))


def prefill_flops_exact(n: int, lm: LMShape) -> float:
    """Exact prefill FLOPs ``T (2n(2d^2 + 2 d d_kv + 3dm) + 4n^2 d)``, GQA-aware."""
    d, m = lm.hidden, lm.ffn
    linear = 2 * n * (2 * d * d + 2 * d * lm.kv_dim + 3 * d * m)
    return float(lm.layers * (linear + 4 * n * n * d))


def pruned_prompt_cost(cost: Callable[[int, LMShape], float], method: str, *, text_tokens: int, visual_tokens: int,
                       kept: int, lm: LMShape, layer: int | None = None, kept_after: int | None = None) -> float:
    """``cost(tokens, lm)`` (prefill FLOPs in either convention, KV-cache bytes, ...) of a prompt of ``text_tokens`` +
    ``visual_tokens`` when ``method`` keeps ``kept`` visual tokens: methods that prune before the LLM run every layer
    on the short prompt; LLM-stage methods (FastV, DART) run layers ``< K`` on the whole prompt and the rest on the
    short one (``layer`` = K, default the method's); a two-stage method (``kept_after`` given: VScan with
    ``stage2_keep``) runs layers ``< K`` on ``kept`` visual tokens and the rest on ``kept_after``."""
    from owlore.pruning.registry import get_method

    spec = get_method(method)
    if spec.stage == "vision" and kept_after is not None:
        k_layer = lm.layers // 2 if layer is None else layer
        return (cost(text_tokens + kept, replace(lm, layers=k_layer))
                + cost(text_tokens + kept_after, replace(lm, layers=lm.layers - k_layer)))
    if spec.stage == "vision":
        return cost(text_tokens + kept, lm)
    k_layer = spec.default_layer if layer is None else layer
    return (cost(text_tokens + visual_tokens, replace(lm, layers=k_layer))
            + cost(text_tokens + kept, replace(lm, layers=lm.layers - k_layer)))


def pruned_prefill_flops(method: str, *, text_tokens: int, visual_tokens: int, kept: int, lm: LMShape,
                         layer: int | None = None, kept_after: int | None = None) -> float:
    """Exact prefill FLOPs of a pruned prompt (:func:`pruned_prompt_cost` of :func:`prefill_flops_exact`)."""
    return pruned_prompt_cost(prefill_flops_exact, method, text_tokens=text_tokens, visual_tokens=visual_tokens,
                              kept=kept, lm=lm, layer=layer, kept_after=kept_after)


def decode_flops_exact(kv_len: int, lm: LMShape) -> float:
    """FLOPs of one decode step attending to ``kv_len`` cached tokens (same convention as the exact prefill)."""
    d, m = lm.hidden, lm.ffn
    return float(lm.layers * (2 * (2 * d * d + 2 * d * lm.kv_dim + 3 * d * m) + 4 * kv_len * d))


def kv_cache_bytes(seq_len: int, lm: LMShape, *, bytes_per_element: int = 2, batch: int = 1) -> int:
    """KV-cache size ``2 (K and V) * L * layers * kv_heads * head_dim * bytes`` (fp16 by default)."""
    return 2 * batch * seq_len * lm.layers * lm.kv_dim * bytes_per_element


def vision_flops(vision: VisionShape) -> float:
    """ViT tower FLOPs: per layer ``2n(4d^2 + 2dm) + 4n^2 d`` (GELU MLP has two matrices)."""
    n, d, m = vision.tokens, vision.hidden, vision.ffn
    return float(vision.layers * (2 * n * (4 * d * d + 2 * d * m) + 4 * n * n * d))


def projector_flops(n: int, vision: VisionShape) -> float:
    """Two-layer MLP projector on ``n`` tokens: ``2n(d_v d_l + d_l^2)``."""
    return float(2 * n * (vision.hidden * vision.lm_hidden + vision.lm_hidden**2))


def zoo_estimator_flops(n: int, vision: VisionShape, *, directions: int) -> float:
    """ZOO-Prune central differences: two projector passes per token and direction."""
    return 2 * directions * projector_flops(n, vision)


def zoo_exact_flops(n: int, vision: VisionShape, *, include_kernel: bool = False) -> float:
    """Closed-form sensitivity: first linear ``2n d_v h`` + quadratic form ``2n h^2``.

    The ``h x h`` kernel ``(W2^T W2) * (W1 W1^T)`` costs ``2h^2(d_l + d_v)`` once per set of weights and
    is cached, so it is excluded unless ``include_kernel``.
    """
    h, dv, dl = vision.lm_hidden, vision.hidden, vision.lm_hidden
    per_call = 2 * n * dv * h + 2 * n * h * h
    return float(per_call + (2 * h * h * (dl + dv) if include_kernel else 0))


def selection_flops(method: str, k: int, vision: VisionShape, *, directions: int = 16) -> float:
    """Extra FLOPs a method spends choosing ``k`` tokens, beyond the unpruned LLaVA pipeline (the method's
    registered cost, ``owlore.pruning.registry``).

    Projecting all ``N`` tokens is part of the unpruned pipeline, so it is not counted for methods that
    need it (ZOO, DivPrune); methods that prune before the projector even save it (see
    :func:`projector_flops`). Greedy selections cost ``2 N d_l`` per pick.

    Raises:
        ValueError: On an unknown method.
    """
    from owlore.pruning.registry import get_method

    return float(get_method(method).flops(k, vision, {"num_directions": directions}))
