import pytest
import torch

from owlore.pruning import fopru_rank_select, fopru_row_select, fopru_significance

from .reference import fopru_significance_loop


def _attention(batch=3, n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, n, n, generator=g).softmax(-1)[:, :, :]  # rows sum to 1 before slicing


def test_significance_matches_loop():
    attn = _attention()[:, 1:, 1:]  # like dropping CLS: both row and column means now vary
    torch.testing.assert_close(
        fopru_significance(attn).double(), fopru_significance_loop(attn), rtol=1e-5, atol=1e-7
    )


def test_significance_uses_column_mean_when_rows_are_stochastic():
    attn = _attention()  # full softmax rows: row mean is constant 1/N, so the column mean must win
    torch.testing.assert_close(fopru_significance(attn), attn.mean(dim=1))


def test_rank_keeps_topk_in_raster_order():
    sig = torch.tensor([[0.5, 0.1, 0.9, 0.3]])
    assert fopru_rank_select(sig, 2).tolist() == [[0, 2]]


def test_row_mode_keeps_whole_rows():
    g = torch.Generator().manual_seed(0)
    sig = torch.rand(4, 36, generator=g)  # 6x6 grid
    kept = fopru_row_select(sig, 12)
    row_sums = sig.view(4, 6, 6).sum(-1)
    for b in range(4):
        rows = sorted({int(i) // 6 for i in kept[b]})
        assert len(rows) == 2 and kept[b].tolist() == [r * 6 + c for r in rows for c in range(6)]
        assert set(rows) == set(row_sums[b].topk(2).indices.tolist())


def test_row_mode_remainder_is_best_contiguous_run_of_next_row():
    sig = torch.zeros(1, 16)  # 4x4
    sig[0, 4:8] = torch.tensor([1.0, 1.0, 1.0, 1.0])  # best row: 1
    sig[0, 8:12] = torch.tensor([0.0, 0.2, 0.9, 0.8])  # second row: 2, best pair at cols 2-3
    kept = fopru_row_select(sig, 6)[0].tolist()
    assert kept == [4, 5, 6, 7, 10, 11]


def test_row_mode_needs_square_grid_or_explicit_one():
    with pytest.raises(ValueError, match="square"):
        fopru_row_select(torch.rand(1, 17), 4)
    assert fopru_row_select(torch.arange(12.0)[None], 4, grid=(3, 4)).tolist() == [[8, 9, 10, 11]]
