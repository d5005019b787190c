"""The lmms-eval model ``owlore_vlm``, found through its entry point, scores a tiny local lmms-eval task (a user's
image folder written by ``owlore.pruning.lmms_tasks``) offline, with pruning, exactly as ``eval/vlm_pruning.py``
scores the same folder."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("lmms_eval", reason="lmms-eval is the optional extra .[lmms] (make setup installs it "
                                        "without its heavy dependencies)")

from .test_byo_vqa import user_data, vlm_dir  # noqa: E402,F401  (the fixtures: a tiny LLaVA and a user folder)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def test_the_entry_point_registers_owlore_vlm():
    from lmms_eval.models import get_model

    from owlore.pruning.lmms_eval_model import OwloreVLM

    assert get_model("owlore_vlm", force_simple=True) is OwloreVLM


@pytest.mark.parametrize("pruning,keep", [("none", 1.0), ("holov", 4), ("mmtok", 0.25)])
def test_lmms_eval_scores_a_local_task_like_the_benchmark(vlm_dir, user_data, tmp_path, pruning, keep):  # noqa: F811
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from owlore.data.vqa_files import read_vqa_dir
    from owlore.pruning.accuracy import vqa_accuracy
    from owlore.pruning.lmms_tasks import write_lmms_tasks
    from owlore.pruning.vqa_benchmark import make_pruner

    tasks = write_lmms_tasks(user_data, tmp_path / "tasks", name="owl_tiny")
    assert tasks == ["owl_tiny_mc", "owl_tiny_gen"]
    manager = TaskManager("WARNING", include_path=str(tmp_path / "tasks"), include_defaults=False)
    out = simple_evaluate(model="owlore_vlm", model_args=f"pretrained={vlm_dir},pruning={pruning},keep={keep}",
                          tasks=tasks, task_manager=manager, batch_size=2, force_simple=True, bootstrap_iters=0,
                          log_samples=True)
    results = out["results"]
    model = LlavaForConditionalGeneration.from_pretrained(vlm_dir).eval()
    processor = AutoProcessor.from_pretrained(vlm_dir)
    records = read_vqa_dir(user_data)
    pruner = None if pruning == "none" else make_pruner(pruning, keep)
    ours = vqa_accuracy(model, processor, records, pruner=pruner, batch_size=2, scoring="full")
    mc = [p == r.answer for p, r in zip(ours["predictions"], records) if r.choices]
    gen = [p for p, r in zip(ours["predictions"], records) if not r.choices]
    assert results["owl_tiny_mc"]["acc,none"] == pytest.approx(sum(mc) / len(mc))
    assert results["owl_tiny_gen"]["exact_match,none"] == pytest.approx(ours["by_kind"]["caption"]["accuracy"])
    answered = [s["resps"][0][0] for s in out["samples"]["owl_tiny_gen"]]
    assert [a.strip() for a in answered] == gen  # the same generated answers, one per image
    assert os.environ["HF_HUB_OFFLINE"] == "1"


def test_unknown_model_args_are_refused(vlm_dir):  # noqa: F811
    from owlore.pruning.lmms_eval_model import OwloreVLM

    with pytest.raises(ValueError, match=r"unknown model_args \['kep'\]"):
        OwloreVLM(pretrained=str(vlm_dir), kep=4)
