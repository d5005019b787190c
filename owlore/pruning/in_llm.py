"""Pruning inside the language model: visual tokens are dropped after decoder layer ``K`` (FastV, DART).

Why hooks rather than a shorter prompt: these methods score tokens with what the first ``K`` decoder layers compute
(the last token's attention, keys, hidden states), so layers ``< K`` must see every token and layers ``>= K`` only
the kept ones. transformers builds one attention mask and one set of rotary embeddings for all layers, so:

* a pre-hook on layer ``K - 1``'s attention recomputes only what the method needs from that layer's input (the last
  token's attention row, or the post-RoPE keys), so every layer keeps SDPA (FastV's code needs eager attention);
* a pre-hook on layer ``K`` selects the kept tokens and shortens the hidden states; pre-hooks on layers ``>= K``
  shorten the shared mask, rotary embeddings and position ids the same way. Kept tokens keep their original
  positions (FastV and DART do), so decoding continues after the unpruned length;
* in the KV cache, layers ``< K`` hold every prompt token and layers ``>= K`` only the kept ones; at each decode
  step the pre-hooks drop the pruned prompt columns from the attention mask of layers ``>= K``;
* a hook on the final norm scatters the shortened hidden states back to the prompt's length (zeros at dropped
  positions), so ``logits[:, i]`` still belongs to input position ``i`` and text-token losses are unchanged.

``VisualTokenPruner.prepare`` arms the hooks with the prompt's image positions; they act on every new sequence of
that prompt length until the next ``prepare`` (or ``detach_llm_pruning``). Selection runs once, at prefill (static,
as in FastV with the cache).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["LLMSelectionContext", "LLMStagePruning", "attach_llm_pruning", "detach_llm_pruning", "language_model_parts",
           "llm_stage_of"]

_MARK = "_owlore_llm_pruning"


@dataclass
class LLMSelectionContext:
    """What an LLM-stage method reads to keep ``k`` visual tokens per image.

    Attributes:
        k: Visual tokens to keep per image.
        image_positions: ``(B, I, N)`` sequence positions of each row's ``I`` images' ``N`` tokens.
        attention_mask: ``(B, L)`` the prompt's 2-D mask.
        last_attention: ``(B, L)`` head-averaged attention of each row's last token at layer ``K - 1``
            (``llm_attention`` methods).
        keys: ``(B, L, H_kv * d)`` layer ``K - 1`` post-RoPE keys, heads concatenated (``llm_keys`` methods).
        hidden: ``(B, L, d)`` the input of layer ``K`` after the model's final norm (``llm_hidden`` methods).
    """

    k: int
    image_positions: torch.Tensor
    attention_mask: torch.Tensor
    last_attention: torch.Tensor | None = None
    keys: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)


def language_model_parts(model: nn.Module) -> tuple[nn.ModuleList, nn.Module]:
    """``(decoder layers, final norm)`` of a LLaVA's language model (any HF decoder with ``.layers`` and ``.norm``)."""
    inner = getattr(model, "model", model)
    lm = getattr(inner, "language_model", None)
    if lm is None or not hasattr(lm, "layers") or not hasattr(lm, "norm"):
        raise TypeError(f"{type(model).__name__}: no .model.language_model with .layers and .norm; LLM-stage pruning "
                        "needs an HF decoder-only language model")
    return lm.layers, lm.norm


def _rope_module(attention: nn.Module):
    module = sys.modules[type(attention).__module__]
    if not hasattr(module, "apply_rotary_pos_emb"):
        raise TypeError(f"{type(attention).__name__}: no apply_rotary_pos_emb in {module.__name__}")
    return module.apply_rotary_pos_emb


def _qk(attention: nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
        query_rows: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Post-RoPE keys ``(B, H_kv, L, d)`` of all tokens and queries ``(B, H, 1, d)`` of ``query_rows`` (or None)."""
    b, length, _ = hidden.shape
    d = attention.head_dim
    key = attention.k_proj(hidden).view(b, length, -1, d)
    if hasattr(attention, "k_norm"):
        key = attention.k_norm(key)
    key = key.transpose(1, 2)
    rope = _rope_module(attention)
    if query_rows is None:
        _, key = rope(key, key, cos, sin)
        return None, key
    rows = torch.arange(b, device=hidden.device)
    h_last = hidden[rows, query_rows][:, None]
    query = attention.q_proj(h_last).view(b, 1, -1, d)
    if hasattr(attention, "q_norm"):
        query = attention.q_norm(query)
    query = query.transpose(1, 2)
    cos_q, sin_q = (t.expand(b, -1, -1)[rows, query_rows][:, None] for t in (cos, sin))
    query, _ = rope(query, query, cos_q, sin_q)
    _, key = rope(key, key, cos, sin)
    return query, key


def last_token_attention(attention: nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         attention_mask: torch.Tensor) -> torch.Tensor:
    """``(B, L)`` head-averaged softmax attention of each row's last real token (causal, padding masked)."""
    last = attention_mask.long().cumsum(-1).argmax(-1)  # the last position with mask 1 (right or left padding)
    query, key = _qk(attention, hidden, cos, sin, last)
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)
    logits = (query.float() @ key.float().transpose(-1, -2)).squeeze(2) * attention.scaling  # (B, H, L)
    positions = torch.arange(hidden.shape[1], device=hidden.device)
    visible = attention_mask.bool() & (positions[None] <= last[:, None])
    logits = logits.masked_fill(~visible[:, None], -float("inf"))
    return logits.softmax(-1).mean(1)


class LLMStagePruning:
    """The hooks of one LLM-stage pruner on one model (see the module docstring)."""

    def __init__(self, model: nn.Module, layer: int, needs: frozenset[str], select) -> None:
        layers, norm = language_model_parts(model)
        if not 1 <= layer < len(layers):
            raise ValueError(f"LLM-stage pruning after layer K={layer}: need 1 <= K < {len(layers)} (the number of "
                             "decoder layers)")
        self.layer, self.needs, self.select = layer, needs, select
        self.norm = norm
        self.armed: dict[str, Any] | None = None
        self.keep: torch.Tensor | None = None  # (B, L') kept prompt positions of the current sequence
        self.full_length = 0
        self._captured: dict[str, torch.Tensor] = {}
        self._active = False
        self._handles = [layers[0].register_forward_pre_hook(self._on_first_layer, with_kwargs=True),
                         layers[layer - 1].self_attn.register_forward_pre_hook(self._on_score_layer,
                                                                               with_kwargs=True),
                         norm.register_forward_hook(self._on_norm)]
        self._handles += [layers[i].register_forward_pre_hook(self._on_pruned_layer, with_kwargs=True)
                          for i in range(layer, len(layers))]
        self.last_keep: torch.Tensor | None = None

    def arm(self, *, k: int, image_positions: torch.Tensor, attention_mask: torch.Tensor, seed: int,
            options: dict[str, Any]) -> None:
        self.armed = {"k": k, "image_positions": image_positions, "attention_mask": attention_mask, "seed": seed,
                      "options": options}

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # hooks ---------------------------------------------------------------------------------------------------
    def _on_first_layer(self, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        cache = kwargs.get("past_key_values")
        new_sequence = cache is None or cache.get_seq_length() == 0
        if new_sequence:
            self.keep = None
            self._captured = {}
            self._active = self.armed is not None and hidden.shape[1] == self.armed["attention_mask"].shape[1]
        return None

    def _on_score_layer(self, module, args, kwargs):
        if not self._active or self.keep is not None:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        cos, sin = kwargs["position_embeddings"]
        if "llm_attention" in self.needs:
            self._captured["last_attention"] = last_token_attention(module, hidden.detach(), cos, sin,
                                                                    self.armed["attention_mask"])
        if "llm_keys" in self.needs:
            _, key = _qk(module, hidden.detach(), cos, sin, None)
            self._captured["keys"] = key.transpose(1, 2).flatten(2)
        return None

    def _on_pruned_layer(self, module, args, kwargs):
        if not self._active:
            return None
        hidden = args[0] if args else kwargs.pop("hidden_states")
        args = args[1:] if args else ()
        if self.keep is None:  # layer K at prefill: choose
            if hidden.shape[1] != self.armed["attention_mask"].shape[1]:
                return None
            with torch.no_grad():
                ctx = LLMSelectionContext(
                    k=self.armed["k"], image_positions=self.armed["image_positions"],
                    attention_mask=self.armed["attention_mask"], last_attention=self._captured.get("last_attention"),
                    keys=self._captured.get("keys"),
                    hidden=self.norm(hidden.detach()) if "llm_hidden" in self.needs else None,
                    seed=self.armed["seed"], options=self.armed["options"])
                kept_images = self.select(ctx)  # (B, I, k) positions
            self.keep = _keep_positions(hidden.shape[1], self.armed["image_positions"], kept_images)
            self.full_length = hidden.shape[1]
            self.last_keep = self.keep
        rows = torch.arange(hidden.shape[0], device=hidden.device)[:, None]
        if hidden.shape[1] == self.full_length:  # prefill, layer K: shorten the hidden states
            hidden = hidden[rows, self.keep]
        prefill = hidden.shape[1] == self.keep.shape[1] and kwargs.get("position_embeddings") is not None and \
            kwargs["position_embeddings"][0].shape[-2] == self.full_length
        if prefill:
            cos, sin = kwargs["position_embeddings"]
            kwargs["position_embeddings"] = tuple(t.expand(hidden.shape[0], -1, -1)[rows, self.keep] for t in (cos, sin))
            if kwargs.get("position_ids") is not None:
                kwargs["position_ids"] = kwargs["position_ids"].expand(hidden.shape[0], -1)[rows, self.keep]
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 4:
            kv = mask.shape[-1]
            cols = torch.cat([self.keep, torch.arange(self.full_length, kv, device=mask.device)
                              .expand(mask.shape[0], -1)], dim=1)
            mask = mask.expand(hidden.shape[0], -1, -1, -1)
            mask = mask.gather(3, cols[:, None, None, :].expand(-1, mask.shape[1], mask.shape[2], -1))
            if prefill:
                mask = mask.gather(2, self.keep[:, None, :, None].expand(-1, mask.shape[1], -1, mask.shape[3]))
            kwargs["attention_mask"] = mask
        return (hidden, *args), kwargs

    def _on_norm(self, module, args, output):
        if not self._active or self.keep is None or output.shape[1] != self.keep.shape[1] \
                or self.keep.shape[1] == self.full_length:
            return None
        full = output.new_zeros(output.shape[0], self.full_length, output.shape[2])
        rows = torch.arange(output.shape[0], device=output.device)[:, None]
        full[rows, self.keep] = output
        return full


def _keep_positions(length: int, image_positions: torch.Tensor, kept_images: torch.Tensor) -> torch.Tensor:
    """``(B, L')`` sorted positions: every non-image position plus the kept image positions."""
    b = image_positions.shape[0]
    keep = torch.ones(b, length, dtype=torch.bool, device=image_positions.device)
    rows = torch.arange(b, device=keep.device)[:, None]
    keep[rows, image_positions.flatten(1)] = False
    keep[rows, kept_images.flatten(1)] = True
    counts = keep.sum(1)
    if bool((counts != counts[0]).any()):
        raise ValueError("LLM-stage pruning needs the same number of images in every row")
    return keep.nonzero()[:, 1].view(b, int(counts[0]))


def attach_llm_pruning(model: nn.Module, owner: object, layer: int, needs: frozenset[str], select) -> LLMStagePruning:
    """The hooks of ``owner`` on ``model`` (installed once; another owner's hooks are replaced)."""
    current = llm_stage_of(model, owner)
    if current is not None and current.layer == layer:
        return current
    detach_llm_pruning(model)
    stage = LLMStagePruning(model, layer, needs, select)
    setattr(model, _MARK, (owner, stage))
    return stage


def llm_stage_of(model: nn.Module, owner: object) -> LLMStagePruning | None:
    """The hooks ``owner`` installed on ``model``, or None (none, or another owner's)."""
    current = getattr(model, _MARK, None)
    return current[1] if current is not None and current[0] is owner else None


def detach_llm_pruning(model: nn.Module) -> None:
    """Remove LLM-stage pruning hooks from ``model`` (no-op if none)."""
    current = getattr(model, _MARK, None)
    if current is not None:
        current[1].remove()
        delattr(model, _MARK)
