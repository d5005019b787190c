"""``owlore.vision.align``: the tower and projector learn to make each visual token read like its item's class word,
the language model is untouched, and the tokens come out embedding-sized."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
import eval_support  # noqa: E402
import method_support as ms  # noqa: E402

from owlore.data.fashion_vqa import make_mosaic, random_grids  # noqa: E402
from owlore.vision.align import align_vision, class_word_ids, token_cell_labels, visual_tokens  # noqa: E402
from owlore.vision.llava import VisionTowerConfig, build_llava, pixel_values  # noqa: E402

TOWER = VisionTowerConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2)
CLASSES = (2, 3, 4, 6)  # classes whose words start with distinct tokens in the tiny test tokenizer


def _items(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic 28x28 items whose class sets the brightness and a stripe, plus noise."""
    rng = np.random.default_rng(seed)
    labels = rng.choice(CLASSES, n)
    images = rng.integers(0, 40, (n, 28, 28))
    for i, c in enumerate(labels):
        k = CLASSES.index(c)
        images[i] += 50 * k
        images[i, 7 * k:7 * k + 7] = 255
    return np.clip(images, 0, 255).astype(np.uint8), labels.astype(np.int64)


def test_token_cell_labels_follow_the_raster_order():
    cells = torch.arange(9).view(1, 9)
    lab = token_cell_labels(cells, grid=3, side=4).view(12, 12)
    assert lab[0, 0] == 0 and lab[0, 4] == 1 and lab[3, 11] == 2 and lab[4, 0] == 3 and lab[11, 11] == 8
    assert (lab[4:8, 4:8] == 4).all()
    images, labels = _items(20, 0)
    mosaics, cell_labels = random_grids(images, labels, 3, grid=3, rng=np.random.default_rng(0))
    assert mosaics.shape == (3, 84, 84) and cell_labels.shape == (3, 9)
    items = np.stack([images[0], images[1], images[2], images[3]])
    assert np.array_equal(make_mosaic(items, 2)[28:, :28], images[2])


def test_alignment_learns_the_items_and_leaves_the_language_model_alone():
    lm = ms.tiny_model(2)
    model, tok = build_llava(lm, eval_support.tokenizer(), TOWER)
    lm_before = {k: v.clone() for k, v in model.model.language_model.state_dict().items()}
    requires = {n: p.requires_grad for n, p in model.named_parameters()}
    images, labels = _items(400, 0)
    result = align_vision(model, tok, images, labels, grid=3, steps=40, batch_size=8, lr=3e-3, seed=0,
                          heldout=_items(200, 1), progress=False)
    assert result["heldout_token_accuracy"] > 0.6  # 4 classes: chance is 0.25
    assert result["losses"][-1] < result["losses"][0]
    for k, v in model.model.language_model.state_dict().items():
        assert torch.equal(v, lm_before[k]), k
    assert {n: p.requires_grad for n, p in model.named_parameters()} == requires
    with torch.no_grad():
        mosaics, _ = random_grids(images, labels, 16, grid=3, rng=np.random.default_rng(5))
        norm = visual_tokens(model, pixel_values(mosaics)).norm(dim=-1).mean()
    target = model.get_input_embeddings().weight.detach().norm(dim=-1).mean()
    assert norm == pytest.approx(float(target), rel=0.15)  # rescaled on other grids: close, not equal


def test_alignment_is_deterministic_in_the_seed():
    images, labels = _items(100, 0)
    outs = []
    for _ in range(2):
        model, tok = build_llava(ms.tiny_model(2), eval_support.tokenizer(), TOWER)
        align_vision(model, tok, images, labels, grid=3, steps=3, batch_size=4, seed=3, progress=False)
        outs.append(model.model.multi_modal_projector.linear_2.weight.detach().clone())
    assert torch.equal(outs[0], outs[1])
    assert len(class_word_ids(tok)) == 10


def test_config_problems_name_the_key():
    from owlore.run.config import VisionConfig

    problems = VisionConfig(enabled=True, align_steps=-1, align_lr=0).problems()
    assert any("vision.align_steps=-1" in p for p in problems)
    assert any("align_lr=0" in p for p in problems)
    assert any("patch_size=12" in p for p in VisionConfig(enabled=True, patch_size=12, align_steps=5).problems())
