"""Pruning during training (``owlore.pruning.training``): the patched forward equals pruning by hand, gradients reach
the projector through the kept tokens, eval mode is untouched, and the patch comes off cleanly."""

from __future__ import annotations

import pytest
import torch

from owlore.pruning import VisualTokenPruner
from owlore.pruning.registry import method_names
from owlore.pruning.training import disable_training_pruning, enable_training_pruning

from .helpers import make_prompt, pad_batch


def _inputs(pixels):
    ids, mask = pad_batch([make_prompt([1, 2, 3], 1, [4, 5, 6, 7]), make_prompt([1, 2], 1, [8, 9, 10])], side="right")
    labels = ids.clone()
    labels[ids == 255] = -100
    labels[mask == 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "pixel_values": pixels}


@pytest.mark.parametrize("method", ["cls", "zoo_exact", "random"])
def test_patched_training_forward_equals_pruning_by_hand(fresh_llava, pixels, method):
    model = fresh_llava.train()
    model.config.text_config.attention_dropout = 0.0
    inputs = _inputs(pixels)
    expected = model(**VisualTokenPruner(method, 5).prepare(model, **inputs)).loss
    enable_training_pruning(model, VisualTokenPruner(method, 5))
    got = model(**inputs)
    assert torch.equal(got.loss, expected)
    got.loss.backward()
    assert model.model.multi_modal_projector.linear_1.weight.grad.abs().sum() > 0
    assert model.model.vision_tower.embeddings.patch_embedding.weight.grad.abs().sum() > 0


def test_eval_mode_and_disable_give_the_unpruned_model(fresh_llava, pixels):
    model = fresh_llava.eval()
    inputs = _inputs(pixels)
    with torch.no_grad():
        reference = model(**inputs).logits
        enable_training_pruning(model, VisualTokenPruner("cls", 4))
        assert torch.equal(model(**inputs).logits, reference)  # eval: not pruned
        model.train()
        assert model(**inputs).logits.shape[1] == reference.shape[1] - (16 - 4)
        enable_training_pruning(model, VisualTokenPruner("cls", 8))  # again: swaps the pruner, no double wrap
        assert model(**inputs).logits.shape[1] == reference.shape[1] - (16 - 8)
        disable_training_pruning(model)
        assert "forward" not in model.__dict__
        assert model(**inputs).logits.shape == reference.shape


def test_config_knows_every_method_and_refuses_without_a_vision_model(tmp_path):
    from owlore.run.config import ConfigError, PruningConfig
    from owlore.run.recipe import load_config

    assert all(PruningConfig(method=name).problems() == [] for name in method_names())
    assert "pruning.method='clss'" in PruningConfig(method="clss").problems()[0]
    assert "keep=2.5" in PruningConfig(keep=2.5).problems()[0]
    with pytest.raises(ConfigError, match="pruning.method=cls: pruning during training needs a vision model"):
        load_config(["configs/smollm2_full.yaml"], ["pruning.method=cls", "training.output_dir=x"])
