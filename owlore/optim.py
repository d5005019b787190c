"""GaLoreAdamW: AdamW whose 2-D weights can take their steps in a low-rank gradient subspace.

GaLore (arXiv 2403.03507, https://arxiv.org/abs/2403.03507): per weight, keep Adam moments for the projected
gradient ``R = Pᵀ G`` (or ``G Qᵀ``), refresh the basis from an SVD every ``update_proj_gap`` steps, and apply
``W <- W - lr · scale · backproject(N)``. OwLore (arXiv 2405.18380, https://arxiv.org/abs/2405.18380) uses it on the
sampled decoder layers, so this optimizer can also drop, move and measure the state of given parameters.

Math lives in the pure function ``adamw_update`` (like torchao's ``single_param_adam``); the class only does
bookkeeping. State holds tensors and ints only, so ``torch.load(path, weights_only=True)`` restores it.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from owlore.layers import find_decoder_layers, linear_modules
from owlore.projector import (
    LEFT,
    PROJ_TYPES,
    choose_side,
    compute_basis,
    project,
    project_back,
    projected_shape,
)

logger = logging.getLogger(__name__)

Convention = Literal["torch", "hf"]
GALORE_GROUP_DEFAULTS: dict[str, Any] = {"update_proj_gap": 200, "scale": 0.25, "proj_type": "std"}


def adamw_update(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: int,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    convention: Convention = "torch",
    basis: Tensor | None = None,
    side: int = LEFT,
    scale: float = 1.0,
) -> None:
    """One AdamW step for one parameter, in the GaLore subspace if ``basis`` is given (updates tensors in place).

    ``convention="torch"`` is ``torch.optim.AdamW`` op for op (bias-corrected moments, eps added after the bias
    correction, decoupled decay ``p *= 1 - lr·wd`` before the update), so full-rank params match it bit for bit.
    ``convention="hf"`` is the HF/galore-torch AdamW used by the official OwLore code (eps added before the bias
    correction, decay applied to the already-updated weight), kept to reproduce published runs.

    Args:
        param: the weight, updated in place.
        grad: its full-size gradient.
        exp_avg: first moment, shaped like the (projected) gradient.
        exp_avg_sq: second moment, same shape.
        step: this step's 1-based count for bias correction.
        lr: learning rate.
        beta1: first-moment decay.
        beta2: second-moment decay.
        eps: denominator epsilon.
        weight_decay: decoupled weight decay.
        convention: ``"torch"`` or ``"hf"`` (see above).
        basis: GaLore basis, or None for plain AdamW.
        side: ``projector.LEFT`` or ``projector.RIGHT``.
        scale: GaLore scale applied to the back-projected update.
    """
    hf = convention == "hf"
    if weight_decay != 0 and not hf:
        param.mul_(1 - lr * weight_decay)
    if basis is not None:
        grad = project(grad, basis, side)
    if hf:
        exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
    else:
        exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    if hf:
        step_size = lr * math.sqrt(bias_correction2) / bias_correction1
        denom = exp_avg_sq.sqrt().add_(eps)
    else:
        step_size = lr / bias_correction1
        denom = (exp_avg_sq.sqrt() / bias_correction2**0.5).add_(eps)
    if basis is None and not hf:
        param.addcdiv_(exp_avg, denom, value=-step_size)
    else:
        direction = exp_avg / denom
        if basis is not None:
            direction = project_back(direction, basis, side, scale)
        param.add_(direction, alpha=-step_size)
    if weight_decay != 0 and hf:
        param.add_(param, alpha=-lr * weight_decay)


class GaLoreAdamW(torch.optim.Optimizer):
    """AdamW with GaLore projection for param groups that carry ``rank``.

    Groups with ``rank`` (plus optional ``update_proj_gap``, ``scale``, ``proj_type`` in ``std`` / ``reverse_std``
    / ``left`` / ``right``; defaults 200 / 0.25 / ``std``) project their 2-D weights; the rank is clamped to
    ``min(m, n)``. Non-2-D params in such groups (biases, norms) get plain AdamW, since a vector has no low-rank
    subspace worth projecting onto. Groups without ``rank`` behave exactly like ``torch.optim.AdamW``.

    The basis is recomputed on a param's first step and then every ``update_proj_gap`` of *its own* steps (steps
    with ``grad is None`` do not count, so frozen layers keep their schedule). Moments carry over a basis refresh
    unchanged, as in GaLore. If the gradient is non-finite or the SVD fails, the previous basis is kept and a
    warning is logged; with no previous basis that param's update is skipped for the step. Finiteness is only
    checked on refresh steps (one host sync per SVD, none per ordinary step); skipping inf/NaN steps in general is
    the job of the loss scaler or the training loop, as with ``torch.optim.AdamW``.

    State per param: ``step`` (int), ``exp_avg``, ``exp_avg_sq`` and, when projected, ``basis`` (tensor) and
    ``side`` (int). ``svd_seconds`` accumulates SVD wall time (not part of the state) for training logs.

    Args:
        params: params or param-group dicts (see ``make_param_groups``).
        lr: learning rate.
        betas: Adam betas.
        eps: Adam epsilon (GaLore/HF default 1e-6; note ``torch.optim.AdamW`` defaults to 1e-8).
        weight_decay: decoupled weight decay.
        convention: ``"torch"`` (default; eps after bias correction, decay before the update, the order
            ``torch.optim.AdamW`` and the OwLore notes recommend) or ``"hf"`` (galore-torch's order, to reproduce
            the official OwLore runs). See ``adamw_update``.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        *,
        convention: Convention = "torch",
    ) -> None:
        for name, value in (("lr", lr), ("eps", eps), ("weight_decay", weight_decay)):
            if not value >= 0.0:
                raise ValueError(f"Invalid {name}: {value}; must be >= 0")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"Invalid betas: {betas}; both must be in [0, 1)")
        self.svd_seconds = 0.0
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, convention=convention)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Fill GaLore defaults into groups with ``rank`` and validate them here, not inside ``step``."""
        if "rank" in param_group:
            for key, value in GALORE_GROUP_DEFAULTS.items():
                param_group.setdefault(key, value)
            where = f"param group {param_group.get('name', len(self.param_groups))!r}"
            rank, gap = param_group["rank"], param_group["update_proj_gap"]
            if not (isinstance(rank, int) and rank >= 1):
                raise ValueError(f"{where}: rank must be a positive int, got {rank!r}")
            if not (isinstance(gap, int) and gap >= 1):
                raise ValueError(f"{where}: update_proj_gap must be a positive int, got {gap!r}")
            if param_group["proj_type"] not in PROJ_TYPES:
                raise ValueError(
                    f"{where}: proj_type must be one of {', '.join(PROJ_TYPES)}, got {param_group['proj_type']!r}"
                )
        convention = param_group.get("convention", self.defaults["convention"])
        if convention not in ("torch", "hf"):
            raise ValueError(f"convention must be 'torch' or 'hf', got {convention!r}")
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Update every param that has a gradient; params with ``grad is None`` are left alone."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group_index, group in enumerate(self.param_groups):
            for index, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("GaLoreAdamW does not support sparse gradients")
                self._step_param(p, group, (group_index, index))
        return loss

    def _step_param(self, p: Tensor, group: dict[str, Any], where: tuple[int, int]) -> None:
        state = self.state[p]
        grad = p.grad
        projected = "rank" in group and p.dim() == 2
        step = state.get("step", 0)
        refresh = projected and ("basis" not in state or step % group["update_proj_gap"] == 0)
        if refresh and not self._refresh_basis(grad, group, state, where):
            if not state:
                del self.state[p]  # a skipped first step leaves no trace; the next step is a first step
            return
        if "exp_avg" not in state:
            shape = projected_shape(grad.shape, state["basis"], state["side"]) if projected else grad.shape
            state["exp_avg"] = torch.zeros(shape, dtype=grad.dtype, device=grad.device)
            state["exp_avg_sq"] = torch.zeros(shape, dtype=grad.dtype, device=grad.device)
        state["step"] = step + 1
        beta1, beta2 = group["betas"]
        adamw_update(
            p,
            grad,
            state["exp_avg"],
            state["exp_avg_sq"],
            state["step"],
            lr=group["lr"],
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            convention=group["convention"],
            basis=state["basis"] if projected else None,
            side=state.get("side", LEFT),
            scale=group["scale"] if projected else 1.0,
        )

    def _refresh_basis(
        self, grad: Tensor, group: dict[str, Any], state: dict[str, Any], where: tuple[int, int]
    ) -> bool:
        """Recompute the basis; on failure keep the old one. Returns False if there is no basis to step with."""
        side = choose_side(group["proj_type"], grad.shape)
        reason = None
        if not bool(torch.isfinite(grad).all()):
            reason = "gradient is not finite"
        else:
            start = time.perf_counter()
            try:
                basis = compute_basis(grad, group["rank"], side)
            except RuntimeError as err:  # torch.linalg.LinAlgError is a RuntimeError
                reason = f"SVD failed ({err})"
            self.svd_seconds += time.perf_counter() - start
        if reason is None:
            state["basis"], state["side"] = basis, side
            return True
        what = f"param {where[1]} {tuple(grad.shape)} of group {group.get('name', where[0])!r}"
        if "basis" in state:
            logger.warning("GaLore basis refresh: %s for %s; keeping the previous basis.", reason, what)
            return True
        logger.warning(
            "GaLore basis refresh: %s for %s and no previous basis; skipping its update.", reason, what
        )
        return False

    def drop_state(self, params: Iterable[Tensor]) -> int:
        """Forget the state of ``params`` (e.g. layers the sampler switched off), so memory stays O(active layers).

        The next step of a dropped param is a first step again: fresh moments, step count 1, new basis.

        Returns:
            The number of state bytes freed.
        """
        params = list(params)
        freed = self.state_bytes(params)
        for p in params:
            self.state.pop(p, None)
        return freed

    def move_state(
        self, params: Iterable[Tensor], device: torch.device | str, *, non_blocking: bool = False
    ) -> None:
        """Move the state tensors of ``params`` to ``device`` (CPU offload of inactive layers and back).

        Move it back to the param's device before that param steps again.
        """
        for p in params:
            state = self.state.get(p)
            if not state:
                continue
            for key, value in state.items():
                if isinstance(value, Tensor):
                    state[key] = value.to(device, non_blocking=non_blocking)

    def state_bytes(self, params: Iterable[Tensor] | None = None) -> int:
        """Bytes held by state tensors (moments and bases) of ``params``, or of all params."""
        states = self.state.values() if params is None else [self.state.get(p, {}) for p in params]
        return sum(v.numel() * v.element_size() for s in states for v in s.values() if isinstance(v, Tensor))


def _output_embedding_ids(model: nn.Module) -> set[int]:
    getter = getattr(model, "get_output_embeddings", None)
    out = getter() if callable(getter) else None
    return {id(out)} if out is not None else set()


def _target_modules(
    model: nn.Module, target_modules: str | Sequence[str], layers_path: str | None
) -> dict[str, nn.Module]:
    """Name -> module of the linears whose weights GaLore projects."""
    linears = dict(linear_modules(model))
    if target_modules == "decoder-linear":
        inside = {
            id(m) for layer in find_decoder_layers(model, layers_path) for _, m in linear_modules(layer)
        }
        return {name: m for name, m in linears.items() if id(m) in inside}
    if target_modules == "all-linear":
        skip = _output_embedding_ids(model)
        return {n: m for n, m in linears.items() if id(m) not in skip and n.rsplit(".", 1)[-1] != "lm_head"}
    patterns = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    found: dict[str, nn.Module] = {}
    for pattern in patterns:
        try:
            regex = re.compile(pattern)
        except re.error as err:
            raise ValueError(f"target_modules pattern {pattern!r} is not a valid regex: {err}") from err
        hits = {n: m for n, m in linears.items() if regex.fullmatch(n)}
        if not hits:
            examples = ", ".join(list(linears)[:5]) or "(none)"
            raise ValueError(
                f"target_modules pattern {pattern!r} fullmatches no linear module of {type(model).__name__}. "
                f"Linear module names look like: {examples}. Use a regex over full names, e.g. r'.*\\.mlp\\..*', "
                "or 'decoder-linear' / 'all-linear'."
            )
        found.update(hits)
    return found


def make_param_groups(
    model: nn.Module,
    *,
    target_modules: str | Sequence[str] = "decoder-linear",
    rank: int = 128,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    proj_type: str = "std",
    weight_decay: float = 0.0,
    no_decay: Sequence[str] = ("bias", "norm"),
    layers_path: str | None = None,
) -> list[dict[str, Any]]:
    """Split a model's params into one GaLore group and full-rank AdamW groups, so the optimizer never walks the model.

    Every param appears exactly once (tied weights once), frozen ones included: the layer sampler unfreezes layers
    later and they must already be in the optimizer.

    Args:
        model: the model.
        target_modules: ``"decoder-linear"`` (every linear inside the decoder blocks: attention and MLP),
            ``"all-linear"`` (every linear except the output embedding / ``lm_head``), or regexes fullmatched
            against module names (like transformers' ``optim_target_modules``).
        rank: GaLore rank (clamped per matrix to ``min(m, n)``).
        update_proj_gap: steps between basis refreshes.
        scale: multiplier of the back-projected update.
        proj_type: ``std``, ``reverse_std``, ``left`` or ``right``.
        weight_decay: decay of the GaLore weights and other full-rank weights.
        no_decay: substrings of param names (lower-cased) that get no weight decay (biases, norms).
        layers_path: dotted path to the decoder blocks if ``find_decoder_layers`` cannot find them.

    Returns:
        Non-empty groups named ``"galore"``, ``"adamw"`` and ``"adamw_no_decay"``.

    Raises:
        ValueError: a regex matches no linear module, or is invalid.
    """
    targets = _target_modules(model, target_modules, layers_path)
    galore_ids = {id(m.weight) for m in targets.values() if m.weight.dim() == 2}
    galore: list[Tensor] = []
    decay: list[Tensor] = []
    plain: list[Tensor] = []
    for name, p in model.named_parameters():  # named_parameters yields each shared tensor once
        if id(p) in galore_ids:
            galore.append(p)
        elif any(s in name.lower() for s in no_decay):
            plain.append(p)
        else:
            decay.append(p)
    galore_opts = {"rank": rank, "update_proj_gap": update_proj_gap, "scale": scale, "proj_type": proj_type}
    groups = [
        {"name": "galore", "params": galore, "weight_decay": weight_decay, **galore_opts},
        {"name": "adamw", "params": decay, "weight_decay": weight_decay},
        {"name": "adamw_no_decay", "params": plain, "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    logger.info(
        "GaLore param groups: %s",
        ", ".join(
            f"{g['name']}={len(g['params'])} tensors/{sum(p.numel() for p in g['params'])} params"
            for g in groups
        ),
    )
    return groups


def create_galore_optimizer(
    model: nn.Module,
    *,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-6,
    convention: Convention = "torch",
    **group_kwargs: Any,
) -> GaLoreAdamW:
    """``GaLoreAdamW(make_param_groups(model, **group_kwargs), lr=lr, ...)`` in one call."""
    groups = make_param_groups(model, **group_kwargs)
    return GaLoreAdamW(groups, lr=lr, betas=betas, eps=eps, convention=convention)
