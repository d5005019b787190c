"""A method added from outside owlore/methods/ (a plugin module named by $OWLORE_METHODS) works everywhere the
shipped ones do, with no edit to the library: the config checks know its section, train.py trains it, the memory
estimator counts it from its declared MemoryProfile (the same trained parameters as the real run), and
eval/bench.py runs it in a child process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
import method_support as ms  # noqa: E402

import train  # noqa: E402
from owlore.methods import PLUGINS_ENV, REGISTRY, get_method, unregister  # noqa: E402
from owlore.run.config import ConfigError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = '''
"""first_layers: the lowest ``layers`` decoder layers train with the Trainer's optimizer; nothing else does."""
from dataclasses import dataclass

from owlore.layerwise.layers import find_decoder_layers
from owlore.methods import MemoryProfile, Method, MethodParts, register


@dataclass
class FirstLayersConfig:
    layers: int = 1

    def problems(self, prefix=""):  # the section protocol: every problem, each naming its key
        return [f"{prefix}layers={self.layers}: must be >= 1"] if self.layers < 1 else []


def build(ctx):
    n = ctx.section("first_layers").layers
    ctx.model.requires_grad_(False)
    for layer in list(find_decoder_layers(ctx.model))[:n]:
        layer.requires_grad_(True)
    return MethodParts(ctx.model)


register(Method(name="first_layers", summary="the lowest N decoder layers, the Trainer's optimizer", build=build,
                sections={"first_layers": FirstLayersConfig},
                memory=MemoryProfile(trains="block",
                                     options=lambda cfg: {"block_size": cfg.sections["first_layers"].layers})))
'''


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    ms.install_plugin(tmp_path, monkeypatch, "my_methods", PLUGIN, PLUGINS_ENV)
    yield tmp_path
    unregister("first_layers")
    sys.modules.pop("my_methods", None)


def _argv(tmp_path: Path, *extra: str) -> list[str]:
    model, rows = ms.save_checkpoint(tmp_path / "m"), ms.write_rows(tmp_path / "r.jsonl")
    return ["--config", str(ROOT / "configs/smollm2.yaml"), "method=first_layers", f"model.name={model}",
            f"data.train={rows}", "data.max_seq_length=160", f"training.output_dir={tmp_path / 'out'}",
            "training.max_steps=2", "training.per_device_train_batch_size=2", "training.report_to=[]",
            "training.save_strategy=no", "eval.demo=false", "training.disable_tqdm=true", *extra]


def test_a_plugin_method_runs_through_checks_train_py_and_the_estimator(plugin):
    from owlore.memory.estimator import estimate_run
    from owlore.memory.plan import Options, build_plan
    from owlore.memory.shapes import load_model_shape
    from owlore.run.recipe import load_config

    assert "first_layers" in REGISTRY and get_method("first_layers").memory.trains == "block"
    argv = _argv(plugin, "first_layers.layers=2")
    with pytest.raises(ConfigError, match="first_layers.layers=0: must be >= 1"):
        load_config(argv[1], [*argv[2:], "first_layers.layers=0"])
    with pytest.raises(ConfigError, match="first_layers.nope"):
        load_config(argv[1], [*argv[2:], "first_layers.nope=1"])
    cfg = load_config(argv[1], argv[2:])
    summary = train.main(argv)
    assert summary["method"] == "first_layers" and summary["optimizer_steps"] == 2
    est = estimate_run(cfg, dtype="float32")
    plan, *_ = build_plan(load_model_shape(cfg.model.name), "first_layers", 4, Options(block_size=2))
    assert sum(t.grad for t in plan.trained) // 4 == summary["trainable_parameters"]  # it counts what the run trained
    assert est.settings["method"] == "first_layers" and est.optimizer_state > 0


def test_the_benchmark_runs_a_plugin_method_in_its_child_process(plugin):
    out = plugin / "bench"
    argv = _argv(plugin)
    r = subprocess.run([sys.executable, "eval/bench.py", "--methods", "first_layers", "--base", argv[1],
                        "--steps", "2", "--batch", "2", "--seq", "64", "--out", str(out),
                        *[a for a in argv[3:] if not a.startswith(("training.output_dir", "training.max_steps"))]],
                       cwd=ROOT, env=os.environ.copy(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    runs = json.loads((out / "bench.json").read_text())["runs"]
    assert [(x["label"], x["status"]) for x in runs] == [("first_layers", "ok")]


def test_readme_says_every_field_a_method_declares():
    """README's "Adding a method" recipe names every field of Method and MemoryProfile, so it stays the whole
    recipe when a field is added."""
    import dataclasses

    from owlore.methods import MemoryProfile, Method

    text = (ROOT / "README.md").read_text()
    recipe = text[text.index("**Adding a method**"):text.index("**Adding a pruning method**")]
    missing = [f.name for cls in (Method, MemoryProfile) for f in dataclasses.fields(cls)
               if f.name not in ("name", "summary", "build") and f.name not in recipe]
    assert missing == [], f"README's method recipe does not mention {missing}"
