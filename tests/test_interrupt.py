"""Ctrl-C / SIGTERM during training (owlore.run.interrupt): a real signal to a real train.py process stops it at the
end of the step with a verified checkpoint, one line saying how to resume, exit 130 / 143 and no traceback; the
resume then continues from that step."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
import method_support as ms  # noqa: E402

from owlore.run.resume import verify  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _stop_after_first_loss(argv: list[str], sig: int) -> tuple[int, str]:
    proc = subprocess.Popen([sys.executable, "train.py", *argv], cwd=ROOT, env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for line in proc.stdout:  # training has started once a step's loss is logged
        if "'loss'" in line:
            break
    else:
        pytest.fail(f"train.py ended before logging a loss: {proc.stderr.read()[-2000:]}")
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=600)
    return proc.returncode, out + err


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_stops_at_a_checkpoint_and_the_resume_continues(tmp_path, sig, code):
    model, rows = ms.save_checkpoint(tmp_path / "m"), ms.write_rows(tmp_path / "r.jsonl")
    out = tmp_path / "out"
    argv = ms.train_argv("owlore", model, rows, out, "training.save_steps=100000", steps=100000)
    rc, text = _stop_after_first_loss(argv, sig)
    assert rc == code, text[-3000:]
    assert "Traceback" not in text
    ckpts = sorted(out.glob("checkpoint-*"))
    assert len(ckpts) == 1 and verify(ckpts[0]) == []  # the signal's own checkpoint (save_steps never came)
    step = int(ckpts[0].name.split("-")[1])
    line = next(ln for ln in text.splitlines() if ln.startswith("stopped by"))
    assert line.startswith(f"stopped by {signal.Signals(sig).name} at step {step}; checkpoint: {ckpts[0]}")
    assert line.endswith("training.resume_from_checkpoint=last")
    assert not (out / "final").exists() and not (out / "owlore_record.json").exists()  # not a finished run
    assert (out / "owlore_record.partial.json").is_file()

    resumed = subprocess.run([sys.executable, "train.py", *argv, f"training.max_steps={step + 2}",
                              "training.resume_from_checkpoint=last"], cwd=ROOT, env=ENV, capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {ckpts[0]}" in resumed.stdout
    record = json.loads((out / "owlore_record.json").read_text())
    assert record["summary"]["optimizer_steps"] == step + 2
