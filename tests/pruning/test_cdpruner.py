"""CDPruner: the incremental-Cholesky greedy MAP equals brute-force greedy log-det, relevance equals a loop, and the
prompt changes what is kept."""

from __future__ import annotations

import torch

from owlore.pruning import VisualTokenPruner
from owlore.pruning.cdpruner import cdpruner_kernel, dpp_greedy_map, instruction_relevance

from .helpers import make_prompt
from .reference import dpp_greedy_logdet_loop, relevance_loop


def test_fast_greedy_map_equals_brute_force_log_det():
    g = torch.Generator().manual_seed(0)
    projected = torch.randn(3, 14, 32, generator=g)
    relevance = torch.rand(3, 14, generator=g) + 0.1
    kernel = cdpruner_kernel(projected, relevance)
    got = dpp_greedy_map(kernel, 7)
    assert got.tolist() == [dpp_greedy_logdet_loop(kernel[b], 7) for b in range(3)]


def test_relevance_equals_a_loop_and_ignores_masked_tokens():
    g = torch.Generator().manual_seed(1)
    projected, text = torch.randn(2, 9, 16, generator=g), torch.randn(2, 5, 16, generator=g)
    mask = torch.tensor([[1, 1, 0, 1, 0], [0, 1, 1, 1, 1]], dtype=torch.bool)
    got = instruction_relevance(projected, text, mask)
    torch.testing.assert_close(got.double(), relevance_loop(projected, text, mask), rtol=1e-5, atol=1e-5)
    text2 = text.clone()
    text2[~mask] = 100.0  # masked tokens must not matter
    torch.testing.assert_close(instruction_relevance(projected, text2, mask), got)
    assert torch.allclose(got.min(-1).values, torch.zeros(2), atol=1e-5) and torch.allclose(got.max(-1).values, torch.ones(2))


def test_the_prompt_conditions_the_selection(tiny_llava, pixels):
    kept = []
    for words in ([1, 5, 6, 7], [200, 201, 202, 203]):
        pruner = VisualTokenPruner("cdpruner", 4)
        pruner.prepare(tiny_llava, input_ids=torch.tensor([make_prompt(words)] * 2), pixel_values=pixels)
        kept.append(pruner.last_stats["keep_indices"])
    assert not torch.equal(kept[0], kept[1])


def test_method_options_reach_the_method_and_unknown_ones_are_refused(tiny_llava, pixels):
    import pytest

    ids = torch.tensor([make_prompt([1, 5, 6, 7])] * 2)
    kept = {}
    for negate in (False, True):
        pruner = VisualTokenPruner("cdpruner", 4, method_options={"cdpruner_negate": negate})
        pruner.prepare(tiny_llava, input_ids=ids, pixel_values=pixels)
        kept[negate] = pruner.last_stats["keep_indices"]
    assert not torch.equal(kept[False], kept[True])
    with pytest.raises(ValueError, match=r"method_options \['theta'\] are not options of 'cdpruner'"):
        VisualTokenPruner("cdpruner", 4, method_options={"theta": 0.5})
