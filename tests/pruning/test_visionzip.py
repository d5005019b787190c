"""VisionZip: the batched merge equals a per-image loop, the budget split follows the paper, and the pruner hands the
language model projector(merged features) with gradients reaching the tower in training."""

from __future__ import annotations

import torch

from owlore.pruning import VisualTokenPruner
from owlore.pruning.visionzip import visionzip_merge, visionzip_split

from .helpers import make_prompt
from .reference import visionzip_loop


def test_budget_split_follows_the_paper():
    assert [visionzip_split(k) for k in (64, 128, 192)] == [(54, 10), (108, 20), (162, 30)]
    assert visionzip_split(1) == (1, 0) and visionzip_split(2) == (2, 0) and visionzip_split(4) == (3, 1)


def test_merge_equals_a_per_image_loop():
    g = torch.Generator().manual_seed(0)
    scores, keys, feats = torch.rand(3, 40, generator=g), torch.randn(3, 40, 8, generator=g), torch.randn(3, 40, 6, generator=g)
    for k, ratio in ((12, 10 / 64), (12, 0.5), (5, 0.4)):
        selection = visionzip_merge(scores, keys, k, ratio)
        contextual = visionzip_split(k, ratio)[1]
        positions, tokens = visionzip_loop(scores, keys, feats, k, contextual)
        assert selection.indices.tolist() == positions
        torch.testing.assert_close(torch.bmm(selection.weights, feats).double(), tokens, rtol=1e-5, atol=1e-6)


def test_pruner_injects_merged_tokens_and_training_reaches_the_tower(fresh_llava, pixels):
    model = fresh_llava.train()
    ids = torch.tensor([make_prompt([1, 5], text_after=[7, 8])] * 2)
    labels = ids.clone()
    pruner = VisualTokenPruner("visionzip", 7)
    inputs = pruner.prepare(model, input_ids=ids, pixel_values=pixels, labels=labels)
    assert pruner.last_stats["merged"] and inputs["input_ids"].shape[1] == ids.shape[1] - (16 - 7)
    model(**inputs).loss.backward()
    tower = model.model.vision_tower
    tower_grad = getattr(tower, "vision_model", tower).encoder.layers[0].mlp.fc1.weight.grad
    assert tower_grad is not None and tower_grad.abs().sum() > 0
