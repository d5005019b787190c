"""ZOO-Prune: projector sensitivity by zeroth-order estimation, plus sensitivity-aware diverse selection.

Paper: Kim et al., "Training-Free Token Pruning via Zeroth-Order Gradient Estimation in
Vision-Language Models" (ZOO-Prune), arXiv 2509.24837 (https://arxiv.org/abs/2509.24837),
code AIM-SKKU/ZOO-Prune. Written from the paper's equations.

A token matters if the multimodal projector reacts strongly to small changes of it:
``S(x) = E_u ||J(x) u||`` over random unit directions ``u``, estimated with central differences of the
projector. Selection (SADS) then greedily trades sensitivity against diversity of the projected tokens.
Two deviations from the released code, both for correctness: differences run in fp32 (in fp16 the step
``h u`` is below the activations' resolution), and an exact closed form is offered for MLP projectors.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from owlore.pruning.divprune import cosine_similarity_matrix, greedy_flops, greedy_max_min
from owlore.pruning.registry import PruningMethod, SelectionContext, register

__all__ = [
    "activation_derivative",
    "mlp_jacobian_kernel",
    "random_unit_directions",
    "sads_select",
    "zoo_sensitivity",
    "zoo_sensitivity_exact",
]


def random_unit_directions(num: int, dim: int, *, generator: torch.Generator) -> torch.Tensor:
    """``num`` Gaussian directions normalised to unit length, fp32, shared by all tokens."""
    u = torch.randn(num, dim, generator=generator, device=generator.device)
    return F.normalize(u, dim=-1)


def zoo_sensitivity(
    projector: Callable[[torch.Tensor], torch.Tensor],
    features: torch.Tensor,
    *,
    directions: torch.Tensor,
    step: float = 0.01,
    chunk_size: int = 4,
) -> torch.Tensor:
    """Zeroth-order sensitivity ``S(i) = mean_j ||M(x_i + h u_j) - M(x_i - h u_j)|| / 2h``.

    Args:
        projector: The multimodal projector ``M``; it must accept fp32 input of shape ``(..., d_v)``.
        features: ``(batch, N, d_v)`` pre-projector visual features.
        directions: ``(m, d_v)`` unit directions (see :func:`random_unit_directions`).
        step: Finite-difference step ``h``.
        chunk_size: Directions evaluated per projector call; bounds memory at
            ``batch * N * chunk_size * (d_v + d_l)`` floats per side.

    Returns:
        ``(batch, N)`` fp32 sensitivities.
    """
    x = features.float()[:, :, None, :]
    total = torch.zeros(features.shape[:2], device=features.device)
    for start in range(0, directions.shape[0], chunk_size):
        delta = step * directions[start : start + chunk_size].float()
        diff = projector(x + delta) - projector(x - delta)
        total += diff.float().norm(dim=-1).sum(dim=-1) / (2.0 * step)
    return total / directions.shape[0]


def activation_derivative(
    activation: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor
) -> torch.Tensor:
    """Elementwise derivative of an elementwise activation via one forward-mode product with ones."""
    return torch.func.jvp(activation, (z,), (torch.ones_like(z),))[1]


def mlp_jacobian_kernel(weight1: torch.Tensor, weight2: torch.Tensor) -> torch.Tensor:
    """``K = (W2^T W2) * (W1 W1^T)`` (Hadamard), so that ``||J(x)||_F^2 = g'^T K g'``.

    For ``M(x) = W2 act(W1 x + b1) + b2`` the Jacobian is ``W2 diag(g') W1`` with
    ``g' = act'(W1 x + b1)``. ``K`` depends only on the weights: compute it once per model.

    Args:
        weight1: ``(hidden, d_v)`` first linear weight.
        weight2: ``(d_l, hidden)`` second linear weight.

    Returns:
        ``(hidden, hidden)`` fp32 kernel.
    """
    w1, w2 = weight1.float(), weight2.float()
    return (w2.T @ w2) * (w1 @ w1.T)


def zoo_sensitivity_exact(
    features: torch.Tensor,
    *,
    weight1: torch.Tensor,
    bias1: torch.Tensor | None,
    activation: Callable[[torch.Tensor], torch.Tensor],
    kernel: torch.Tensor,
) -> torch.Tensor:
    """Exact RMS sensitivity ``sqrt(E_u ||J u||^2) = ||J||_F / sqrt(d_v)`` of an MLP projector.

    This is the ``m -> inf, h -> 0`` limit of the second moment the estimator samples; it ranks tokens
    like :func:`zoo_sensitivity` (which averages ``||J u||`` rather than its square) while costing one
    first-layer pass plus a ``hidden x hidden`` quadratic form per token.

    Args:
        features: ``(batch, N, d_v)`` pre-projector features.
        weight1: ``(hidden, d_v)`` first linear weight.
        bias1: ``(hidden,)`` first linear bias, or ``None``.
        activation: The elementwise activation between the linears.
        kernel: :func:`mlp_jacobian_kernel` of the projector weights.

    Returns:
        ``(batch, N)`` fp32 sensitivities.
    """
    z = F.linear(features.float(), weight1.float(), None if bias1 is None else bias1.float())
    g = activation_derivative(activation, z)
    quad = torch.einsum("bnh,bnh->bn", g @ kernel, g)
    return (quad.clamp_min(0.0) / features.shape[-1]).sqrt()


def sads_select(sensitivity: torch.Tensor, projected: torch.Tensor, k: int) -> torch.Tensor:
    """Sensitivity-aware diverse selection (SADS) of ZOO-Prune.

    Sensitivities are min-max normalised per image; the first pick is the most sensitive token, each
    next pick maximises ``S_hat(i) * min_j (1 - cos(z_i, z_j))`` over the kept set (a product, so there is
    no weighting hyper-parameter).

    Args:
        sensitivity: ``(batch, N)`` raw sensitivities.
        projected: ``(batch, N, d_l)`` projected tokens (diversity is measured after the projector).
        k: Tokens to keep per image.

    Returns:
        ``(batch, k)`` sorted indices.
    """
    s = sensitivity.float()
    low, high = s.min(dim=-1, keepdim=True).values, s.max(dim=-1, keepdim=True).values
    s_hat = (s - low) / (high - low + 1e-8)
    return greedy_max_min(cosine_similarity_matrix(projected), k, first=s_hat.argmax(dim=-1), weight=s_hat)


def _fp32_call(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """Call ``module`` with fp32 parameters (a no-op for fp32 models) so finite differences resolve."""
    if all(p.dtype == torch.float32 for p in module.parameters()):
        return module
    params = {name: p.float() for name, p in module.named_parameters()}
    return lambda x: torch.func.functional_call(module, params, (x,))


def _select_zoo(ctx: SelectionContext) -> torch.Tensor:
    features = ctx.enc.features
    directions = random_unit_directions(ctx.options.get("num_directions", 16), features.shape[-1],
                                        generator=ctx.seeded_generator())
    sensitivity = zoo_sensitivity(_fp32_call(ctx.projector), features, directions=directions,
                                  step=ctx.options.get("step", 0.01), chunk_size=ctx.options.get("chunk_size", 4))
    return sads_select(sensitivity, ctx.projected, ctx.k)


def _select_zoo_exact(ctx: SelectionContext) -> torch.Tensor:
    linear_1, act, linear_2 = (getattr(ctx.projector, name) for name in ("linear_1", "act", "linear_2"))
    # The kernel depends only on the weights: recompute it only when they change (in-place optimizer steps bump
    # the tensors' version counters).
    key = (linear_1.weight.data_ptr(), linear_1.weight._version, linear_2.weight.data_ptr(), linear_2.weight._version)
    cached = ctx.cache.get("zoo_exact_kernel")
    if cached is None or cached[0] != key:
        cached = ctx.cache["zoo_exact_kernel"] = (key, mlp_jacobian_kernel(linear_1.weight, linear_2.weight))
    sensitivity = zoo_sensitivity_exact(ctx.enc.features, weight1=linear_1.weight, bias1=linear_1.bias,
                                        activation=act, kernel=cached[1])
    return sads_select(sensitivity, ctx.projected, ctx.k)


def _zoo_flops(k: int, vision, options) -> float:
    from owlore.pruning.flops import zoo_estimator_flops

    n = vision.tokens - 1
    return (zoo_estimator_flops(n, vision, directions=options.get("num_directions", 16))
            + greedy_flops(k, n, vision.lm_hidden))


def _zoo_exact_flops(k: int, vision, options) -> float:
    from owlore.pruning.flops import zoo_exact_flops

    n = vision.tokens - 1
    return zoo_exact_flops(n, vision) + greedy_flops(k, n, vision.lm_hidden)


_PAPER = "[arXiv 2509.24837](https://arxiv.org/abs/2509.24837)"
register(PruningMethod(
    name="zoo", select=_select_zoo, needs=frozenset({"projected"}), flops=_zoo_flops, paper=_PAPER,
    summary="ZOO-Prune: projector sensitivity by central differences (fp32) + sensitivity-aware diverse selection",
    options=("num_directions", "step", "chunk_size"),
))
register(PruningMethod(
    name="zoo_exact", select=_select_zoo_exact, needs=frozenset({"projected", "mlp_projector"}),
    flops=_zoo_exact_flops, paper=_PAPER,
    summary="ZOO-Prune's sensitivity in closed form for an MLP projector (32x fewer FLOPs than m = 16), same selection",
))
