"""The method registry: every method is found by name, computes only what it declares, costs what flops.py says,
and the docs table is the registry's; a method registered from outside works through ``VisualTokenPruner``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from owlore.pruning import VisualTokenPruner
from owlore.pruning import registry as reg
from owlore.pruning.flops import VisionShape, selection_flops
from owlore.pruning.select import topk_select
from owlore.pruning.support import support_table

from .helpers import make_prompt

DOCS = Path(__file__).resolve().parents[2] / "docs" / "pruning.md"


def test_every_builtin_is_registered_with_known_needs_and_a_paper():
    names = reg.method_names()
    assert {"fopru_rank", "fopru_row", "zoo", "zoo_exact", "cls", "divprune", "random"} <= set(names)
    for name in names:
        method = reg.get_method(name)
        assert method.name == name and set(method.needs) <= set(reg.NEEDS) and method.paper and method.summary


def test_unknown_and_duplicate_names_are_refused():
    with pytest.raises(ValueError, match=r"unknown pruning method 'zooo' \(did you mean 'zoo'\?\); choose one of"):
        reg.get_method("zooo")
    with pytest.raises(ValueError, match="already registered"):
        reg.register(reg.PruningMethod(name="zoo", select=lambda ctx: None, needs=frozenset(),
                                       flops=lambda k, v, o: 0.0, paper="-", summary="-"))
    with pytest.raises(ValueError, match="unknown needs"):
        reg.PruningMethod(name="x", select=lambda ctx: None, needs=frozenset({"depth"}), flops=lambda k, v, o: 0.0,
                          paper="-", summary="-")


def test_selection_flops_reads_the_registry():
    v = VisionShape()
    n = v.tokens - 1
    assert selection_flops("random", 64, v) == 0.0
    assert selection_flops("cls", 64, v) == 2.0 * n * v.hidden
    assert selection_flops("divprune", 64, v) == 2.0 * n * n * v.lm_hidden + 2.0 * 64 * n * v.lm_hidden
    for name in reg.method_names():
        assert selection_flops(name, 64, v) == reg.get_method(name).flops(64, v, {"num_directions": 16})
    with pytest.raises(ValueError, match="unknown pruning method 'fastvv'"):
        selection_flops("fastvv", 64, v)


def test_docs_table_is_the_registry_table():
    assert support_table() in DOCS.read_text(), "run python scripts/update_pruning_table.py"


def test_a_method_registered_from_outside_gets_exactly_what_it_declares(tiny_llava, pixels, monkeypatch):
    seen = {}

    def select(ctx: reg.SelectionContext) -> torch.Tensor:
        seen.update(projected=ctx.projected, query=ctx.enc.query, options=dict(ctx.options))
        # Keep the tokens whose projected features have the largest norm.
        return topk_select(ctx.projected.norm(dim=-1), ctx.k)

    method = reg.PruningMethod(name="norm", select=select, needs=frozenset({"projected"}),
                               flops=lambda k, v, o: 1.0, paper="-", summary="largest projected norm")
    monkeypatch.setitem(reg._METHODS, "norm", method)
    ids = torch.tensor([make_prompt([1, 5], text_after=[7])] * 2)
    pruner = VisualTokenPruner("norm", 5, grid=(4, 4))
    pruner.prepare(tiny_llava, input_ids=ids, pixel_values=pixels)
    assert seen["query"] is None and seen["options"]["grid"] == (4, 4)
    with torch.no_grad():
        from owlore.pruning.llava import encode_images

        feats = encode_images(tiny_llava, pixels, attention=False).features
        expected = tiny_llava.model.multi_modal_projector(feats).norm(dim=-1).topk(5).indices.sort().values
    assert torch.equal(pruner.last_stats["keep_indices"], expected)
    assert selection_flops("norm", 5, VisionShape()) == 1.0


def test_merge_weights_are_applied_before_the_projector_and_text_reaches_text_methods(tiny_llava, pixels,
                                                                                       monkeypatch):
    """A Selection with weights: output token j = projector(weights[j] @ features); a method that declares
    ``text`` gets each image's prompt embeddings with a mask of its text tokens (padding and placeholders off)."""
    seen = {}

    def select(ctx: reg.SelectionContext) -> reg.Selection:
        seen.update(text=ctx.text, text_mask=ctx.text_mask)
        images, n = ctx.enc.features.shape[:2]
        weights = torch.zeros(images, ctx.k, n)
        weights[:, 0] = 1.0 / n  # token 0 = the mean of all tokens
        weights[:, 1:, 1:ctx.k].copy_(torch.eye(ctx.k - 1))
        return reg.Selection(indices=torch.arange(ctx.k).expand(images, ctx.k), weights=weights)

    monkeypatch.setitem(reg._METHODS, "mean0", reg.PruningMethod(
        name="mean0", select=select, needs=frozenset({"text"}), flops=lambda k, v, o: 0.0, paper="-", summary="-"))
    from .helpers import IMAGE_TOKEN, pad_batch

    ids, mask = pad_batch([make_prompt([1, 5, 6], text_after=[7]), make_prompt([1], text_after=[9, 3])], side="left")
    pruner = VisualTokenPruner("mean0", 3)
    inputs = pruner.prepare(tiny_llava, input_ids=ids, attention_mask=mask, pixel_values=pixels)
    assert pruner.last_stats["merged"]
    from owlore.pruning.llava import encode_images

    with torch.no_grad():
        feats = encode_images(tiny_llava, pixels, attention=False).features
        merged = torch.cat([feats.mean(dim=1, keepdim=True), feats[:, 1:3]], dim=1)
        expected = tiny_llava.model.multi_modal_projector(merged)
    got = torch.stack(inputs["mm_encoder_outputs"]["image"].pooler_output)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    text_mask = mask.bool() & (ids != IMAGE_TOKEN)
    assert torch.equal(seen["text_mask"], text_mask)
    torch.testing.assert_close(seen["text"], tiny_llava.get_input_embeddings()(ids).detach())


def test_readme_says_every_field_a_pruning_method_declares():
    import dataclasses
    from pathlib import Path

    from owlore.pruning.registry import PruningMethod

    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    recipe = text[text.index("**Adding a pruning method**"):text.index("**Adding a memory option**")]
    missing = [f.name for f in dataclasses.fields(PruningMethod) if f.name not in recipe]
    assert missing == [] and "BUILTIN_MODULES" in recipe, f"README's pruning recipe does not mention {missing}"
