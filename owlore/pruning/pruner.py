"""``VisualTokenPruner``: one entry point for every selector, pruning before the language model.

Flow of :meth:`VisualTokenPruner.prepare`: run the vision tower once (SDPA; one layer's q/k hooked
if the method needs attention), score and select ``k`` tokens per image under ``no_grad``, project
only what the language model will see, drop the unselected ``<image>`` placeholders from the prompt,
and return kwargs for ``model(**inputs)`` or ``model.generate(**inputs)``. Because the language model
just sees a shorter prompt, batching, the KV cache, ``generate`` and training all work unchanged.
"""

from __future__ import annotations

import logging
import time
from typing import Any, get_args

import torch
from torch import nn

from owlore.pruning.in_llm import attach_llm_pruning, detach_llm_pruning, language_model_parts, llm_stage_of
from owlore.pruning.llava import (
    VisionEncoding,
    image_token_mask,
)
from owlore.pruning.models import adapter_for
from owlore.pruning.registry import (
    PruningMethod,
    Selection,
    SelectionContext,
    as_selection,
    get_method,
    method_names,
)
from owlore.pruning.select import resolve_keep
from owlore.pruning.sequence import PositionPolicy, mask_positions, sequence_keep_mask, shrink_sequences

logger = logging.getLogger(__name__)

__all__ = ["Method", "VisualTokenPruner"]

Method = str
"""A registered method name (``owlore.pruning.registry.method_names()``)."""


class VisualTokenPruner:
    """Training-free visual-token pruning for LLaVA, applied before the language model.

    Args:
        method: A registered method (``owlore.pruning.registry``; docs/pruning.md lists them): ``"fopru_rank"`` /
            ``"fopru_row"`` (FoPru attention significance, global top-k or whole
            grid rows), ``"zoo"`` (ZOO-Prune zeroth-order projector sensitivity + SADS), ``"zoo_exact"``
            (same selection, closed-form sensitivity of the MLP projector), ``"cls"`` ([CLS] attention,
            FasterVLM), ``"divprune"`` (max-min diversity), ``"random"``.
        keep: Tokens per image (int >= 1; >= N means no pruning) or a ratio in (0, 1].
        num_directions: ZOO random directions ``m``. The paper uses 64; its ablation finds 16-160
            equally good, and 16 costs a quarter.
        step: ZOO finite-difference step ``h``.
        seed: Seed of the random directions / random scores: the pruner's generator starts from it and advances
            with every call (new tokens each training step; the same sequence on a rerun).
        chunk_size: ZOO directions per projector call (memory bound).
        attn_layer: Vision encoder layer whose attention FoPru/[CLS] use; default: the layer producing the
            LLaVA feature layer.
        grid: ``(rows, cols)`` of the patch grid for ``fopru_row``; square by default.
        position_policy: ``"contiguous"`` (renumber, the peers' behaviour) or ``"original"`` (kept tokens keep
            their unpruned RoPE positions; decoding continues after the unpruned length).
        method_options: Options of the chosen method beyond the ones above (its registration lists them, e.g.
            ``{"cdpruner_negate": True}``); an option the method does not read is an error.

    Raises:
        ValueError: On an unknown method or position policy, or an invalid ``keep``.
    """

    def __init__(
        self,
        method: Method,
        keep: int | float,
        *,
        num_directions: int = 16,
        step: float = 0.01,
        seed: int = 0,
        chunk_size: int = 4,
        attn_layer: int | None = None,
        grid: tuple[int, int] | None = None,
        position_policy: PositionPolicy = "contiguous",
        method_options: dict[str, Any] | None = None,
    ) -> None:
        self.spec: PruningMethod = get_method(method)
        unknown = sorted(set(method_options or {}) - set(self.spec.options))
        if unknown:
            raise ValueError(f"method_options {unknown} are not options of {method!r}; it reads "
                             f"{list(self.spec.options) or 'none'}")
        self.method_options = dict(method_options or {})
        if position_policy not in get_args(PositionPolicy):
            raise ValueError(f"position_policy must be 'contiguous' or 'original', got {position_policy!r}")
        if num_directions < 1 or step <= 0:
            raise ValueError(f"need num_directions >= 1 and step > 0, got {num_directions} and {step}")
        resolve_keep(keep, 1 << 30)  # validates type and range now rather than at the first batch
        self.method, self.keep = method, keep
        self.num_directions, self.step, self.seed, self.chunk_size = num_directions, step, seed, chunk_size
        self.attn_layer, self.grid, self.position_policy = attn_layer, grid, position_policy
        self._cache: dict[str, Any] = {}
        self.last_stats: dict[str, Any] = {}
        """Of the latest :meth:`prepare` call: ``vision_s``, ``select_s`` (scoring + selection),
        ``project_s`` (projector + prompt shrinking), token counts and ``keep_indices`` (None if
        nothing was pruned); for benchmarks and inspection."""

    def __repr__(self) -> str:
        return f"VisualTokenPruner(method={self.method!r}, keep={self.keep!r})"

    def prepare(
        self,
        model: nn.Module,
        *,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **image_kwargs: Any,
    ) -> dict[str, Any]:
        """Select visual tokens and build the shortened inputs.

        Selection always runs under ``no_grad``; the features the language model receives are computed
        in the ambient grad mode, so in training the loss back-propagates through the kept tokens into
        the projector (and the vision tower if it is trainable).

        Args:
            model: A ``LlavaForConditionalGeneration``.
            input_ids: ``(batch, L)`` with ``N`` ``<image>`` placeholders per image (left or right padded).
            pixel_values: ``(images, 3, H, W)`` (LLaVA-NeXT: ``(images, crops, 3, H, W)``); placeholder order.
            attention_mask: ``(batch, L)``; all ones if omitted.
            labels: Optional ``(batch, L)`` labels; shortened with the prompt.
            image_kwargs: What the model needs besides the pixels (LLaVA-NeXT: ``image_sizes``).

        Returns:
            ``input_ids``, ``attention_mask``, ``position_ids``, ``mm_encoder_outputs`` (and ``labels``),
            ready for ``model(**inputs)`` or ``model.generate(**inputs)``.

        Raises:
            ValueError: If the prompt has no image tokens or their count does not match the images.
        """
        adapter = adapter_for(model)
        tower, projector = adapter.modules(model)
        config = model.config
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if (why := adapter.unsupported(self.spec)) is not None:
            raise ValueError(f"{self.method} does not run on {adapter.title}: {why}; methods that do: "
                             f"{', '.join(m for m in method_names() if adapter.unsupported(get_method(m)) is None)}")
        if self.spec.stage == "llm":
            return self._prepare_llm_stage(model, config, input_ids, pixel_values, attention_mask, labels)
        detach_llm_pruning(model)  # an earlier LLM-stage pruner's hooks must not prune this prompt again
        start = time.perf_counter()
        track = torch.is_grad_enabled() and any(p.requires_grad for p in tower.parameters())
        with torch.set_grad_enabled(track):
            if "shallow_attention" in self.spec.needs:  # a second, shallow layer's q/k (VScan's local scan)
                image_kwargs = {**image_kwargs, "shallow": True,
                                "shallow_layer": self.method_options.get("shallow_layer")}
            enc, layout = adapter.encode(model, pixel_values, attention="attention" in self.spec.needs,
                                         attn_layer=self.attn_layer, **image_kwargs)
        vision_done = time.perf_counter()
        num_images, num_tokens = len(layout.placeholders), enc.features.shape[1]
        image_mask = adapter.image_mask(model, input_ids, layout)
        k = resolve_keep(self.keep, num_tokens)
        text = self._text(model, input_ids, attention_mask, image_mask, layout) if k < num_tokens else None
        projected_all, selection, select_s = (
            self._choose(enc, projector, k, text) if k < num_tokens else (None, None, 0.0)
        )
        keep_idx = None if selection is None else selection.indices
        features, token_keep = adapter.assemble(model, enc, projector, projected_all, selection, layout)
        keep = torch.ones_like(image_mask) if token_keep is None else sequence_keep_mask(image_mask, token_keep)
        inputs = self._shrink(input_ids, attention_mask, labels, keep, config)
        if hasattr(adapter, "positions"):  # models with their own position scheme (Qwen2-VL's M-RoPE)
            inputs["position_ids"] = adapter.positions(model, input_ids, attention_mask, keep, layout)
        inputs.update(adapter.inject(features, layout))
        second = self._arm_second_stage(model, adapter, inputs["input_ids"], inputs["attention_mask"], k)
        done = time.perf_counter()
        self.last_stats = {
            "vision_s": vision_done - start,
            "select_s": select_s,
            "project_s": done - vision_done - select_s,
            "tokens_per_image": (num_tokens, k),
            "keep_indices": keep_idx,
            "merged": selection is not None and selection.weights is not None,
            "prompt_length": (input_ids.shape[1], inputs["input_ids"].shape[1]),
            **second,
        }
        logger.debug(
            "%s: kept %d of %d visual tokens per image (%d images); prompt length %d -> %d",
            self.method,
            k,
            num_tokens,
            num_images,
            input_ids.shape[1],
            inputs["input_ids"].shape[1],
        )
        return inputs

    def _arm_second_stage(self, model: nn.Module, adapter: Any, input_ids: torch.Tensor,
                          attention_mask: torch.Tensor, k: int) -> dict[str, Any]:
        """Two-stage methods (``PruningMethod.then``, option ``stage2_keep``): arm the LLM-stage method's hooks on
        the shortened prompt, so layers ``>= K`` see ``stage2_keep`` of the ``k`` tokens per image. Returns what
        ``last_stats`` reports about it."""
        if self.spec.then is None or self.method_options.get("stage2_keep") is None:
            return {}
        then = get_method(self.spec.then)
        if (why := adapter.unsupported(then)) is not None:
            raise ValueError(f"{self.method}'s second stage ({then.name}) does not run on {adapter.title}: {why}")
        layers, _ = language_model_parts(model)
        layer = int(self.method_options.get("layer", len(layers) // 2))
        image = input_ids == model.config.image_token_id
        per_row = image.sum(1)
        if bool((per_row != per_row[0]).any()) or int(per_row[0]) % k:
            raise ValueError(f"{self.method}'s second stage needs the same number of images in every row")
        stage = attach_llm_pruning(model, self, layer, then.needs, then.select)
        k2 = resolve_keep(self.method_options["stage2_keep"], k)
        if k2 < k:
            stage.arm(k=k2, image_positions=image.nonzero()[:, 1].view(input_ids.shape[0], -1, k),
                      attention_mask=attention_mask, seed=self.seed, options=self.options)
        else:
            stage.armed = None
        return {"llm_layer": layer, "stage2_keep": k2}

    def _prepare_llm_stage(self, model: nn.Module, config: Any, input_ids: torch.Tensor, pixel_values: torch.Tensor,
                           attention_mask: torch.Tensor, labels: torch.Tensor | None) -> dict[str, Any]:
        """LLM-stage methods: the prompt is unchanged; hooks (``owlore.pruning.in_llm``) prune after layer K."""
        num_images = pixel_values.shape[0]
        placeholders = int((input_ids == config.image_token_id).sum())
        num_tokens = placeholders // max(num_images, 1)
        image_mask = image_token_mask(input_ids, image_token_id=config.image_token_id, num_images=num_images,
                                      tokens_per_image=num_tokens)
        per_row = image_mask.sum(1)
        if bool((per_row != per_row[0]).any()):
            raise ValueError(f"{self.method} prunes inside the language model and needs the same number of images in "
                             f"every row; got {(per_row // num_tokens).tolist()} images per row")
        k = resolve_keep(self.keep, num_tokens)
        layer = int(self.method_options.get("layer", self.spec.default_layer))
        stage = attach_llm_pruning(model, self, layer, self.spec.needs, self.spec.select)
        positions = image_mask.nonzero()[:, 1].view(input_ids.shape[0], -1, num_tokens)
        if k < num_tokens:
            stage.arm(k=k, image_positions=positions, attention_mask=attention_mask, seed=self.seed,
                      options=self.options)
        else:
            stage.armed = None
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values,
                  "position_ids": mask_positions(attention_mask)}
        if labels is not None:
            inputs["labels"] = labels
        self.last_stats = {"vision_s": 0.0, "select_s": 0.0, "project_s": 0.0, "tokens_per_image": (num_tokens, k),
                           "keep_indices": None, "merged": False, "llm_layer": layer,
                           "prompt_length": (input_ids.shape[1], input_ids.shape[1])}
        return inputs

    def llm_keep(self, model: nn.Module) -> torch.Tensor | None:
        """``(B, L')`` prompt positions an LLM-stage pruner kept at the latest prefill on ``model`` (None before)."""
        stage = llm_stage_of(model, self)
        return None if stage is None else stage.last_keep

    def detach(self, model: nn.Module) -> None:
        """Remove this pruner's LLM-stage hooks from ``model`` (LLM-stage methods; a no-op otherwise)."""
        if llm_stage_of(model, self) is not None:
            detach_llm_pruning(model)

    @property
    def options(self) -> dict[str, Any]:
        """The method options handed to the registered method (``SelectionContext.options``)."""
        return {"num_directions": self.num_directions, "step": self.step, "chunk_size": self.chunk_size,
                "grid": self.grid, **self.method_options}

    def _check_model(self, projector: nn.Module) -> None:
        if "mlp_projector" in self.spec.needs and any(
            getattr(projector, name, None) is None for name in ("linear_1", "act", "linear_2")
        ):
            raise ValueError(
                f"{self.method} needs an MLP projector (linear_1, act, linear_2); {type(projector).__name__} is not "
                "one, use method='zoo'"
            )

    def _text(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              image_mask: torch.Tensor, layout: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Per selection unit: the input embeddings of its prompt row and a mask of that row's text tokens."""
        if "text" not in self.spec.needs:
            return None
        counts = torch.tensor(layout.placeholders, device=input_ids.device)
        ends = counts.cumsum(0)  # image i's placeholders end at ends[i] in the flattened (row-major) mask
        row_of_token = image_mask.nonzero()[:, 0]
        image_rows = row_of_token[ends - 1]
        rows = image_rows[layout.unit_image]
        with torch.no_grad():
            embeds = model.get_input_embeddings()(input_ids[rows])
        return embeds, (attention_mask.bool() & ~image_mask)[rows]

    def _choose(
        self, enc: VisionEncoding, projector: nn.Module, k: int,
        text: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor | None, Selection, float]:
        """Projected features (if the method needs them), the selection, and the pure selection time."""
        self._check_model(projector)
        with torch.no_grad():
            projected = projector(enc.features) if "projected" in self.spec.needs else None
            start = time.perf_counter()
            selection = self.select(enc, projector=projector, projected=projected, k=k, text=text)
        return projected, selection, time.perf_counter() - start

    def select(
        self, enc: VisionEncoding, *, projector: nn.Module, projected: torch.Tensor | None, k: int,
        text: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> Selection:
        """The registered method's choice of ``k`` tokens per image (sorted indices, optional merge weights).

        Args:
            enc: Vision features (and captured q/k for attention methods).
            projector: The multimodal projector.
            projected: Projected features of all tokens (methods that need them), else None.
            k: Tokens to keep per image.
            text: Per-image prompt embeddings and text mask (methods that need the text), else None.
        """
        ctx = SelectionContext(enc=enc, k=k, projector=projector, projected=projected, seed=self.seed,
                               options=self.options, cache=self._cache, text=None if text is None else text[0],
                               text_mask=None if text is None else text[1])
        selection = as_selection(self.spec.select(ctx))
        if selection.indices.shape != (enc.features.shape[0], k):
            raise RuntimeError(f"method {self.method!r} returned indices of shape {tuple(selection.indices.shape)}, "
                               f"expected {(enc.features.shape[0], k)}")
        return selection

    def _shrink(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor | None,
        keep: torch.Tensor,
        config: object,
    ) -> dict[str, torch.Tensor]:
        padded = attention_mask == 0
        pad = (
            input_ids[padded][0].item() if padded.any() else getattr(config.text_config, "pad_token_id", None)
        )
        return shrink_sequences(
            input_ids,
            keep=keep,
            attention_mask=attention_mask,
            labels=labels,
            pad_token_id=0 if pad is None else pad,
            position_policy=self.position_policy,
        )
