"""Build the real offline tasks (owlore.data.real_tasks) into JSONL files that configs/tasks/*.yaml read.

    python scripts/prepare_tasks.py [--out .cache/tasks] [--man-dir /usr/share/man] [--docs /usr/share/doc/nodejs/api]

Writes <out>/manpages/{train,validation,test}.jsonl (instruction task), <out>/nodejs_docs/{...}.jsonl (domain
text, split by document) and <out>/mmlu_text/test.jsonl (general text for forgetting, from lm-eval's MMLU dev
items), plus <out>/MANIFEST.json (row counts, sources). When the man pages or the Node.js docs are missing and
apt-get is usable (root), installs the Debian packages that ship them (man-db manpages manpages-dev, nodejs).
Exit code 1 with instructions if a source is still missing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from owlore.data import real_tasks as rt  # noqa: E402

PACKAGES = {"manpages": ["man-db", "manpages", "manpages-dev"], "nodejs_docs": ["nodejs"]}


def _apt_install(packages: list[str]) -> None:
    if not (shutil.which("apt-get") and hasattr(os, "geteuid") and os.geteuid() == 0):
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    print(f"installing {' '.join(packages)} with apt-get ...", file=sys.stderr)
    if subprocess.run(["apt-get", "install", "-y", *packages], env=env).returncode:
        subprocess.run(["apt-get", "update"], env=env)
        subprocess.run(["apt-get", "install", "-y", *packages], env=env)


def _build(name: str, build):
    try:
        return build()
    except rt.TaskDataMissing:
        _apt_install(PACKAGES[name])
        return build()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path(".cache/tasks"))
    p.add_argument("--man-dir", type=Path, default=rt.MAN_DIR)
    p.add_argument("--docs", type=Path, default=rt.NODEJS_DOCS)
    p.add_argument("--seed", type=int, default=0, help="split seed (changes which pages/documents are held out)")
    args = p.parse_args()
    manifest: dict = {"seed": args.seed, "tasks": {}}
    try:
        tasks = {"manpages": (_build("manpages", lambda: rt.manpage_task(args.man_dir, seed=args.seed)),
                              str(args.man_dir)),
                 "nodejs_docs": (_build("nodejs_docs", lambda: rt.document_task(args.docs, seed=args.seed)),
                                 str(args.docs))}
    except rt.TaskDataMissing as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    from owlore.evaluation.mmlu_data import mmlu_dev_items

    tasks["mmlu_text"] = ({"test": rt.mmlu_text_rows(mmlu_dev_items())}, "lm_eval/tasks/mmlu/flan_cot_fewshot")
    for name, (splits, source) in tasks.items():
        counts = {split: rt.write_jsonl(rows, args.out / name / f"{split}.jsonl") for split, rows in splits.items()}
        manifest["tasks"][name] = {"source": source, "rows": counts}
        print(f"{name}: {counts} from {source}")
    (args.out / "MANIFEST.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
