import torch

from owlore.pruning import divprune_select, greedy_max_min
from owlore.pruning.divprune import cosine_similarity_matrix

from .reference import greedy_loop


def test_divprune_matches_naive_greedy():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(3, 40, 8, generator=g)
    got = divprune_select(feats, 10)
    for b in range(3):
        unit = torch.nn.functional.normalize(feats[b].double(), dim=-1)
        dist = 1 - unit @ unit.T
        dist.fill_diagonal_(float("inf"))
        first = int(dist.min(dim=1).values.argmax())
        assert got[b].tolist() == greedy_loop(feats[b], 10, first)


def test_divprune_prefers_distinct_tokens_over_duplicates():
    base = torch.eye(4)
    feats = torch.cat([base, base + 1e-3 * torch.randn(4, 4, generator=torch.Generator().manual_seed(1))])[
        None
    ]
    kept = divprune_select(feats, 4)[0]
    # one token from each of the 4 orthogonal directions, never a near-duplicate pair
    assert sorted(int(i) % 4 for i in kept) == [0, 1, 2, 3]


def test_greedy_is_batched_independently():
    g = torch.Generator().manual_seed(2)
    feats = torch.randn(2, 30, 6, generator=g)
    first = torch.tensor([3, 7])
    together = greedy_max_min(cosine_similarity_matrix(feats), 8, first=first)
    for b in range(2):
        alone = greedy_max_min(cosine_similarity_matrix(feats[b : b + 1]), 8, first=first[b : b + 1])[0]
        assert torch.equal(together[b], alone)
        assert together[b].tolist() == greedy_loop(feats[b], 8, int(first[b]))
