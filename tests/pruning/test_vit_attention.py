import torch

from owlore.pruning import capture_qk, cls_attention_scores, head_mean_attention

from .reference import head_mean_attention_loop


def _qk(seed=0, batch=2, heads=3, tokens=7, dim=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, heads, tokens, dim, generator=g), torch.randn(
        batch, heads, tokens, dim, generator=g
    )


def test_head_mean_attention_matches_loop():
    q, k = _qk()
    got = head_mean_attention(q, k, scale=0.5)
    torch.testing.assert_close(got.double(), head_mean_attention_loop(q, k, 0.5), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.sum(-1), torch.ones(2, 7))


def test_cls_attention_is_row_zero_of_the_full_map():
    q, k = _qk(seed=1)
    full = head_mean_attention_loop(q, k, 0.7)
    torch.testing.assert_close(
        cls_attention_scores(q, k, scale=0.7).double(), full[:, 0], rtol=1e-5, atol=1e-6
    )


def test_capture_qk_reproduces_eager_attention_of_an_sdpa_tower(tiny_llava):
    """The hooked q/k of an SDPA layer give exactly the weights an eager tower would return."""
    tower = tiny_llava.model.vision_tower
    assert tower.config._attn_implementation == "sdpa"
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    attn = tower.encoder.layers[0].self_attn
    with torch.no_grad(), capture_qk(attn) as qk:
        tower(pixels)
    assert not attn.q_proj._forward_hooks and not attn.k_proj._forward_hooks  # hooks removed
    ours = head_mean_attention(qk["query"], qk["key"], scale=attn.scale)
    tower.config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            eager = tower(pixels, output_attentions=True).attentions[0].mean(dim=1)
    finally:
        tower.config._attn_implementation = "sdpa"
    torch.testing.assert_close(ours, eager, rtol=1e-5, atol=1e-6)
