import torch

from owlore.pruning import shrink_sequences
from owlore.pruning.sequence import padding_side, sequence_keep_mask


def test_sequence_keep_mask_fills_images_in_row_major_order():
    image = torch.tensor([[0, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    token_keep = torch.tensor([[True, False], [False, True]])
    assert sequence_keep_mask(image, token_keep).tolist() == [
        [True, True, False, True],
        [False, True, True, True],
    ]


def test_left_padding_equal_counts_is_a_pure_gather():
    ids = torch.tensor([[0, 0, 5, 9, 9, 6], [4, 5, 9, 9, 6, 7]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    keep = ids != 9
    keep[:, 3] = True  # keep the second image token of each row
    out = shrink_sequences(ids, keep=keep, attention_mask=mask)
    assert out["input_ids"].tolist() == [[0, 0, 5, 9, 6], [4, 5, 9, 6, 7]]
    assert out["attention_mask"].tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert out["position_ids"].tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]


def test_unequal_counts_are_repadded_on_the_padding_side():
    ids = torch.tensor([[5, 9, 9, 9, 9, 6], [5, 9, 9, 6, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    labels = torch.tensor([[-100, -100, -100, -100, -100, 6], [-100, -100, -100, 6, -100, -100]])
    keep = torch.tensor([[1, 1, 0, 1, 0, 1], [1, 0, 1, 1, 1, 1]], dtype=torch.bool)
    assert padding_side(mask) == "right"
    out = shrink_sequences(ids, keep=keep, attention_mask=mask, labels=labels, pad_token_id=0)
    assert out["input_ids"].tolist() == [[5, 9, 9, 6], [5, 9, 6, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert out["labels"].tolist() == [[-100, -100, -100, 6], [-100, -100, 6, -100]]
    left = shrink_sequences(ids.flip(1), keep=keep.flip(1), attention_mask=mask.flip(1))
    assert left["input_ids"].tolist() == [[6, 9, 9, 5], [0, 6, 9, 5]]
    assert left["position_ids"].tolist() == [[0, 1, 2, 3], [0, 0, 1, 2]]


def test_original_positions_keep_unpruned_indices():
    ids = torch.tensor([[0, 5, 9, 9, 9, 6]])
    mask = torch.tensor([[0, 1, 1, 1, 1, 1]])
    keep = torch.tensor([[1, 1, 0, 1, 0, 1]], dtype=torch.bool)
    out = shrink_sequences(ids, keep=keep, attention_mask=mask, position_policy="original")
    assert out["input_ids"].tolist() == [[5, 9, 6]]  # a padding column no row needs is dropped
    assert out["position_ids"].tolist() == [[0, 2, 4]]
    contiguous = shrink_sequences(ids, keep=keep, attention_mask=mask)
    assert contiguous["position_ids"].tolist() == [[0, 1, 2]]
