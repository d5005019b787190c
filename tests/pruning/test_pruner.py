import logging

import pytest
import torch

from owlore.pruning import VisualTokenPruner, get_method, method_names
from owlore.pruning.llava import encode_images

from .helpers import IMAGE_TOKEN, TOKENS_PER_IMAGE, make_prompt, pad_batch

# torch.func.jvp lazily scripts decompositions inside torch; that deprecation is torch's, not ours.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

METHODS = [m for m in method_names() if get_method(m).stage == "vision"]  # every pre-LLM method: same contract
DETERMINISTIC = [m for m in METHODS if m != "random"]  # random scores depend on the batch layout


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("keep", [TOKENS_PER_IMAGE, 100, 1.0])
@pytest.mark.parametrize("method", ["fopru_rank", "zoo"])
def test_keep_all_reproduces_unpruned_logits_exactly(tiny_llava, pixels, method, keep):
    ids = torch.tensor([make_prompt([1, 5, 6], text_after=[7, 8]), make_prompt([1, 9, 6], text_after=[3, 8])])
    mask = torch.ones_like(ids)
    inputs = VisualTokenPruner(method, keep).prepare(
        tiny_llava, input_ids=ids, attention_mask=mask, pixel_values=pixels
    )
    assert torch.equal(inputs["input_ids"], ids)
    reference = _logits(tiny_llava, {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels})
    assert torch.equal(_logits(tiny_llava, inputs), reference)


@pytest.mark.parametrize("method", METHODS)
def test_pruned_features_are_the_projected_kept_tokens(tiny_llava, pixels, method):
    """Independent route: rebuild inputs_embeds with masked_scatter of projector(features[kept])."""
    ids = torch.tensor([make_prompt([1, 5], text_after=[7, 8])] * 2)
    pruner = VisualTokenPruner(method, 6)
    inputs = pruner.prepare(tiny_llava, input_ids=ids, pixel_values=pixels)
    kept = pruner.last_stats["keep_indices"]
    assert kept.shape == (2, 6) and torch.equal(kept, kept.sort(dim=-1).values)
    assert inputs["input_ids"].shape == (2, 4 + 6) and int((inputs["input_ids"] == IMAGE_TOKEN).sum()) == 12
    with torch.no_grad():
        feats = encode_images(tiny_llava, pixels, attention=False).features
        if pruner.last_stats["merged"]:  # merging methods: projector(weights @ features), weights from select()
            enc = encode_images(tiny_llava, pixels, attention="attention" in pruner.spec.needs,
                                shallow="shallow_attention" in pruner.spec.needs)
            selection = pruner.select(enc, projector=tiny_llava.model.multi_modal_projector, projected=None, k=6)
            assert torch.equal(selection.indices, kept)
            chosen = torch.bmm(selection.weights, feats)
        else:
            chosen = feats.gather(1, kept[..., None].expand(-1, -1, feats.shape[-1]))
        proj = tiny_llava.model.multi_modal_projector(chosen)
        embeds = tiny_llava.get_input_embeddings()(inputs["input_ids"])
        embeds = embeds.masked_scatter((inputs["input_ids"] == IMAGE_TOKEN)[..., None], proj)
        ref = tiny_llava(inputs_embeds=embeds, position_ids=inputs["position_ids"]).logits
    torch.testing.assert_close(_logits(tiny_llava, inputs), ref, rtol=1e-5, atol=1e-5)


def test_attention_methods_match_an_eager_tower(tiny_llava, pixels):
    """FoPru/[CLS] from the SDPA tower + hook select what the eager tower's attention weights select."""
    ids = torch.tensor([make_prompt([1])] * 2)
    tower = tiny_llava.model.vision_tower
    tower.config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            attn = (
                tower(pixels, output_attentions=True).attentions[0].mean(dim=1)
            )  # layer producing hidden -2
    finally:
        tower.config._attn_implementation = "sdpa"
    patch = attn[:, 1:, 1:]
    col, row = patch.mean(dim=1), patch.mean(dim=2)
    sig = torch.where((col.var(-1) > row.var(-1))[:, None], col, row)
    expected = {
        "fopru_rank": sig.topk(5).indices.sort().values,
        "cls": attn[:, 0, 1:].topk(5).indices.sort().values,
    }
    for method, want in expected.items():
        pruner = VisualTokenPruner(method, 5)
        pruner.prepare(tiny_llava, input_ids=ids, pixel_values=pixels)
        assert torch.equal(pruner.last_stats["keep_indices"], want), method
    assert tower.config._attn_implementation == "sdpa"


def test_fopru_row_through_pruner_keeps_whole_rows(tiny_llava, pixels):
    pruner = VisualTokenPruner("fopru_row", 8)  # 4x4 grid -> two whole rows
    pruner.prepare(tiny_llava, input_ids=torch.tensor([make_prompt([1])] * 2), pixel_values=pixels)
    for kept in pruner.last_stats["keep_indices"].tolist():
        rows = sorted({i // 4 for i in kept})
        assert kept == [r * 4 + c for r in rows for c in range(4)]


def _batch_vs_single(model, pixels, method, side, policy):
    rows = [make_prompt([1, 5, 6, 7], text_after=[8, 9]), make_prompt([1, 5], text_after=[4])]
    ids, mask = pad_batch(rows, side=side)
    pruner = VisualTokenPruner(method, 5, position_policy=policy)
    batched = _logits(model, pruner.prepare(model, input_ids=ids, attention_mask=mask, pixel_values=pixels))
    batched_kept = pruner.last_stats["keep_indices"]
    for i, row in enumerate(rows):
        one = torch.tensor([row])
        single = _logits(model, pruner.prepare(model, input_ids=one, pixel_values=pixels[i : i + 1]))
        assert torch.equal(pruner.last_stats["keep_indices"][0], batched_kept[i])
        n = single.shape[1]
        part = batched[i, -n:] if side == "left" else batched[i, :n]
        torch.testing.assert_close(part, single[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("method", DETERMINISTIC)
def test_batched_equals_per_sample_under_padding(tiny_llava, pixels, method, side):
    _batch_vs_single(tiny_llava, pixels, method, side, "contiguous")


@pytest.mark.parametrize("side", ["left", "right"])
def test_batched_equals_per_sample_with_original_positions(tiny_llava, pixels, side):
    _batch_vs_single(tiny_llava, pixels, "divprune", side, "original")


def test_rows_with_different_image_counts_are_repadded(tiny_llava):
    pix = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    rows = [make_prompt([1, 5], num_images=2, text_after=[8]), make_prompt([1, 5, 6], text_after=[8, 9])]
    ids, mask = pad_batch(rows, side="left")
    pruner = VisualTokenPruner("cls", 4)
    inputs = pruner.prepare(tiny_llava, input_ids=ids, attention_mask=mask, pixel_values=pix)
    assert inputs["input_ids"].shape == (2, 3 + 8)
    assert inputs["attention_mask"].sum(1).tolist() == [11, 9]
    batched = _logits(tiny_llava, inputs)
    single = _logits(
        tiny_llava, pruner.prepare(tiny_llava, input_ids=torch.tensor([rows[1]]), pixel_values=pix[2:])
    )
    torch.testing.assert_close(batched[1, -9:], single[0], rtol=1e-4, atol=1e-5)


def test_training_keeps_labels_aligned_and_trains_the_projector(fresh_llava, pixels):
    model = fresh_llava.train()
    rows = [make_prompt([1, 5, 6], text_after=[20, 21, 22]), make_prompt([1, 7], text_after=[30, 31])]
    ids, mask = pad_batch(rows, side="right")
    labels = ids.masked_fill((ids == IMAGE_TOKEN) | (mask == 0), -100)
    for p in model.model.vision_tower.parameters():  # LLaVA stage-2 style: frozen tower, trained projector
        p.requires_grad_(False)
    inputs = VisualTokenPruner("zoo", 4).prepare(
        model, input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=labels
    )
    new_ids, new_labels = inputs["input_ids"], inputs["labels"]
    assert new_ids.shape == new_labels.shape == (2, 3 + 4 + 3)  # longest row; old padding rebuilt
    for i in range(2):  # text labels survive in order and still sit on their own tokens
        assert new_labels[i][new_labels[i] != -100].tolist() == labels[i][labels[i] != -100].tolist()
        text = new_labels[i] != -100
        assert torch.equal(new_labels[i][text], new_ids[i][text])
    assert bool((new_labels[new_ids == IMAGE_TOKEN] == -100).all())
    features = inputs["mm_encoder_outputs"]["image"].pooler_output
    assert all(f.requires_grad for f in features)  # selection was no-grad, the kept features are not

    out = model(**inputs)
    logits = out.logits[:, :-1].reshape(-1, out.logits.shape[-1])
    manual = torch.nn.functional.cross_entropy(logits, new_labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, manual)
    out.loss.backward()
    for name in ("linear_1", "linear_2"):
        grad = getattr(model.model.multi_modal_projector, name).weight.grad
        assert grad is not None and grad.abs().sum() > 0


def test_training_gradients_reach_a_trainable_vision_tower(fresh_llava, pixels):
    model = fresh_llava.train()
    ids = torch.tensor([make_prompt([1, 5], text_after=[20, 21])] * 2)
    inputs = VisualTokenPruner("fopru_rank", 4).prepare(model, input_ids=ids, pixel_values=pixels, labels=ids)
    model(**inputs).loss.backward()
    assert model.model.vision_tower.encoder.layers[0].mlp.fc1.weight.grad.abs().sum() > 0


def _greedy_reference(model, inputs, steps):
    """Uncached greedy decoding with the pruned features injected at every full forward."""
    ids, mask, pos = inputs["input_ids"], inputs["attention_mask"], inputs["position_ids"]
    for _ in range(steps):
        with torch.no_grad():
            logits = model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=pos,
                mm_encoder_outputs=inputs["mm_encoder_outputs"],
            ).logits
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        pos = torch.cat([pos, pos[..., -1:] + 1], dim=-1)  # 2-D, or Qwen2-VL's (3, B, L) M-RoPE
    return ids[:, inputs["input_ids"].shape[1] :]


@pytest.mark.parametrize("policy", ["contiguous", "original"])
def test_generate_after_pruning_batch2(tiny_llava, pixels, policy):
    ids, mask = pad_batch(
        [make_prompt([1, 5, 6, 7], text_after=[8]), make_prompt([1, 5], text_after=[4])], side="left"
    )
    inputs = VisualTokenPruner("divprune", 6, position_policy=policy).prepare(
        tiny_llava, input_ids=ids, attention_mask=mask, pixel_values=pixels
    )
    with torch.no_grad():
        out = tiny_llava.generate(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert out.shape == (2, inputs["input_ids"].shape[1] + 5)
    assert torch.equal(out[:, inputs["input_ids"].shape[1] :], _greedy_reference(tiny_llava, inputs, 5))


def test_original_positions_continue_after_unpruned_length(tiny_llava, pixels):
    ids = torch.tensor([make_prompt([1, 5], text_after=[8])])
    pruner = VisualTokenPruner("cls", 4, position_policy="original")
    inputs = pruner.prepare(tiny_llava, input_ids=ids, pixel_values=pixels[:1])
    kept = pruner.last_stats["keep_indices"][0]
    expected = [0, 1, *(2 + kept).tolist(), ids.shape[1] - 1]
    assert inputs["position_ids"][0].tolist() == expected


def test_kept_count_is_logged(tiny_llava, pixels, caplog):
    with caplog.at_level(logging.DEBUG, logger="owlore.pruning"):
        VisualTokenPruner("random", 0.25).prepare(
            tiny_llava, input_ids=torch.tensor([make_prompt([1])] * 2), pixel_values=pixels
        )
    assert "kept 4 of 16 visual tokens per image (2 images)" in caplog.text


@pytest.mark.parametrize("keep", [0, -1, 0.0, 2.5])
def test_invalid_keep_raises(keep):
    with pytest.raises(ValueError, match="keep"):
        VisualTokenPruner("cls", keep)


def test_invalid_method_and_policy_raise():
    with pytest.raises(ValueError, match="unknown pruning method"):
        VisualTokenPruner("fastvv", 8)
    with pytest.raises(ValueError, match="position_policy"):
        VisualTokenPruner("cls", 8, position_policy="absolute")


def test_prompt_without_image_tokens_raises(tiny_llava, pixels):
    with pytest.raises(ValueError, match="no image tokens"):
        VisualTokenPruner("cls", 4).prepare(
            tiny_llava, input_ids=torch.tensor([[1, 2, 3]] * 2), pixel_values=pixels
        )


@pytest.mark.parametrize(
    ("rows", "num_images"),
    [
        ([[1] + [IMAGE_TOKEN] * 15, [1] + [IMAGE_TOKEN] * 15], 2),  # 15 placeholders per image
        ([make_prompt([1], num_images=2), [1] * 33], 1),  # 32 placeholders but one image
        ([make_prompt([1]), make_prompt([1])], 3),  # three images for two placeholder runs
    ],
)
def test_mismatched_counts_raise(tiny_llava, rows, num_images):
    pix = torch.randn(num_images, 3, 32, 32)
    with pytest.raises(ValueError, match="do not match"):
        VisualTokenPruner("cls", 4).prepare(tiny_llava, input_ids=torch.tensor(rows), pixel_values=pix)


def test_non_llava_model_raises(tiny_llava):
    with pytest.raises(TypeError, match="LlamaModel: visual-token pruning supports LlavaForConditionalGeneration"):
        VisualTokenPruner("cls", 4).prepare(
            tiny_llava.model.language_model,
            input_ids=torch.tensor([[1]]),
            pixel_values=torch.zeros(1, 3, 32, 32),
        )


@pytest.mark.parametrize("method", ["cls", "fopru_rank", "zoo_exact"])
def test_full_feature_strategy_keeps_cls_as_a_candidate(method):
    from transformers import LlavaForConditionalGeneration

    from .conftest import tiny_llava_config

    config = tiny_llava_config()
    config.vision_feature_select_strategy = "full"  # 17 tokens per image: [CLS] + 16 patches
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    ids = torch.tensor([[1, *([IMAGE_TOKEN] * 17), 2]])
    pruner = VisualTokenPruner(method, 5)
    inputs = pruner.prepare(model, input_ids=ids, pixel_values=torch.randn(1, 3, 32, 32))
    assert pruner.last_stats["tokens_per_image"] == (17, 5)
    assert _logits(model, inputs).shape == (1, 7, 256)
    with pytest.raises(ValueError, match="square"):
        VisualTokenPruner("fopru_row", 5).prepare(
            model, input_ids=ids, pixel_values=torch.randn(1, 3, 32, 32)
        )


def test_zoo_exact_needs_an_mlp_projector_but_zoo_does_not(fresh_llava, pixels):
    old = fresh_llava.model.multi_modal_projector
    fresh_llava.model.multi_modal_projector = torch.nn.Sequential(old.linear_1, old.act, old.linear_2)
    ids = torch.tensor([make_prompt([1])] * 2)
    with torch.no_grad(), pytest.raises(ValueError, match="MLP projector"):
        VisualTokenPruner("zoo_exact", 4).prepare(fresh_llava, input_ids=ids, pixel_values=pixels)
    with torch.no_grad():
        inputs = VisualTokenPruner("zoo", 4).prepare(fresh_llava, input_ids=ids, pixel_values=pixels)
    assert inputs["input_ids"].shape == (2, 5)


def test_random_method_draws_new_tokens_each_call_and_a_rerun_repeats(tiny_llava, pixels):
    """Training with pruning.method=random must not keep one fixed subset (a generator re-seeded per call did)."""
    ids = torch.tensor([make_prompt([1])] * 2)

    def kept(pruner: VisualTokenPruner) -> list[list[list[int]]]:
        out = []
        for _ in range(3):
            pruner.prepare(tiny_llava, input_ids=ids, pixel_values=pixels)
            out.append(pruner.last_stats["keep_indices"].tolist())
        return out

    first, again = kept(VisualTokenPruner("random", 5, seed=3)), kept(VisualTokenPruner("random", 5, seed=3))
    assert first[0] != first[1] and first[1] != first[2]  # new tokens every call (16 choose 5 subsets)
    assert first == again  # same seed, same calls: the same sequence


def test_zoo_directions_are_the_same_every_call(tiny_llava, pixels):
    pruner = VisualTokenPruner("zoo", 5, seed=3)
    ids = torch.tensor([make_prompt([1])] * 2)
    pruner.prepare(tiny_llava, input_ids=ids, pixel_values=pixels)
    one = pruner.last_stats["keep_indices"].clone()
    pruner.prepare(tiny_llava, input_ids=ids, pixel_values=pixels)
    assert torch.equal(one, pruner.last_stats["keep_indices"])  # a function of the image, batch-invariant
