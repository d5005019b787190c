"""FastV inside the language model (``owlore.pruning.in_llm``): selection equals the eager attention map's, logits
and cached ``generate`` (batch 2, left padding) equal an uncached layer-by-layer reference, SDPA stays on, and the
hooks come off."""

from __future__ import annotations

import torch

from owlore.pruning import VisualTokenPruner

from .helpers import IMAGE_TOKEN, make_prompt, pad_batch
from .reference import llm_stage_greedy_loop, llm_stage_logits_loop

K = 1  # the tiny LLaVA has 2 decoder layers: score at layer 0, prune before layer 1


def _batch():
    return pad_batch([make_prompt([1, 5, 6, 7], text_after=[8, 9]), make_prompt([1, 5], text_after=[4])],
                     side="left")


def _fastv_reference_keep(model, ids, mask, pixels, k):
    """Selection from the eager attention weights of layer K - 1 (an independent route to the same map)."""
    lm_config = model.config.text_config
    before = lm_config._attn_implementation
    lm_config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels,
                        position_ids=(mask.cumsum(-1) - 1).clamp_min(0), output_attentions=True)
    finally:
        lm_config._attn_implementation = before
    row = out.attentions[K - 1][:, :, -1].mean(1)  # left padding: the last position is every row's last token
    keep = []
    for b in range(ids.shape[0]):
        image = (ids[b] == IMAGE_TOKEN).nonzero()[:, 0]
        top = image[row[b, image].topk(k).indices].tolist()
        keep.append(sorted([i for i in range(ids.shape[1]) if ids[b, i] != IMAGE_TOKEN] + top))
    return torch.tensor(keep)


def test_selection_equals_the_eager_attention_map_and_logits_equal_the_reference(tiny_llava, pixels):
    ids, mask = _batch()
    pruner = VisualTokenPruner("fastv", 5, method_options={"layer": K})
    inputs = pruner.prepare(tiny_llava, input_ids=ids, attention_mask=mask, pixel_values=pixels)
    assert torch.equal(inputs["input_ids"], ids)  # the prompt is unchanged: pruning happens inside the LM
    with torch.no_grad():
        logits = tiny_llava(**inputs).logits
    keep = pruner.llm_keep(tiny_llava)
    pruner.detach(tiny_llava)  # the references below call the decoder layers directly, without the hooks
    assert torch.equal(keep, _fastv_reference_keep(tiny_llava, ids, mask, pixels, 5))
    assert keep.shape == (2, ids.shape[1] - (16 - 5))
    reference = llm_stage_logits_loop(tiny_llava, ids, mask, pixels, keep, K)
    everything = torch.arange(ids.shape[1])[None].expand(2, -1)
    unpruned = llm_stage_logits_loop(tiny_llava, ids, mask, pixels, everything, K)
    assert not torch.allclose(reference[:, -1], unpruned[:, -1])  # the reference itself prunes
    rows = torch.arange(2)[:, None]
    torch.testing.assert_close(logits[rows, keep][mask.bool()[rows, keep]],
                               reference[mask.bool()[rows, keep]], rtol=1e-4, atol=1e-5)
    assert tiny_llava.config.text_config._attn_implementation == "sdpa"


def test_cached_generate_batch2_left_padding_equals_uncached_reference(tiny_llava, pixels):
    ids, mask = _batch()
    pruner = VisualTokenPruner("fastv", 4, method_options={"layer": K})
    inputs = pruner.prepare(tiny_llava, input_ids=ids, attention_mask=mask, pixel_values=pixels)
    with torch.no_grad():
        out = tiny_llava.generate(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False,
                                  return_dict_in_generate=True, output_logits=True)
    keep = pruner.llm_keep(tiny_llava)
    pruner.detach(tiny_llava)  # the references below call the decoder layers directly, without the hooks
    expected, logits = llm_stage_greedy_loop(tiny_llava, ids, mask, pixels, keep, 5, K)
    assert torch.equal(out.sequences[:, ids.shape[1]:], expected)
    torch.testing.assert_close(torch.stack(out.logits, 1), logits, rtol=1e-4, atol=1e-5)  # every cached step


def test_keep_all_is_the_unpruned_model_and_detach_restores_it(tiny_llava, pixels):
    ids, mask = _batch()
    plain = {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels,
             "position_ids": (mask.cumsum(-1) - 1).clamp_min(0)}
    with torch.no_grad():
        reference = tiny_llava(**plain).logits
        everything = VisualTokenPruner("fastv", 16, method_options={"layer": K})
        assert torch.equal(tiny_llava(**everything.prepare(tiny_llava, input_ids=ids, attention_mask=mask,
                                                            pixel_values=pixels)).logits, reference)
        pruner = VisualTokenPruner("fastv", 4, method_options={"layer": K})
        pruned = tiny_llava(**pruner.prepare(tiny_llava, input_ids=ids, attention_mask=mask,
                                             pixel_values=pixels)).logits
        assert not torch.allclose(pruned[:, -1], reference[:, -1])
        # A pre-LLM pruner on the same model takes the LLM-stage hooks off first.
        VisualTokenPruner("random", 16).prepare(tiny_llava, input_ids=ids, attention_mask=mask, pixel_values=pixels)
        assert torch.equal(tiny_llava(**plain).logits, reference)
