"""GaLoreAdamW: AdamW whose 2-D weights can take their steps in a low-rank gradient subspace.

GaLore (arXiv 2403.03507, https://arxiv.org/abs/2403.03507): per weight, keep Adam moments for the projected
gradient ``R = Pᵀ G`` (or ``G Qᵀ``), refresh the basis from an SVD every ``update_proj_gap`` steps, and apply
``W <- W - lr · scale · backproject(N)``. OwLore (arXiv 2405.18380, https://arxiv.org/abs/2405.18380) uses it on the
sampled decoder layers, so this optimizer can also drop, move and measure the state of given parameters.

Math lives in the pure function ``owlore.optim.adamw.adamw_update`` (like torchao's ``single_param_adam``); the class only does
bookkeeping. State holds tensors and ints only, so ``torch.load(path, weights_only=True)`` restores it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.adamw import adamw as torch_adamw

from owlore.optim.adamw import Convention, adamw_update
from owlore.optim.factored import factored_update
from owlore.optim.host import by_device
from owlore.optim.param_groups import make_param_groups
from owlore.optim.projector import (
    BASIS_METHODS,
    LEFT,
    PROJ_TYPES,
    choose_side,
    compute_basis,
    projected_shape,
    randomized_basis,
)
from owlore.optim.quant_state import (
    MIN_8BIT_SIZE,
    MOMENTS,
    CodeMaps,
    check_state_options,
    load_moments,
    store_moments,
    update_target,
)
from owlore.parallel.sharded import (
    agree_finite,
    broadcast_outcome,
    full_gradient,
    is_mesh_rank0,
    is_sharded,
    local,
    reduce_projected,
    row_offset,
)

logger = logging.getLogger(__name__)

GALORE_GROUP_DEFAULTS: dict[str, Any] = {"update_proj_gap": 200, "scale": 0.25, "proj_type": "std",
                                         "basis_method": "svd", "power_iters": 2}


class GaLoreAdamW(torch.optim.Optimizer):
    """AdamW with GaLore projection for groups that carry ``rank``; optional fp32 master weights and 8-bit state.

    Groups with ``rank`` (plus optional ``update_proj_gap``, ``scale``, ``proj_type`` in ``std`` / ``reverse_std``
    / ``left`` / ``right``; defaults 200 / 0.25 / ``std``) project their 2-D weights; the rank is clamped to
    ``min(m, n)``. Non-2-D params in such groups (biases, norms) get plain AdamW, since a vector has no low-rank
    subspace worth projecting onto. Groups without ``rank`` behave exactly like ``torch.optim.AdamW``.

    The basis is recomputed on a param's first step and then every ``update_proj_gap`` of *its own* steps (steps
    with ``grad is None`` do not count, so frozen layers keep their schedule). Moments carry over a basis refresh
    unchanged, as in GaLore. If the SVD fails, the previous basis is kept and a warning is logged; with no previous
    basis that param's update is skipped for the step.

    A param whose gradient holds an inf or NaN skips its *whole* update for that step, on every step: moments,
    step count, basis and weight stay as they were, so one bad batch cannot poison its moments for the rest of the
    run, and the other params step normally. The check is one ``torch._foreach_norm`` over all gradients and one
    host sync per ``step()`` (per device). ``skipped_updates`` counts the skips; the first is logged with the
    param's group, index and shape, later ones at every power of two. A loss scaler that skips whole steps (fp16
    ``GradScaler``) works as before.

    Precision options (keyword-only, each also a per-group key of the same name):

    - ``state_dtype`` (default ``torch.float32``): dtype of ``exp_avg``, ``exp_avg_sq`` and the GaLore basis, and
      the dtype the update is computed in (the gradient is upcast; the result is written into the param in the
      param's own dtype). fp32 is cheap because GaLore's moments are low-rank, and bf16 moments round small
      gradients away (and fp16 ones overflow). ``None`` follows the gradient's dtype (the old behaviour, as in
      galore-torch). With fp32 params the default changes nothing; fp64 params get fp32 state unless ``None``.
    - ``master_weights`` (default False): for bf16/fp16 params keep an fp32 copy in ``state["master"]``, apply the
      update to it and round it into the param; otherwise an update below half a bf16 ulp of the weight (lr 1e-4 on
      weights ~1) is lost entirely. The copy is made lazily from the param at its first step and, like all state,
      is dropped by ``drop_state``: under OwLore's layer sampling only the *active* layers hold master copies
      (4 extra bytes per weight of γ layers), and a re-activated layer restarts from its current bf16 weight.
      While a copy exists, change the weight only through the optimizer (or drop its state first).
    - ``factored`` (group key only, ``optimizer.embedding_state=factored``): 2-D params of the group keep an
      Adafactor row/column second moment and no first moment instead of AdamW's moments (``owlore.optim.factored``).
    - ``state_bits`` (default 32): 8 stores the moments, low-rank and full-rank alike, 8-bit blockwise quantised
      with bitsandbytes (``owlore.optim.quant_state``; about 4x less moment memory), on CPU and CUDA; moments with
      fewer than ``quant_state.MIN_8BIT_SIZE`` (4096) elements stay unquantised. bitsandbytes is imported only
      when a group uses 8 bits.

    State per param: ``step`` (int); ``exp_avg`` and ``exp_avg_sq`` (``state_dtype``; or uint8 codes with
    fp32 per-block scales ``exp_avg_absmax`` / ``exp_avg_sq_absmax``); when projected ``basis`` (tensor) and
    ``side`` (int); with master weights ``master`` (fp32). Tensors and ints only, and ``load_state_dict`` keeps
    their dtypes. ``svd_seconds`` (SVD wall time) and ``skipped_updates`` are not part of the state.

    Args:
        params: params or param-group dicts (see ``make_param_groups``).
        lr: learning rate.
        betas: Adam betas.
        eps: Adam epsilon (GaLore/HF default 1e-6; note ``torch.optim.AdamW`` defaults to 1e-8).
        weight_decay: decoupled weight decay.
        convention: ``"torch"`` (default; eps after bias correction, decay before the update, the order
            ``torch.optim.AdamW`` and the OwLore notes recommend) or ``"hf"`` (galore-torch's order, to reproduce
            the official OwLore runs). See ``adamw_update``.
        state_dtype: dtype of moments and basis, and of the update math; ``None`` follows the gradient.
        master_weights: keep fp32 master copies of bf16/fp16 params.
        state_bits: 32, or 8 for 8-bit blockwise quantised moments (needs bitsandbytes).
        fused: plain-AdamW params (see "Speed") step with torch's fused AdamW kernel; ``None`` (default) does so
            on every device torch has the kernel for, ``False`` never.
        foreach: with ``fused`` off, step plain-AdamW params with torch's foreach (multi-tensor) AdamW; ``False``
            as well as ``fused=False`` keeps the per-param loop (the reference path, exact to
            ``torch.optim.AdamW``'s default on CPU).
        skip_non_finite: test every gradient for inf/NaN and skip that param's update (default). The test is one
            host read per step (per tensor under in-backward updates, ``owlore.memory.in_backward``); ``False``
            drops it and steps whatever comes, as ``torch.optim.AdamW`` does.

    Speed: every param that needs nothing of GaLore's (no projection, torch convention, 32-bit moments, the state
    dtype equal to the weight's or its master's dtype, not FSDP-sharded) is updated by ``torch.optim.adamw``'s
    functional AdamW (``torch_adamw``), fused or foreach, one call per param group and step count, instead of ~8 kernels per
    tensor from Python. This is the whole step for LISA and BAdam, and the embeddings, head and norms under
    OwLore. Projected weights keep the per-param path (each has its own basis).
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
        state_dtype: torch.dtype | None = torch.float32,
        master_weights: bool = False,
        state_bits: int = 32,
        fused: bool | None = None,
        foreach: bool | None = None,
        skip_non_finite: bool = True,
    ) -> None:
        for name, value in (("lr", lr), ("eps", eps), ("weight_decay", weight_decay)):
            if not value >= 0.0:
                raise ValueError(f"Invalid {name}: {value}; must be >= 0")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"Invalid betas: {betas}; both must be in [0, 1)")
        self.svd_seconds = 0.0
        self.skipped_updates = 0
        self._code_maps = CodeMaps()
        self.fused, self.foreach, self.skip_non_finite = fused, foreach, skip_non_finite
        self.host_state: set[int] = set()  # ids of params whose loaded state stays on the host (load_state_dict)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, convention=convention)
        defaults.update(state_dtype=state_dtype, master_weights=master_weights, state_bits=state_bits)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Fill GaLore defaults into groups with ``rank`` and validate them here, not inside ``step``."""
        where = f"param group {param_group.get('name', len(self.param_groups))!r}"
        if "rank" in param_group:
            for key, value in GALORE_GROUP_DEFAULTS.items():
                param_group.setdefault(key, value)
            rank, gap = param_group["rank"], param_group["update_proj_gap"]
            if not (isinstance(rank, int) and rank >= 1):
                raise ValueError(f"{where}: rank must be a positive int, got {rank!r}")
            if not (isinstance(gap, int) and gap >= 1):
                raise ValueError(f"{where}: update_proj_gap must be a positive int, got {gap!r}")
            if param_group["basis_method"] not in BASIS_METHODS:
                raise ValueError(f"{where}: basis_method must be one of {', '.join(BASIS_METHODS)}, got "
                                 f"{param_group['basis_method']!r}")
            if not (isinstance(param_group["power_iters"], int) and param_group["power_iters"] >= 0):
                raise ValueError(f"{where}: power_iters must be an int >= 0, got {param_group['power_iters']!r}")
            if param_group["proj_type"] not in PROJ_TYPES:
                raise ValueError(
                    f"{where}: proj_type must be one of {', '.join(PROJ_TYPES)}, got {param_group['proj_type']!r}"
                )
        convention = param_group.get("convention", self.defaults["convention"])
        if convention not in ("torch", "hf"):
            raise ValueError(f"convention must be 'torch' or 'hf', got {convention!r}")
        check_state_options({**self.defaults, **param_group}, where)
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Update every param with a finite gradient; params with ``grad is None`` are left alone."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        todo = [
            (p, group, (group_index, index))
            for group_index, group in enumerate(self.param_groups)
            for index, p in enumerate(group["params"])
            if p.grad is not None
        ]
        for p, _, _ in todo:
            if p.grad.is_sparse:  # a row-sparse embedding gradient (memory.sparse_embedding_grad): same math dense
                p.grad = p.grad.to_dense()
        if self.skip_non_finite:
            flags = _finite_flags([local(p.grad) for p, _, _ in todo])
            flags = agree_finite(flags, [p for p, _, _ in todo])  # FSDP2 shards: every rank skips or steps together
        else:  # no host read at all, as torch.optim.AdamW
            flags = [True] * len(todo)
        plain = []
        for (p, group, where), finite in zip(todo, flags):
            if not finite:
                self._skip_non_finite(p, group, where)
            elif self._is_plain_adamw(p, group):
                plain.append((p, group))
            else:
                self._step_param(p, group, where)
        if plain:
            self._step_plain(plain)
        return loss

    def _step_one(self, p: Tensor, group: dict[str, Any], where: tuple[int, int]) -> None:
        """One param's update by the path ``step`` would take for it (used by the in-backward subclass)."""
        if self._is_plain_adamw(p, group):
            self._step_plain([(p, group)])
        else:
            self._step_param(p, group, where)

    def _is_plain_adamw(self, p: Tensor, group: dict[str, Any]) -> bool:
        """Whether ``p`` steps through torch's AdamW: a multi-tensor path is on and its update is exactly torch's
        AdamW on tensors of one dtype (see "Speed")."""
        if self.fused is False and self.foreach is False:  # the per-param loop was asked for
            return False
        if group["convention"] != "torch" or p.dim() == 2 and ("rank" in group or group.get("factored")):
            return False
        if is_sharded(p) or group["state_bits"] == 8 and p.numel() >= MIN_8BIT_SIZE:
            return False
        dtype = group["state_dtype"] or p.grad.dtype
        low = group["master_weights"] and p.dtype in (torch.bfloat16, torch.float16)
        if (torch.float32 if low else p.dtype) != dtype:
            return False
        state = self.state.get(p, {})
        return all(state[key].dtype == dtype for key in MOMENTS if key in state)

    def _step_plain(self, items: list[tuple[Tensor, dict[str, Any]]]) -> None:
        """Plain-AdamW params through ``torch.optim.adamw.adamw``, one call per (group, step count).

        Params of one group normally share their step count (layers switched on together), so the call count is
        the group count. Step tensors are made for the call only; the state keeps its int ``step``.
        """
        buckets: dict[tuple[int, int], tuple[dict[str, Any], list[Tensor]]] = {}
        for p, group in items:
            step = self.state[p].get("step", 0)
            buckets.setdefault((id(group), step), (group, []))[1].append(p)
        for (_, step), (group, params) in buckets.items():
            dtype = group["state_dtype"] or params[0].grad.dtype
            targets, grads, exp_avgs, exp_avg_sqs = [], [], [], []
            for p in params:
                state = self.state[p]
                target = update_target(p, state, master_weights=group["master_weights"])
                for key in MOMENTS:
                    if key not in state:
                        state[key] = torch.zeros_like(target, dtype=dtype)
                targets.append(target)
                grads.append(p.grad.to(dtype))
                exp_avgs.append(state["exp_avg"])
                exp_avg_sqs.append(state["exp_avg_sq"])
                state["step"] = step + 1
            fused = self.fused if self.fused is not None else _has_fused_adamw(targets)
            device = targets[0].device if fused else "cpu"  # foreach reads CPU step counts without a sync
            steps = list(torch.full((len(targets),), float(step), device=device).unbind())
            beta1, beta2 = group["betas"]
            torch_adamw(
                targets, grads, exp_avgs, exp_avg_sqs, [], steps,
                foreach=not fused and self.foreach is not False, fused=fused, amsgrad=False, beta1=beta1,
                beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"], maximize=False,
            )
            low = [(p, t) for p, t in zip(params, targets) if t is not p]
            if low:  # round the fp32 masters into the low-precision weights
                torch._foreach_copy_([p for p, _ in low], [t for _, t in low])

    def _step_param(self, p: Tensor, group: dict[str, Any], where: tuple[int, int]) -> None:
        state = self.state[p]
        sharded = is_sharded(p)  # an FSDP2 DTensor: update this rank's rows (owlore.parallel.sharded)
        if group.get("factored") and p.dim() == 2:  # Adafactor-style state (owlore.optim.factored)
            if sharded:
                raise NotImplementedError("optimizer.embedding_state=factored under FSDP: the column statistics "
                                          "would need a reduction over shards; use full, 8bit or lowrank")
            factored_update(p, p.grad, state, lr=group["lr"], weight_decay=group["weight_decay"])
            return
        dtype = group["state_dtype"] or p.grad.dtype
        grad = local(p.grad).to(dtype)  # no copy when the gradient already has the state dtype
        projected = "rank" in group and p.dim() == 2
        step = state.get("step", 0)
        refresh = projected and ("basis" not in state or step % group["update_proj_gap"] == 0)
        if refresh and not self._refresh_basis(full_gradient(p).to(dtype) if sharded else grad, group, state,
                                               where, sharded_param=p if sharded else None):
            if not state:
                del self.state[p]  # a skipped first step leaves no trace; the next step is a first step
            return
        basis = state["basis"].to(dtype) if projected else None
        reduce = None
        if sharded and basis is not None and state["side"] == LEFT:  # this rank's rows of P; Pᵀ G summed over ranks
            offset = row_offset(p)
            basis = basis[offset:offset + grad.shape[0]]
            reduce = reduce_projected(p)
        shape = projected_shape(grad.shape, basis, state["side"]) if basis is not None else grad.shape
        exp_avg, exp_avg_sq = load_moments(state, shape, dtype, grad.device, self._code_maps)
        target = update_target(local(p), state, master_weights=group["master_weights"])
        state["step"] = step + 1
        beta1, beta2 = group["betas"]
        adamw_update(
            target,
            grad,
            exp_avg,
            exp_avg_sq,
            state["step"],
            lr=group["lr"],
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            convention=group["convention"],
            basis=basis,
            side=state.get("side", LEFT),
            scale=group["scale"] if projected else 1.0,
            reduce_projected=reduce,
        )
        store_moments(state, (exp_avg, exp_avg_sq), bits=group["state_bits"], maps=self._code_maps)
        if target is not local(p):
            local(p).copy_(target)  # round the fp32 master into the low-precision weight

    def _skip_non_finite(self, p: Tensor, group: dict[str, Any], where: tuple[int, int]) -> None:
        """Count a skipped update and log it, rate-limited so that a diverged run cannot flood the log."""
        self.skipped_updates += 1
        count = self.skipped_updates
        if count & (count - 1) == 0:  # 1, 2, 4, 8, ...
            logger.warning(
                "GaLoreAdamW: gradient is not finite for %s; skipping its update (moments, step count, basis and "
                "weight unchanged). %d update(s) skipped so far; next report at %d.",
                _describe(p.shape, group, where),
                count,
                2 * count,
            )

    def _refresh_basis(
        self, grad: Tensor, group: dict[str, Any], state: dict[str, Any], where: tuple[int, int],
        sharded_param: Tensor | None = None,
    ) -> bool:
        """Recompute the basis (in ``grad``'s dtype, the state dtype); if the SVD fails, keep the old one.

        Returns:
            False if there is no basis to step with.
        """
        side = choose_side(group["proj_type"], grad.shape)
        start = time.perf_counter()
        basis, error = None, None
        # sharded (FSDP2): mesh rank 0 alone computes, then sends its basis or its failure to every rank
        if sharded_param is None or is_mesh_rank0(sharded_param):
            try:
                if group.get("basis_method", "svd") == "randomized":
                    warm = state.get("basis") if state.get("side") == side else None
                    seed = (where[0] * 1_000_003 + where[1] * 7_919 + state.get("step", 0)) % 2**62  # resumable
                    basis = randomized_basis(grad, group["rank"], side, warm=warm, seed=seed,
                                             power_iters=group.get("power_iters", 2))
                else:
                    basis = compute_basis(grad, group["rank"], side)
            except RuntimeError as err:  # torch.linalg.LinAlgError is a RuntimeError
                error = err
        if sharded_param is not None:
            r = min(group["rank"], *grad.shape)
            shape = (grad.shape[0], r) if side == LEFT else (r, grad.shape[1])
            basis = broadcast_outcome(sharded_param, basis, shape, grad.dtype)
            if basis is None and error is None:
                error = RuntimeError("the SVD failed on mesh rank 0")
        self.svd_seconds += time.perf_counter() - start
        if basis is None:
            keep = "basis" in state
            outcome = "keeping the previous basis" if keep else "no previous basis, skipping its update"
            logger.warning(
                "GaLore basis refresh: SVD failed (%s) for %s; %s.",
                error,
                _describe(grad.shape, group, where),
                outcome,
            )
            return keep
        state["basis"], state["side"] = basis, side
        return True

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """``Optimizer.load_state_dict``, except that every state tensor keeps the dtype it was saved with.

        torch casts all state tensors of a floating-point param to the param's dtype, which would round the fp32
        moments and master copies of bf16 params to bf16 and turn 8-bit codes into floats. Groups saved before an
        option existed get its default. State of params in ``host_state`` (ids; OwLore's ``state_policy: offload``
        puts every decoder layer there) stays in host memory instead of passing through the device first; the
        layer-switching callback moves the active layers' state to the device.
        """
        super().load_state_dict({**state_dict, "state": {}})  # groups and hyperparameters; state placed below
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for param_id, p in zip(saved_ids, params):
            device = "cpu" if id(p) in self.host_state else p.device
            for key, value in state_dict["state"].get(param_id, {}).items():
                self.state[p][key] = value.to(device=device) if isinstance(value, Tensor) else value
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)

    def drop_state(self, params: Iterable[Tensor]) -> int:
        """Forget the state of ``params`` (e.g. layers the sampler switched off), so memory stays O(active layers).

        The next step of a dropped param is a first step again: fresh moments, step count 1, new basis, and a new
        master copy made from the current (rounded) weight.

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
        """Move the state tensors of ``params`` (moments or 8-bit codes and scales, basis, master) to ``device``.

        For CPU offload of inactive layers and back; move it back to the param's device before that param steps
        again.
        """
        for p in params:
            state = self.state.get(p)
            if not state:
                continue
            for key, value in state.items():
                if isinstance(value, Tensor):
                    state[key] = value.to(device, non_blocking=non_blocking)

    def state_bytes(self, params: Iterable[Tensor] | None = None) -> int:
        """Bytes held by state tensors (moments or 8-bit codes and scales, bases, masters) of ``params`` or all."""
        states = self.state.values() if params is None else [self.state.get(p, {}) for p in params]
        return sum(v.numel() * v.element_size() for s in states for v in s.values() if isinstance(v, Tensor))


def _describe(shape: torch.Size, group: dict[str, Any], where: tuple[int, int]) -> str:
    return f"param {where[1]} {tuple(shape)} of group {group.get('name', where[0])!r}"


def _has_fused_adamw(tensors: list[Tensor]) -> bool:
    """Whether torch has a fused AdamW kernel for all of ``tensors`` (one device; CPU and CUDA among others)."""
    from torch.optim.optimizer import _get_fused_kernels_supported_devices

    devices = {t.device for t in tensors}
    return (len(devices) == 1 and next(iter(devices)).type in _get_fused_kernels_supported_devices()
            and all(t.dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64) for t in tensors))


def _finite_flags(grads: list[Tensor]) -> list[bool]:
    """Whether each gradient is all-finite, with one host sync per device instead of one per gradient.

    The 2-norm of a tensor holding an inf or NaN is inf or NaN. A finite gradient whose fp32 norm overflows
    (entries ≳ 1e19) is re-checked exactly, so it is not mistaken for a non-finite one.
    """
    flags = [True] * len(grads)
    for indices in by_device(grads).values():
        norms = torch._foreach_norm([grads[i] for i in indices], 2, dtype=torch.float32)
        for i, finite in zip(indices, torch.stack(norms).isfinite().tolist()):
            flags[i] = finite or bool(torch.isfinite(grads[i]).all())
    return flags


def create_galore_optimizer(
    model: nn.Module,
    *,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-6,
    convention: Convention = "torch",
    state_dtype: torch.dtype | None = torch.float32,
    master_weights: bool = False,
    state_bits: int = 32,
    fused: bool | None = None,
    foreach: bool | None = None,
    skip_non_finite: bool = True,
    **group_kwargs: Any,
) -> GaLoreAdamW:
    """``GaLoreAdamW(make_param_groups(model, **group_kwargs), lr=lr, ...)`` in one call."""
    groups = make_param_groups(model, **group_kwargs)
    return GaLoreAdamW(
        groups,
        lr=lr,
        betas=betas,
        eps=eps,
        convention=convention,
        state_dtype=state_dtype,
        master_weights=master_weights,
        state_bits=state_bits,
        fused=fused,
        foreach=foreach,
        skip_non_finite=skip_non_finite,
    )
