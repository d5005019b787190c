import pytest
import torch

from owlore.pruning import random_scores, resolve_keep, topk_select


@pytest.mark.parametrize(
    ("keep", "expected"),
    [(64, 64), (576, 576), (1000, 576), (1.0, 576), (1 / 3, 192), (0.1112, 64), (0.2223, 128), (1e-9, 1)],
)
def test_resolve_keep(keep, expected):
    assert resolve_keep(keep, 576) == expected


@pytest.mark.parametrize("keep", [0, -3, 0.0, 1.5, -0.2, True, "64", None])
def test_resolve_keep_rejects(keep):
    with pytest.raises(ValueError, match="keep"):
        resolve_keep(keep, 576)


def test_topk_select_sorted_and_correct():
    scores = torch.tensor([[0.1, 0.9, 0.3, 0.8, 0.2], [5.0, 4.0, 3.0, 2.0, 1.0]])
    assert topk_select(scores, 2).tolist() == [[1, 3], [0, 1]]
    loop = [sorted(sorted(range(5), key=lambda i: -float(row[i]))[:3]) for row in scores]
    assert topk_select(scores, 3).tolist() == loop


def test_random_scores_reproducible_with_explicit_generator():
    a = random_scores(2, 10, generator=torch.Generator().manual_seed(3))
    b = random_scores(2, 10, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == (2, 10)
    assert not torch.equal(a, random_scores(2, 10, generator=torch.Generator().manual_seed(4)))
