"""A second run into a used output directory: refused before any weights load (the first run's files
byte-identical), replaced with training.overwrite_output_dir=true (saying what), or sent to a fresh ${now} path."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
import method_support as ms  # noqa: E402

import train  # noqa: E402
from owlore.run.output_dir import claim_output_dir, previous_results  # noqa: E402


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("rundir")
    model, rows = ms.save_checkpoint(root / "m"), ms.write_rows(root / "r.jsonl")
    argv = ms.train_argv("lisa", model, rows, root / "out", steps=2)
    train.main(argv)
    return root, argv


def test_a_second_run_into_a_used_directory_exits_2_before_loading_and_changes_nothing(first_run, capsys,
                                                                                       monkeypatch):
    root, argv = first_run
    before = _digest(root / "out")
    assert {"owlore_record.json", "final"} <= set(previous_results(root / "out"))
    monkeypatch.setattr(train, "load_model_and_tokenizer", lambda *a, **k: pytest.fail("weights loaded"))
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    for words in ("holds another run's results", "final", "resume_from_checkpoint=last",
                  "training.overwrite_output_dir=true", "${now}"):
        assert words in err, err
    assert _digest(root / "out") == before


def test_overwrite_replaces_the_earlier_run_and_says_what(tmp_path, caplog):
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "model.safetensors").write_bytes(b"x")
    (tmp_path / "owlore_record.json").write_text("{}")
    (tmp_path / "layers.png").write_bytes(b"png")
    (tmp_path / "notes.txt").write_text("mine")  # not a run's result: kept
    removed = claim_output_dir(tmp_path, resume=False, overwrite=True)
    assert removed == ["final", "owlore_record.json", "layers.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    assert "deleted final, owlore_record.json, layers.png" in caplog.text
    assert claim_output_dir(tmp_path / "new", resume=False, overwrite=False) == []


def test_resume_continues_and_a_partial_record_is_not_a_finished_run(tmp_path):
    (tmp_path / "checkpoint-2").mkdir()
    assert claim_output_dir(tmp_path, resume=True, overwrite=False) == []
    with pytest.raises(FileExistsError, match="checkpoint-2"):
        claim_output_dir(tmp_path, resume=False, overwrite=False)
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    (crashed / "owlore_record.partial.json").write_text("{}")  # a run that died: nothing finished to protect
    assert previous_results(crashed) == []


def test_now_placeholder_gives_a_fresh_directory(monkeypatch):
    from owlore.run.recipe import load_config

    cfg = load_config(ms.ROOT / "configs/smollm2_lisa.yaml", ["training.output_dir=outputs/x-${now}"])
    name = cfg.training["output_dir"]
    assert name.startswith("outputs/x-20") and len(name) == len("outputs/x-20261203-154500")
    monkeypatch.setenv("WORLD_SIZE", "2")
    from owlore.run.config import ConfigError

    with pytest.raises(ConfigError, match="now.*several processes"):
        load_config(ms.ROOT / "configs/smollm2_lisa.yaml", ["training.output_dir=outputs/x-${now}"])
