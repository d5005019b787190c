"""A bring-your-own-images VQA directory as lmms-eval tasks, so lmms-eval scores a user's folder as it scores MME.

``write_lmms_tasks(vqa_dir, out_dir, name)`` writes ``<name>_mc`` (rows with ``choices``: lmms-eval's
``multiple_choice``, accuracy by log-likelihood) and ``<name>_gen`` (rows without: ``generate_until``, exact match
after SQuAD normalisation, as ``owlore.pruning.accuracy`` scores them), a ``utils.py`` and the rows as JSONL with
absolute image paths. Run them with ``--include_path out_dir --tasks <name>_mc,<name>_gen``.
"""

from __future__ import annotations

import json
from pathlib import Path

from owlore.data.vqa_files import read_vqa_dir

__all__ = ["write_lmms_tasks"]

_UTILS = '''"""Written by owlore.pruning.lmms_tasks: the documents are rows of a bring-your-own-images VQA directory."""

from PIL import Image

from owlore.evaluation.answers import normalize_answer


def doc_to_visual(doc):
    return [Image.open(doc["image"]).convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def doc_to_choice(doc):
    return doc["choices"]


def doc_to_target(doc):
    return doc["choices"].index(doc["answer"]) if doc.get("choices") else doc["answer"]


def exact_match(doc, results):
    return {"exact_match": float(normalize_answer(results[0]) == normalize_answer(doc["answer"]))}
'''


class _Function(str):
    """A ``!function utils.<name>`` reference in the task YAML."""


def _task(name: str, data: str, *, choices: bool) -> dict:
    f = _Function
    task = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": data}},
            "test_split": "test", "doc_to_visual": f("utils.doc_to_visual"), "doc_to_text": f("utils.doc_to_text"),
            "doc_to_target": f("utils.doc_to_target"), "metadata": {"version": 0.0}}
    if choices:
        task.update(output_type="multiple_choice", doc_to_choice=f("utils.doc_to_choice"),
                    metric_list=[{"metric": "acc", "aggregation": "mean", "higher_is_better": True}])
    else:
        task.update(output_type="generate_until", process_results=f("utils.exact_match"),
                    generation_kwargs={"max_new_tokens": 16, "do_sample": False, "until": ["\n"]},
                    metric_list=[{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}])
    return task


def _yaml(task: dict) -> str:
    import yaml

    class Dumper(yaml.SafeDumper):
        pass

    Dumper.add_representer(_Function, lambda d, v: d.represent_scalar("!function", str(v)))
    return yaml.dump(task, Dumper=Dumper, sort_keys=False)


def write_lmms_tasks(vqa_dir: str | Path, out_dir: str | Path, name: str = "owlore_vqa") -> list[str]:
    """Write the tasks (see the module docstring); returns the task names written (a kind with no rows is left
    out)."""
    records = read_vqa_dir(vqa_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "utils.py").write_text(_UTILS)
    written = []
    for suffix, with_choices in (("mc", True), ("gen", False)):
        rows = [r for r in records if (r.choices is not None) == with_choices]
        if not rows:
            continue
        data = f"{name}_{suffix}.jsonl"
        (out / data).write_text("".join(json.dumps({"id": r.id, "image": str(Path(r.image).resolve()),
                                                    "question": r.question, "answer": r.answer, "kind": r.kind,
                                                    **({"choices": list(r.choices)} if r.choices else {})}) + "\n"
                                        for r in rows))
        (out / f"{name}_{suffix}.yaml").write_text(_yaml(_task(f"{name}_{suffix}", data, choices=with_choices)))
        written.append(f"{name}_{suffix}")
    return written
