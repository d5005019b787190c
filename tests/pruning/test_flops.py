import pytest

from owlore.pruning.flops import (
    LMShape,
    VisionShape,
    decode_flops_exact,
    kv_cache_bytes,
    prefill_flops_exact,
    prefill_flops_peer,
    projector_flops,
    selection_flops,
    vision_flops,
    zoo_estimator_flops,
    zoo_exact_flops,
)


def test_small_hand_computed_values():
    lm = LMShape(hidden=2, ffn=3, layers=1, heads=1, kv_heads=1)
    assert prefill_flops_peer(1, lm) == 4 * 1 * 4 + 2 * 1 * 2 + 2 * 1 * 2 * 3  # 32
    assert prefill_flops_exact(1, lm) == 2 * (4 * 4 + 3 * 2 * 3) + 4 * 2  # 76
    gqa = LMShape(hidden=4, ffn=3, layers=2, heads=2, kv_heads=1)  # d_kv = 2
    assert prefill_flops_exact(2, gqa) == 2 * (2 * 2 * (2 * 16 + 2 * 4 * 2 + 3 * 4 * 3) + 4 * 4 * 4)  # 800
    assert decode_flops_exact(5, gqa) == 2 * (2 * (32 + 16 + 36) + 4 * 5 * 4)
    assert kv_cache_bytes(100, gqa, bytes_per_element=2) == 2 * 100 * 2 * 2 * 2


def test_llava_7b_figures_match_published_table():
    """576 visual + 60 text tokens, LLaVA-1.5-7B: 3.31 TF (peer) and 8.45 TF (exact)."""
    lm = LMShape()
    assert prefill_flops_peer(636, lm) / 1e12 == pytest.approx(3.31, abs=0.005)
    assert prefill_flops_exact(636, lm) / 1e12 == pytest.approx(8.45, abs=0.005)
    assert prefill_flops_exact(124, lm) / 1e12 == pytest.approx(1.61, abs=0.005)
    assert prefill_flops_exact(636, lm) / prefill_flops_exact(124, lm) >= 5  # 576 -> 64 target
    assert kv_cache_bytes(636, lm) == 2 * 636 * 32 * 4096 * 2


def test_vision_and_zoo_costs():
    v = VisionShape()
    assert vision_flops(v) / 1e12 == pytest.approx(0.38, abs=0.01)  # CLIP-L/336
    assert projector_flops(1, v) == 2 * (1024 * 4096 + 4096 * 4096)
    assert zoo_estimator_flops(576, v, directions=64) / 1e12 == pytest.approx(3.09, abs=0.01)
    assert zoo_exact_flops(576, v) / 1e9 == pytest.approx(24.2, abs=0.1)
    assert zoo_exact_flops(576, v, include_kernel=True) - zoo_exact_flops(576, v) == 2 * 4096**2 * (
        4096 + 1024
    )


def test_selection_flops_order_and_errors():
    v = VisionShape()
    costs = {
        m: selection_flops(m, 64, v) for m in ["random", "cls", "fopru_rank", "divprune", "zoo_exact", "zoo"]
    }
    assert list(costs) == sorted(costs, key=costs.get)
    with pytest.raises(ValueError):
        selection_flops("fastvv", 64, v)


def test_pruned_prefill_flops_by_stage():
    from owlore.pruning.flops import pruned_prefill_flops

    lm = LMShape()
    assert pruned_prefill_flops("cls", text_tokens=60, visual_tokens=576, kept=64, lm=lm) == prefill_flops_exact(124, lm)
    two = LMShape(layers=2)
    thirty = LMShape(layers=30)
    assert pruned_prefill_flops("fastv", text_tokens=60, visual_tokens=576, kept=64, lm=lm) == (
        prefill_flops_exact(636, two) + prefill_flops_exact(124, thirty))
    assert pruned_prefill_flops("dart", text_tokens=60, visual_tokens=576, kept=64, lm=lm, layer=3) == (
        prefill_flops_exact(636, LMShape(layers=3)) + prefill_flops_exact(124, LMShape(layers=29)))
