"""LLaVA-NeXT (anyres) through the LlavaNextAdapter: per-crop budgets, newline tokens kept, the kept features are the
model's own packed features at the kept positions, keep = N is the unpruned model, batched equals per sample, and
generate (batch 2, left padding) equals an uncached greedy loop."""

from __future__ import annotations

import pytest
import torch

from owlore.pruning import VisualTokenPruner, get_method, method_names

from .helpers import IMAGE_TOKEN, pad_batch
from .test_pruner import _greedy_reference

SIZES = torch.tensor([[32, 64], [64, 64]])  # 1 x 2 and 2 x 2 tiles: 3 and 5 crops of 16 tokens
VISION_METHODS = [m for m in method_names() if get_method(m).stage == "vision"]


@pytest.fixture(scope="module")
def tiny_next():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8)
    text = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=256, max_position_embeddings=512)
    config = LlavaNextConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN,
                             image_grid_pinpoints=[[32, 64], [64, 32], [64, 64]])
    torch.manual_seed(0)
    return LlavaNextForConditionalGeneration(config).eval()


@pytest.fixture(scope="module")
def next_inputs(tiny_next):
    pixels = torch.randn(2, 5, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        packed = tiny_next.model.get_image_features(pixel_values=pixels, image_sizes=SIZES).pooler_output
    rows = [[1, 5, 6] + [IMAGE_TOKEN] * len(packed[0]) + [7, 8], [1] + [IMAGE_TOKEN] * len(packed[1]) + [9]]
    ids, mask = pad_batch(rows, side="left")
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels, "image_sizes": SIZES}, packed


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("method", ["fopru_rank", "zoo", "cdpruner"])
def test_keep_all_is_the_unpruned_model(tiny_next, next_inputs, method):
    raw, _ = next_inputs
    inputs = VisualTokenPruner(method, 16).prepare(tiny_next, **raw)
    assert torch.equal(inputs["input_ids"], raw["input_ids"])
    reference = _logits(tiny_next, {**raw, "position_ids": inputs["position_ids"]})
    torch.testing.assert_close(_logits(tiny_next, inputs), reference, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", VISION_METHODS)
def test_kept_features_are_the_packed_features_at_kept_positions(tiny_next, next_inputs, method):
    raw, packed = next_inputs
    pruner = VisualTokenPruner(method, 5)
    inputs = pruner.prepare(tiny_next, **raw)
    got = inputs["mm_encoder_outputs"]["image"].pooler_output
    newline = tiny_next.model.image_newline
    for mine, full in zip(got, packed):
        is_newline = (full == newline).all(-1)
        assert 0 < len(mine) < len(full)
        assert (mine == newline).all(-1).sum() == is_newline.sum()  # every newline kept
        if not pruner.last_stats["merged"]:  # pure selection: rows of the model's own packed sequence, in order
            visual = mine[~(mine == newline).all(-1)]
            matches = ((visual[:, None] - full[None]).abs().amax(-1) < 1e-5) & ~is_newline[None]
            positions = matches.float().argmax(1)
            assert matches.any(1).all() and bool((positions.diff() > 0).all())
    crops = [3, 5]
    kept_visual = [int((~(m == newline).all(-1)).sum()) for m in got]
    assert all(v <= 5 * c for v, c in zip(kept_visual, crops))  # at most k per crop (unpadding may drop more)
    placeholders = (inputs["input_ids"] == IMAGE_TOKEN).sum(1).tolist()
    assert placeholders == [len(m) for m in got]


@pytest.mark.parametrize("method", ["cls", "divprune", "zoo_exact", "visionzip"])
def test_batched_equals_per_sample(tiny_next, next_inputs, method):
    raw, _ = next_inputs
    batched = _logits(tiny_next, VisualTokenPruner(method, 6).prepare(tiny_next, **raw))
    for row in range(2):
        valid = raw["attention_mask"][row].bool()
        single = {"input_ids": raw["input_ids"][row:row + 1, valid], "pixel_values": raw["pixel_values"][row:row + 1],
                  "image_sizes": SIZES[row:row + 1]}
        alone = _logits(tiny_next, VisualTokenPruner(method, 6).prepare(tiny_next, **single))
        torch.testing.assert_close(batched[row, -1], alone[0, -1], rtol=1e-4, atol=1e-5)


def test_generate_batch2_left_padding(tiny_next, next_inputs):
    raw, _ = next_inputs
    inputs = VisualTokenPruner("fopru_row", 8).prepare(tiny_next, **raw)
    with torch.no_grad():
        out = tiny_next.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert torch.equal(out[:, inputs["input_ids"].shape[1]:], _greedy_reference(tiny_next, inputs, 4))


def test_missing_image_sizes_is_a_clear_error(tiny_next, next_inputs):
    raw, _ = next_inputs
    with pytest.raises(ValueError, match="needs image_sizes"):
        VisualTokenPruner("cls", 4).prepare(tiny_next, input_ids=raw["input_ids"], pixel_values=raw["pixel_values"])


def test_llm_stage_methods_are_refused_with_the_alternatives(tiny_next, next_inputs):
    raw, _ = next_inputs
    with pytest.raises(ValueError, match=r"fastv does not run on LLaVA-NeXT: .*; methods that do: cdpruner, cls"):
        VisualTokenPruner("fastv", 4).prepare(tiny_next, **raw)
