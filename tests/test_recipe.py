"""owlore.run.recipe: composing YAML files, typed values and overrides, one ConfigError naming every problem, the CLI."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

import train
from owlore.run.config import ConfigError
from owlore.run.recipe import decoder_layer_count, load_config, parse_yaml, read_config_files
from owlore.run.typecheck import coerce, suggest

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
BASES_7B = sorted(p for p in CONFIGS.glob("*.yaml") if not p.name.startswith(("smollm2", "fashion_llava")))
OVERLAYS = sorted((CONFIGS / "paper").glob("*.yaml"))
OWLORE = CONFIGS / "smollm2_owlore.yaml"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def config_error(*args, **kwargs) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(*args, **kwargs)
    return str(e.value)


# ---------------------------------------------------------------------------------------------------- composition


def test_include_is_relative_to_the_including_file(tmp_path, monkeypatch):
    write(tmp_path / "sub" / "base.yaml", "training: {output_dir: o, max_steps: 7, learning_rate: 1.0e-3}\n")
    write(tmp_path / "sub" / "run.yaml", "include: base.yaml\ntraining: {max_steps: 9}\n")
    monkeypatch.chdir(tmp_path)  # base.yaml is not in the working directory, only next to run.yaml
    cfg = load_config("sub/run.yaml")
    assert cfg.training["max_steps"] == 9  # the including file wins over what it includes
    assert cfg.training["learning_rate"] == 1e-3 and cfg.training["output_dir"] == "o"


def test_list_of_includes_and_nested_include(tmp_path):
    write(tmp_path / "common" / "root.yaml", "training: {output_dir: o, seed: 1, max_steps: 1, warmup_steps: 1}\n")
    write(tmp_path / "parts" / "mid.yaml", "include: ../common/root.yaml\ntraining: {seed: 2}\n")  # nested
    write(tmp_path / "parts" / "a.yaml", "training: {max_steps: 3, warmup_steps: 3}\n")
    run = write(tmp_path / "parts" / "run.yaml", "include: [mid.yaml, a.yaml]\ntraining: {warmup_steps: 4}\n")
    t = load_config(run).training
    assert (t["seed"], t["max_steps"], t["warmup_steps"], t["output_dir"]) == (2, 3, 4, "o")


def test_later_config_wins_key_by_key(tmp_path):
    base = write(tmp_path / "base.yaml", "owlore: {gamma: 3, rank: 16}\n"
                                         "training: {output_dir: o, max_steps: 5, learning_rate: 1.0e-3}\n")
    top = write(tmp_path / "top.yaml", "owlore: {gamma: 2}\ntraining: {learning_rate: 2.0e-4}\n")
    cfg = load_config([base, top])
    assert (cfg.owlore.gamma, cfg.owlore.rank) == (2, 16)
    assert cfg.training == {"output_dir": "o", "max_steps": 5, "learning_rate": 2e-4}


def test_null_section_in_an_overlay_removes_it(tmp_path):
    base = write(tmp_path / "base.yaml", "method: lora\nlora: {r: 4}\ntraining: {output_dir: o}\n")
    assert "lora: section of method lora / qlora" in config_error([base], ["method=owlore"])
    top = write(tmp_path / "top.yaml", "method: owlore\nlora: null\n")
    assert load_config([base, top]).method == "owlore"
    # a null in an included file removes the section too, and a later file may give it again
    write(tmp_path / "drop.yaml", "lora: null\n")
    via_include = write(tmp_path / "via.yaml", "include: drop.yaml\nmethod: owlore\n")
    assert load_config([base, via_include]).method == "owlore"
    again = write(tmp_path / "again.yaml", "method: lora\nlora: {alpha: 8}\n")
    cfg = load_config([base, top, again])
    assert (cfg.lora.r, cfg.lora.alpha) == (8, 8)  # r=4 was removed with the section: back to the default
    # on the command line, section=null does the same
    assert load_config([base], ["method=owlore", "lora=null"]).method == "owlore"
    assert "lora" not in read_config_files([base, top])


def test_include_cycle_is_a_config_error(tmp_path):
    write(tmp_path / "a.yaml", "include: b.yaml\ntraining: {output_dir: o}\n")
    write(tmp_path / "b.yaml", "include: a.yaml\n")
    msg = config_error(tmp_path / "a.yaml")
    assert "include cycle" in msg and "a.yaml" in msg and "b.yaml" in msg
    write(tmp_path / "self.yaml", "include: self.yaml\n")
    assert "include cycle" in config_error(tmp_path / "self.yaml")


def test_missing_include_names_the_including_file(tmp_path):
    p = write(tmp_path / "run.yaml", "include: gone.yaml\n")
    msg = config_error(p)
    assert "config file" in msg and "gone.yaml not found (included from" in msg and "run.yaml" in msg


def test_method_substituted_in_output_dir(tmp_path):
    p = write(tmp_path / "run.yaml", "training:\n  output_dir: out/${method}_run\n  run_name: r-${method}\n")
    assert load_config(p).training["output_dir"] == "out/owlore_run"
    cfg = load_config(p, ["method=lisa", "training.hub_model_id=me/${method}"])
    assert cfg.training["output_dir"] == "out/lisa_run" and cfg.training["run_name"] == "r-lisa"
    assert cfg.training["hub_model_id"] == "me/lisa"  # in an override's text too


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads_alone(path):
    cfg = load_config(path)
    out = cfg.training["output_dir"]
    assert "${" not in out and (cfg.method in out or path.stem in out)  # smollm2: method; 7B bases: ${config}
    if path.stem.startswith("smollm2_"):
        assert cfg.method == path.stem.removeprefix("smollm2_")


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.stem)
@pytest.mark.parametrize("base", BASES_7B, ids=lambda p: p.stem)
def test_every_7b_base_with_every_paper_overlay(base, overlay):
    cfg = load_config([base, overlay])
    expected = "owlore" if overlay.stem == "official" else overlay.stem
    assert cfg.method == expected
    # every (model, overlay) pair writes to its own directory: outputs/<base>/<overlay>
    assert cfg.training["output_dir"] == f"outputs/{base.stem}/{overlay.stem}" and expected == cfg.method
    assert cfg.model.name == load_config(base).model.name and cfg.training["bf16"] is True  # the base's setting
    if overlay.stem == "official":
        assert (cfg.owlore.scheme, cfg.owlore.state_policy, cfg.owlore.threshold) == ("sequential", "keep", 13.0)
        assert cfg.optimizer.state_dtype == "auto" and cfg.owlore.gamma == 5  # the rest from owlore.yaml
    if overlay.stem == "qlora":
        assert cfg.lora.alpha == 32 and cfg.quantization.compute_dtype == "bfloat16"  # lora.yaml's adapters


# ------------------------------------------------------------------------------------------ values vs field types


def test_yaml_12_booleans_and_exponent_floats():
    assert parse_yaml("a: no\nb: on\nc: yes\nd: true\ne: False\nf: 3e-4\ng: 1.0e-5\nh: 7\ni: ~\n") == {
        "a": "no", "b": "on", "c": "yes", "d": True, "e": False, "f": 3e-4, "g": 1e-5, "h": 7, "i": None}
    assert isinstance(parse_yaml("3e-4"), float) and isinstance(parse_yaml("1e3"), float)


def test_coerce_and_suggest():
    assert coerce("no", bool) == (False, None) and coerce(3, float) == (3.0, None) and coerce(4.0, int) == (4, None)
    assert coerce({"a": "b"}, str, raw="a: b") == ("a: b", None)  # an override's text, verbatim
    assert coerce(None, str | None, raw="null") == (None, None)
    assert coerce("x", int) == ("x", "expected int")
    assert suggest("rnak", ["rank", "seed"]) == " (did you mean 'rank'?)" and suggest("zzz", ["rank"]) == ""
    assert suggest(3, ["a"]) == ""  # a YAML key that is not a string does not crash the message


TRAINING_WORDS = {"save_strategy": "no", "report_to": "none", "eval_strategy": "no", "bf16": "no",
                  "learning_rate": "3e-4"}


@pytest.mark.parametrize("where", ["file", "override"])
def test_values_read_against_field_types(tmp_path, where):
    if where == "file":
        text = "".join(f"  {k}: {v}\n" for k, v in TRAINING_WORDS.items())
        p = write(tmp_path / "run.yaml", f"include: {OWLORE}\ntraining:\n{text}")
        cfg = load_config(p, [f"training.output_dir={tmp_path / 'out'}"])
    else:
        cfg = load_config(OWLORE, [f"training.{k}={v}" for k, v in TRAINING_WORDS.items()]
                          + [f"training.output_dir={tmp_path / 'out'}"])
    t = cfg.training
    assert (t["save_strategy"], t["report_to"], t["eval_strategy"]) == ("no", "none", "no")
    assert t["bf16"] is False
    assert isinstance(t["learning_rate"], float) and t["learning_rate"] == 3e-4
    args = train.training_arguments(cfg)  # TrainingArguments accepts what the loader produced
    assert args.save_strategy == "no" and args.eval_strategy == "no" and args.report_to == []
    assert args.bf16 is False and args.learning_rate == 3e-4 and args.output_dir == str(tmp_path / "out")


def test_every_problem_in_one_error():
    msg = config_error(OWLORE, ["training.learning_rate=abc", "owlore.rnak=3"])
    assert "2 problem(s)" in msg
    assert "training.learning_rate='abc': expected float" in msg
    assert "owlore.rnak: unknown key (did you mean 'rank'?)" in msg


def test_enum_typo_names_the_choices_and_suggests():
    msg = config_error(OWLORE, ["training.lr_scheduler_type=cosin"])
    assert "training.lr_scheduler_type='cosin': must be one of linear, cosine," in msg
    assert "(did you mean 'cosine'?)" in msg


@pytest.mark.parametrize(("given", "meant"), [("lisaa", "lisa"), ("LoRA", "lora"), ("galor", "galore")])
def test_unknown_method_suggests_the_close_one(given, meant):
    msg = config_error(OWLORE, [f"method={given}"])
    assert f"method={given!r}: unknown method (did you mean {meant!r}?)" in msg


def test_empty_method_override_is_reported():
    assert "override 'method=': expected method=NAME" in config_error(OWLORE, ["method="])


def test_section_of_another_method_names_its_owner():
    msg = config_error(OWLORE, ["lora.r=4"])
    assert "lora: section of method lora / qlora, but this run's method is owlore" in msg
    assert "lora=null" in msg  # how to drop it from the command line


def test_trainer_optim_only_where_the_trainer_builds_the_optimizer():
    msg = config_error(OWLORE, ["training.optim=adamw_bnb_8bit"])
    assert "training.optim='adamw_bnb_8bit': method owlore builds its own GaLoreAdamW" in msg
    cfg = load_config(CONFIGS / "smollm2_full.yaml", ["training.optim=adamw_bnb_8bit"])
    assert cfg.method == "full" and cfg.training["optim"] == "adamw_bnb_8bit"


def test_nested_dict_override(tmp_path):
    cfg = load_config(OWLORE, ["training.gradient_checkpointing_kwargs.use_reentrant=false",
                               f"training.output_dir={tmp_path}"])
    assert cfg.training["gradient_checkpointing_kwargs"] == {"use_reentrant": False}
    assert train.training_arguments(cfg).gradient_checkpointing_kwargs == {"use_reentrant": False}
    p = write(tmp_path / "run.yaml", f"include: {OWLORE}\ntraining: {{gradient_checkpointing_kwargs: null}}\n")
    cfg = load_config(p, ["training.gradient_checkpointing_kwargs.use_reentrant=true"])  # null -> a new mapping
    assert cfg.training["gradient_checkpointing_kwargs"] == {"use_reentrant": True}
    msg = config_error(OWLORE, ["model.name.revision=main", "training.report_to.x=1"])
    assert "override 'model.name.revision=main': model.name is not a mapping" in msg
    assert "override 'training.report_to.x=1': training.report_to is not a mapping" in msg


def test_model_gradient_checkpointing_reaches_training_arguments(tmp_path, recwarn):
    cfg = load_config(OWLORE, ["model.gradient_checkpointing=true", f"training.output_dir={tmp_path}"])
    args = train.training_arguments(cfg)
    assert args.gradient_checkpointing is True and args.gradient_checkpointing_kwargs == {"use_reentrant": False}
    assert not [w for w in recwarn if "deprecated" in str(w.message)]  # set under transformers' current name
    cfg = load_config(OWLORE, ["model.gradient_checkpointing=true", f"training.output_dir={tmp_path}",
                               "training.gradient_checkpointing_kwargs.use_reentrant=true"])
    assert train.training_arguments(cfg).gradient_checkpointing_kwargs == {"use_reentrant": True}  # the user's wins


def test_override_text_that_is_not_yaml():
    msg = config_error(OWLORE, ["owlore.gamma=[3"])  # a typo, not a crash
    assert "owlore.gamma='[3': expected int" in msg
    cfg = load_config(OWLORE, ["training.run_name=lr 3e-4: try [2", "training.hub_model_id=a: b"])
    assert cfg.training["run_name"] == "lr 3e-4: try [2" and cfg.training["hub_model_id"] == "a: b"


def test_output_dir_required_and_not_null():
    assert "training.output_dir: required" in config_error(CONFIGS / "paper" / "lora.yaml")
    assert "training.output_dir: required" in config_error(OWLORE, ["training.output_dir=null"])


# ---------------------------------------------------------------------------------------------------------- CLI


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train.py", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)


def test_cli_missing_config_file():
    r = _cli("--config", "nope.yaml")
    assert r.returncode == 2
    assert "config file nope.yaml not found" in r.stderr and "Traceback" not in r.stderr


def test_cli_bad_values_exit_2(tmp_path):
    bad = write(tmp_path / "bad.yaml", f"include: {OWLORE}\nowlore: {{gamma: -1}}\n")
    r = _cli("--config", str(bad), "training.learning_rate=abc", "owlore.gama=2", "training.lr_scheduler_type=bogus",
             f"training.output_dir={tmp_path}")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "4 problem(s)" in r.stderr
    assert "training.learning_rate='abc': expected float" in r.stderr
    assert "owlore.gama: unknown key (did you mean 'gamma'?)" in r.stderr
    assert "training.lr_scheduler_type='bogus': must be one of linear, cosine" in r.stderr
    assert "owlore.gamma=-1" in r.stderr  # from the file


def test_embedded_model_layer_count_from_config_json():
    assert decoder_layer_count("smollm2-135m-instruct") == 30
    assert decoder_layer_count("/nonexistent/model") is None


@pytest.mark.parametrize(("args", "key"), [
    (["--config", "configs/smollm2_owlore.yaml", "owlore.gamma=31"], "owlore.gamma=31"),
    (["--config", "configs/smollm2.yaml", "method=lisa", "lisa.gamma=31"], "lisa.gamma=31"),
    (["--config", "configs/smollm2.yaml", "method=badam", "badam.block_size=31"], "badam.block_size=31"),
], ids=["owlore", "lisa", "badam"])
def test_layer_count_checked_before_any_weights_load(args, key, tmp_path, monkeypatch, capsys):
    def no_weights(*a, **k):
        raise AssertionError("weights loaded before the layer-count check")

    monkeypatch.setattr(train, "load_model_and_tokenizer", no_weights)
    monkeypatch.setattr(logging, "basicConfig", lambda **kw: None)  # keep pytest's log handlers
    with pytest.raises(SystemExit) as e:
        train.main([*args, f"training.output_dir={tmp_path}"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "config error: smollm2-135m-instruct has 30 decoder layers" in err
    assert f"{key}: the model has only 30 decoder layers" in err


@pytest.mark.slow
def test_cli_empty_data_file(tmp_path):
    data = write(tmp_path / "empty.jsonl", "\n\n")
    r = _cli("--config", "configs/smollm2_full.yaml", f"data.train={data}", f"training.output_dir={tmp_path / 'o'}",
             "eval.demo=false")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"data error: {data}: no rows" in r.stderr


def _main_without_weights(argv, monkeypatch, capsys) -> str:
    """Run train.main where loading weights is an error; return stderr (the run must exit 2 before that)."""
    def no_weights(*a, **k):
        raise AssertionError("weights loaded before the check")

    monkeypatch.setattr(train, "load_model_and_tokenizer", no_weights)
    monkeypatch.setattr(logging, "basicConfig", lambda **kw: None)
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


def test_unknown_model_is_a_config_error_before_weights(tmp_path, monkeypatch, capsys):
    err = _main_without_weights(["--config", "configs/smollm2_lora.yaml", "model.name=nope/nope",
                                 f"training.output_dir={tmp_path}"], monkeypatch, capsys)
    assert "config error: model.name='nope/nope': cannot read its config.json" in err


def test_bad_rows_are_reported_before_weights_load(tmp_path, monkeypatch, capsys):
    data = write(tmp_path / "d.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": "no answer"}\n'
                                       '{"text": ""}\n')
    err = _main_without_weights(["--config", "configs/smollm2_lora.yaml", f"data.train={data}", "eval.demo=false",
                                 f"training.output_dir={tmp_path / 'o'}"], monkeypatch, capsys)
    assert "row 1: field 'output' is missing or empty (line 2)" in err and "row 2: field 'text' is empty" in err


def test_resume_from_checkpoint_is_checked(tmp_path):
    base = ROOT / "configs/smollm2_owlore.yaml"
    assert load_config(base, ["training.resume_from_checkpoint=true"]).training["resume_from_checkpoint"] == "last"
    assert load_config(base, ["training.resume_from_checkpoint=false"]).training["resume_from_checkpoint"] is None
    with pytest.raises(ConfigError, match=r"resume_from_checkpoint='/nope/checkpoint-4': no such directory"):
        load_config(base, ["training.resume_from_checkpoint=/nope/checkpoint-4"])
    ckpt = tmp_path / "checkpoint-4"
    ckpt.mkdir()
    write(ckpt / "trainer_state.json", "{}")
    with pytest.raises(ConfigError, match=r"not a complete checkpoint \(missing owlore_state.pt"):
        load_config(base, [f"training.resume_from_checkpoint={ckpt}"])
    # full fine-tuning needs no layer-switching state
    cfg = load_config(ROOT / "configs/smollm2_full.yaml", [f"training.resume_from_checkpoint={ckpt}"])
    assert cfg.training["resume_from_checkpoint"] == str(ckpt)


def test_trainer_optimizer_options_ignored_by_own_optimizer_methods_are_reported():
    with pytest.raises(ConfigError, match=r"training.optim_args='rank=4': method owlore builds its own"):
        load_config(ROOT / "configs/smollm2_owlore.yaml", ["training.optim_args=rank=4"])
    load_config(ROOT / "configs/smollm2_full.yaml", ["training.optim_args=foo=1"])  # the Trainer's own optimizer


def test_config_stem_substitution(tmp_path):
    base = write(tmp_path / "base.yaml", "training: {output_dir: 'out/${config}/${method}'}\n")
    overlay = write(tmp_path / "mine.yaml", "method: full\n")
    assert load_config([base, overlay]).training["output_dir"] == "out/mine/full"


def test_string_fields_in_files_keep_the_yaml_text(tmp_path):
    """In files as in overrides, a string field gets what was written (``007``, ``1e3``), and numbers given to
    number fields come back as plain ints/floats."""
    p = write(tmp_path / "a.yaml", f"include: {ROOT / 'configs/smollm2_lora.yaml'}\n"
                                   "training: {run_name: 007, output_dir: 1e3, max_steps: 12, learning_rate: 3e-4}\n")
    t = load_config(p).training
    assert (t["run_name"], t["output_dir"]) == ("007", "1e3")
    assert type(t["max_steps"]) is int and type(t["learning_rate"]) is float and t["learning_rate"] == 3e-4


def test_deepspeed_mixed_precision_is_refused_for_methods_with_their_own_optimizer():
    """DeepSpeed stage 0 with bf16/fp16 wraps the client optimizer in FP16_UnfusedOptimizer (fp32 clones of every
    parameter): the per-layer methods would lose their memory saving and their state handling."""
    from owlore.run.recipe import deepspeed_precision

    zero0 = str(ROOT / "configs/deepspeed/zero0.json")
    assert deepspeed_precision(zero0, {"bf16": True}) == "bf16" and deepspeed_precision(zero0, {}) is None
    assert deepspeed_precision({"fp16": {"enabled": True}}, {}) == "fp16"
    for method in ("owlore", "lisa", "badam", "galore"):
        with pytest.raises(ConfigError, match="with bf16 on.*FP16_UnfusedOptimizer.*without training.deepspeed"):
            load_config(ROOT / f"configs/smollm2_{method}.yaml", [f"training.deepspeed={zero0}", "training.bf16=true",
                                                                  "training.output_dir=x"])
        load_config(ROOT / f"configs/smollm2_{method}.yaml", [f"training.deepspeed={zero0}", "training.output_dir=x"])
    load_config(ROOT / "configs/smollm2_full.yaml", [f"training.deepspeed={zero0}", "training.bf16=true",
                                                     "training.output_dir=x"])  # the Trainer's optimizer: fine
