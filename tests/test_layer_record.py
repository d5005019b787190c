"""The layer-switching callback's JSON record: honest per-layer fields, one writer, state before the Trainer's files."""

import json

import pytest
from transformers import Trainer

from owlore import OwLoreCallback, OwLoreConfig, create_owlore_optimizer
from tests.test_callback import RandomLM, _args, _model


def _run(tmp_path, config, **args_kw):
    model = _model(4)
    cb = OwLoreCallback(config)
    opt = create_owlore_optimizer(model, config, lr=1e-2)
    Trainer(model=model, args=_args(tmp_path, max_steps=4, **args_kw), train_dataset=RandomLM(),
            optimizers=(opt, None), callbacks=[cb]).train()
    return cb, json.loads((tmp_path / "owlore_record.json").read_text())


@pytest.mark.parametrize("mode", ["uniform", "increase", "decrease"])
def test_modes_without_outlier_ratios_record_none(tmp_path, mode):
    _, rec = _run(tmp_path, OwLoreConfig(gamma=2, interval=2, mode=mode, rank=None, calibration_batches=1))
    assert rec["outlier_ratios"] is None  # not a vector of ones pretending to be ratios
    assert len(rec["inclusion_probabilities"]) == 4 and abs(sum(rec["inclusion_probabilities"]) - 2) < 1e-9
    assert rec["activation_counts"] == [sum(i in h["layers"] for h in rec["history"]) for i in range(4)]
    assert all(len(h["layers"]) == 2 for h in rec["history"])


def test_owl_mode_records_the_ratios(tmp_path):
    cb, rec = _run(tmp_path, OwLoreConfig(gamma=2, interval=2, rank=None, calibration_batches=1))
    ratios = rec["outlier_ratios"]
    assert len(ratios) == 4 and all(r > 0 for r in ratios)
    # the probabilities follow from the ratios by the paper's rule, recomputed here by hand: p ∝ ratio, then the
    # inclusion probabilities min(1, c·p) with c (found by bisection) such that they sum to γ = 2
    p = [r / sum(ratios) for r in ratios]
    lo, hi = 0.0, 1e6
    for _ in range(200):
        c = (lo + hi) / 2
        lo, hi = (c, hi) if sum(min(1.0, c * x) for x in p) < 2 else (lo, c)
    assert rec["inclusion_probabilities"] == pytest.approx([min(1.0, c * x) for x in p], abs=1e-6)
    # the counts are the history's, layer by layer
    assert rec["activation_counts"] == [sum(i in h["layers"] for h in rec["history"]) for i in range(4)]


def test_only_the_main_process_writes_the_record(tmp_path):
    cb, _ = _run(tmp_path, OwLoreConfig(gamma=2, interval=2, rank=None, calibration_batches=1))
    (tmp_path / "owlore_record.json").unlink()
    cb._is_main = False  # what on_train_begin sets on a rank with process_index > 0
    cb.write_record(final=True)
    assert not (tmp_path / "owlore_record.json").exists()
    cb._is_main = True
    cb.write_record()  # while training: the partial record, never the finished one
    assert (tmp_path / "owlore_record.partial.json").is_file() and not (tmp_path / "owlore_record.json").exists()
    cb.write_record(final=True)
    assert (tmp_path / "owlore_record.json").is_file() and not (tmp_path / "owlore_record.partial.json").exists()


def test_state_file_is_written_before_the_trainer_checkpoint(tmp_path):
    """With the stock Trainer the callback's state lands in checkpoint-N before trainer_state.json does."""
    from transformers import TrainerCallback

    seen = {}

    class Spy(TrainerCallback):  # runs after OwLoreCallback's on_step_end, before the Trainer saves
        def on_step_end(self, args, state, control, **kw):
            if control.should_save:
                ckpt = tmp_path / f"checkpoint-{state.global_step}"
                seen[state.global_step] = ((ckpt / "owlore_state.pt").is_file(), (ckpt / "trainer_state.json").is_file())

    model = _model(4)
    config = OwLoreConfig(gamma=2, interval=2, rank=None, calibration_batches=1)
    Trainer(model=model, args=_args(tmp_path, max_steps=4, save_strategy="steps", save_steps=2),
            train_dataset=RandomLM(), optimizers=(create_owlore_optimizer(model, config, lr=1e-2), None),
            callbacks=[OwLoreCallback(config), Spy()]).train()
    assert seen == {2: (True, False), 4: (True, False)}
    assert all((tmp_path / f"checkpoint-{s}" / "trainer_state.json").is_file() for s in (2, 4))


def test_epoch_save_replaces_a_previous_runs_state_file(tmp_path):
    """save_strategy=epoch saves after on_step_end: on_save writes the state even if an old run left one there."""
    import torch

    ckpt = tmp_path / "checkpoint-16"  # 64 rows / batch 4 = 16 steps in the epoch
    ckpt.mkdir()
    torch.save({"global_step": 16, "stale": torch.zeros(1)}, ckpt / "owlore_state.pt")
    model = _model(4)
    config = OwLoreConfig(gamma=2, interval=4, rank=None, calibration_batches=1)
    cb = OwLoreCallback(config)
    Trainer(model=model, args=_args(tmp_path, max_steps=-1, num_train_epochs=1, save_strategy="epoch"),
            train_dataset=RandomLM(), optimizers=(create_owlore_optimizer(model, config, lr=1e-2), None),
            callbacks=[cb]).train()
    saved = torch.load(ckpt / "owlore_state.pt", weights_only=True)
    assert "stale" not in saved and saved["history_steps"].tolist() == [s for s, _ in cb.history]
