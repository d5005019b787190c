import json
import os
import subprocess
import sys
from pathlib import Path

from owlore.pruning import method_names

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fixtures"))
import eval_support  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[2] / "eval" / "vlm_pruning.py"


def test_speed_quick_writes_json_markdown_and_png(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg"}
    flags = ["speed", "--quick", "--budgets", "8", "4", "--threads", "1", "--out"]
    cmd = [sys.executable, str(SCRIPT), *flags, str(tmp_path)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]

    result = json.loads((tmp_path / "speed.json").read_text())
    rows = result["rows"]
    assert rows[0]["method"] == "none" and rows[0]["tokens"] == 16
    assert len(rows) == 1 + len(method_names()) * 2
    for row in rows[1:]:
        assert row["tokens"] in (4, 8) and row["seq_len"] == 12 + row["tokens"]
        assert row["select_ms"] >= 0 and row["prefill_ms"] > 0 and row["e2e_ms"] > 0
        assert (
            row["flops_reduction_exact"] > 1
            and row["prefill_tflops_exact_full"] < rows[0]["prefill_tflops_exact_full"]
        )
        assert row["kv_cache_mb_full_fp16"] < rows[0]["kv_cache_mb_full_fp16"]
    by = {(r["method"], r["tokens"]): r for r in rows}
    for key in ("prefill_tflops_exact_full", "prefill_tflops_peer_full", "kv_cache_mb_full_fp16"):
        # layers < K of the LLM-stage methods see (and cache) the whole prompt: more than pre-LLM pruning
        assert by[("fastv", 4)][key] == by[("dart", 4)][key] > by[("cls", 4)][key]
    markdown = (tmp_path / "speed.md").read_text()
    assert "--quick" in markdown and markdown.count("\n| ") == 1 + len(rows)  # header + one line per row
    eval_support.assert_plot(tmp_path / "speed.png")
