"""Per-model adapters: what differs between VLMs for pruning before the language model.

``VisualTokenPruner`` is model-agnostic: it asks an adapter to encode the images into *selection units* (one image
for LLaVA-1.5; the base image and each tile for LLaVA-NeXT), scores and selects ``k`` tokens per unit with the
registered method, then asks the adapter to build the language-model features of the kept tokens, which placeholder
positions they take, and how to hand them to the model. Adding a model is one adapter class (with its
``model_classes``) and one entry in ``owlore.pruning.models.all_adapters``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from owlore.pruning.llava import (
    VisionEncoding,
    encode_images,
    image_token_mask,
    llava_modules,
    to_mm_encoder_outputs,
)
from owlore.pruning.registry import Selection

__all__ = ["ImageLayout", "LlavaAdapter"]


@dataclass
class ImageLayout:
    """Where each selection unit's tokens go.

    Attributes:
        unit_image: ``(U,)`` the image each unit belongs to (images in placeholder order).
        placeholders: Placeholder count of each image.
        extra: Model-specific bookkeeping (e.g. LLaVA-NeXT's packed-token map).
    """

    unit_image: torch.Tensor
    placeholders: list[int]
    extra: dict[str, Any] = field(default_factory=dict)


def _gather_tokens(values: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return values.gather(1, idx[..., None].expand(-1, -1, values.shape[-1]))


def counted_image_mask(input_ids: torch.Tensor, image_token_id: int, layout: ImageLayout) -> torch.Tensor:
    """Placeholder mask for models whose images have their own token counts, checked against the layout."""
    mask = input_ids == image_token_id
    if int(mask.sum()) != sum(layout.placeholders):
        raise ValueError(f"image tokens and features do not match: {int(mask.sum())} image placeholder tokens, but "
                         f"the images give {layout.placeholders} tokens; expand the images with the processor")
    return mask


def kept_unit_features(features: torch.Tensor, projector: nn.Module, projected: torch.Tensor | None,
                       selection: Selection) -> torch.Tensor:
    """``(U, k, d_l)`` language-model features of the selected (or merged) tokens of each unit.

    At inference, methods that projected every token reuse those rows; in training the kept tokens are projected
    again with gradients; merge weights are applied to the pre-projector features.
    """
    if selection.weights is not None:
        return projector(torch.bmm(selection.weights.to(features.dtype), features))
    if projected is not None and not torch.is_grad_enabled():
        return _gather_tokens(projected, selection.indices)
    return projector(_gather_tokens(features, selection.indices))


class LlavaAdapter:
    """LLaVA-1.5 (``LlavaForConditionalGeneration``): one unit per image, ``N`` placeholders each."""

    name = "llava"
    title = "LLaVA-1.5"
    model_classes = ("LlavaForConditionalGeneration", "LlavaModel")

    def unsupported(self, method: Any) -> str | None:
        """Why ``method`` (a registered ``PruningMethod``) cannot run on this model, or None."""
        return None

    def modules(self, model: nn.Module) -> tuple[nn.Module, nn.Module]:
        """``(vision tower, projector)``; the projector maps the encoding's features to language-model space."""
        tower, projector, _ = llava_modules(model)
        return tower, projector

    def encode(self, model: nn.Module, pixel_values: torch.Tensor, *, attention: bool, attn_layer: int | None,
               shallow: bool = False, shallow_layer: int | None = None,
               **image_kwargs: Any) -> tuple[VisionEncoding, ImageLayout]:
        enc = encode_images(model, pixel_values, attention=attention, attn_layer=attn_layer, shallow=shallow,
                            shallow_layer=shallow_layer)
        images, n = enc.features.shape[:2]
        return enc, ImageLayout(unit_image=torch.arange(images, device=enc.features.device), placeholders=[n] * images)

    def image_mask(self, model: nn.Module, input_ids: torch.Tensor, layout: ImageLayout) -> torch.Tensor:
        return image_token_mask(input_ids, image_token_id=model.config.image_token_id,
                                num_images=len(layout.placeholders), tokens_per_image=layout.placeholders[0])

    def assemble(self, model: nn.Module, enc: VisionEncoding, projector: nn.Module, projected: torch.Tensor | None,
                 selection: Selection | None, layout: ImageLayout) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """Per-image features of the kept tokens, and flat keep flags over all placeholders (None: all kept)."""
        if selection is None:
            return list(projector(enc.features).unbind(0)), None
        token_keep = torch.zeros(enc.features.shape[:2], dtype=torch.bool, device=enc.features.device)
        token_keep.scatter_(1, selection.indices, True)
        return list(kept_unit_features(enc.features, projector, projected, selection).unbind(0)), token_keep.flatten()

    def inject(self, features: list[torch.Tensor], layout: ImageLayout) -> dict[str, Any]:
        return {"mm_encoder_outputs": to_mm_encoder_outputs(features)}
