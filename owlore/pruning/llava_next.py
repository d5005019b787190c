"""LLaVA-NeXT (anyres) adapter: the budget is per crop (the base image and each tile), ``image_newline`` tokens stay.

LLaVA-NeXT (Liu et al. 2024, "LLaVA-NeXT: Improved reasoning, OCR, and world knowledge") encodes an image as a base
crop plus a grid of tiles; ``LlavaNextModel.pack_image_features`` lays the tiles out spatially, removes the rows or
columns that only cover padding ("unpad") and appends an ``image_newline`` token to every row. Pruning here:

* every crop is a selection unit: the method keeps ``k`` of its ``N`` tokens (ZOO-Prune's and CDPruner's NeXT variants
  split the budget per crop the same way; ``keep`` is per crop);
* the packed sequence is rebuilt by transformers' own ``pack_image_features`` on the projected tokens, and a second
  call on token ids tells which packed position holds which crop token, so the kept positions are exact whatever
  the unpadding removed; newline tokens are always kept;
* tile tokens that unpadding removes were never in the prompt, so a tile may contribute fewer than ``k`` tokens.

Merging methods (VisionZip) put each merged token at its target's position.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from owlore.pruning.adapters import ImageLayout, LlavaAdapter, counted_image_mask, kept_unit_features
from owlore.pruning.llava import VisionEncoding, encode_images, to_mm_encoder_outputs
from owlore.pruning.registry import Selection

__all__ = ["LlavaNextAdapter"]


def _crops_per_image(model: nn.Module, image_sizes: torch.Tensor) -> list[int]:
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    config = model.config
    return [image_size_to_num_patches(image_size=size, grid_pinpoints=config.image_grid_pinpoints,
                                      patch_size=config.vision_config.image_size) for size in image_sizes]


class LlavaNextAdapter(LlavaAdapter):
    """``LlavaNextForConditionalGeneration``: one unit per crop; features re-packed with newlines."""

    name = "llava_next"
    title = "LLaVA-NeXT"
    model_classes = ("LlavaNextForConditionalGeneration", "LlavaNextModel")

    def unsupported(self, method: Any) -> str | None:
        if method.stage == "llm":
            return "LLM-stage budgets per crop over the packed sequence are not implemented"
        return None

    def encode(self, model: nn.Module, pixel_values: torch.Tensor, *, attention: bool, attn_layer: int | None,
               image_sizes: torch.Tensor | None = None, shallow: bool = False, shallow_layer: int | None = None,
               **image_kwargs: Any) -> tuple[VisionEncoding, ImageLayout]:
        if image_sizes is None:
            raise ValueError("LLaVA-NeXT pruning needs image_sizes (the processor returns it with pixel_values)")
        crops = _crops_per_image(model, image_sizes)
        if pixel_values.dim() == 5:
            pixel_values = torch.cat([p[:c] for p, c in zip(pixel_values, crops)], dim=0)
        enc = encode_images(model, pixel_values, attention=attention, attn_layer=attn_layer, shallow=shallow,
                            shallow_layer=shallow_layer)
        n = enc.features.shape[1]
        inner = model.model
        packed_ids = []
        for i, c in enumerate(crops):
            ids = torch.arange(c * n, dtype=torch.float32, device=enc.features.device).view(c, n, 1)
            packed, _ = inner.pack_image_features([ids], image_sizes[i:i + 1],
                                                  model.config.vision_feature_select_strategy,
                                                  image_newline=torch.tensor([-1.0], device=ids.device))
            packed_ids.append(packed[0][:, 0].round().long())
        unit_image = torch.repeat_interleave(torch.arange(len(crops), device=enc.features.device),
                                             torch.tensor(crops, device=enc.features.device))
        layout = ImageLayout(unit_image=unit_image, placeholders=[len(p) for p in packed_ids],
                             extra={"packed_ids": packed_ids, "crops": crops, "image_sizes": image_sizes})
        return enc, layout

    def image_mask(self, model: nn.Module, input_ids: torch.Tensor, layout: ImageLayout) -> torch.Tensor:
        return counted_image_mask(input_ids, model.config.image_token_id, layout)

    def _pack(self, model: nn.Module, projected: torch.Tensor, layout: ImageLayout) -> list[torch.Tensor]:
        packed, _ = model.model.pack_image_features(list(projected.split(layout.extra["crops"], dim=0)),
                                                    layout.extra["image_sizes"],
                                                    model.config.vision_feature_select_strategy,
                                                    image_newline=model.model.image_newline)
        return packed

    def assemble(self, model: nn.Module, enc: VisionEncoding, projector: nn.Module, projected: torch.Tensor | None,
                 selection: Selection | None, layout: ImageLayout) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        if selection is None:
            return self._pack(model, projector(enc.features), layout), None
        units, n = enc.features.shape[:2]
        full = projected if projected is not None and not torch.is_grad_enabled() else projector(enc.features)
        kept = kept_unit_features(enc.features, projector, projected, selection)
        full = full.scatter(1, selection.indices[..., None].expand(-1, -1, full.shape[-1]), kept.to(full.dtype))
        unit_keep = torch.zeros(units, n, dtype=torch.bool, device=full.device)
        unit_keep.scatter_(1, selection.indices, True)
        features, flags, start = [], [], 0
        for packed, ids, crops in zip(self._pack(model, full, layout), layout.extra["packed_ids"],
                                      layout.extra["crops"]):
            mine = unit_keep[start:start + crops].flatten()
            keep = (ids < 0) | mine[ids.clamp_min(0)]
            features.append(packed[keep])
            flags.append(keep)
            start += crops
        return features, torch.cat(flags)

    def inject(self, features: list[torch.Tensor], layout: ImageLayout) -> dict[str, Any]:
        return {"mm_encoder_outputs": to_mm_encoder_outputs(features)}
