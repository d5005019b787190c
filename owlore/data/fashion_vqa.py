"""A visual question-answering set from real images: grids of Fashion-MNIST items, questions with one-word answers.

Fashion-MNIST (Xiao, Rasul and Vollgraf 2017, arXiv 1708.07747; MIT licence) has 70,000 real 28×28 grayscale photos
of clothing in 10 classes. Pretrained vision weights cannot be downloaded on our machines, but these images can
(Debian's ``dataset-fashion-mnist``), so a small LLaVA trained on them has visual features that mean something,
and visual-token pruning methods can be compared by accuracy.

Each example is a ``grid × grid`` mosaic of items (3×3 by default: 84×84 pixels) and one question about it:

* position: "What item is in the top-left?" -> ``boot`` (one cell matters, as in real VQA);
* presence: "Is there a bag?" -> ``yes`` / ``no`` (half the questions ask about an absent class);
* count: "How many shoes?" -> ``two`` (sandals, sneakers and ankle boots are shoes; also "How many bags?" etc.).

The training split draws its items from the official 60,000 training images and the held-out split from the 10,000
test images, so no held-out image is ever seen in training. Everything is a pure function of the split and the seed.
"""

from __future__ import annotations

import gzip
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot")
"""One-word answers for the 10 labels (official names: T-shirt/top, Trouser, Pullover, Dress, Coat, Sandal, Shirt,
Sneaker, Bag, Ankle boot)."""
PLURALS = ("t-shirts", "trousers", "pullovers", "dresses", "coats", "sandals", "shirts", "sneakers", "bags", "boots")
SHOES = frozenset({5, 7, 9})
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
INSTALL_HINT = ("install Debian's package (sudo apt-get install dataset-fashion-mnist; files in "
                f"{DEFAULT_DIR}), or put the four original idx files (train-images-idx3-ubyte[.gz], ...) from "
                "https://github.com/zalandoresearch/fashion-mnist in a directory and pass it as data_dir")


class FashionMNISTMissing(FileNotFoundError):
    """The idx files are not where they were looked for (the message says how to get them)."""


def _read_idx(path: Path) -> np.ndarray:
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if len(raw) < 8 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte idx file (magic {raw[:4].hex()})")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims} ({int(np.prod(dims))} bytes) but holds {data.size}")
    return data.reshape(dims)


def _find(directory: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (directory / name).is_file():
            return directory / name
    raise FashionMNISTMissing(f"Fashion-MNIST file {stem}[.gz] not found in {directory}: {INSTALL_HINT}")


def load_fashion_mnist(split: str = "train", data_dir: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Images ``[N, 28, 28]`` uint8 and labels ``[N]`` of the official ``train`` (60k) or ``test`` (10k) split,
    from the idx files (gzipped or not) in ``data_dir`` (default: Debian's install location)."""
    if split not in FILES:
        raise ValueError(f"split={split!r}: must be train or test")
    directory = Path(data_dir) if data_dir is not None else DEFAULT_DIR
    images = _read_idx(_find(directory, FILES[split][0]))
    labels = _read_idx(_find(directory, FILES[split][1]))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"{directory}: {split} images {images.shape} and labels {labels.shape} do not match")
    if labels.max(initial=0) >= len(CLASSES):
        raise ValueError(f"{directory}: {split} labels go up to {labels.max()}, Fashion-MNIST has 10 classes")
    return images, labels


def cell_name(row: int, col: int, grid: int) -> str:
    """"top-left", "middle", "bottom-right", ... (2×2 grids have no middle row or column)."""
    rows = ("top", "bottom") if grid == 2 else ("top", "middle", "bottom")
    cols = ("left", "right") if grid == 2 else ("left", "center", "right")
    if grid == 3 and row == 1 and col == 1:
        return "middle"
    return f"{rows[row]}-{cols[col]}"


@dataclass(frozen=True)
class VQAExample:
    image: np.ndarray
    """``[grid·28, grid·28]`` uint8."""
    question: str
    answer: str
    kind: str
    """position, presence or count."""
    labels: tuple[int, ...]
    """The items' classes, row by row."""
    indices: tuple[int, ...]
    """The items' indices in the source split."""
    follow_ups: tuple[tuple[str, str, str], ...] = ()
    """Further ``(question, answer, kind)`` turns about the same image (training conversations; empty for
    evaluation, where each image gets one question)."""


HELDOUT_SEED_OFFSET = 1_000_003
"""Held-out questions use seed ``vision.seed + HELDOUT_SEED_OFFSET`` (test-split images, one question each)."""


def heldout_examples(n: int, *, grid: int = 3, seed: int = 0, data_dir: str | Path | None = None) -> list[VQAExample]:
    """The ``n`` held-out questions every evaluation uses (train.py, ``eval/vlm_pruning.py accuracy``)."""
    images, labels = load_fashion_mnist("test", data_dir)
    return build_vqa(images, labels, n, grid=grid, seed=seed + HELDOUT_SEED_OFFSET)


def make_mosaic(items: np.ndarray, grid: int) -> np.ndarray:
    """``grid × grid`` items ``[grid², S, S]`` (row by row) as one ``[grid·S, grid·S]`` image."""
    size = items.shape[-1]
    return items.reshape(grid, grid, size, size).transpose(0, 2, 1, 3).reshape(grid * size, grid * size)


def random_grids(images: np.ndarray, labels: np.ndarray, n: int, *, grid: int,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``n`` mosaics of random items ``[n, grid·S, grid·S]`` and their cells' labels ``[n, grid²]`` (row by row)."""
    idx = rng.integers(len(images), size=(n, grid * grid))
    mosaics = np.stack([make_mosaic(images[i], grid) for i in idx])
    return mosaics, labels[idx].astype(np.int64)


def build_vqa(images: np.ndarray, labels: np.ndarray, n: int, *, grid: int = 3, seed: int = 0,
              questions: int = 1) -> list[VQAExample]:
    """``n`` examples from the given split's images; deterministic in ``seed``.

    ``questions > 1`` adds up to ``questions - 1`` distinct follow-up questions about the same image (a
    multi-turn conversation, as in LLaVA's instruction data): the image's tokens are paid for once and
    supervise several answers, which makes training several times cheaper per answer. The first question of
    every example is the same whatever ``questions`` is.
    """
    return list(iter_vqa(images, labels, n, grid=grid, seed=seed, questions=questions))


def iter_vqa(images: np.ndarray, labels: np.ndarray, n: int, *, grid: int = 3, seed: int = 0,
             questions: int = 1) -> Iterator[VQAExample]:
    if grid not in (2, 3):
        raise ValueError(f"grid={grid}: must be 2 or 3")
    if questions < 1:
        raise ValueError(f"questions={questions}: must be >= 1")
    rng = np.random.default_rng(seed)
    follow_rng = np.random.default_rng([seed, 1])  # a separate stream: the first questions do not depend on it
    for _ in range(n):
        idx = rng.choice(len(images), size=grid * grid, replace=False)
        cells = tuple(int(labels[i]) for i in idx)
        mosaic = make_mosaic(images[idx], grid)
        question, answer, kind = _ask(rng, cells, grid)
        follow_ups: list[tuple[str, str, str]] = []
        seen = {question}
        for _attempt in range(4 * (questions - 1)):
            if len(follow_ups) == questions - 1:
                break
            turn = _ask(follow_rng, cells, grid)
            if turn[0] not in seen:
                seen.add(turn[0])
                follow_ups.append(turn)
        yield VQAExample(np.ascontiguousarray(mosaic), question, answer, kind, cells, tuple(int(i) for i in idx),
                         tuple(follow_ups))


def _ask(rng: np.random.Generator, cells: tuple[int, ...], grid: int) -> tuple[str, str, str]:
    """One question about a grid with items ``cells``: ``(question, answer, kind)``."""
    kind = ("position", "presence", "count")[int(rng.integers(3))]
    if kind == "position":
        k = int(rng.integers(grid * grid))
        return f"What item is in the {cell_name(k // grid, k % grid, grid)}?", CLASSES[cells[k]], kind
    if kind == "presence":
        present = sorted(set(cells))
        absent = [c for c in range(len(CLASSES)) if c not in present]
        ask_present = bool(rng.integers(2)) or not absent
        c = int(rng.choice(present if ask_present else absent))
        article = "an" if CLASSES[c][0] in "aeiou" else "a"
        return f"Is there {article} {CLASSES[c]}?", "yes" if c in cells else "no", kind
    if rng.integers(2):
        question, count = "How many shoes?", sum(c in SHOES for c in cells)
    else:
        c = int(rng.integers(len(CLASSES)))
        question, count = f"How many {PLURALS[c]}?", cells.count(c)
    return question, NUMBERS[count], kind


CHOICES: dict[str, tuple[str, ...]] = {"position": CLASSES, "presence": ("yes", "no"), "count": NUMBERS}
"""The candidate answers of each question kind (every answer of that kind)."""

HELDOUT_DIR_NAME = "fashion_vqa"
"""The held-out set's directory under ``.cache/tasks`` (``scripts/prepare_fashion_mnist.py`` writes it)."""


def as_records(examples: list[VQAExample]) -> list:
    """The examples as ``owlore.data.vqa_files.VQARecord``: each kind's answers as the choices."""
    from owlore.data.vqa_files import VQARecord

    return [VQARecord(image=e.image, question=e.question, answer=e.answer, choices=CHOICES[e.kind], kind=e.kind,
                      id=str(i)) for i, e in enumerate(examples)]


def write_heldout_dir(path: str | Path, n: int = 288, *, grid: int = 3, seed: int = 0,
                      data_dir: str | Path | None = None) -> Path:
    """The ``n`` held-out questions (:func:`heldout_examples`) as a bring-your-own-images VQA directory (PNGs and
    ``questions.jsonl``), so the Fashion benchmark is scored like any user's set."""
    from owlore.data.vqa_files import write_vqa_dir

    return write_vqa_dir(path, as_records(heldout_examples(n, grid=grid, seed=seed, data_dir=data_dir)))
