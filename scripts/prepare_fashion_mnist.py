"""Make Fashion-MNIST available offline: check the idx files, install Debian's package when they are missing.

    python scripts/prepare_fashion_mnist.py [--data-dir DIR] [--heldout-out .cache/tasks/fashion_vqa]

With ``--data-dir`` it only checks that directory (the original idx files, gzipped or not). Otherwise it looks in
``/usr/share/datasets/fashion-mnist`` and, if the files are missing and apt-get is usable (root), runs
``apt-get install -y dataset-fashion-mnist`` (30.9 MB, MIT). Exit code 1, with instructions, if neither works.
Then it writes the 288 held-out grid questions as a bring-your-own-images VQA directory (PNGs + questions.jsonl,
``owlore.data.vqa_files``), the set ``eval/vlm_pruning.py accuracy --data`` scores (skipped when already there).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from owlore.data.fashion_vqa import (  # noqa: E402
    DEFAULT_DIR,
    HELDOUT_DIR_NAME,
    FashionMNISTMissing,
    load_fashion_mnist,
    write_heldout_dir,
)
from owlore.data.vqa_files import QUESTIONS_FILE  # noqa: E402


def _check(data_dir) -> bool:
    try:
        for split in ("train", "test"):
            images, _ = load_fashion_mnist(split, data_dir)
            print(f"{split}: {len(images)} images in {data_dir or DEFAULT_DIR}")
        return True
    except FashionMNISTMissing as e:
        print(e, file=sys.stderr)
        return False


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--heldout-out", type=Path, default=Path(".cache/tasks") / HELDOUT_DIR_NAME,
                   help="where to write the held-out VQA directory")
    p.add_argument("--heldout", type=int, default=288, help="held-out questions (one per test-split grid)")
    args = p.parse_args()
    if _check(args.data_dir):
        return _write_heldout(args)
    if args.data_dir is None and shutil.which("apt-get") and hasattr(os, "geteuid") and os.geteuid() == 0:
        print("installing dataset-fashion-mnist with apt-get ...", file=sys.stderr)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        if subprocess.run(["apt-get", "install", "-y", "dataset-fashion-mnist"], env=env).returncode:
            subprocess.run(["apt-get", "update"], env=env)
            subprocess.run(["apt-get", "install", "-y", "dataset-fashion-mnist"], env=env)
        if _check(None):
            return _write_heldout(args)
    return 1


def _write_heldout(args: argparse.Namespace) -> int:
    if (args.heldout_out / QUESTIONS_FILE).is_file():
        print(f"held-out VQA set: {args.heldout_out} (already there)")
        return 0
    write_heldout_dir(args.heldout_out, args.heldout, data_dir=args.data_dir)
    print(f"held-out VQA set: {args.heldout} questions in {args.heldout_out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
