"""A small, deterministic, **synthetic** instruction task set for the offline demo and tests.

Nothing can be downloaded on our machines, so the demo needs a task that (a) ships with the code, (b) a 135M
model answers poorly out of the box and (c) a few minutes of CPU fine-tuning measurably improves. Each item is an
instruction with a short answer plus a fixed list of answer choices, so held-out accuracy is scored as
multiple choice by log-likelihood (the lm-eval convention) and never depends on free-form generation.

Train and held-out items never share an underlying fact: every item has a key (the numbers / words it is built
from) and the split is decided by a hash of that key, so "held-out" means unseen facts of seen task types.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from owlore.errors import UsageError

DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
ANTONYMS = [("hot", "cold"), ("big", "small"), ("fast", "slow"), ("happy", "sad"), ("light", "dark"),
            ("open", "closed"), ("early", "late"), ("full", "empty"), ("hard", "soft"), ("high", "low"),
            ("young", "old"), ("strong", "weak"), ("rich", "poor"), ("wet", "dry"), ("loud", "quiet"),
            ("thick", "thin"), ("clean", "dirty"), ("long", "short"), ("heavy", "light"), ("push", "pull"),
            ("win", "lose"), ("buy", "sell"), ("up", "down"), ("inside", "outside"), ("day", "night"),
            ("begin", "end"), ("true", "false"), ("friend", "enemy"), ("arrive", "leave"), ("remember", "forget"),
            ("above", "below"), ("accept", "refuse"), ("add", "subtract"), ("alive", "dead"), ("always", "never"),
            ("asleep", "awake"), ("brave", "afraid"), ("cheap", "expensive"), ("deep", "shallow"), ("easy", "difficult"),
            ("enter", "exit"), ("first", "last"), ("give", "take"), ("good", "bad"), ("guilty", "innocent"),
            ("laugh", "cry"), ("lend", "borrow"), ("major", "minor"), ("near", "far"), ("north", "south"),
            ("east", "west"), ("polite", "rude"), ("question", "answer"), ("raise", "drop"), ("safe", "dangerous"),
            ("smooth", "rough"), ("sweet", "sour"), ("tall", "short"), ("wide", "narrow"), ("ancient", "modern")]
CATEGORIES = {
    "fruit": ["apple", "banana", "cherry", "grape", "lemon", "mango", "orange", "peach", "pear", "plum"],
    "animal": ["horse", "tiger", "rabbit", "eagle", "whale", "sheep", "zebra", "camel", "otter", "wolf"],
    "color": ["red", "blue", "green", "yellow", "purple", "brown", "pink", "white", "black", "gray"],
    "tool": ["hammer", "wrench", "saw", "drill", "shovel", "pliers", "chisel", "rake", "axe", "ladder"],
    "vehicle": ["car", "bus", "truck", "bicycle", "train", "boat", "plane", "tractor", "scooter", "van"],
}
# Powers of ten only: the rule (how many zeros to append) is learnable by a 135M model in a few minutes.
UNITS = [("kilometers", "meters", 1000), ("meters", "centimeters", 100), ("kilograms", "grams", 1000),
         ("centimeters", "millimeters", 10), ("liters", "milliliters", 1000), ("dollars", "cents", 100),
         ("centuries", "years", 100), ("decades", "years", 10), ("millennia", "years", 1000),
         ("kilowatts", "watts", 1000)]
# A short system prompt keeps sequences short (SmolLM2's default one is ~20 tokens); the demo runs on a CPU.
SYSTEM = "Answer briefly."


def _item(task: str, key: str, instruction: str, choices: list[str], answer: str) -> dict[str, Any]:
    uniq = list(dict.fromkeys(choices))
    if all(c.isdigit() for c in uniq):  # numeric answers: sorted, so the answer's position carries no signal
        uniq.sort(key=int)
    # Log-likelihood scoring without an end marker can never pick a choice that another choice is a prefix of.
    clash = [(a, b) for a in uniq for b in uniq if a != b and b.startswith(a)]
    if clash:
        raise AssertionError(f"{task}: choice {clash[0][0]!r} is a prefix of {clash[0][1]!r}")
    return {"task": task, "key": key, "system": SYSTEM, "instruction": instruction, "input": "", "output": answer,
            "choices": uniq, "label": uniq.index(answer)}


def _arithmetic(rng: random.Random) -> dict[str, Any]:
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    s = a + b
    choices = [str(s + d) for d in (-2, -1, 0, 1, 2) if s + d > 0][:4]
    if str(s) not in choices:
        choices[-1] = str(s)
    # The key is order-free: "3 + 5" and "5 + 3" are the same fact and land in the same split.
    return _item("arithmetic", f"add:{min(a, b)}:{max(a, b)}", f"What is {a} + {b}? Answer with the number only.",
                 choices, str(s))


def _unit(rng: random.Random) -> dict[str, Any]:
    big, small, f = rng.choice(UNITS)
    n = rng.randint(2, 99)
    # The unit follows the number so no choice is a prefix of another ("63" would always out-score "63000").
    choices = [f"{v} {small}" for v in sorted({n * f, n, n * f * 10, n * f // 10})]
    return _item("unit_conversion", f"unit:{big}:{n}", f"Convert {n} {big} to {small}.", choices, f"{n * f} {small}")


def _parity(rng: random.Random) -> dict[str, Any]:
    n = rng.randint(10, 999)
    ans = "even" if n % 2 == 0 else "odd"
    return _item("parity", f"parity:{n}", f"Is {n} even or odd? Answer with one word.", ["even", "odd"], ans)


def _compare(rng: random.Random) -> dict[str, Any]:
    a, b = rng.sample(range(100, 1000), 2)  # same digit count: no choice is a prefix of the other
    return _item("compare", f"cmp:{min(a, b)}:{max(a, b)}",
                 f"Which number is larger, {a} or {b}? Answer with the number only.", [str(a), str(b)], str(max(a, b)))


def _next_in_cycle(rng: random.Random) -> dict[str, Any]:
    seq, kind = (DAYS, "day of the week") if rng.random() < 0.5 else (MONTHS, "month")
    i = rng.randrange(len(seq))
    after = rng.random() < 0.5
    ans, other = (seq[(i + 1) % len(seq)], seq[i - 1]) if after else (seq[i - 1], seq[(i + 1) % len(seq)])
    wrong = [s for s in seq if s not in (ans, other, seq[i])]
    word = "after" if after else "before"
    pair = (seq[i], seq[(i + 1) % len(seq)]) if after else (seq[i - 1], seq[i])  # "after X" == "before next(X)"
    return _item("next_in_cycle", f"adj:{pair[0]}:{pair[1]}",
                 f"Which {kind} comes right {word} {seq[i]}? Answer with one word.",
                 sorted([ans, other, *rng.sample(wrong, 2)]), ans)


def _word_mc(rng: random.Random, correct: str, wrong: list[str]) -> list[str]:
    options = [correct, *rng.sample(wrong, 3)]
    rng.shuffle(options)
    return options


def _antonym(rng: random.Random) -> dict[str, Any]:
    word, opp = rng.choice(ANTONYMS)
    if rng.random() < 0.5:
        word, opp = opp, word
    partners = {b for a, b in ANTONYMS if a == word} | {a for a, b in ANTONYMS if b == word}  # "light": dark, heavy
    wrong = sorted({w for pair in ANTONYMS for w in pair} - {word, opp} - partners)
    options = _word_mc(rng, opp, wrong)
    q = f"Which word means the opposite of '{word}': {', '.join(options)}? Answer with the word only."
    return _item("antonym", f"ant:{':'.join(sorted((word, opp)))}", q, options, opp)  # hot->cold == cold->hot


def _category(rng: random.Random) -> dict[str, Any]:
    cat = rng.choice(sorted(CATEGORIES))
    correct = rng.choice(CATEGORIES[cat])
    wrong = [w for c, ws in CATEGORIES.items() if c != cat for w in ws]
    options = _word_mc(rng, correct, wrong)
    q = f"Which of these is a {cat}: {', '.join(options)}? Answer with the word only."
    return _item("category", f"cat:{cat}:{correct}", q, options, correct)


DEMO_TASKS: dict[str, Callable[[random.Random], dict[str, Any]]] = {
    "arithmetic": _arithmetic, "unit_conversion": _unit, "parity": _parity, "compare": _compare,
    "next_in_cycle": _next_in_cycle, "antonym": _antonym, "category": _category,
}


def _split_of(key: str, heldout_fraction: float) -> str:
    h = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "test" if h < heldout_fraction else "train"


def build_demo_tasks(split: str = "train", n: int | None = None, *, seed: int = 0,
                     tasks: list[str] | None = None, heldout_fraction: float = 0.2) -> list[dict[str, Any]]:
    """Generate ``n`` items of one split, round-robin over task types, deterministic in ``seed``.

    Args:
        split: ``"train"`` or ``"test"`` (held-out facts).
        n: number of items (default 2000 for train, 210 for test).
        seed: generator seed; same arguments give the same list.
        tasks: subset of ``DEMO_TASKS`` names (default all).
        heldout_fraction: share of the underlying facts reserved for the test split.

    Returns:
        Dicts with ``task``, ``key``, ``instruction``, ``input``, ``output``, ``choices``, ``label``
        (``choices[label] == output``).
    """
    if split not in ("train", "test"):
        raise UsageError(f"split must be 'train' or 'test', got {split!r}")
    names = tasks or list(DEMO_TASKS)
    unknown = sorted(set(names) - set(DEMO_TASKS))
    if unknown:
        raise UsageError(f"unknown demo tasks {unknown}; available: {sorted(DEMO_TASKS)}")
    n = n if n is not None else (2000 if split == "train" else 210)
    rng = random.Random(f"{seed}:{split}")
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    active = list(names)
    misses = dict.fromkeys(names, 0)
    turn = 0
    while len(out) < n:
        if not active:
            raise RuntimeError(f"could not draw {n} distinct {split} items from tasks {names}")
        name = active[turn % len(active)]
        item = DEMO_TASKS[name](rng)
        # Train may repeat a fact with new distractors; the test split keeps one item per fact.
        if _split_of(item["key"], heldout_fraction) != split or (split == "test" and item["key"] in seen):
            misses[name] += 1
            if misses[name] > 500:  # this task's pool of held-out facts is used up; the others fill in
                active.remove(name)
            continue
        misses[name] = 0
        seen.add(item["key"])
        out.append(item)
        turn += 1
    return out


def write_demo_tasks(directory: str | Path, *, seed: int = 0, n_train: int | None = None,
                     n_test: int | None = None) -> dict[str, Path]:
    """Write ``train.jsonl`` and ``test.jsonl`` into ``directory``; returns their paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, n in (("train", n_train), ("test", n_test)):
        path = directory / f"{split}.jsonl"
        with path.open("w") as f:
            for item in build_demo_tasks(split, n, seed=seed):
                f.write(json.dumps(item) + "\n")
        paths[split] = path
    return paths
