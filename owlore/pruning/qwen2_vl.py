"""Qwen2-VL / Qwen2.5-VL adapter: prune the patch merger's output tokens, keep their original 3-D M-RoPE positions.

Qwen2-VL (Wang et al. 2024, arXiv 2409.12191) encodes each image at its own resolution; the patch merger
(``visual.merger``: LayerNorm + MLP over 2×2 neighbouring patches) produces the tokens the language model sees, so
it plays the projector's role (ZOO-Prune treats it so). Here:

* a selection unit is an image; its pre-projector "features" are the vision tower's last hidden states of each
  merge group (``(N, 4·d)``), and the projector is the merger applied to them, so ``zoo``, ``divprune``, ``cdpruner``
  and ``random`` run unchanged (the merger's LayerNorm rules out ``zoo_exact``'s closed form);
* positions: the full prompt's M-RoPE index (``get_rope_index``) is computed first, then the kept columns are taken,
  so every kept token keeps its (t, h, w) position and decoding continues after the unpruned prompt's largest
  position, as without pruning (``generate`` extends the given ``(3, B, L')`` positions by one per step);
* Qwen2.5-VL runs most tower blocks on windows and keeps the merge groups in window order until after the merger;
  the adapter puts them back in raster order (the order of the placeholders and of the merger's output);
* one resolution per call: every image of a batch must have the same ``image_grid_thw`` (selection is batched over
  images of equal token count); batch images by resolution.

Not supported: methods that need the vision attention or a [CLS] token (Qwen2-VL's vision attention is a fused
``qkv`` with 2-D RoPE over variable-length sequences, and there is no [CLS]), and pruning inside the language model.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from owlore.pruning.adapters import ImageLayout, LlavaAdapter, counted_image_mask
from owlore.pruning.llava import VisionEncoding
from owlore.pruning.sequence import compactor

__all__ = ["MergerProjector", "Qwen2VLAdapter"]


class MergerProjector(nn.Module):
    """Qwen2-VL's patch merger as a projector on ``(..., N, 4·d)`` grouped features (LayerNorm per patch, then the
    MLP), so pruning methods can call it like LLaVA's projector."""

    def __init__(self, merger: nn.Module, groups: int = 4) -> None:
        super().__init__()
        self.merger, self.groups = merger, groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = self.merger.ln_q(x.unflatten(-1, (self.groups, -1))).flatten(-2)
        return self.merger.mlp(normed)


class Qwen2VLAdapter(LlavaAdapter):
    """``Qwen2VLForConditionalGeneration`` / ``Qwen2_5_VLForConditionalGeneration`` (one unit per image, so
    ``assemble`` and ``inject`` are LLaVA's)."""

    name = "qwen2_vl"
    title = "Qwen2-VL"
    model_classes = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")

    def unsupported(self, method: Any) -> str | None:
        if method.stage == "llm":
            return "M-RoPE positions inside the LLM are not sliced yet"
        if {"attention", "cls"} & set(method.needs):
            return "needs the vision attention / [CLS] (fused qkv, 2-D RoPE, no [CLS])"
        if "mlp_projector" in method.needs:
            return "the merger's LayerNorm has no closed form (use zoo)"
        return None

    def modules(self, model: nn.Module) -> tuple[nn.Module, nn.Module]:
        visual = model.model.visual
        return visual, MergerProjector(visual.merger, visual.spatial_merge_size ** 2)

    def encode(self, model: nn.Module, pixel_values: torch.Tensor, *, attention: bool, attn_layer: int | None,
               image_grid_thw: torch.Tensor | None = None, **image_kwargs: Any) -> tuple[VisionEncoding, ImageLayout]:
        if image_grid_thw is None:
            raise ValueError("Qwen2-VL pruning needs image_grid_thw (the processor returns it with pixel_values)")
        if bool((image_grid_thw != image_grid_thw[0]).any()):
            raise ValueError(f"Qwen2-VL pruning needs one resolution per call; got image_grid_thw "
                             f"{image_grid_thw.tolist()}: batch the images by resolution")
        visual = model.model.visual
        hidden = visual(pixel_values.type(visual.dtype), grid_thw=image_grid_thw).last_hidden_state
        group = visual.spatial_merge_size ** 2
        groups = hidden.reshape(-1, group * hidden.shape[-1])  # merge groups, in the tower's order
        if hasattr(visual, "window_size"):  # Qwen2.5-VL runs the groups in window order: back to raster order
            from transformers.vision_utils import get_vision_window_index

            window_index, _ = get_vision_window_index(image_grid_thw, spatial_merge_size=visual.spatial_merge_size,
                                                      window_size=visual.window_size, patch_size=visual.patch_size)
            groups = groups[torch.argsort(window_index)]
        images = image_grid_thw.shape[0]
        features = groups.reshape(images, -1, groups.shape[-1])  # (images, N, 4·d)
        layout = ImageLayout(unit_image=torch.arange(images, device=hidden.device),
                             placeholders=[features.shape[1]] * images, extra={"image_grid_thw": image_grid_thw})
        return VisionEncoding(features=features, cls_dropped=False), layout

    def image_mask(self, model: nn.Module, input_ids: torch.Tensor, layout: ImageLayout) -> torch.Tensor:
        return counted_image_mask(input_ids, model.config.image_token_id, layout)

    def positions(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep: torch.Tensor,
                  layout: ImageLayout) -> torch.Tensor:
        """``(3, B, L')`` M-RoPE positions of the kept tokens, taken from the full prompt's."""
        types = (input_ids == model.config.image_token_id).int()
        full, _ = model.model.get_rope_index(input_ids, types, image_grid_thw=layout.extra["image_grid_thw"],
                                             attention_mask=attention_mask)
        return compactor(keep, attention_mask)(full, 0)
