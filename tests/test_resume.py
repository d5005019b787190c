"""Checked checkpoints (owlore.run.resume): a manifest written last, verification by size and hash, 'last' skipping
what does not verify, and a resume with another method or other settings refused unless asked for."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
import method_support as ms  # noqa: E402

import train  # noqa: E402
from owlore.run.resume import (  # noqa: E402
    MANIFEST_FILE,
    CheckpointError,
    choose_checkpoint,
    newest_verified,
    read_manifest,
    settings_changes,
    verify,
    write_manifest,
)

SETTINGS = {"method": "owlore", "sections": {"owlore": {"gamma": 4, "rank": 64, "cache_dir": "a"}}}


def _checkpoint(root: Path, step: int, settings=SETTINGS) -> Path:
    ckpt = root / f"checkpoint-{step}"
    (ckpt / "sub").mkdir(parents=True)
    (ckpt / "optimizer.pt").write_bytes(b"x" * 1000)
    (ckpt / "sub" / "state.json").write_text("{}")
    write_manifest(ckpt, settings, step)
    return ckpt


def test_manifest_lists_every_file_with_size_and_hash_and_verifies(tmp_path):
    ckpt = _checkpoint(tmp_path, 2)
    manifest = read_manifest(ckpt)
    assert manifest["method"] == "owlore" and manifest["global_step"] == 2
    assert manifest["files"]["optimizer.pt"]["size"] == 1000 and len(manifest["files"]["optimizer.pt"]["sha256"]) == 64
    assert set(manifest["files"]) == {"optimizer.pt", "sub/state.json"}
    assert verify(ckpt) == []


@pytest.mark.parametrize("damage, words", [
    (lambda c: (c / "optimizer.pt").write_bytes(b"x" * 10), "10 bytes, the manifest says 1000 (truncated?)"),
    (lambda c: (c / "optimizer.pt").write_bytes(b"y" * 1000), "contents changed since it was saved"),
    (lambda c: (c / "sub" / "state.json").unlink(), "state.json: missing"),
    (lambda c: (c / MANIFEST_FILE).unlink(), "owlore_manifest.json: missing (the save was interrupted"),
    (lambda c: (c / MANIFEST_FILE).write_text("{trunc"), "owlore_manifest.json: unreadable"),
])
def test_a_damaged_checkpoint_names_the_bad_file(tmp_path, damage, words):
    ckpt = _checkpoint(tmp_path, 2)
    damage(ckpt)
    problems = verify(ckpt)
    assert len(problems) == 1 and words in problems[0], problems


def test_last_takes_the_newest_checkpoint_that_verifies_and_says_what_it_skipped(tmp_path, caplog):
    _checkpoint(tmp_path, 2)
    bad = _checkpoint(tmp_path, 10)  # numeric order, not text order: 10 is newer than 4
    _checkpoint(tmp_path, 4)
    (bad / "optimizer.pt").write_bytes(b"")
    chosen, skipped = newest_verified(tmp_path)
    assert chosen.name == "checkpoint-4" and [c.name for c, _ in skipped] == ["checkpoint-10"]
    with caplog.at_level(logging.INFO, logger="owlore.run.resume"):
        assert choose_checkpoint(tmp_path, "last", SETTINGS) == str(tmp_path / "checkpoint-4")
    assert "skipped checkpoint-10" in caplog.text and "0 bytes, the manifest says 1000" in caplog.text


def test_an_explicit_checkpoint_that_does_not_verify_is_refused(tmp_path):
    ckpt = _checkpoint(tmp_path, 2)
    (ckpt / "optimizer.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"checkpoint-2: does not verify:\n  - .*optimizer.pt: 0 bytes"):
        choose_checkpoint(tmp_path, str(ckpt), SETTINGS)


def test_other_settings_are_refused_with_both_values_unless_allowed(tmp_path, caplog):
    ckpt = _checkpoint(tmp_path, 2)
    other = {"method": "owlore", "sections": {"owlore": {"gamma": 2, "rank": 64, "cache_dir": "b"}}}
    assert settings_changes(read_manifest(ckpt), other) == ["owlore.gamma: checkpoint 4, now 2"]  # cache_dir: no
    with pytest.raises(CheckpointError, match="owlore.gamma: checkpoint 4, now 2"):
        choose_checkpoint(tmp_path, "last", other)
    lisa = {"method": "lisa", "sections": {"lisa": {"gamma": 2}}}
    with pytest.raises(CheckpointError, match="trained with 'owlore', this run asks for 'lisa'"):
        choose_checkpoint(tmp_path, str(ckpt), lisa)
    with caplog.at_level(logging.WARNING, logger="owlore.run.resume"):
        assert choose_checkpoint(tmp_path, "last", other, allow_changes=True) == str(ckpt)
    assert "resume_allow_changes=true: owlore.gamma: checkpoint 4, now 2" in caplog.text


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    model, rows = ms.save_checkpoint(root / "m"), ms.write_rows(root / "r.jsonl")
    argv = ms.train_argv("owlore", model, rows, root / "out", "training.save_total_limit=null", steps=4)  # 2 and 4
    train.main(argv)
    return root, argv


def test_train_py_writes_a_verifying_manifest_with_the_method_settings(trained):
    root, _ = trained
    for step in (2, 4):
        ckpt = root / "out" / f"checkpoint-{step}"
        assert verify(ckpt) == []
        manifest = read_manifest(ckpt)
        assert manifest["method"] == "owlore" and manifest["sections"]["owlore"]["gamma"] == 1
        assert {"owlore_state.pt", "optimizer.pt", "trainer_state.json"} <= set(manifest["files"])


def test_train_py_refuses_a_resume_with_another_method_before_loading_weights(trained, monkeypatch, capsys):
    root, argv = trained
    monkeypatch.setattr(train, "load_model_and_tokenizer", lambda *a, **k: pytest.fail("weights loaded"))
    lisa = ms.train_argv("lisa", root / "m", root / "r.jsonl", root / "out", "training.resume_from_checkpoint=last")
    with pytest.raises(SystemExit) as e:
        train.main(lisa)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "checkpoint error:" in err and "trained with 'owlore', this run asks for 'lisa'" in err
    assert "training.resume_allow_changes=true" in err
    with pytest.raises(SystemExit) as e:
        train.main([*argv, "training.resume_from_checkpoint=last", "owlore.gamma=2"])
    assert e.value.code == 2 and "owlore.gamma: checkpoint 1, now 2" in capsys.readouterr().err
