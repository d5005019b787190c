"""HoloV, MMTok and VScan: each vectorised selection equals a naive per-image python loop written from the method's
description, and each runs through the pruner (prompt conditioning for MMTok, the shallow layer for VScan)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from owlore.pruning import VisualTokenPruner
from owlore.pruning.holov import allocate_budget, crop_ids, holov_select
from owlore.pruning.mmtok import coverage_matrix, greedy_coverage
from owlore.pruning.vscan import merge_into_kept, vscan_scan

from .helpers import TOKENS_PER_IMAGE, make_prompt


def _cos(a, b):
    return float(a.double() @ b.double() / (a.double().norm() * b.double().norm()))


# ---- HoloV -------------------------------------------------------------------------------------------------------

def _holov_loop(cls_scores, features, k, crops):
    """Per image: crop of each token from its (row, col), scores by loops, budget by largest remainder with caps."""
    n = cls_scores.shape[1]
    side = math.isqrt(n)
    g = max(1, min(side, round(math.sqrt(crops))))
    crop = [(r * g // side) * g + (c * g // side) for r in range(side) for c in range(side)]
    out = []
    for b in range(cls_scores.shape[0]):
        a = [float(x) for x in cls_scores[b]]
        mean_a = sum(a) / n
        var = []
        for i in range(n):
            sims = [_cos(features[b, i], features[b, j]) for j in range(n) if j != i and crop[j] == crop[i]]
            mu = sum(sims) / max(len(sims), 1)
            var.append(sum((s - mu) ** 2 for s in sims) / max(len(sims), 1))
        mean_v = sum(var) / n
        t = [a[i] / mean_a + 0.09 * var[i] / mean_v for i in range(n)]
        members = {p: [i for i in range(n) if crop[i] == p] for p in sorted(set(crop))}
        crop_score = {p: sum(t[i] for i in m) / len(m) for p, m in members.items()}
        budget = {p: 0 for p in members}
        left = k
        while left:
            open_ = [p for p in members if budget[p] < len(members[p])]
            total = sum(crop_score[p] + 1e-12 for p in open_)
            share = {p: (crop_score[p] + 1e-12) / total * left for p in open_}
            add = {p: min(math.floor(share[p]), len(members[p]) - budget[p]) for p in open_}
            rest = left - sum(add.values())
            room = [p for p in open_ if budget[p] + add[p] < len(members[p])]
            for p in sorted(room, key=lambda p: -(share[p] - math.floor(share[p])))[:rest]:
                add[p] += 1
            for p in open_:
                budget[p] += add[p]
            left = k - sum(budget.values())
        kept = []
        for p, m in members.items():
            kept += sorted(m, key=lambda i: (-t[i], i))[:budget[p]]
        out.append(sorted(kept))
    return out


@pytest.mark.parametrize("k,crops", [(4, 4), (7, 4), (12, 9), (3, 16)])
def test_holov_equals_a_naive_loop(k, crops):
    g = torch.Generator().manual_seed(k)
    cls_scores = torch.rand(2, 36, generator=g).softmax(-1)
    features = torch.randn(2, 36, 8, generator=g)
    assert holov_select(cls_scores, features, k, crops=crops).tolist() == _holov_loop(cls_scores, features, k, crops)


def test_holov_budget_sums_to_k_and_respects_crop_sizes():
    sizes = torch.tensor([4, 4, 4, 4])
    budget = allocate_budget(torch.tensor([10.0, 0.1, 0.1, 0.1]), sizes, 9)
    assert int(budget.sum()) == 9 and bool((budget <= sizes).all()) and budget[0] == 4  # the overflow moved on
    assert crop_ids(16, 4).tolist() == [0, 0, 1, 1, 0, 0, 1, 1, 2, 2, 3, 3, 2, 2, 3, 3]


def test_holov_keeps_context_outside_the_salient_crop():
    """All attention on one crop: pure top-k keeps only that crop; HoloV gives the other crops a share."""
    cls_scores = torch.full((1, 16), 0.01)
    cls_scores[0, [0, 1, 4, 5]] = 1.0  # the top-left crop of a 2 x 2 grid of 2 x 2 crops
    kept = holov_select(cls_scores, torch.randn(1, 16, 4), 6, crops=4)[0].tolist()
    assert len(kept) == 6 and set(kept) - {0, 1, 4, 5}


# ---- MMTok -------------------------------------------------------------------------------------------------------

def _coverage(cover_b, chosen):
    return sum(max(float(cover_b[r, j]) for j in chosen) for r in range(cover_b.shape[0])) if chosen else 0.0


def test_mmtok_greedy_equals_brute_force_marginal_gains():
    g = torch.Generator().manual_seed(0)
    projected, features = torch.randn(2, 12, 16, generator=g), torch.randn(2, 12, 8, generator=g)
    text, mask = torch.randn(2, 5, 16, generator=g), torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1]]).bool()
    cover = coverage_matrix(projected, features, text, mask)
    got = greedy_coverage(cover, 5).tolist()
    for b in range(2):
        chosen: list[int] = []
        for _ in range(5):
            gains = {j: _coverage(cover[b], chosen + [j]) - _coverage(cover[b], chosen) for j in range(12)
                     if j not in chosen}
            chosen.append(max(gains, key=lambda j: (gains[j], -j)))
        assert got[b] == sorted(chosen)


def test_mmtok_coverage_rows_equal_a_loop():
    g = torch.Generator().manual_seed(1)
    projected, features = torch.randn(1, 6, 4, generator=g), torch.randn(1, 6, 3, generator=g)
    text, mask = torch.randn(1, 3, 4, generator=g), torch.tensor([[1, 0, 1]]).bool()
    cover = coverage_matrix(projected, features, text, mask, alpha=0.5, tau_tv=0.02, tau_vv=0.2)
    for r, (row, on) in enumerate(zip(text[0], mask[0])):
        logits = torch.tensor([_cos(row, projected[0, j]) / 0.02 for j in range(6)])
        want = logits.softmax(0) / 2 if on else torch.zeros(6)
        torch.testing.assert_close(cover[0, r].double(), want.double(), rtol=1e-4, atol=1e-6)
    for i in range(6):
        logits = torch.tensor([_cos(features[0, i], features[0, j]) / 0.2 for j in range(6)])
        torch.testing.assert_close(cover[0, 3 + i].double(), (0.5 * logits.softmax(0) / 6).double(),
                                   rtol=1e-4, atol=1e-6)


def test_mmtok_the_prompt_conditions_the_selection(tiny_llava, pixels):
    kept = []
    for words in ([1, 5, 6, 7], [200, 201, 202, 203]):
        pruner = VisualTokenPruner("mmtok", 4)
        pruner.prepare(tiny_llava, input_ids=torch.tensor([make_prompt(words)] * 2), pixel_values=pixels)
        kept.append(pruner.last_stats["keep_indices"])
    assert not torch.equal(kept[0], kept[1])


# ---- VScan -------------------------------------------------------------------------------------------------------

def _vscan_loop(shallow, deep, k):
    n = shallow.shape[1]
    side = math.isqrt(n)
    k_local = k // 2
    g = max(1, min(4, side, math.isqrt(max(k_local, 1))))
    per_window = k_local // (g * g)
    out = []
    for b in range(shallow.shape[0]):
        kept = []
        for wr, wc in itertools.product(range(g), range(g)):
            window = [r * side + c for r in range(side) for c in range(side) if r * g // side == wr and c * g // side == wc]
            kept += sorted(window, key=lambda i: (-float(shallow[b, i]), i))[:per_window]
        rest = sorted((i for i in range(n) if i not in kept), key=lambda i: (-float(deep[b, i]), i))
        out.append(sorted(kept + rest[:k - len(kept)]))
    return out


@pytest.mark.parametrize("k", [2, 5, 8, 16, 30])
def test_vscan_scan_equals_a_naive_loop(k):
    g = torch.Generator().manual_seed(k)
    shallow, deep = torch.rand(3, 64, generator=g), torch.rand(3, 64, generator=g)
    assert vscan_scan(shallow, deep, k).tolist() == _vscan_loop(shallow, deep, k)


def test_vscan_merges_each_dropped_token_into_its_nearest_kept_token():
    g = torch.Generator().manual_seed(2)
    features = torch.randn(2, 9, 5, generator=g)
    kept = torch.tensor([[0, 4, 8], [1, 2, 7]])
    w = merge_into_kept(features, kept)
    for b in range(2):
        groups = {j: [int(kept[b, j])] for j in range(3)}
        for i in set(range(9)) - set(kept[b].tolist()):
            groups[max(range(3), key=lambda j: _cos(features[b, i], features[b, kept[b, j]]))].append(i)
        for j, members in groups.items():
            want = torch.zeros(9)
            want[members] = 1 / len(members)
            torch.testing.assert_close(w[b, j], want)


def test_vscan_reads_the_shallow_layer(tiny_llava, pixels):
    ids = torch.tensor([make_prompt([1, 5])] * 2)
    kept = {}
    for layer in (0, 1):  # the tiny tower's two layers: a different shallow layer changes the local scan
        pruner = VisualTokenPruner("vscan", 8, method_options={"shallow_layer": layer})
        inputs = pruner.prepare(tiny_llava, input_ids=ids, pixel_values=pixels)
        kept[layer] = pruner.last_stats["keep_indices"]
        assert pruner.last_stats["merged"] and inputs["input_ids"].shape[1] == ids.shape[1] - (TOKENS_PER_IMAGE - 8)
    assert not torch.equal(kept[0], kept[1])


def test_vscan_second_stage_prunes_again_inside_the_language_model(tiny_llava, pixels):
    """keep 8 tokens before the LLM, 3 of them after layer 1: the logits equal an uncached layer-by-layer reference
    fed the stage-1 features, and the FLOPs count both stages."""
    from owlore.pruning.flops import LMShape, pruned_prefill_flops

    from .helpers import IMAGE_TOKEN, pad_batch
    from .reference import llm_stage_logits_loop

    ids, mask = pad_batch([make_prompt([1, 5, 6, 7], text_after=[8, 9]), make_prompt([1, 5], text_after=[4])],
                          side="left")
    pruner = VisualTokenPruner("vscan", 8, method_options={"stage2_keep": 3, "layer": 1})
    inputs = pruner.prepare(tiny_llava, input_ids=ids, attention_mask=mask, pixel_values=pixels)
    assert pruner.last_stats["stage2_keep"] == 3 and pruner.last_stats["llm_layer"] == 1
    short, short_mask = inputs["input_ids"], inputs["attention_mask"]
    assert short.shape[1] == ids.shape[1] - (TOKENS_PER_IMAGE - 8)
    with torch.no_grad():
        logits = tiny_llava(**inputs).logits
    keep = pruner.llm_keep(tiny_llava)
    pruner.detach(tiny_llava)
    assert keep.shape == (2, short.shape[1] - (8 - 3))
    assert all(int((short[b, keep[b]] == IMAGE_TOKEN).sum()) == 3 for b in range(2))
    features = torch.stack(inputs["mm_encoder_outputs"]["image"].pooler_output)
    reference = llm_stage_logits_loop(tiny_llava, short, short_mask, None, keep, 1, features=features)
    rows = torch.arange(2)[:, None]
    kept_mask = short_mask.bool()[rows, keep]
    torch.testing.assert_close(logits[rows, keep][kept_mask], reference[kept_mask], rtol=1e-4, atol=1e-5)
    lm = LMShape(64, 128, 2, 4, 2)
    one = pruned_prefill_flops("vscan", text_tokens=6, visual_tokens=16, kept=8, lm=lm)
    two = pruned_prefill_flops("vscan", text_tokens=6, visual_tokens=16, kept=8, lm=lm, layer=1, kept_after=3)
    assert two < one
