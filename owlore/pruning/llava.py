"""The model-specific part: LLaVA (transformers 5.x) vision features, placeholder layout, injection.

Everything else in ``owlore.pruning`` works on plain tensors. This module knows where LLaVA keeps its
vision tower, feature layer, projector and ``<image>`` id, and how pruned features are handed back:
``mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=[per-image tensors])}``, which
``LlavaForConditionalGeneration.forward`` accepts instead of ``pixel_values`` and which ``generate``
forwards at prefill only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from owlore.pruning.vit_attention import capture_qk

__all__ = ["VisionEncoding", "encode_images", "image_token_mask", "llava_modules", "to_mm_encoder_outputs"]


@dataclass
class VisionEncoding:
    """Vision-tower outputs needed for selection.

    Attributes:
        features: ``(images, N, d_v)`` pre-projector features at the LLaVA feature layer.
        query: ``(images, heads, T, head_dim)`` of the attention layer, or None if not requested.
        key: Same shape as ``query``.
        scale: Attention logit scale of that layer.
        cls_dropped: True when the tower's token 0 ([CLS]) is not among ``features`` (strategy "default").
        shallow_query: Queries of a shallow layer too (``shallow_attention`` methods, e.g. VScan's local scan).
        shallow_key: Its keys.
    """

    features: torch.Tensor
    query: torch.Tensor | None = None
    key: torch.Tensor | None = None
    scale: float = 1.0
    cls_dropped: bool = True
    shallow_query: torch.Tensor | None = None
    shallow_key: torch.Tensor | None = None


def llava_modules(model: nn.Module) -> tuple[nn.Module, nn.Module, object]:
    """Return ``(vision_tower, projector, config)`` of a ``LlavaForConditionalGeneration`` or ``LlavaModel``.

    Raises:
        TypeError: If the model has no LLaVA-style vision tower and projector.
    """
    inner = getattr(model, "model", model)
    tower = getattr(inner, "vision_tower", None)
    projector = getattr(inner, "multi_modal_projector", None)
    if tower is None or projector is None:
        raise TypeError(
            f"{type(model).__name__} is not a LLaVA-style model (needs .model.vision_tower and "
            ".model.multi_modal_projector); visual-token pruning supports LlavaForConditionalGeneration"
        )
    return tower, projector, model.config


def _encoder_layers(tower: nn.Module) -> nn.ModuleList:
    return getattr(tower, "vision_model", tower).encoder.layers


def _feature_layer_to_attention_layer(feature_layer: int | list[int], num_layers: int) -> int:
    # hidden_states[0] is the embedding output, hidden_states[i] the output of encoder layer i - 1.
    deepest = max(
        f if f >= 0 else num_layers + 1 + f
        for f in ([feature_layer] if isinstance(feature_layer, int) else feature_layer)
    )
    if deepest == 0:
        raise ValueError("the feature layer is the embedding output; pass attn_layer explicitly")
    return deepest - 1


def shallow_layer_index(num_layers: int) -> int:
    """The default shallow layer of ``shallow_attention`` methods: VScan's 6th of CLIP-L's 24 layers, scaled."""
    return max(0, round(num_layers * 6 / 24) - 1)


def encode_images(
    model: nn.Module, pixel_values: torch.Tensor, *, attention: bool, attn_layer: int | None = None,
    shallow: bool = False, shallow_layer: int | None = None,
) -> VisionEncoding:
    """Run the vision tower once (SDPA kept) and gather LLaVA's pre-projector features.

    Gradients follow the ambient grad mode, so in training the kept features stay differentiable;
    the captured queries/keys are always detached.

    Args:
        model: A LLaVA model.
        pixel_values: ``(images, 3, H, W)``.
        attention: Also capture one layer's queries and keys.
        attn_layer: Encoder layer whose attention to capture; by default the layer that produces the
            LLaVA feature layer (-2, the penultimate layer, for LLaVA-1.5).
        shallow: Also capture a shallow layer's queries and keys (``shallow_layer``, default
            :func:`shallow_layer_index`).

    Returns:
        A :class:`VisionEncoding`.
    """
    tower, _, config = llava_modules(model)
    feature_layer = config.vision_feature_layer
    layers = _encoder_layers(tower)
    captured: dict[str, torch.Tensor] = {}
    layer = None
    if attention:
        index = (
            attn_layer
            if attn_layer is not None
            else _feature_layer_to_attention_layer(feature_layer, len(layers))
        )
        layer = layers[index].self_attn
        low = shallow_layer_index(len(layers)) if shallow_layer is None else shallow_layer
        with capture_qk(layer) as captured, capture_qk(layers[low].self_attn if shallow else None) as early:
            out = tower(pixel_values, output_hidden_states=True, return_dict=True)
    else:
        early = {}
        out = tower(pixel_values, output_hidden_states=True, return_dict=True)
    hidden = out.hidden_states
    strategy = config.vision_feature_select_strategy
    picked = [hidden[feature_layer]] if isinstance(feature_layer, int) else [hidden[i] for i in feature_layer]
    if strategy == "default":
        picked = [h[:, 1:] for h in picked]
    scale = getattr(layer, "scale", getattr(layer, "scaling", 1.0)) if layer is not None else 1.0
    return VisionEncoding(
        features=torch.cat(picked, dim=-1),
        query=captured.get("query"),
        key=captured.get("key"),
        scale=float(scale),
        cls_dropped=strategy == "default",
        shallow_query=early.get("query"),
        shallow_key=early.get("key"),
    )


def image_token_mask(
    input_ids: torch.Tensor, *, image_token_id: int, num_images: int, tokens_per_image: int
) -> torch.Tensor:
    """Placeholder mask, checked against the number of images and tokens per image.

    Raises:
        ValueError: If there are no ``<image>`` tokens, or their count per row is not a multiple of
            ``tokens_per_image``, or the total does not match ``num_images * tokens_per_image``.
    """
    mask = input_ids == image_token_id
    per_row = mask.sum(dim=1)
    total = int(per_row.sum())
    if total == 0:
        raise ValueError(
            f"input_ids contain no image tokens (id {image_token_id}) but pixel_values were given; "
            "expand each <image> into its placeholders with the processor first"
        )
    if bool((per_row % tokens_per_image != 0).any()) or total != num_images * tokens_per_image:
        raise ValueError(
            f"image tokens and features do not match: {per_row.tolist()} <image> tokens per row, but "
            f"{num_images} image(s) x {tokens_per_image} tokens each; every image needs exactly "
            f"{tokens_per_image} placeholders"
        )
    return mask


def to_mm_encoder_outputs(features: torch.Tensor | list[torch.Tensor]) -> dict[str, BaseModelOutputWithPooling]:
    """Wrap per-image projected features (``(images, k, d_l)`` or a list of ``(k_i, d_l)``) the way LLaVA's and
    LLaVA-NeXT's ``forward(mm_encoder_outputs=...)`` want."""
    per_image = list(features.unbind(0)) if isinstance(features, torch.Tensor) else list(features)
    return {"image": BaseModelOutputWithPooling(pooler_output=per_image)}
