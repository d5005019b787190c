"""A memory option added from outside owlore (a plugin module named by $OWLORE_MEMORY_OPTIONS) works everywhere the
shipped ones do, with no edit to the library: the config checks read its value, conflicts and FSDP2 exclusion from
its declaration, train.py applies it, the memory estimator counts it through its ``adjust``, and eval/bench.py runs
it as a variant in a child process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
import method_support as ms  # noqa: E402

import train  # noqa: E402
from owlore.memory.options import PLUGINS_ENV, REGISTRY, get_option, unregister  # noqa: E402
from owlore.run.config import ConfigError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = '''
"""frozen_norms: the RMSNorm weights do not train, so they hold no gradient and no optimizer state."""
from owlore.memory.option import MemoryOption
from owlore.memory.options import register
from owlore.memory.shapes import load_model_shape


def norm_weights(model):
    return [m.weight for name, m in model.named_modules() if name.endswith("norm") and hasattr(m, "weight")]


def apply(on, parts, cfg):
    for w in norm_weights(parts.model):
        w.requires_grad_(False)


def conflicts(on, ctx):
    if ctx.method.name in ("lora", "qlora"):
        return [f"memory.frozen_norms=true with method {ctx.method.name}: its norms are frozen already; remove it"]
    return []


def adjust(on, est, cfg):
    shape = load_model_shape(cfg.model.name)
    saved = (2 * shape.layers + 1) * shape.hidden * 4  # fp32 gradients of the 2 norms per layer and the final one
    est.gradients -= saved
    est.total -= saved
    est.notes.append(f"memory.frozen_norms: {saved} gradient bytes fewer")


register(MemoryOption(name="frozen_norms", default=False, doc="RMSNorm weights frozen", conflicts=conflicts,
                      fsdp2=False, apply=apply, adjust=adjust))
'''


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    ms.install_plugin(tmp_path, monkeypatch, "my_options", PLUGIN, PLUGINS_ENV)
    yield tmp_path
    unregister("frozen_norms")
    sys.modules.pop("my_options", None)


def _argv(tmp_path: Path, *extra: str) -> list[str]:
    model, rows = ms.save_checkpoint(tmp_path / "m"), ms.write_rows(tmp_path / "r.jsonl")
    return ["--config", str(ROOT / "configs/smollm2_full.yaml"), f"model.name={model}", f"data.train={rows}",
            "data.max_seq_length=160", f"training.output_dir={tmp_path / 'out'}", "training.max_steps=2",
            "training.per_device_train_batch_size=2", "training.report_to=[]", "training.save_strategy=no",
            "training.learning_rate=1e-2", "eval.demo=false", "training.disable_tqdm=true", *extra]


def test_a_plugin_memory_option_runs_through_checks_train_py_and_the_estimator(plugin):
    from owlore.memory.estimator import estimate_run
    from owlore.run.recipe import load_config

    assert "frozen_norms" in REGISTRY and get_option("frozen_norms").fsdp2 is False
    argv = _argv(plugin, "memory.frozen_norms=true")
    with pytest.raises(ConfigError, match=r"memory.frozen_norms='maybe': "):  # read against its default's type
        load_config(argv[1], [*argv[2:], "memory.frozen_norms=maybe"])
    with pytest.raises(ConfigError, match="memory.frozen_norms=true with method lora: its norms are frozen"):
        load_config(argv[1], [*argv[2:], "method=lora"])
    with pytest.raises(ConfigError, match="parallel.fsdp2=true with memory.frozen_norms"):
        load_config(argv[1], [*argv[2:], "parallel.fsdp2=true"])
    cfg = load_config(argv[1], argv[2:])
    assert cfg.memory.plugins == {"frozen_norms": True}

    base = load_file(Path(cfg.model.name) / "model.safetensors")
    summary = train.main(argv)
    after = load_file(plugin / "out" / "final" / "model.safetensors")
    norms = [k for k in base if k.endswith("norm.weight")]
    assert len(norms) == 2 * ms.NUM_LAYERS + 1
    assert all(torch.equal(base[k], after[k]) for k in norms)  # the option froze them ...
    assert not torch.equal(base["model.layers.0.mlp.up_proj.weight"], after["model.layers.0.mlp.up_proj.weight"])
    plain = train.main(_argv(plugin / "plain"))  # ... and only them: the plain run trains the norms too
    assert plain["trainable_parameters"] - summary["trainable_parameters"] == sum(base[k].numel() for k in norms)

    with_option, without = estimate_run(cfg, dtype="float32"), estimate_run(load_config(argv[1], _argv(plugin)[2:]),
                                                                           dtype="float32")
    assert without.total - with_option.total == sum(base[k].numel() for k in norms) * 4
    assert any("memory.frozen_norms" in n for n in with_option.notes)


def test_the_benchmark_runs_a_plugin_memory_option_as_a_variant_in_its_child_process(plugin):
    out = plugin / "bench"
    argv = _argv(plugin)
    r = subprocess.run([sys.executable, "eval/bench.py", "--methods", "full", "--base", argv[1],
                        "--variants", "nonorms=full:memory.frozen_norms=true", "--steps", "2", "--batch", "2",
                        "--seq", "64", "--out", str(out),
                        *[a for a in argv[2:] if not a.startswith(("training.output_dir", "training.max_steps"))]],
                       cwd=ROOT, env=os.environ.copy(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    runs = json.loads((out / "bench.json").read_text())["runs"]
    assert [(x["label"], x["status"]) for x in runs] == [("full", "ok"), ("nonorms", "ok")]
    record = json.loads((out / "nonorms" / "owlore_record.json").read_text())
    assert record["summary"]["trainable_parameters"] < json.loads(
        (out / "full" / "owlore_record.json").read_text())["summary"]["trainable_parameters"]


def test_readme_says_every_hook_a_memory_option_declares():
    import dataclasses

    from owlore.memory.option import MemoryOption

    text = (ROOT / "README.md").read_text()
    recipe = text[text.index("**Adding a memory option**"):text.index("## Does it train well?")]
    missing = [f.name for f in dataclasses.fields(MemoryOption) if f.name not in recipe]
    assert missing == [], f"README's memory-option recipe does not mention {missing}"


def test_every_shipped_option_is_a_memory_config_field_with_its_declared_default():
    from owlore.memory.options import all_options
    from owlore.run.config import MemoryConfig

    defaults = MemoryConfig()
    assert {name: getattr(defaults, name) for name in all_options()} == {
        name: o.default for name, o in all_options().items()}
