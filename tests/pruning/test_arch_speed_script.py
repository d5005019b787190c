"""benchmarks/vlm_arch_speed.py --quick runs every supported method on tiny LLaVA-NeXT and Qwen2-VL layouts and
writes consistent rows (pruned prompts shorter, FLOPs lower)."""

import json
import os
import subprocess
import sys
from pathlib import Path

from owlore.pruning import get_method, method_names

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "vlm_arch_speed.py"


def test_quick_run_covers_every_supported_method(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--threads", "1", "--out", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads((tmp_path / "arch_speed.json").read_text())["rows"]
    vision = [m for m in method_names() if get_method(m).stage == "vision"]
    next_methods = {r["method"] for r in rows if r["arch"] == "llava_next"}
    qwen_methods = {r["method"] for r in rows if r["arch"] == "qwen2_vl"}
    assert next_methods == {"none", *vision}
    from owlore.pruning.qwen2_vl import Qwen2VLAdapter

    runs_on_qwen = {m for m in vision if Qwen2VLAdapter().unsupported(get_method(m)) is None}
    assert {"cdpruner", "divprune", "random", "zoo", "mmtok"} <= runs_on_qwen  # the text/projected-only methods
    assert qwen_methods == {"none", *runs_on_qwen}
    for arch in ("llava_next", "qwen2_vl"):
        mine = [r for r in rows if r["arch"] == arch]
        base = mine[0]
        assert base["method"] == "none"
        for r in mine[1:]:
            assert r["visual_tokens"] < base["visual_tokens"] and r["flops_reduction"] > 1
    assert (tmp_path / "arch_speed.md").read_text().count("| llava_next |") == len(next_methods)
