"""DART inside the language model: the batched pivot selection equals a per-image loop, the budget is exact, and
cached ``generate`` equals the uncached reference with the same kept positions."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from owlore.pruning import VisualTokenPruner
from owlore.pruning.dart import dart_quotas, dart_select
from owlore.pruning.in_llm import LLMSelectionContext

from .helpers import make_prompt, pad_batch
from .reference import llm_stage_greedy_loop


def _dart_loop(ctx: LLMSelectionContext, image_pivots: int, text_pivots: int) -> list[list[list[int]]]:
    out = []
    for b in range(ctx.image_positions.shape[0]):
        length = ctx.keys.shape[1]
        norms = [float(ctx.keys[b, t].abs().sum()) for t in range(length)]
        last_image = int(ctx.image_positions[b].max())
        text = [t for t in range(last_image + 1, length) if ctx.attention_mask[b, t]]
        text_piv = sorted(text, key=lambda t: -norms[t])[:text_pivots]
        row = []
        for positions in ctx.image_positions[b].tolist():
            img_piv = sorted(positions, key=lambda t: -norms[t])[:image_pivots]
            kept = set(img_piv)
            for pivot, quota in zip(img_piv + text_piv, dart_quotas(ctx.k, len(img_piv), len(text_piv))):
                sims = {t: float(F.cosine_similarity(ctx.hidden[b, t], ctx.hidden[b, pivot], dim=0))
                        for t in positions if t not in kept}
                kept |= set(sorted(sims, key=sims.get)[:quota])
            row.append(sorted(kept))
        out.append(row)
    return out


def test_quotas_make_the_budget_exact():
    for k in range(4, 40):
        assert 4 + sum(dart_quotas(k, 4, 4)) == k
    assert dart_quotas(132, 4, 4) == [16] * 8  # the paper's "128" (4 pivots + 8 x 16) as an exact budget of 132


def test_selection_equals_a_per_image_loop():
    g = torch.Generator().manual_seed(0)
    length, n = 30, 8
    positions = torch.tensor([[[2 + i for i in range(n)], [12 + i for i in range(n)]],
                              [[4 + i for i in range(n)], [14 + i for i in range(n)]]])
    mask = torch.ones(2, length, dtype=torch.long)
    mask[1, 27:] = 0  # right padding must not be a text pivot
    ctx = LLMSelectionContext(k=6, image_positions=positions, attention_mask=mask,
                              keys=torch.randn(2, length, 12, generator=g), hidden=torch.randn(2, length, 10, generator=g),
                              options={"image_pivots": 2, "text_pivots": 3})
    assert dart_select(ctx).tolist() == _dart_loop(ctx, 2, 3)


def test_cached_generate_equals_the_uncached_reference(tiny_llava, pixels):
    ids, mask = pad_batch([make_prompt([1, 5, 6, 7], text_after=[8, 9, 10]), make_prompt([1, 5], text_after=[4, 3])],
                          side="left")
    pruner = VisualTokenPruner("dart", 6, method_options={"layer": 1, "image_pivots": 2, "text_pivots": 2})
    inputs = pruner.prepare(tiny_llava, input_ids=ids, attention_mask=mask, pixel_values=pixels)
    with torch.no_grad():
        out = tiny_llava.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                                  return_dict_in_generate=True, output_logits=True)
    keep = pruner.llm_keep(tiny_llava)
    pruner.detach(tiny_llava)  # the references below call the decoder layers directly, without the hooks
    assert keep.shape == (2, ids.shape[1] - (16 - 6))
    expected, logits = llm_stage_greedy_loop(tiny_llava, ids, mask, pixels, keep, 4, 1)
    assert torch.equal(out.sequences[:, ids.shape[1]:], expected)
    torch.testing.assert_close(torch.stack(out.logits, 1), logits, rtol=1e-4, atol=1e-5)
