"""train.py: config validation, every shipped config, end to end on the real SmolLM2, kill -9 + resume equality."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import train
from owlore.run.config import ConfigError
from owlore.run.resume import newest_verified

sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
import eval_support  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SMALL_RUN = ["data.max_seq_length=48", "data.limit=40", "training.per_device_train_batch_size=2",
             "owlore.gamma=2", "owlore.interval=2", "owlore.rank=8", "owlore.calibration_batches=2",
             "owlore.cache_dir=null", "eval.demo=false", "training.logging_steps=1", "training.warmup_steps=0"]


# every shipped config (alone, and each 7B base with each paper overlay): tests/test_recipe.py


def test_config_errors_name_every_problem(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("model: {name: x, colour: red, dtype: bf16}\nowlore: {gamma: 0, mode: fancy, rank: -3}\n"
                 "training: {output_dir: o, max_step: 5}\nextra: {}\n")
    with pytest.raises(ConfigError) as e:
        train.load_config(p, ["owlore.interval=abc", "nosection.x=1", "badoverride"])
    msg = str(e.value)
    for part in ["model.colour: unknown key", "owlore.gamma=0", "owlore.mode='fancy'", "owlore.rank=-3",
                 "training.max_step: not a transformers.TrainingArguments field (did you mean 'max_steps'?)",
                 "extra: unknown section",
                 "owlore.interval='abc': expected int", "nosection: unknown section", "'badoverride'",
                 "model.dtype='bf16'"]:
        assert part in msg, part


def test_overrides_are_typed(tmp_path):
    cfg = train.load_config(ROOT / "configs/smollm2_owlore.yaml",
                            ["owlore.gamma=3", "owlore.rank=null", "training.learning_rate=1e-3", "eval.suites=[mmlu]"])
    assert cfg.owlore.gamma == 3 and cfg.owlore.rank is None
    assert cfg.training["learning_rate"] == 1e-3 and cfg.eval.suites == ["mmlu"]


@pytest.mark.slow
def test_cli_data_error_names_the_row(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "ok", "output": "fine"}\n{"instruction": "no answer"}\n')
    r = subprocess.run([sys.executable, "train.py", "--config", "configs/smollm2_owlore.yaml", f"data.train={data}",
                        f"training.output_dir={tmp_path / 'o'}", "eval.demo=false"], capture_output=True, text=True,
                       cwd=ROOT, timeout=300)
    assert r.returncode == 2
    assert "data error: row 1: field 'output' is missing or empty" in r.stderr
    assert "Traceback" not in r.stderr


# exit code 2 and no traceback on bad files/overrides: tests/test_recipe.py::test_cli_bad_values_exit_2


@pytest.mark.slow
def test_train_py_end_to_end_on_smollm2(tmp_path):
    out = tmp_path / "run"
    summary = train.main(["--config", str(ROOT / "configs/smollm2_owlore.yaml"), *SMALL_RUN,
                          f"training.output_dir={out}", "training.max_steps=3", "training.save_steps=2",
                          "eval.demo=true", "eval.demo_limit=2", "eval.suites=[mmlu]", "eval.mmlu_split=dev",
                          "eval.shots=0", "eval.limit=1"])
    assert summary["optimizer_steps"] == 3
    # eval section: demo before/after and MMLU-dev after, in the record, JSON files and TensorBoard
    assert summary["eval_before"]["demo"]["results"]["overall"]["n"] == 14  # 2 per task type
    assert set(summary["eval_after"]) == {"demo", "mmlu"}
    assert summary["eval_after"]["mmlu"]["results"]["mmlu"]["n"] == 57  # one item per subject
    assert (out / "eval_mmlu_after.json").is_file() and (out / "eval_demo_before.json").is_file()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "runs" / "owlore"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"eval/demo_before", "eval/demo_after", "eval/mmlu_after", "owlore/optimizer_state_bytes",
            "owlore/svd_seconds", "owlore/peak_memory_bytes", "owlore/layer_count/00"} <= set(tags)
    assert (out / "final" / "model.safetensors").is_file() and (out / "final" / "tokenizer.json").is_file()
    assert list((out / "runs").rglob("events.out.tfevents.*"))  # Trainer's and OwLore's event files
    assert list((out / "runs" / "owlore").glob("events.out.tfevents.*"))
    record = json.loads((out / "owlore_record.json").read_text())
    assert len(record["outlier_ratios"]) == 30 and len(record["history"]) == 2
    assert abs(sum(record["inclusion_probabilities"]) - 2) < 1e-9
    eval_support.assert_plot(out / "layers.png")
    ckpts = list(out.glob("checkpoint-*"))  # save_total_limit=1 in the config: only the newest is kept
    assert ckpts and all((c / "owlore_state.pt").is_file() for c in ckpts)
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out / "final").config.num_hidden_layers == 30


def _losses(out_dir: Path) -> list[float]:
    state = json.loads((out_dir / "trainer_state.json").read_text())
    return [h["loss"] for h in state["log_history"] if "loss" in h]


@pytest.mark.slow
def test_kill_9_and_resume_gives_same_losses(tmp_path):
    """An uninterrupted run and a run killed with SIGKILL then resumed log the same per-step losses."""
    args = ["--config", str(ROOT / "configs/smollm2_owlore.yaml"), *SMALL_RUN,
            "training.max_steps=10", "training.save_steps=2", "training.save_total_limit=null", "training.report_to=[]"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    full = tmp_path / "full"
    subprocess.run([sys.executable, "train.py", *args, f"training.output_dir={full}"], cwd=ROOT, env=env,
                   check=True, capture_output=True, timeout=900)

    cut = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "train.py", *args, f"training.output_dir={cut}"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not (cut / "checkpoint-4" / "owlore_state.pt").is_file():
        assert proc.poll() is None, "run ended before it could be interrupted"
        assert time.time() < deadline
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (cut / "final").exists()  # it really was interrupted
    resume, _ = newest_verified(cut)  # what resume_from_checkpoint=last takes (a half-written one is skipped)
    assert resume is not None and int(resume.name.rsplit("-", 1)[1]) < 10
    subprocess.run([sys.executable, "train.py", *args, f"training.output_dir={cut}",
                    "training.resume_from_checkpoint=last"], cwd=ROOT, env=env, check=True, capture_output=True,
                   timeout=900)
    final_full = _losses(full / "checkpoint-10")
    final_cut = _losses(cut / "checkpoint-10")
    assert len(final_full) == 10
    assert final_cut == final_full
    rec_full = json.loads((full / "owlore_record.json").read_text())
    rec_cut = json.loads((cut / "owlore_record.json").read_text())
    assert rec_cut["history"] == rec_full["history"]
