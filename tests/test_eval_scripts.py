"""eval/mmlu.py and eval/commonsense.py: model loading (checkpoint, adapter), JSON output, --compare, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
import eval_support as support  # noqa: E402
from eval_support import DATA_DIR, REPO, load_script  # noqa: E402

from owlore.evaluation import evaluate, load_model  # noqa: E402
from owlore.evaluation.loading import resolve_dtype  # noqa: E402

SCHEMA_TASK_KEYS = {"acc", "acc_norm", "n"}


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    return support.save_checkpoint(tmp_path_factory.mktemp("tiny_ckpt"))


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """A LoRA adapter with non-zero B (peft's default init would make it a no-op), saved as train.py would."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    cfg = LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    peft_model = get_peft_model(base, cfg)
    out = tmp_path_factory.mktemp("adapter")
    peft_model.save_pretrained(out)
    return out


def _check_schema(result: dict, tasks: list[str]) -> None:
    assert set(result) >= {"model", "results", "average"}
    assert list(result["results"]) == tasks
    for r in result["results"].values():
        assert set(r) == SCHEMA_TASK_KEYS and 0.0 <= r["acc"] <= 1.0 and r["n"] > 0
    assert 0.0 <= result["average"] <= 1.0


def test_commonsense_script_writes_json_and_table(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "res" / "cs.json"
    script = load_script("commonsense")
    result = script.main(["--model", str(tiny_model_dir), "--data-dir", str(DATA_DIR), "--tasks", "piqa,winogrande",
                          "--output", str(out)])
    _check_schema(result, ["piqa", "winogrande"])
    assert json.loads(out.read_text()) == result
    assert result["model"] == str(tiny_model_dir)
    printed = capsys.readouterr().out
    assert "| task | acc | acc_norm | n |" in printed and "| piqa |" in printed and "| winogrande |" in printed


def test_mmlu_script_on_local_data(tiny_model_dir):
    result = load_script("mmlu").main(["--model", str(tiny_model_dir), "--data-dir", str(DATA_DIR), "--shots", "1"])
    _check_schema(result, ["mmlu"])
    assert result["results"]["mmlu"]["n"] == len(support.fixture_rows("mmlu", "test"))
    assert result["shots"] == 1 and result["split"] == "test"
    assert set(result["subtasks"]) == {"anatomy", "astronomy", "high_school_microeconomics"}


def test_script_equals_library_on_in_memory_model(tiny_model_dir):
    """Loading from disk through the script gives the numbers of the in-memory model it was saved from."""
    via_script = load_script("commonsense").main(["--model", str(tiny_model_dir), "--data-dir", str(DATA_DIR)])
    in_memory = evaluate(support.tiny_model(), support.tokenizer(), suite="commonsense", data_dir=DATA_DIR)
    assert via_script["results"] == in_memory["results"]
    assert via_script["average"] == in_memory["average"]


def _logits(model, text: str = "The trophy would not fit in the suitcase.") -> torch.Tensor:
    ids = support.tokenizer()(text, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(ids).logits


def test_adapter_loading_matches_peft_reference(tiny_model_dir, adapter_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter_dir).eval()
    base, _ = load_model(str(tiny_model_dir))
    unmerged, _ = load_model(str(tiny_model_dir), adapter=str(adapter_dir))
    merged, _ = load_model(str(tiny_model_dir), adapter=str(adapter_dir), merge_adapter=True)
    auto, _ = load_model(str(adapter_dir))  # adapter-only dir: base model taken from adapter_config.json
    assert isinstance(unmerged, PeftModel) and not isinstance(merged, PeftModel)
    ref = _logits(reference)
    assert not torch.allclose(_logits(base), ref, atol=1e-3)  # the adapter really changes the model
    torch.testing.assert_close(_logits(unmerged), ref)
    torch.testing.assert_close(_logits(auto), ref)
    torch.testing.assert_close(_logits(merged), ref, rtol=1e-4, atol=1e-5)


def test_adapter_eval_through_script(tiny_model_dir, adapter_dir):
    """base + adapter via the script = the peft reference model evaluated in memory, and != the base model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from owlore.data import build_demo_tasks

    script = load_script("demo_tasks")
    common = ["--n", "42"]
    base = script.main(["--model", str(tiny_model_dir), *common])
    with_adapter = script.main(["--model", str(tiny_model_dir), "--adapter", str(adapter_dir), *common])
    merged = script.main(["--model", str(tiny_model_dir), "--adapter", str(adapter_dir), "--merge-adapter", *common])
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter_dir).eval()
    expected = evaluate(reference, support.tokenizer(), suite="demo", examples=build_demo_tasks("test", 42))
    assert with_adapter["adapter"] == str(adapter_dir)
    assert with_adapter["results"] == expected["results"]
    assert merged["results"] == expected["results"]
    assert with_adapter["results"] != base["results"]


def test_compare_prints_both_runs_and_deltas(tmp_path, capsys):
    a = {"model": "before-run", "suite": "commonsense", "average": 0.5,
         "results": {"piqa": {"acc": 0.5, "acc_norm": 0.25, "n": 4}, "boolq": {"acc": 0.5, "acc_norm": None, "n": 4}}}
    b = {"model": "after-run", "suite": "commonsense", "average": 0.625,
         "results": {"piqa": {"acc": 0.75, "acc_norm": 0.5, "n": 4}, "boolq": {"acc": 0.5, "acc_norm": None, "n": 4},
                     "siqa": {"acc": 1.0, "acc_norm": None, "n": 4}}}
    pa, pb = tmp_path / "a.json", tmp_path / "b.json"
    pa.write_text(json.dumps(a))
    pb.write_text(json.dumps(b))
    deltas = load_script("mmlu").main(["--compare", str(pa), str(pb)])
    out = capsys.readouterr().out
    assert "before-run" in out and "after-run" in out
    assert "| piqa | 0.5000 | 0.7500 | +0.2500 | 0.2500 | 0.5000 | +0.2500 |" in out
    assert "| boolq | 0.5000 | 0.5000 | +0.0000 | – | – | – |" in out
    assert "| siqa | – | 1.0000 | – |" in out
    assert "| **average** | 0.5000 | 0.6250 | +0.1250 |" in out
    assert deltas["piqa"]["acc_delta"] == pytest.approx(0.25)
    assert deltas["average"]["acc_delta"] == pytest.approx(0.125)
    assert deltas["siqa"]["acc_delta"] is None


def test_missing_data_file_is_a_clean_cli_error(tmp_path, tiny_model_dir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_script("commonsense").main(["--model", str(tiny_model_dir), "--data-dir", str(tmp_path),
                                         "--tasks", "boolq,openbookqa"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"boolq: expected {tmp_path / 'boolq' / 'validation.jsonl'}" in err
    assert f"openbookqa: expected {tmp_path / 'openbookqa' / 'test.jsonl'}" in err
    assert "question_stem, choices, answerKey" in err  # tells the user the schema too


def test_trust_remote_code_is_off_unless_asked(monkeypatch, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    seen = []
    real_model, real_tok = AutoModelForCausalLM.from_pretrained, AutoTokenizer.from_pretrained

    def spy(real):
        def wrapped(*args, **kwargs):
            seen.append(kwargs.get("trust_remote_code"))
            return real(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy(real_model))
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", spy(real_tok))
    for name in ("mmlu", "commonsense", "demo_tasks"):
        assert load_script(name).build_parser().parse_args(["--model", "x"]).trust_remote_code is False
    load_model(str(tiny_model_dir))
    assert seen == [False, False]
    load_model(str(tiny_model_dir), trust_remote_code=True)
    assert seen[2:] == [True, True]


def test_dtype_defaults():
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("auto", "cuda:0") == torch.bfloat16
    assert resolve_dtype("float16", "cpu") == torch.float16
    with pytest.raises(ValueError, match="dtype must be one of"):
        resolve_dtype("fp8", "cpu")


def test_commonsense_script_as_subprocess(tmp_path, tiny_model_dir):
    out = tmp_path / "sub.json"
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    proc = subprocess.run(
        [sys.executable, str(REPO / "eval" / "commonsense.py"), "--model", str(tiny_model_dir), "--data-dir",
         str(DATA_DIR), "--tasks", "boolq,arc_challenge", "--output", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    _check_schema(result, ["boolq", "arc_challenge"])
    assert "| boolq |" in proc.stdout and "| **average** |" in proc.stdout
