"""Output head + causal-LM cross-entropy in chunks of tokens, so the full logits never exist.

Why: a causal LM's loss goes through logits of B·T·V elements. In fp32 (HF upcasts them before the loss) the
logits take B·T·V·4 bytes, their log-softmax (saved for backward) as much again, and their gradient as much again in
backward: ~100 MiB each for SmolLM2 (V=49152) at 4×128 tokens, ~1 GiB each for a 7B model (V=32000) at 16×512.
Here the head's matmul, the log-softmax and its gradient run over ``chunk_size`` tokens at a time: a chunk's
logits (chunk·V·4 bytes, two or three such buffers at once) are the largest temporary, in forward and in backward.
Only the hidden states (B·T·d, which the unpatched head saves too) and three vectors of B·T are kept for backward.

Cost: each chunk's logits are computed twice (forward, then again in backward), one extra chunk·V·d matmul,
i.e. the head's share of the FLOPs grows by a third (a few percent of a step for SmolLM2, less for larger models).

Prior art: Liger-Kernel's fused linear cross-entropy (https://github.com/linkedin/Liger-Kernel) computes the
gradients during forward; Apple's Cut Cross-Entropy (https://arxiv.org/abs/2411.09009) recomputes the logits
blockwise in backward. This module takes the recompute route in pure torch (CPU/CUDA, any float dtype); see
``_LinearCrossEntropySum`` for why.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
from types import MethodType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.loss.loss_utils import ForCausalLMLoss
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import slice_logits_to_keep
from transformers.utils.generic import can_return_tuple

from owlore.memory.option import MemoryOption

logger = logging.getLogger(__name__)

_CHUNK = "_owlore_chunk_size"  # instance attribute: the chunk size, or None when disabled
_PREVIOUS = "_owlore_previous_forward"  # the instance-level forward we replaced (None: the class's)


def _logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """One chunk's logits, the matmul in the model's dtype and the rest in at least fp32, as HF's loss does."""
    logits = F.linear(hidden, weight, bias)
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


class _LinearCrossEntropySum(torch.autograd.Function):
    """Sum over the non-ignored tokens of ``cross_entropy(hidden @ weight.T + bias, targets)``.

    Store or recompute? Computing the gradients during forward (Liger) saves the backward matmul that recomputes
    the logits, but keeps grad_hidden (N·d) and, for a trainable head, an fp32 grad_weight (V·d·4 bytes, 500 MiB
    at 7B) alive from the forward to the backward. In one forward then one backward that costs no more peak than
    recomputing (whose V·d accumulator appears at the start of backward, when the activations are still alive),
    but any forward before that backward (DPO pairs, teacher and student, two micro-batches in one graph) holds
    one more V·d, and a forward whose backward never comes (a metric under grad) pays for both gradients.
    Recomputing saves only what the unpatched head saves (hidden, N·d) plus ``rows``, ``targets`` and ``lse``
    (N each), so its memory does not depend on how the graph is used; one chunk·V·d matmul is the price.
    With a frozen head (``weight.requires_grad`` False) no V·d buffer exists at all: backward checks
    ``needs_input_grad`` and skips the weight gradient's matmul too.
    Ignored tokens (padding, prompts) are dropped before chunking, so they cost no matmul at all.
    """

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor, chunk_size: int, ignore_index: int) -> torch.Tensor:
        rows = (targets != ignore_index).nonzero().squeeze(1)  # one host sync, like HF's num_items_in_batch
        kept = targets[rows]
        dtype = torch.promote_types(hidden.dtype, torch.float32)
        lse = torch.empty(rows.numel(), dtype=dtype, device=hidden.device)
        total = torch.zeros((), dtype=dtype, device=hidden.device)
        for start in range(0, rows.numel(), chunk_size):
            end = min(start + chunk_size, rows.numel())
            logits = _logits(hidden.index_select(0, rows[start:end]), weight, bias)
            lse[start:end] = torch.logsumexp(logits, dim=-1)
            total += (lse[start:end] - logits.gather(1, kept[start:end, None]).squeeze(1)).sum()
        ctx.save_for_backward(hidden, weight, bias, rows, kept, lse)
        ctx.chunk_size = chunk_size
        return total

    @staticmethod
    def backward(ctx: Any, grad_total: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        hidden, weight, bias, rows, kept, lse = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None
        # accumulated over chunks in fp32 (bf16 partial sums would lose bits); V·d, only when the head trains.
        # Each chunk adds grad_logitsᵀ·h as one fp32 GEMM from the fp32 grad_logits (TF32 on Ampere+ if enabled):
        # a bf16 product would be rounded to bf16 and then copied to fp32, two V·d temporaries (~0.8 GB at 7B).
        grad_weight = torch.zeros_like(weight, dtype=lse.dtype) if need_weight else None
        grad_bias = torch.zeros_like(bias, dtype=lse.dtype) if need_bias else None
        for start in range(0, rows.numel(), ctx.chunk_size):
            end = min(start + ctx.chunk_size, rows.numel())
            index = rows[start:end]
            h = hidden.index_select(0, index)
            # d(lse - logit_t)/d logits = softmax - onehot(t), built in place in the recomputed logits
            grad_logits = _logits(h, weight, bias).sub_(lse[start:end, None]).exp_()
            grad_logits.scatter_add_(1, kept[start:end, None], grad_logits.new_full((end - start, 1), -1.0))
            grad_logits.mul_(grad_total)
            g = grad_logits.to(hidden.dtype)
            if need_hidden:
                grad_hidden.index_copy_(0, index, g @ weight)
            if need_weight:  # in place into the fp32 sum: no V·d temporary, no bf16 rounding of a chunk's part
                grad_weight.addmm_(grad_logits.t(), h.to(grad_weight.dtype))
            if need_bias:
                grad_bias += grad_logits.sum(0)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None


def chunked_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                                 chunk_size: int, bias: torch.Tensor | None = None, ignore_index: int = -100,
                                 num_items_in_batch: torch.Tensor | int | None = None,
                                 shift_labels: bool = True) -> torch.Tensor:
    """transformers' ``ForCausalLMLoss(hidden @ weight.T + bias, labels)`` without the full logits.

    Args:
        hidden: last hidden states, ``(..., T, d)``.
        weight: the output head, ``(V, d)``.
        labels: ``(..., T)`` token ids, ``ignore_index`` where no loss is wanted.
        chunk_size: tokens per chunk; the largest temporary is ``chunk_size × V`` fp32 logits.
        bias: the head's bias, ``(V,)``, if any.
        ignore_index: label value that contributes nothing.
        num_items_in_batch: divide the summed loss by this (the Trainer's count under gradient accumulation)
            instead of taking the mean over the non-ignored tokens.
        shift_labels: shift ``labels`` left by one (position i predicts token i+1), as HF does; False when they
            are already shifted (the Trainer's ``shift_labels`` under context parallelism).

    Returns:
        The loss, a scalar in at least fp32. Gradients flow to ``hidden``, ``weight`` and ``bias``.

    Raises:
        ValueError: a non-positive ``chunk_size``, or labels that do not match the hidden states.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r}: must be a positive number of tokens")
    if shift_labels:
        labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    targets = labels.reshape(-1).to(hidden.device)
    hidden = hidden.reshape(-1, hidden.shape[-1])
    if targets.numel() != hidden.shape[0]:
        raise ValueError(f"labels {tuple(labels.shape)} do not match the {hidden.shape[0]} hidden states")
    device = hidden.device.type
    autocast = torch.amp.is_autocast_available(device)  # False on backends without autocast (lazy, XLA)
    if autocast and torch.is_autocast_enabled(device):  # cast as autocast would for the head, math outside it
        dtype = torch.get_autocast_dtype(device)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    with torch.autocast(device, enabled=False) if autocast else contextlib.nullcontext():
        total = _LinearCrossEntropySum.apply(hidden, weight, bias, targets, chunk_size, ignore_index)
    if num_items_in_batch is None:
        return total / (targets != ignore_index).sum()
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


_DECODER_THEN_HEAD = frozenset({"LlavaForConditionalGeneration"})
"""Multimodal models whose forward is also ``self.model(...)`` (vision + language, returning ``last_hidden_state``)
then ``lm_head`` and ``ForCausalLMLoss``, so the chunked loss reproduces theirs (tested for LLaVA)."""


def _causal_lm(model: nn.Module) -> nn.Module:
    """The HF causal LM inside ``model`` (itself, or the base model of a peft wrapper)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _unsupported(lm: nn.Module) -> list[str]:
    """Why the chunked loss would not equal ``lm``'s own loss (empty: it would)."""
    config = getattr(lm, "config", None)
    issues = []
    if getattr(config, "final_logit_softcapping", None) is not None:
        issues.append(f"final_logit_softcapping={config.final_logit_softcapping} (tanh softcap of the logits)")
    if getattr(config, "logit_scale", 1.0) not in (None, 1.0) or getattr(config, "logits_scaling", 1.0) != 1.0:
        issues.append("the config scales the logits (logit_scale / logits_scaling)")
    if getattr(config, "output_router_logits", False):
        issues.append("output_router_logits=True adds a router auxiliary loss")
    if getattr(lm, "loss_function", None) is not ForCausalLMLoss:
        issues.append("its loss_function is not transformers' ForCausalLMLoss")
    if type(lm).__name__ not in _DECODER_THEN_HEAD and (
            not hasattr(lm, "get_decoder") or lm.get_decoder() is not getattr(lm, "model", None)):
        issues.append("its forward is not `model` (the decoder) then the head (e.g. a multimodal model)")
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    if type(head) is not nn.Linear:
        issues.append(f"the output head is a {type(head).__name__}, not a plain nn.Linear (e.g. a peft LoRA "
                      "layer or modules_to_save on lm_head); keep lm_head out of the adapter's target_modules")
    elif head._forward_hooks or head._forward_pre_hooks:
        issues.append("the output head has forward hooks (e.g. accelerate offload), which the chunks would skip")
    return issues


def enable_chunked_loss(model: nn.Module, chunk_size: int) -> None:
    """Compute the training loss of ``model`` (an HF causal LM, or a peft wrapper of one) in chunks of tokens.

    Patches the causal LM's instance ``forward``: with ``labels`` and grad enabled it runs the decoder and returns
    ``CausalLMOutputWithPast(loss=chunked loss, logits=None, ...)``; otherwise (generation, evaluation under
    no_grad) the original forward runs unchanged. Calling it again only changes the chunk size.

    Raises:
        ValueError: a non-positive ``chunk_size``, or a model whose loss this cannot reproduce exactly.
    """
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r}: must be a positive number of tokens")
    lm = _causal_lm(model)
    if getattr(lm, _CHUNK, None) is None:
        issues = _unsupported(lm)
        if issues:
            raise ValueError(f"chunked loss cannot reproduce {type(lm).__name__}'s loss exactly: "
                             + "; ".join(issues))
    if _PREVIOUS not in lm.__dict__:  # not patched yet (a wrapper put over our forward keeps it patched)
        setattr(lm, _PREVIOUS, lm.__dict__.get("forward"))
        lm.forward = _patched_forward(lm)
    setattr(lm, _CHUNK, chunk_size)
    logger.debug("chunked loss on %s: %d tokens per chunk", type(lm).__name__, chunk_size)


def disable_chunked_loss(model: nn.Module) -> None:
    """Undo ``enable_chunked_loss``: the model's own forward and loss again (no-op if not enabled)."""
    lm = _causal_lm(model)
    if getattr(lm, _CHUNK, None) is None:
        return
    setattr(lm, _CHUNK, None)
    if getattr(lm.__dict__.get("forward"), "_owlore_chunked", False):
        previous = lm.__dict__.pop(_PREVIOUS)
        del lm.forward
        if previous is not None:
            lm.forward = previous
    # else something wrapped our forward since (accelerate's autocast); it stays, and passes straight through


def _patched_forward(lm: nn.Module) -> MethodType:
    """``_chunked_forward`` bound to ``lm`` (so ``deepcopy`` rebinds it), with the class forward's signature: the
    Trainer keeps the dataset columns and passes ``num_items_in_batch`` by that signature."""

    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        return _chunked_forward(self, *args, **kwargs)

    functools.update_wrapper(forward, type(lm).forward)
    forward._owlore_chunked = True
    return MethodType(forward, lm)


def _original_forward(lm: nn.Module) -> Any:
    previous = lm.__dict__.get(_PREVIOUS)
    return previous if previous is not None else type(lm).forward.__get__(lm)


@can_return_tuple
def _chunked_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The patched forward: the chunked loss when training with labels, the original forward otherwise."""
    original = _original_forward(self)
    chunk_size = getattr(self, _CHUNK, None)
    if args:  # normalise positional arguments to keywords, by the original signature
        signature = inspect.signature(original)
        bound = signature.bind(*args, **kwargs).arguments
        extra = [n for n, p in signature.parameters.items() if p.kind is inspect.Parameter.VAR_KEYWORD]
        kwargs = {**(bound.pop(extra[0], {}) if extra else {}), **bound}
    if chunk_size is None or kwargs.get("labels") is None or not torch.is_grad_enabled():
        return original(**kwargs)
    labels = kwargs.pop("labels")
    logits_to_keep = kwargs.pop("logits_to_keep", 0)
    num_items_in_batch = kwargs.pop("num_items_in_batch", None)
    ignore_index = kwargs.pop("ignore_index", -100)
    shifted = kwargs.pop("shift_labels", None)  # already-shifted labels (context parallelism), as ForCausalLMLoss
    outputs = self.model(**kwargs)
    hidden = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
    head = self.get_output_embeddings()
    loss = chunked_linear_cross_entropy(
        hidden, head.weight, labels if shifted is None else shifted, chunk_size=chunk_size, bias=head.bias,
        ignore_index=ignore_index, num_items_in_batch=num_items_in_batch, shift_labels=shifted is None)
    return CausalLMOutputWithPast(loss=loss, logits=None, past_key_values=outputs.past_key_values,
                                  hidden_states=outputs.hidden_states, attentions=outputs.attentions)


# ------------------------------------------------------------------------------------------------ the option
def _apply(chunk: int, parts: Any, cfg: Any) -> None:
    enable_chunked_loss(parts.model, chunk)
    logger.info("chunked loss: output head + cross-entropy in chunks of %d tokens", chunk)


OPTION = MemoryOption(
    name="chunked_loss", default=0,
    doc="output head + cross-entropy in chunks of N tokens: the full logits and their gradient never exist",
    check=lambda v: None if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else (
        "must be 0 (off) or a positive number of tokens per chunk, e.g. 2048"),
    fsdp2=False, apply=_apply, estimate=lambda v, cfg: {"chunked_loss": v})
