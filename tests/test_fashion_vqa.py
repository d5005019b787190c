"""The Fashion-MNIST grid VQA builder: idx loading (gzipped and raw), determinism, answers recomputed independently
from the grid's labels, cells equal to the source images, and clear errors for missing or malformed files.

The files are synthetic idx files in the official format (the real ones come from Debian's dataset-fashion-mnist,
which a fresh CI machine does not have)."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from owlore.data.fashion_vqa import (
    CLASSES,
    FashionMNISTMissing,
    build_vqa,
    cell_name,
    load_fashion_mnist,
)


def _idx(arr: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return header + arr.astype(np.uint8).tobytes()


@pytest.fixture
def idx_dir(tmp_path):
    rng = np.random.default_rng(1)
    for split, n, gz in (("train", 60, True), ("t10k", 30, False)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = np.arange(n, dtype=np.uint8) % 10
        for kind, arr, suffix in (("images-idx3", images, ""), ("labels-idx1", labels, "")):
            path = tmp_path / f"{split}-{kind}-ubyte{suffix}"
            if gz:
                (tmp_path / (path.name + ".gz")).write_bytes(gzip.compress(_idx(arr)))
            else:
                path.write_bytes(_idx(arr))
    return tmp_path


def test_loads_gzipped_and_raw_idx_files(idx_dir):
    x, y = load_fashion_mnist("train", idx_dir)
    assert x.shape == (60, 28, 28) and x.dtype == np.uint8 and y.tolist() == [i % 10 for i in range(60)]
    x, y = load_fashion_mnist("test", idx_dir)
    assert x.shape == (30, 28, 28)


def test_missing_files_say_how_to_get_them(tmp_path):
    with pytest.raises(FashionMNISTMissing, match="apt-get install dataset-fashion-mnist.*data_dir"):
        load_fashion_mnist("train", tmp_path)


def test_malformed_file_is_named(tmp_path, idx_dir):
    (idx_dir / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x0c\x01" + bytes(8))
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte: not an unsigned-byte idx file"):
        load_fashion_mnist("test", idx_dir)


def test_same_seed_same_examples_other_seed_others(idx_dir):
    x, y = load_fashion_mnist("train", idx_dir)
    a, b, c = build_vqa(x, y, 20, seed=3), build_vqa(x, y, 20, seed=3), build_vqa(x, y, 20, seed=4)
    assert all(np.array_equal(p.image, q.image) and p.question == q.question and p.answer == q.answer
               for p, q in zip(a, b))
    assert [e.indices for e in a] != [e.indices for e in c]


@pytest.mark.parametrize("grid", [2, 3])
def test_answers_and_cells_are_right(idx_dir, grid):
    x, y = load_fashion_mnist("test", idx_dir)
    examples = build_vqa(x, y, 300, grid=grid, seed=0)
    assert {e.kind for e in examples} == {"position", "presence", "count"}
    for e in examples:
        assert e.image.shape == (28 * grid, 28 * grid)
        assert len(set(e.indices)) == grid * grid  # no image twice in a grid
        for k, i in enumerate(e.indices):  # each cell is its source image, row by row
            r, c = divmod(k, grid)
            assert np.array_equal(e.image[28 * r:28 * (r + 1), 28 * c:28 * (c + 1)], x[i])
            assert e.labels[k] == y[i]
        _check_answer(e.question, e.answer, e.kind, e.labels, grid)
    presence = [e.answer for e in examples if e.kind == "presence"]
    assert 0.3 < presence.count("yes") / len(presence) < 0.7  # both answers occur about equally


def _check_answer(q: str, answer: str, kind: str, labels: tuple[int, ...], grid: int) -> None:
    """Recompute the answer of question ``q`` from the grid's labels."""
    names = {cell_name(r, c, grid): (r, c) for r in range(grid) for c in range(grid)}
    numbers = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    if kind == "position":
        r, c = names[q.removeprefix("What item is in the ").removesuffix("?")]
        assert answer == CLASSES[labels[r * grid + c]]
    elif kind == "presence":
        asked = q.split()[-1].rstrip("?")
        assert answer == ("yes" if CLASSES.index(asked) in labels else "no")
    else:
        asked = q.removeprefix("How many ").removesuffix("?")
        if asked == "shoes":
            n = sum(CLASSES[lab] in ("sandal", "sneaker", "boot") for lab in labels)
        else:
            n = sum(CLASSES[lab] + ("es" if CLASSES[lab] == "dress" else "s") == asked for lab in labels)
        assert answer == numbers[n]


def test_follow_up_questions_are_distinct_right_and_leave_the_first_unchanged(idx_dir):
    x, y = load_fashion_mnist("train", idx_dir)
    single = build_vqa(x, y, 50, seed=2)
    multi = build_vqa(x, y, 50, seed=2, questions=9)
    assert all(not e.follow_ups for e in single)
    for a, b in zip(single, multi):
        assert (a.question, a.answer, a.indices) == (b.question, b.answer, b.indices)
        asked = [b.question, *(q for q, _, _ in b.follow_ups)]
        assert len(asked) == len(set(asked)) and 5 <= len(asked) <= 9
        for q, answer, kind in b.follow_ups:
            _check_answer(q, answer, kind, b.labels, 3)
    with pytest.raises(ValueError, match="questions=0"):
        build_vqa(x, y, 1, questions=0)


def test_cell_names_cover_the_grid():
    assert [cell_name(r, c, 3) for r in range(3) for c in range(3)] == [
        "top-left", "top-center", "top-right", "middle-left", "middle", "middle-right",
        "bottom-left", "bottom-center", "bottom-right"]
    assert [cell_name(r, c, 2) for r in range(2) for c in range(2)] == [
        "top-left", "top-right", "bottom-left", "bottom-right"]
