"""A Llama-style model as numbers, and what each op of its training step saves for backward, in bytes.

``ModelShape`` holds the architecture read from a HF ``config.json`` (no weights), or from the public numbers
shipped in ``model_configs/`` when the hub cannot be reached. The ``*_saved`` functions give, op by op, the bytes
autograd keeps between forward and backward for one decoder layer (RMSNorm, q/k/v/o, RoPE, SDPA or eager
attention, SwiGLU MLP, residuals), the final norm / head and the loss. They follow what PyTorch actually saves
(each backward formula keeps only what it needs, so a frozen ``y = x Wᵀ`` keeps ``W`` and not ``x``), checked
against real HF Llama layers with ``torch.autograd.graph.saved_tensors_hooks`` (tests/test_memory_estimator.py).
The accounting is the one of Korthikanti et al. (arXiv 2205.05198, https://arxiv.org/abs/2205.05198, §4.1),
redone per op for HF's Llama, whose RMSNorm keeps an fp32 copy of its input and whose SDPA keeps q, k, v, out.

Per decoder layer, with N = batch·seq tokens, s bytes per activation, q = N·heads·head_dim and kv likewise with
the key/value heads (SDPA without a mask, GQA kept; with a mask or eager attention the keys/values repeated):

- needs backward (trained or frozen): 2 × (4·N·d + 4·N) for the norms' fp32 inputs and rsqrt (the first norm's
  only if the layer input requires grad), SDPA's s·(2q + 2kv) + 4·batch·heads·seq (q, k, v, out, logsumexp), and
  3·s·N·I for SwiGLU (gate, silu(gate), up);
- trained adds 2·s·N·d (the normalised h kept for the norm weights' gradient) + 2·s·N·d (the inputs of q/k/v and
  of gate/up, each shared) + s·N·I (down's input); o_proj's input is SDPA's output buffer, already kept;
- eager attention keeps the fp32 softmax (4·batch·heads·seq², and its 16-bit cast) instead of the logsumexp;
- LoRA adds, per target, lora_B's input s_a·N·r and lora_A's (dropout's output, plus its mask when x requires
  grad; without dropout shared by the targets reading one tensor).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

MODEL_CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
SHIPPED: dict[str, tuple[str, ...]] = {
    "llama2-7b": ("meta-llama/Llama-2-7b-hf", "meta-llama/Llama-2-7b-chat-hf", "llama-2-7b", "llama2_7b"),
    "llama3-8b": ("meta-llama/Meta-Llama-3-8B", "meta-llama/Meta-Llama-3-8B-Instruct", "llama-3-8b", "llama3_8b"),
    "mistral-7b": ("mistralai/Mistral-7B-v0.1", "mistralai/Mistral-7B-Instruct-v0.1", "mistral_7b"),
}
"""Shipped architecture files and the hub ids / names they stand in for (public config.json numbers)."""

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_INPUTS = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "o_proj": "attn_out",
               "gate_proj": "mlp_in", "up_proj": "mlp_in", "down_proj": "mlp_prod"}
"""Which tensor each linear reads: linears that read the same tensor share one saved copy of it."""


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a Llama-style decoder (Llama, Mistral, Qwen2, SmolLM2 ...) that decide its memory."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    head_dim: int
    tied: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    name: str = "model"

    @classmethod
    def from_config(cls, config: Any, *, name: str | None = None) -> ModelShape:
        """From a ``PretrainedConfig`` or a ``config.json`` dict (a multimodal ``text_config`` is used)."""
        c = config if isinstance(config, dict) else config.to_dict()
        c = c.get("text_config") or c
        missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                               "vocab_size") if not isinstance(c.get(k), int)]
        if missing:
            raise ValueError(f"model config {name or c.get('_name_or_path', '?')!r} lacks {', '.join(missing)}: "
                             "not a Llama-style decoder config (hidden_size, intermediate_size, num_hidden_layers, "
                             "num_attention_heads, vocab_size)")
        heads = c["num_attention_heads"]
        return cls(hidden=c["hidden_size"], intermediate=c["intermediate_size"], layers=c["num_hidden_layers"],
                   heads=heads, kv_heads=c.get("num_key_value_heads") or heads, vocab=c["vocab_size"],
                   head_dim=c.get("head_dim") or c["hidden_size"] // heads,
                   tied=bool(c.get("tie_word_embeddings", False)), attention_bias=bool(c.get("attention_bias")),
                   mlp_bias=bool(c.get("mlp_bias")), name=name or c.get("_name_or_path") or "model")

    def with_layers(self, layers: int) -> ModelShape:
        return ModelShape(**{**self.__dict__, "layers": layers})

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(out, in) of each linear of one decoder layer."""
        d, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return {"q_proj": (q, d), "k_proj": (kv, d), "v_proj": (kv, d), "o_proj": (d, q),
                "gate_proj": (i, d), "up_proj": (i, d), "down_proj": (d, i)}

    def layer_tensors(self) -> dict[str, tuple[int, ...]]:
        """Every parameter of one decoder layer: the linears' weights (and biases), the two norms."""
        out: dict[str, tuple[int, ...]] = {f"{k}.weight": v for k, v in self.linear_shapes().items()}
        for k, (m, _) in self.linear_shapes().items():
            if (self.attention_bias and k in LINEARS[:4]) or (self.mlp_bias and k in LINEARS[4:]):
                out[f"{k}.bias"] = (m,)
        return {**out, "input_layernorm.weight": (self.hidden,), "post_attention_layernorm.weight": (self.hidden,)}

    def layer_params(self) -> int:
        return sum(_numel(s) for s in self.layer_tensors().values())

    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    def total_params(self) -> int:
        heads = 1 if self.tied else 2
        return self.layers * self.layer_params() + heads * self.embedding_params() + self.hidden


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def shipped_config_path(name: str) -> Path | None:
    """The shipped ``model_configs/<key>.json`` standing in for ``name`` (a hub id or a short name), if any."""
    low = name.lower().rstrip("/")
    for key, aliases in SHIPPED.items():
        if low == key or low in (a.lower() for a in aliases):
            return MODEL_CONFIG_DIR / f"{key}.json"
    return None


def load_model_shape(name: str, *, trust_remote_code: bool = False) -> ModelShape:
    """Read a model's shape: its ``config.json`` (hub id, local directory, embedded model), else a shipped file.

    Raises:
        ValueError: neither can be read; the message lists the shipped names.
    """
    from owlore.assets import resolve_model_name

    path = Path(name)
    if path.suffix == ".json" and path.is_file():
        return ModelShape.from_config(json.loads(path.read_text()), name=path.stem)
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(resolve_model_name(name), trust_remote_code=trust_remote_code)
        return ModelShape.from_config(config, name=name)
    except (OSError, ValueError) as err:
        shipped = shipped_config_path(name)
        if shipped is None:
            names = ", ".join(a for aliases in SHIPPED.values() for a in aliases[:1])
            raise ValueError(f"cannot read the config.json of model {name!r} ({str(err).splitlines()[0]}) and no "
                             f"shipped architecture stands in for it; give a local directory or config.json "
                             f"path, a reachable hub id, or one of the shipped ones: {names}") from None
        logger.info("config.json of %s unreadable offline; using the shipped %s", name, shipped.name)
        return ModelShape.from_config(json.loads(shipped.read_text()), name=name)


@dataclass(frozen=True)
class Tokens:
    """One micro-batch: ``batch`` sequences of ``seq`` tokens, activations in ``act_bytes`` bytes per value."""

    batch: int
    seq: int
    act_bytes: int
    attention: str = "sdpa"
    """sdpa (flash / memory-efficient kernels), flash_attention_2, or eager."""
    mask: bool = False
    """A padding mask reaches attention (no packing): SDPA keeps the mask and repeats GQA keys/values."""
    device: str = "cuda"
    """cuda or cpu: dropout keeps a bool mask on CUDA, a mask in the input's dtype on CPU."""

    @property
    def n(self) -> int:
        return self.batch * self.seq


@dataclass(frozen=True)
class LoraShape:
    """peft LoRA adapters of one decoder layer."""

    rank: int
    targets: tuple[str, ...] = LINEARS
    dropout: float = 0.0
    act_bytes: int = 4
    """Bytes of the adapters' activations: peft runs fp32 adapters (and casts their input) on a 16-bit base."""


def layer_saved(shape: ModelShape, tok: Tokens, *, role: str, input_grad: bool,
                lora: LoraShape | None = None) -> dict[str, int]:
    """Bytes one decoder layer saves for backward, per op.

    Args:
        shape: the model.
        tok: the micro-batch and activation precision.
        role: ``trained`` (all its weights train), ``frozen`` (no weight trains, but backward runs through it),
            ``lora`` (frozen base + adapters) or ``none`` (nothing below it needs a gradient: saves nothing).
        input_grad: whether the layer's input requires grad (some layer below trains, or the embeddings do).
        lora: the adapters, for ``role="lora"``.

    Returns:
        Bytes per op group: ``norm_in``, ``qkv_in``, ``attention``, ``norm_mlp``, ``mlp_in``, ``mlp`` (``lora``).
    """
    if role == "none":
        return {}
    s, n, d, i = tok.act_bytes, tok.n, shape.hidden, shape.intermediate
    trained = role == "trained"
    q = n * shape.heads * shape.head_dim
    fused = tok.attention in ("sdpa", "flash_attention_2")
    kv_heads = shape.kv_heads if (fused and not tok.mask) or tok.attention == "flash_attention_2" else shape.heads
    kv = n * kv_heads * shape.head_dim
    # RMSNorm upcasts: pow() and the normalising mul keep the fp32 input (the layer input itself in fp32) and
    # rsqrt(var) (N floats); weight * h keeps h only when the weight trains.
    out = {"norm_in": (4 * n * d + 4 * n if input_grad else 0) + (s * n * d if trained else 0),
           "qkv_in": s * n * d if trained else 0}
    if fused:  # q, k, v, out, logsumexp; o_proj's input *is* the kernel's output buffer ((B,T,H,hd) layout)
        out["attention"] = s * (2 * q + 2 * kv) + 4 * tok.batch * shape.heads * tok.seq
        if tok.mask and tok.attention == "sdpa":
            out["attention"] += s * tok.batch * tok.seq * tok.seq  # the additive mask, converted per call
    else:  # eager: q, repeated k and v, fp32 softmax (and its cast for the PV matmul), contiguous o_proj input
        probs = tok.batch * shape.heads * tok.seq * tok.seq
        out["attention"] = s * 3 * q + 4 * probs + (s * probs if s != 4 else 0) + (s * q if trained else 0)
    out["norm_mlp"] = 4 * n * d + 4 * n + (s * n * d if trained else 0)
    out["mlp_in"] = s * n * d if trained else 0
    out["mlp"] = s * n * i * (4 if trained else 3)  # gate (silu input), silu(gate), up; down's input if trained
    if role == "lora" and lora is not None:
        out["lora"] = _lora_saved(shape, tok, lora, fused, input_grad)
    return out


def _lora_saved(shape: ModelShape, tok: Tokens, lora: LoraShape, fused: bool, input_grad: bool) -> int:
    """peft's ``lora_B(lora_A(dropout(x)))`` per target: lora_A keeps dropout's output, and dropout its mask
    when x requires grad (q/k/v's x does not in the lowest layer); a cast input (fp32 adapters on a 16-bit base)
    is per module; without dropout or cast, modules reading one tensor share it."""
    a, n = lora.act_bytes, tok.n
    mask_bytes = 1 if tok.device == "cuda" else a
    ins = {k: v[1] for k, v in shape.linear_shapes().items()}
    total, shared = 0, set()
    for t in lora.targets:
        d_in = ins[t]
        total += a * n * lora.rank
        if lora.dropout > 0:
            masked = input_grad or LORA_INPUTS[t] != "attn_in"
            total += (a + (mask_bytes if masked else 0)) * n * d_in
        elif a != tok.act_bytes:
            total += a * n * d_in
        elif LORA_INPUTS[t] not in shared:
            shared.add(LORA_INPUTS[t])
            already = LORA_INPUTS[t] == "attn_out" and fused  # the attention output is saved already
            total += 0 if already else a * n * d_in
    return total


def layer_backward_temporaries(shape: ModelShape, tok: Tokens) -> int:
    """Largest set of gradient buffers alive inside one layer's backward (the MLP's or the attention's)."""
    s, n = tok.act_bytes, tok.n
    mlp = s * n * (shape.hidden + 3 * shape.intermediate)
    q, kv = n * shape.heads * shape.head_dim, n * shape.kv_heads * shape.head_dim
    attn = s * (n * shape.hidden + 2 * q + 2 * kv)
    if tok.attention == "eager":
        attn += (4 + s) * tok.batch * shape.heads * tok.seq * tok.seq
    return max(mlp, attn)


def head_saved(shape: ModelShape, tok: Tokens, *, norm_trained: bool, head_trained: bool,
               chunked: bool) -> dict[str, int]:
    """The final norm, the head's input and the loss's saved log-softmax (fp32, B·T·V) or, chunked, N floats."""
    s, n = tok.act_bytes, tok.n
    out = {"final_norm": 4 * n * shape.hidden + 4 * n + (s * n * shape.hidden if norm_trained else 0),
           "head_in": s * n * shape.hidden if head_trained or chunked else 0}  # the chunked loss keeps it too
    # log_softmax output (fp32) and the shifted targets (int64); chunked: row index and target (int64), lse (fp32)
    out["log_softmax"] = 20 * n if chunked else 4 * n * shape.vocab + 8 * n
    return out
