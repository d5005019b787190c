"""Qwen2-VL and Qwen2.5-VL through the Qwen2VLAdapter: the merger is the projector, kept tokens keep their full-prompt M-RoPE
positions, keep = N equals the unpruned model (logits and transformers' own generate, which uses rope_deltas),
pruned features are the model's merged tokens, generate (batch 2, left padding) equals an uncached loop."""

from __future__ import annotations

import pytest
import torch

from owlore.pruning import VisualTokenPruner
from owlore.pruning.qwen2_vl import MergerProjector

from .test_pruner import _greedy_reference

IMAGE, START, END = 250, 252, 253
THW = torch.tensor([[1, 8, 8], [1, 8, 8]])  # 64 patches -> 16 merged tokens per image
METHODS = ["random", "divprune", "zoo", "cdpruner"]


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def tiny_qwen(request):
    """Qwen2-VL, and Qwen2.5-VL (window attention: the tower runs merge groups in window order)."""
    import transformers

    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=256, max_position_embeddings=512, eos_token_id=None,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    ids = dict(image_token_id=IMAGE, video_token_id=251, vision_start_token_id=START, vision_end_token_id=END)
    common = dict(num_heads=4, patch_size=4, spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    if request.param == "qwen2_vl":
        config = transformers.Qwen2VLConfig(vision_config=dict(depth=2, embed_dim=32, hidden_size=64, mlp_ratio=2,
                                                               **common), text_config=text, **ids)
        cls = transformers.Qwen2VLForConditionalGeneration
    else:
        config = transformers.Qwen2_5_VLConfig(
            vision_config=dict(depth=2, hidden_size=32, out_hidden_size=64, intermediate_size=64, window_size=16,
                               fullatt_block_indexes=[1], **common), text_config=text, **ids)
        cls = transformers.Qwen2_5_VLForConditionalGeneration
    torch.manual_seed(0)
    return cls(config).eval()


@pytest.fixture(scope="module")
def raw():
    ids = torch.tensor([[1, 2, 3, START] + [IMAGE] * 16 + [END, 5, 6], [0, 0, 9, START] + [IMAGE] * 16 + [END, 7, 8]])
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding
    pixels = torch.randn(128, 3 * 2 * 4 * 4, generator=torch.Generator().manual_seed(5))
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels, "image_grid_thw": THW}


def _unpruned(model, raw):
    return {**raw, "mm_token_type_ids": (raw["input_ids"] == IMAGE).int()}


def test_merger_projector_is_the_merger(tiny_qwen, raw):
    visual = tiny_qwen.model.visual
    with torch.no_grad():
        out = visual(raw["pixel_values"], grid_thw=THW)
        grouped = out.last_hidden_state.reshape(2, 16, -1)
        if hasattr(visual, "window_size"):
            from owlore.pruning.models import adapter_for

            grouped = adapter_for(tiny_qwen).encode(tiny_qwen, raw["pixel_values"], attention=False, attn_layer=None,
                                                    image_grid_thw=THW)[0].features
        torch.testing.assert_close(MergerProjector(visual.merger)(grouped).reshape(32, -1), out.pooler_output)


@pytest.mark.parametrize("method", ["random", "cdpruner"])
def test_keep_all_equals_the_unpruned_model_and_its_generate(tiny_qwen, raw, method):
    inputs = VisualTokenPruner(method, 16).prepare(tiny_qwen, **raw)
    with torch.no_grad():
        reference = tiny_qwen(**_unpruned(tiny_qwen, raw)).logits
        torch.testing.assert_close(tiny_qwen(**inputs).logits[raw["attention_mask"].bool()],
                                   reference[raw["attention_mask"].bool()], rtol=1e-5, atol=1e-5)
        ours = tiny_qwen.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        theirs = tiny_qwen.generate(**_unpruned(tiny_qwen, raw), max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert torch.equal(ours[:, -4:], theirs[:, -4:])  # decoding continues from the same M-RoPE positions


@pytest.mark.parametrize("method", METHODS)
def test_kept_tokens_are_the_merged_tokens_at_their_original_positions(tiny_qwen, raw, method):
    pruner = VisualTokenPruner(method, 5)
    inputs = pruner.prepare(tiny_qwen, **raw)
    kept = pruner.last_stats["keep_indices"]
    with torch.no_grad():
        merged = tiny_qwen.model.get_image_features(raw["pixel_values"], THW).pooler_output
        full, _ = tiny_qwen.model.get_rope_index(raw["input_ids"], (raw["input_ids"] == IMAGE).int(),
                                                 image_grid_thw=THW, attention_mask=raw["attention_mask"])
    got = inputs["mm_encoder_outputs"]["image"].pooler_output
    for image in range(2):
        torch.testing.assert_close(got[image], merged[image][kept[image]], rtol=1e-5, atol=1e-6)
    assert inputs["position_ids"].shape == (3, 2, inputs["input_ids"].shape[1])
    for row in range(2):
        image_pos = (raw["input_ids"][row] == IMAGE).nonzero()[:, 0]
        keep_cols = [c for c in range(raw["input_ids"].shape[1]) if raw["attention_mask"][row, c]
                     and (raw["input_ids"][row, c] != IMAGE or c in image_pos[kept[row]].tolist())]
        valid = inputs["attention_mask"][row].bool()
        assert torch.equal(inputs["position_ids"][:, row, valid], full[:, row, keep_cols])


def test_generate_batch2_left_padding_equals_an_uncached_loop(tiny_qwen, raw):
    inputs = VisualTokenPruner("divprune", 6).prepare(tiny_qwen, **raw)
    with torch.no_grad():
        out = tiny_qwen.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert torch.equal(out[:, inputs["input_ids"].shape[1]:], _greedy_reference(tiny_qwen, inputs, 4))


@pytest.mark.parametrize("method", ["divprune", "cdpruner"])
def test_batched_equals_per_sample(tiny_qwen, raw, method):
    batched = VisualTokenPruner(method, 6).prepare(tiny_qwen, **raw)
    with torch.no_grad():
        logits = tiny_qwen(**batched).logits
        for row in range(2):
            valid = raw["attention_mask"][row].bool()
            single = {"input_ids": raw["input_ids"][row:row + 1, valid],
                      "pixel_values": raw["pixel_values"][64 * row:64 * (row + 1)], "image_grid_thw": THW[row:row + 1]}
            alone = tiny_qwen(**VisualTokenPruner(method, 6).prepare(tiny_qwen, **single)).logits
            torch.testing.assert_close(logits[row, -1], alone[0, -1], rtol=1e-4, atol=1e-5)


def test_unsupported_methods_and_mixed_resolutions_are_refused(tiny_qwen, raw):
    with pytest.raises(ValueError, match="fopru_rank does not run on Qwen2-VL: needs the vision attention"):
        VisualTokenPruner("fopru_rank", 4).prepare(tiny_qwen, **raw)
    with pytest.raises(ValueError, match="zoo_exact does not run on Qwen2-VL"):
        VisualTokenPruner("zoo_exact", 4).prepare(tiny_qwen, **raw)
    mixed = {**raw, "image_grid_thw": torch.tensor([[1, 8, 8], [1, 4, 16]])}
    with pytest.raises(ValueError, match="one resolution per call"):
        VisualTokenPruner("random", 4).prepare(tiny_qwen, **mixed)
