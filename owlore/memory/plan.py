"""What a method trains, and what each trained tensor costs in gradient, optimizer state and step temporaries.

One function per kind of state, written from the optimizers' code and checked by measuring them (see
benchmarks/memory_validation.py): ``GaLoreAdamW`` (owlore/optim/galore_adamw.py, GaLore arXiv 2403.03507: moments of the
projected shape plus the basis), torch's AdamW (fused: no temporaries; foreach: one copy of the group for
``sqrt(v)``; for-loop: two copies of the largest tensor), bitsandbytes' 8-bit Adam (1 byte per moment value plus
one fp32 absmax per 256), Adafactor (row and column vectors).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from owlore.memory.shapes import LINEARS, ModelShape

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

QUANT_BLOCK = 256
"""Values per absmax of blockwise 8-bit moments (bitsandbytes' optimizers and owlore.optim.quant_state)."""
MIN_8BIT = 4096
"""Moments with fewer values stay 32-bit (bitsandbytes' ``min_8bit_size``, owlore.optim.quant_state.MIN_8BIT_SIZE)."""
TRAINER_8BIT = ("adamw_bnb_8bit", "adamw_8bit", "paged_adamw_8bit", "adamw_torch_8bit")


@dataclass(frozen=True)
class Counted:
    """How one method is counted: its ``MemoryProfile`` (``owlore.methods.base``) and whose optimizer keeps the
    state. Built from the registry by ``counted``, so a new method needs no branch here."""

    name: str
    trains: str = "all"
    lowrank: bool = False
    quantized_base: bool = False
    master_weights: bool = False
    own: bool = False
    """GaLoreAdamW's per-tensor state (the methods with their own optimizer, and APOLLO), else ``training.optim``."""

    @property
    def adapters(self) -> bool:
        return self.trains == "adapters"

    @property
    def switches_layers(self) -> bool:
        return self.trains in ("sampled", "block")


def counted(method: Any) -> Counted:
    """``Counted`` of a registered method name (or a ``Method``).

    Raises:
        ValueError: a name that is not registered.
    """
    from owlore.methods import REGISTRY, get_method

    if isinstance(method, Counted):
        return method
    if isinstance(method, str):
        if method not in REGISTRY:
            raise ValueError(f"method={method!r}: unknown; methods: {', '.join(REGISTRY)}")
        method = get_method(method)
    prof = method.memory
    own = method.own_optimizer if prof.projected_state is None else prof.projected_state
    return Counted(method.name, prof.trains, prof.lowrank, prof.quantized_base, prof.master_weights, own)


@dataclass(frozen=True)
class StateOptions:
    """How the optimizer keeps its state (the ``optimizer`` section, or ``training.optim`` for full/lora/qlora)."""

    own: bool = True
    """GaLoreAdamW (owlore, lisa, badam, galore) or the Trainer's ``training.optim``."""
    optim: str = "adamw_torch_fused"
    state_bits: int = 32
    state_dtype: str = "float32"
    """float32, or auto (the gradient's dtype)."""
    master_weights: bool = False
    embedding_state: str = "full"
    embedding_rank: int = 128
    basis_method: str = "svd"
    device: str = "cuda"


@dataclass
class Trained:
    """One trained tensor."""

    name: str
    shape: tuple[int, ...]
    layer: int | None
    grad: int
    state: int
    step_temp: int
    """Bytes its update allocates while it runs (one tensor steps at a time in GaLoreAdamW and fused AdamW)."""


@dataclass
class Plan:
    """What trains, what is resident, which decoder layers save what."""

    weights: dict[str, int] = field(default_factory=dict)
    host: dict[str, int] = field(default_factory=dict)
    trained: list[Trained] = field(default_factory=list)
    roles: list[str] = field(default_factory=list)
    group_temp: int = 0
    """Step temporaries over a whole param group at once (torch AdamW's foreach path)."""
    inactive_state: int = 0
    """Optimizer state of the layers not trained now, kept on the device (``state_policy=keep``)."""
    notes: list[str] = field(default_factory=list)


def numel_of(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _moments(numel: int, bits: int, value_bytes: int) -> int:
    """Two Adam moments of ``numel`` values, 8-bit (codes + absmax per block) when asked and large enough."""
    if bits == 8 and numel >= MIN_8BIT:
        return 2 * (numel + 4 * -(-numel // QUANT_BLOCK))
    return 2 * numel * value_bytes


def projected(shape: tuple[int, int], rank: int) -> tuple[int, int]:
    """(moment values, basis values) of GaLore's ``std`` side: the basis on the smaller dimension."""
    m, n = shape
    r = min(rank, m, n)
    return (m * r, r * n) if m >= n else (r * n, m * r)


def svd_bytes(shape: tuple[int, int]) -> int:
    """``torch.linalg.svd(G, full_matrices=False)`` in fp32: input copy, U, Vh and LAPACK's gesdd workspace
    (measured: 5-6 times the matrix)."""
    m, n = shape
    k = min(m, n)
    return 4 * (2 * m * n + k * (m + n) + 4 * k * k)


def own_tensor(name: str, shape: tuple[int, ...], p: int, opts: StateOptions, *, rank: int | None,
               kind: str = "full") -> tuple[int, int]:
    """(state bytes, step temporaries) of one tensor in ``GaLoreAdamW``; ``kind`` is the embedding_state.

    The update runs in the state dtype: a 16-bit param's gradient is upcast, and the update into the 16-bit
    weight goes through an fp32 temporary; 8-bit moments are dequantised into fp32 copies for the update.
    """
    sb = 4 if opts.state_dtype == "float32" else p
    numel = numel_of(shape)
    if kind == "factored":
        return 4 * sum(shape), 4 * numel * (3 if p < 4 else 2)
    if len(shape) == 2 and (rank is not None or kind == "lowrank"):
        r = min(rank if kind != "lowrank" else opts.embedding_rank, *shape)
        mom, basis = projected(shape, r)
        state = _moments(mom, opts.state_bits, sb) + basis * sb
        # the back-projected update is full size; a 16-bit weight adds the fp32 gradient and update copies
        temp = sb * ((1 if p == 4 else 4) * numel + 3 * mom) + (2 * 4 * mom if opts.state_bits == 8 else 0)
        # basis refresh: an SVD, or the randomized range finder's sketches (oversampled by 10)
        refresh = svd_bytes(shape) if opts.basis_method == "svd" else 4 * (numel + 2 * sum(shape) * (r + 10))
        temp = max(temp, refresh + (4 * numel if p < 4 else 0))
    else:
        bits = 8 if kind == "8bit" else opts.state_bits
        state = _moments(numel, bits, sb)
        temp = sb * numel * (2 if p == 4 else 4) + (2 * 4 * numel if bits == 8 else 0)
    if opts.master_weights and p < 4:
        state += 4 * numel
    return state, temp


def trainer_tensor(shape: tuple[int, ...], p: int, opts: StateOptions) -> tuple[int, int]:
    """(state bytes, per-tensor step temporaries) under the Trainer's ``training.optim``.

    torch keeps AdamW moments in the param's dtype. The fused kernel allocates nothing; the for-loop path
    (torch's default on CPU for ``adamw_torch``) holds sqrt(v) and its quotient for one tensor at a time; the
    foreach path (CUDA) holds sqrt(v) for the whole group (``Plan.group_temp``).
    """
    numel, optim = numel_of(shape), opts.optim
    if optim in TRAINER_8BIT or optim.endswith("_8bit"):
        return _moments(numel, 8, 4), 0
    if optim.startswith("adafactor"):
        return 4 * (sum(shape) if len(shape) == 2 else numel), 4 * numel * 2
    if optim in ("sgd", "lomo"):
        return 0, 0
    fused = optim in ("adamw_torch_fused", "adamw_torch_npu_fused") or optim.startswith("paged_adamw")
    loop = optim in ("adamw_torch", "adamw_hf") and opts.device == "cpu"
    return 2 * numel * p, 0 if fused else (2 * numel * p if loop else 0)


def decoder_tensors(shape: ModelShape) -> list[tuple[str, tuple[int, ...]]]:
    return list(shape.layer_tensors().items())


def quantized_weight_bytes(numel: int, *, double_quant: bool) -> float:
    """NF4 (QLoRA, arXiv 2305.14314): half a byte per weight plus one absmax per 64 (fp32, or 8-bit with one fp32
    per 256 absmaxes under double quantisation)."""
    return numel * (0.5 + (1 / 64 + 4 / (64 * 256) if double_quant else 4 / 64))


def lora_tensors(shape: ModelShape, rank: int, targets: tuple[str, ...]) -> list[tuple[str, tuple[int, int]]]:
    """peft LoRA's A (r × in) and B (out × r) of every target linear of one decoder layer."""
    out = []
    for t in targets:
        m, n = shape.linear_shapes()[t]
        out += [(f"{t}.lora_A", (rank, n)), (f"{t}.lora_B", (m, rank))]
    return out


def lora_targets(target_modules: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """peft's ``all-linear`` (every linear but the head) or module names / name suffixes, as decoder linears."""
    if isinstance(target_modules, str):
        return LINEARS if target_modules == "all-linear" else tuple(t for t in LINEARS if t in target_modules)
    return tuple(t for t in LINEARS if any(t == m.rsplit(".", 1)[-1] or t in m for m in target_modules))


@dataclass(frozen=True)
class Options:
    """Everything besides the model, method, dtype and batch that changes the peak (``estimate``'s keywords)."""

    gamma: int = 5
    """Decoder layers trained at once (owlore, lisa); badam: ``block_size``."""
    rank: int | None = 256
    """GaLore rank of the trained decoder linears (owlore, galore); None: full-rank."""
    block_size: int = 1
    lora_rank: int = 8
    lora_targets: str | tuple[str, ...] = "all-linear"
    lora_dropout: float = 0.0
    double_quant: bool = True
    train_embeddings: bool = True
    train_lm_head: bool = True
    train_norms: bool = True
    active_layers: tuple[int, ...] | None = None
    """Which layers train (default: the lowest ones, the worst case when the embeddings are frozen)."""
    state_policy: str = "reset"
    """keep: every layer's state stays (all L, once all were sampled); offload: inactive states on the host."""
    optim: str = "adamw_torch_fused"
    state_bits: int = 32
    state_dtype: str = "float32"
    master_weights: bool | None = None
    update_in_backward: bool = False
    embedding_state: str = "full"
    embedding_rank: int = 128
    basis_method: str = "svd"
    checkpointing: str = "off"
    """off, all (every decoder layer keeps only its input), frozen (only the frozen layers)."""
    chunked_loss: int = 0
    offload_activations: bool = False
    """The checkpointed layers' inputs in host memory (``memory.offload_activations``)."""
    frozen_int8: bool = False
    attention: str = "sdpa"
    mask: bool = False
    autocast: bool = False
    """bf16/fp16 autocast over fp32 weights (activations 16-bit, a 16-bit copy of each trained linear weight)."""
    gradient_accumulation: int = 1
    device: str = "cuda"


def _layout(shape: ModelShape, c: Counted, o: Options) -> tuple[set[int], bool, bool, bool]:
    """(trained decoder layers, embeddings train, head trains, final norm trains)."""
    L = shape.layers
    if c.trains == "all":
        return set(range(L)), True, True, True
    if c.adapters:
        return set(), False, False, False
    block = c.trains == "block"
    k = o.block_size if block else o.gamma
    if not 1 <= k <= L:
        raise ValueError(f"{'block_size' if block else 'gamma'}={k}: must be in [1, {L}] (the model's "
                         "decoder layers)")
    active = set(o.active_layers) if o.active_layers is not None else set(range(k))
    if not active or not all(0 <= i < L for i in active):
        raise ValueError(f"active_layers={o.active_layers!r}: must be layer indices in [0, {L - 1}]")
    if block:
        return active, False, False, False
    emb, head = o.train_embeddings, o.train_lm_head
    if shape.tied:
        emb = head = emb or head
    return active, emb, head, o.train_norms


def _weights(plan: Plan, shape: ModelShape, c: Counted, p: int, o: Options, active: set[int]) -> None:
    """Resident weights: 16/32-bit, NF4 (qlora) or int8 frozen layers (frozen_int8, exact copies on the host)."""
    layer_numel = shape.layer_params()
    linear_numel = sum(m * n for m, n in shape.linear_shapes().values())
    base_p = 4 if c.quantized_base else p  # prepare_model_for_kbit_training casts every unquantised param to fp32
    n_int8 = shape.layers - len(active) if o.frozen_int8 and c.switches_layers else 0
    if c.quantized_base:
        plan.weights["decoder layers"] = int(shape.layers * (quantized_weight_bytes(
            linear_numel, double_quant=o.double_quant) + (layer_numel - linear_numel) * base_p))
    else:
        plan.weights["decoder layers"] = (shape.layers - n_int8) * layer_numel * p
    if n_int8:
        scales = 4 * sum(m for m, _ in shape.linear_shapes().values())
        plan.weights["decoder layers"] += n_int8 * ((layer_numel - linear_numel) * p + linear_numel + scales)
        plan.host["exact weights of the int8 layers"] = n_int8 * linear_numel * p
    if c.quantized_base or n_int8:
        plan.notes.append("quantised frozen linears are dequantised one at a time in forward and backward")
    plan.weights["embeddings + head"] = (1 if shape.tied else 2) * shape.embedding_params() * base_p
    plan.weights["final norm"] = shape.hidden * base_p


def build_plan(shape: ModelShape, method: Any, p: int, o: Options) -> tuple[Plan, bool, bool, bool]:
    """Weights, trained tensors (gradient, state, step temporaries) and per-layer roles of one run.

    Returns:
        The plan, and whether the embeddings, the head and the final norm train.
    """
    c = counted(method)
    active, emb, head, norm = _layout(shape, c, o)
    own = c.own
    master = o.master_weights if o.master_weights is not None else c.master_weights
    so = StateOptions(own=own, optim=o.optim, state_bits=o.state_bits, state_dtype=o.state_dtype,
                      master_weights=master, embedding_state=o.embedding_state, embedding_rank=o.embedding_rank,
                      basis_method=o.basis_method, device=o.device)
    plan = Plan()
    _weights(plan, shape, c, p, o, active)
    rank = o.rank if c.lowrank else None

    def add(name: str, tshape: tuple[int, ...], layer: int | None, tp: int, *, r: int | None = None,
            kind: str = "full") -> None:
        state, temp = own_tensor(name, tshape, tp, so, rank=r, kind=kind) if own else trainer_tensor(tshape, tp, so)
        plan.trained.append(Trained(name, tshape, layer, tp * numel_of(tshape), state, temp))

    if c.adapters:
        for i in range(shape.layers):  # peft keeps fp32 adapters on a 16-bit base (autocast_adapter_dtype)
            for name, tshape in lora_tensors(shape, o.lora_rank, lora_targets(o.lora_targets)):
                add(f"layer {i} {name}", tshape, i, 4)
        plan.weights["LoRA adapters"] = sum(t.grad for t in plan.trained)
    for i in sorted(active):
        for name, tshape in shape.layer_tensors().items():
            add(f"layer {i} {name}", tshape, i, p, r=rank if name.split(".")[0] in shape.linear_shapes() else None)
    names = ["embedding (tied head)"] if shape.tied else [n for n, on in (("embedding", emb), ("head", head)) if on]
    for name in names if emb or head else []:
        add(name, (shape.vocab, shape.hidden), None, p, kind=o.embedding_state if own else "full")
    if norm:
        add("final norm", (shape.hidden,), None, p)
    if own and o.state_policy in ("keep", "offload") and c.trains == "sampled":
        inactive = (shape.layers - len(active)) * sum(t.state for t in plan.trained if t.layer == min(active))
        if o.state_policy == "keep":
            plan.inactive_state = inactive
        else:
            plan.host["offloaded states of inactive layers"] = inactive
        plan.notes.append(f"state_policy={o.state_policy}: the state of every layer once sampled stays "
                          f"({'on the device' if o.state_policy == 'keep' else 'on the host'}), the long-run bound")
    if not own and o.optim == "adamw_torch" and o.device == "cuda":
        plan.group_temp = sum(t.grad for t in plan.trained)  # foreach: sqrt(v) of the whole group at once
    lowest = 0 if emb else min(active, default=0)
    plan.roles = ["lora"] * shape.layers if c.adapters else [
        "trained" if i in active else "frozen" if i > lowest or emb else "none" for i in range(shape.layers)]
    return plan, emb, head, norm
