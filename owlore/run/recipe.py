"""A run's configuration: YAML files (composable), ``key=value`` overrides, and one validation pass.

A config file has a top-level ``method:`` (default ``owlore``; see ``owlore.methods.REGISTRY``), the common
sections ``model``, ``data``, ``training`` (``transformers.TrainingArguments``), ``eval`` and ``memory``, and the sections of
its method (``owlore``, ``lora``, ``galore``, ``lisa``, ``badam``, ``quantization``, ``optimizer`` ...).

Composition: a file may say ``include: base.yaml`` (or a list; paths relative to the file), and several files may
be given; later ones override earlier ones key by key, and a section set to ``null`` is removed (in any file, or
``section=null`` on the command line). ``${method}`` in any string value is replaced by the method's name (e.g.
``output_dir: outputs/smollm2_${method}``), ``${config}`` by the last config file's stem (the 7B bases write to
``outputs/llama2_7b/${config}``: with the overlay ``paper/official.yaml``, ``outputs/llama2_7b/official``), ``${now}`` by the start time (``20261203-154500``: a fresh output directory per run).

Everything is checked before any weights load, and one ``ConfigError`` lists every problem, each naming
``section.key``, the bad value and the fix.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from owlore.parallel.deepspeed_config import deepspeed_config_stage, deepspeed_precision
from owlore.run.config import (
    ConfigError,
    DataConfig,
    EvalConfig,
    MemoryConfig,
    ModelConfig,
    ParallelConfig,
    PruningConfig,
    VisionConfig,
    dataclass_from_dict,
)
from owlore.run.typecheck import coerce, suggest

COMMON_SECTIONS: dict[str, type] = {"model": ModelConfig, "data": DataConfig, "eval": EvalConfig,
                                   "memory": MemoryConfig, "parallel": ParallelConfig, "vision": VisionConfig,
                                   "pruning": PruningConfig}
TOP_KEYS = ("method", "include")
DEFAULT_METHOD = "owlore"
_OWN_OPTIMIZER_DEFAULT = "adamw_torch"


class _Loader(yaml.SafeLoader):
    """YAML with YAML 1.2's booleans (only true/false: ``no``, ``on``, ``off`` stay strings, so HF's
    ``save_strategy: no`` means what HF documents) and with ``3e-4`` read as the float everyone means."""


_Loader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:bool"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)$|^[-+]?(?:\d+\.\d*|\.\d+)$|^[-+]?\.(?:inf|Inf|INF)$"
               r"|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."),
)


class YamlInt(int):
    """An int read from YAML that remembers its text, so a string field gets ``007``, not ``7``."""

    yaml_text: str


class YamlFloat(float):
    """A float read from YAML that remembers its text (``1e3`` stays ``1e3`` in a string field)."""

    yaml_text: str


def _with_text(cls: type, base: Any):
    def construct(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> Any:
        value = cls(base(loader, node))
        value.yaml_text = node.value
        return value

    return construct


_Loader.add_constructor("tag:yaml.org,2002:int", _with_text(YamlInt, yaml.SafeLoader.construct_yaml_int))
_Loader.add_constructor("tag:yaml.org,2002:float", _with_text(YamlFloat, yaml.SafeLoader.construct_yaml_float))


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


@dataclass
class RunConfig:
    """A validated run: the method's name, the common sections and the method's own sections."""

    method: str
    model: ModelConfig
    data: DataConfig
    training: dict[str, Any]
    eval: EvalConfig = field(default_factory=EvalConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    pruning: PruningConfig = field(default_factory=PruningConfig)
    sections: dict[str, Any] = field(default_factory=dict)
    """The method's sections by name, e.g. ``{"owlore": OwLoreConfig(...), "optimizer": OptimizerConfig(...)}``."""
    sources: list[str] = field(default_factory=list)

    def __getattr__(self, name: str) -> Any:  # cfg.owlore, cfg.lora ... for the method's sections
        sections = self.__dict__.get("sections", {})
        if name in sections:
            return sections[name]
        raise AttributeError(f"RunConfig has no section {name!r} (method {self.__dict__.get('method')!r} reads "
                             f"{', '.join(sections) or 'no own section'})")


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def read_config_files(paths: list[str | Path]) -> dict[str, Any]:
    """Merge YAML files in order, each after the files it ``include``s; a top-level ``null`` removes a section.

    A ``null`` counts wherever it is set, in an included file too: it removes the section the files before it
    gave, and a later file may give the section again.
    """
    merged = _read_files(paths, ())
    return {k: v for k, v in merged.items() if v is not None or k == "method"}


def _read_files(paths: list[str | Path], chain: tuple[Path, ...]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for path in paths:
        path = Path(path)
        if not path.is_file():
            where = f" (included from {chain[-1]})" if chain else ""
            raise ConfigError(f"config file {path} not found{where}; shipped configs are in configs/, e.g. "
                              "configs/smollm2_owlore.yaml")
        resolved = path.resolve()
        if resolved in chain:
            raise ConfigError(f"{path}: include cycle {' -> '.join(map(str, (*chain, resolved)))}")
        try:
            data = parse_yaml(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
        includes = data.pop("include", None) or []
        includes = [includes] if isinstance(includes, str) else includes
        if not isinstance(includes, list) or not all(isinstance(i, str) for i in includes):
            raise ConfigError(f"{path}: include must be a file name or a list of file names, got {includes!r}")
        base = _read_files([path.parent / i for i in includes], (*chain, resolved)) if includes else {}
        merged = _merge(merged, _merge(base, data))
    return merged


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> tuple[list[str], dict[tuple[str, str], str]]:
    """Set ``section.key=value`` (or ``method=name``, or ``section=null`` to drop a section) in place.

    Values are YAML, read later against field types; a value that is not valid YAML is kept as its text (a string
    field takes it, any other reports it). Returns the problems and the original text of every override value
    (so a string field gets it verbatim).
    """
    problems, texts = [], {}
    for item in overrides:
        key, sep, value = item.partition("=")
        parts = key.strip().split(".")
        value = value.strip()
        if parts == ["method"] and sep:
            if value:
                raw["method"] = value
            else:
                problems.append(f"override {item!r}: expected method=NAME")
            continue
        if len(parts) == 1 and sep and parts[0] and value in ("null", "~"):
            raw.pop(parts[0], None)  # section=null removes the section, as null does in a file
            continue
        if not sep or not all(parts) or len(parts) == 1:
            problems.append(f"override {item!r}: expected section.key=value (e.g. owlore.gamma=2), method=NAME "
                            "or section=null")
            continue
        try:
            parsed = parse_yaml(value) if value else None
        except yaml.YAMLError:
            parsed = value
        node = raw
        for depth, p in enumerate(parts[:-1]):
            if node.get(p) is None:
                node[p] = {}
            node = node[p]
            if not isinstance(node, dict):
                problems.append(f"override {item!r}: {'.'.join(parts[:depth + 1])} is not a mapping "
                                f"(it is {node!r})")
                break
        else:
            node[parts[-1]] = parsed
            if len(parts) == 2:
                texts[(parts[0], parts[1])] = value
    return problems, texts


def _substitute(value: Any, names: dict[str, str]) -> Any:
    if isinstance(value, str):
        for key, name in names.items():
            value = value.replace("${" + key + "}", name)
        return value
    if isinstance(value, dict):
        return {k: _substitute(v, names) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, names) for v in value]
    return value


OWLORE_TRAINING_KEYS: dict[str, Any] = {"overwrite_output_dir": bool, "resume_allow_changes": bool}
"""``training`` keys that train.py handles itself: ``overwrite_output_dir`` replaces the results of an earlier run
in ``output_dir`` instead of refusing to start (``owlore.run.output_dir``; transformers 5 dropped the field);
``resume_allow_changes`` resumes a checkpoint trained with other method settings (``owlore.run.resume``)."""


def training_problems(training: dict[str, Any], texts: dict[str, str], *, own_optimizer: bool,
                      method: str, state_files: tuple[str, ...] = ()) -> tuple[dict[str, Any], list[str]]:
    """Check ``training:`` against ``TrainingArguments``' fields and types (without building it)."""
    from transformers import TrainingArguments

    hints = typing.get_type_hints(TrainingArguments)
    names = [f.name for f in dataclasses.fields(TrainingArguments) if f.init]
    out, problems = {}, []
    for k, v in training.items():
        if k in OWLORE_TRAINING_KEYS:  # ours, not the Trainer's: train.py reads and removes them
            value, why = coerce(v, OWLORE_TRAINING_KEYS[k], raw=texts.get(k))
            if why:
                problems.append(f"training.{k}={v!r}: {why}")
            out[k] = value
            continue
        if k not in names:
            problems.append(f"training.{k}: not a transformers.TrainingArguments field{suggest(str(k), names)}")
            continue
        value, why = coerce(v, hints.get(k, Any), raw=texts.get(k))
        if why:
            problems.append(f"training.{k}={v!r}: {why}")
        out[k] = value
    output_dir = out.get("output_dir")
    if not isinstance(output_dir, str) or not output_dir.strip():
        got = f" (got {output_dir!r})" if "output_dir" in training else ""
        problems.append(f"training.output_dir: required (where checkpoints, logs and the model go){got}")
    problems += _resume_problems(out, state_files)
    problems += _schedule_problems(out)
    optim = out.get("optim", _OWN_OPTIMIZER_DEFAULT)
    if own_optimizer and str(optim) not in (_OWN_OPTIMIZER_DEFAULT, "adamw_torch_fused"):
        problems.append(f"training.optim={optim!r}: method {method} builds its own GaLoreAdamW, so training.optim "
                        "is not used; remove it (8-bit states: optimizer.state_bits=8)")
    for key in ("optim_args", "optim_target_modules"):
        if own_optimizer and out.get(key) is not None:
            problems.append(f"training.{key}={out[key]!r}: method {method} builds its own GaLoreAdamW and ignores "
                            f"it; set the method's own section instead (e.g. {method}.rank / target_modules)")
    return out, problems


def _schedule_problems(training: dict[str, Any]) -> list[str]:
    """Values the Trainer would accept and then misuse: a learning rate <= 0 (the optimizer raises only after the
    weights load), ``max_steps=0`` (the Trainer then runs one step and exits 0) or below -1 (-1: use epochs)."""
    out = []
    lr = training.get("learning_rate")
    if isinstance(lr, (int, float)) and not isinstance(lr, bool) and lr <= 0:
        out.append(f"training.learning_rate={lr!r}: must be > 0 (e.g. 3e-4; a method's config file has a tuned one)")
    steps = training.get("max_steps")
    if isinstance(steps, int) and not isinstance(steps, bool) and (steps == 0 or steps < -1):
        out.append(f"training.max_steps={steps!r}: must be >= 1 (or -1 to train training.num_train_epochs epochs)")
    epochs = training.get("num_train_epochs")
    if isinstance(epochs, (int, float)) and epochs <= 0 and training.get("max_steps", -1) in (-1, None):
        out.append(f"training.num_train_epochs={epochs!r}: must be > 0 (or set training.max_steps)")
    return out


def missing_checkpoint_files(checkpoint: str | Path, state_files: tuple[str, ...] = ()) -> list[str]:
    """Files a complete checkpoint lacks: ``trainer_state.json`` (the Trainer writes it last, so a crash mid-save
    leaves it out) and the method's ``state_files``."""
    return [f for f in ("trainer_state.json", *state_files) if not (Path(checkpoint) / f).is_file()]


def _resume_problems(training: dict[str, Any], state_files: tuple[str, ...]) -> list[str]:
    """``resume_from_checkpoint``: ``last``, or a complete checkpoint directory (checked before weights load)."""
    if "resume_from_checkpoint" not in training:
        return []
    value = training["resume_from_checkpoint"]
    if value in ("true", "True", True):
        training["resume_from_checkpoint"] = "last"  # the Trainer's True: the newest checkpoint
        return []
    if value in (None, "last", "false", "False", False):
        training["resume_from_checkpoint"] = None if value in ("false", "False", False) else value
        return []
    path = Path(str(value))
    missing = missing_checkpoint_files(path, state_files)
    if not path.is_dir():
        return [f"training.resume_from_checkpoint={value!r}: no such directory; give a checkpoint-N directory "
                "or 'last' (the newest complete checkpoint in output_dir)"]
    if missing:
        return [f"training.resume_from_checkpoint={value!r}: not a complete checkpoint (missing "
                f"{', '.join(missing)}; interrupted while saving?); resume from an earlier one or use 'last'"]
    return []


def load_config(paths: str | Path | list[str | Path], overrides: list[str] | None = None) -> RunConfig:
    """Read and merge YAML files, apply overrides, validate everything; one ``ConfigError`` lists every problem."""
    from owlore.methods import REGISTRY, all_methods

    paths = [paths] if isinstance(paths, str | Path) else list(paths)
    raw = read_config_files(paths)
    problems, texts = apply_overrides(raw, overrides or [])
    method_name = raw.get("method")
    method_name = DEFAULT_METHOD if method_name is None else method_name
    if not isinstance(method_name, str) or method_name not in REGISTRY:
        problems.append(f"method={method_name!r}: unknown method{suggest(str(method_name).lower(), REGISTRY)}; "
                        f"methods: {', '.join(REGISTRY)}")
        method_name = DEFAULT_METHOD
    names = {"method": str(method_name), "config": Path(paths[-1]).stem, "now": time.strftime("%Y%m%d-%H%M%S")}
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "${now}" in json.dumps(raw) + " ".join(overrides or []):
        problems.append("${now} under several processes: each would read its own clock and write elsewhere; "
                        "give training.output_dir an explicit new path")
    raw = {k: _substitute(v, names) for k, v in raw.items()}
    texts = {k: _substitute(t, names) for k, t in texts.items()}
    methods = all_methods()
    method = methods[method_name]
    own = method.all_sections()
    users: dict[str, list[str]] = {}
    for name, m in methods.items():
        for s in m.all_sections():
            users.setdefault(s, []).append(name)
    known = [*TOP_KEYS, *COMMON_SECTIONS, "training", *users]
    for key in raw:
        if key in TOP_KEYS or key in COMMON_SECTIONS or key == "training" or key in own:
            continue
        if key in users:
            problems.append(f"{key}: section of method {' / '.join(users[key])}, but this run's method is "
                            f"{method_name}; remove the section (on the command line: {key}=null) or set "
                            f"method: {users[key][0]}")
        else:
            problems.append(f"{key}: unknown section{suggest(str(key), known)}; sections: {', '.join(known[2:])}")
    built: dict[str, Any] = {}
    for name, cls in {**COMMON_SECTIONS, **own}.items():
        section = {} if raw.get(name) is None else raw[name]
        if not isinstance(section, dict):
            problems.append(f"{name}: must be a mapping of keys, got {type(section).__name__}")
            continue
        section_texts = {k: t for (s, k), t in texts.items() if s == name}
        if name == "memory":
            section, errs = _memory_plugins(section, section_texts)
            problems += errs
        obj, errs = dataclass_from_dict(cls, section, section=name, raw=section_texts)
        problems += errs
        built[name] = obj
    training = {} if raw.get("training") is None else raw["training"]
    if not isinstance(training, dict):
        problems.append(f"training: must be a mapping of TrainingArguments fields, got {type(training).__name__}")
        training = {}
    training, errs = training_problems(training, {k: t for (s, k), t in texts.items() if s == "training"},
                                       own_optimizer=method.own_optimizer, method=method_name,
                                       state_files=method.state_files)
    problems += errs
    if not problems:
        problems += _memory_problems(method, built, training)
        problems += engine_problems(method, training, built["parallel"])
        problems += _vision_problems(method, built["vision"], built["data"])
        if built["pruning"].method and not built["vision"].enabled:
            problems.append(f"pruning.method={built['pruning'].method}: pruning during training needs a vision model "
                            "(vision.enabled=true); for inference use owlore.pruning.VisualTokenPruner")
    if problems:
        where = ", ".join(map(str, paths))
        raise ConfigError(f"{where}: {len(problems)} problem(s):\n" + "\n".join(f"  - {p}" for p in problems))
    return RunConfig(method=method_name, model=built["model"], data=built["data"], eval=built["eval"],
                     memory=built["memory"], parallel=built["parallel"], vision=built["vision"], pruning=built["pruning"], training=training, sections={k: built[k] for k in own}, sources=[str(p) for p in paths])


def _memory_plugins(section: dict[str, Any], texts: dict[str, str]) -> tuple[dict[str, Any], list[str]]:
    """The ``memory`` section with the values of options registered from outside owlore (keys that are no field
    of ``MemoryConfig``) moved under ``plugins``, each read against its default's type."""
    from owlore.memory.options import REGISTRY, get_option

    fields = {f.name for f in dataclasses.fields(MemoryConfig)}
    rest: dict[str, Any] = {}
    values: dict[str, Any] = {}
    problems = []
    for key, raw in section.items():
        if key == "plugins":
            problems.append("memory.plugins: set an option registered from outside owlore by its name, "
                            "memory.<name>=<value>")
        elif key in fields or key not in REGISTRY:
            rest[key] = raw  # a field, or an unknown key that dataclass_from_dict reports
        else:
            value, why = coerce(raw, type(get_option(key).default), raw=texts.get(key))
            if why:
                problems.append(f"memory.{key}={raw!r}: {why}")
            else:
                values[key] = value
    return ({**rest, "plugins": values} if values else rest), problems


def _named(test) -> str:
    """The registered methods passing ``test`` (a ``Method`` predicate), for messages."""
    from owlore.methods import listed_where

    return listed_where(test)


def _memory_problems(method: Any, built: dict[str, Any], training: dict[str, Any]) -> list[str]:
    """Checks across sections for the memory options: each ``memory`` option's declared conflicts
    (``owlore.memory.options``), and the ``optimizer`` section's in-backward update."""
    from owlore.memory.option import OptionContext
    from owlore.memory.options import run_problems

    out = run_problems(OptionContext(method=method, memory=built["memory"], model=built["model"],
                                     parallel=built["parallel"], training=training,
                                     sections=dict(built)))
    optimizer = built.get("optimizer")
    if optimizer is not None and optimizer.update_in_backward:
        clip = training.get("max_grad_norm", 1.0)  # TrainingArguments' default clips at 1.0
        if clip not in (None, 0, 0.0):
            out.append(f"optimizer.update_in_backward=true with training.max_grad_norm={clip!r}: each tensor "
                       "steps inside backward, before a global gradient norm exists; set training.max_grad_norm=0 "
                       "(or optimizer.update_in_backward=false to keep global clipping)")
        if training.get("fp16"):
            out.append("optimizer.update_in_backward=true with training.fp16=true: the GradScaler unscales and "
                       "skips whole steps after backward, but each tensor steps inside it; use training.bf16=true "
                       "or fp32")
    return out


def _vision_problems(method: Any, vision: Any, data: Any) -> list[str]:
    if not vision.enabled:
        return []
    out = []
    if not method.vision:
        out.append(f"vision.enabled=true with method {method.name}: the from-scratch vision tower must train and be "
                   f"saved, which this method does not do; use one of {_named(lambda m: m.vision)} (a frozen "
                   "language model: method=full with vision.freeze_language_model=true)")
    if vision.freeze_language_model and method.name != "full":
        out.append(f"vision.freeze_language_model=true with method {method.name}: only method full trains the tower "
                   "alone; remove it, or set method: full")
    if data.train != "fashion-vqa":
        out.append(f"data.train={data.train!r} with vision.enabled=true: the vision model trains on data.train: "
                   "fashion-vqa (Fashion-MNIST grid questions, owlore.data.fashion_vqa)")
    return out


def engine_problems(spec: Any, training: dict[str, Any], parallel: Any = None) -> list[str]:
    """Which method (a ``Method``) runs under which scale-out engine (README "Scale out"), checked before anything
    loads; read from the method's ``zero_stages`` and ``fsdp2`` (the memory options' own ``fsdp2``:
    ``owlore.memory.options.run_problems``)."""
    out = []
    method, own_optimizer = spec.name, spec.own_optimizer
    if parallel is not None and parallel.fsdp2:
        if not spec.fsdp2:
            out.append(f"parallel.fsdp2=true with method {method}: FSDP2 is supported for "
                       f"{_named(lambda m: m.fsdp2)}; for {method} use plain data parallelism (torchrun) or "
                       "DeepSpeed (training.deepspeed=configs/deepspeed/zero2.json for full/lora)")
        if training.get("deepspeed") or training.get("fsdp"):
            out.append("parallel.fsdp2=true with training.deepspeed / training.fsdp: choose one engine")
    if training.get("fsdp") and own_optimizer:
        out.append(f"training.fsdp with method {method}: HF's FSDP plugin rebuilds the optimizer around the sharded "
                   "parameters (the method's per-layer GaLoreAdamW would not survive) and on CPU falls back to DDP; "
                   "use parallel.fsdp2=true (configs/scale/fsdp2.yaml)")
    ds = training.get("deepspeed")
    if ds:
        stage, why = deepspeed_config_stage(ds)
        if why:
            out.append(why)
        elif stage and stage not in spec.zero_stages:
            what = ("GaLore cannot project them (GaLore #2)" if spec.memory.lowrank else
                    "frozen layers would be stepped with zero gradients and every layer's state allocated")
            out.append(f"training.deepspeed={ds!r} is ZeRO stage {stage}, but method {method} builds its own "
                       f"per-layer optimizer and ZeRO {stage} hands it flat 1-D partitions of every parameter ({what}). "
                       "Use training.deepspeed=configs/deepspeed/zero0.json (DeepSpeed's all-reduce only), plain "
                       "data parallelism (torchrun without training.deepspeed: only the active layers' gradients "
                       f"travel); ZeRO 2/3 work for {_named(lambda m: 3 in m.zero_stages)}")
        elif own_optimizer and (precision := deepspeed_precision(ds, training)):
            out.append(f"training.deepspeed={ds!r} with {precision} on (its \"{precision}\" section, \"auto\" "
                       f"following training.{precision}): DeepSpeed then wraps method {method}'s own optimizer in "
                       "its FP16_UnfusedOptimizer, which keeps an fp32 copy of every parameter the optimizer holds "
                       "(every layer's weights: the memory the method saves) and steps those copies, so the layer "
                       "switching's per-layer state freeing and offloading no longer reach the state. Run it "
                       f"without training.deepspeed (torchrun, {precision} weights; optimizer.master_weights=true "
                       f"keeps fp32 copies of the trained layers only), or set training.{precision}=false for fp32 "
                       "weights under DeepSpeed")
        if training.get("fsdp"):
            out.append("training.deepspeed and training.fsdp are both set: choose one engine")
    return out


def _layer_count(hf_config: Any) -> int | None:
    hf_config = getattr(hf_config, "text_config", None) or hf_config
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(getattr(hf_config, key, None), int):
            return getattr(hf_config, key)
    return None


def decoder_layer_count(model_name: str, *, trust_remote_code: bool = False) -> int | None:
    """Decoder layers of a model from its ``config.json`` alone (no weights), or None if unknown."""
    from transformers import AutoConfig

    from owlore.assets import resolve_model_name

    try:
        cfg = AutoConfig.from_pretrained(resolve_model_name(model_name), trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        return None
    return _layer_count(cfg)


def preflight(cfg: RunConfig) -> None:
    """Checks that need the model's ``config.json`` (the model exists and has weights; ``owlore.gamma`` vs the
    layer count; ``data.max_seq_length`` vs the model's context), before any weights load."""
    from transformers import AutoConfig

    from owlore.methods import get_method
    from owlore.run.sources import check_model_source, looks_like_path

    name = cfg.model.name
    source = check_model_source(name, key="model.name")
    try:
        hf_config = AutoConfig.from_pretrained(source, trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        where = "" if looks_like_path(source) else " (no such local directory, so it was read as a hub id)"
        raise ConfigError(f"model.name={name!r}: cannot read its config.json{where}: {first}. Use a hub id (with "
                          "network access or a filled HF cache), a local save_pretrained directory, or the "
                          "embedded smollm2-135m-instruct.") from None
    problems = _context_problems(cfg, hf_config)
    method = get_method(cfg.method)
    layers = _layer_count(hf_config)
    if method.preflight is not None and layers is not None:
        problems += method.preflight(cfg, layers)
    if problems:
        limit = context_length(hf_config)
        head = name + (f" has {layers} decoder layers" if layers is not None else "")
        head += f" and a context of {limit} tokens" if limit is not None else ""
        raise ConfigError(f"{head}:\n" + "\n".join(f"  - {p}" for p in problems))


def context_length(hf_config: Any) -> int | None:
    """The model's trained context (``max_position_embeddings`` or its older names), or None if it has none."""
    hf_config = getattr(hf_config, "text_config", None) or hf_config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        if isinstance(getattr(hf_config, key, None), int):
            return getattr(hf_config, key)
    return None


def _context_problems(cfg: RunConfig, hf_config: Any) -> list[str]:
    """``data.max_seq_length`` above the model's context is an error, not a warning: learned position tables
    index out of range and rotary models run untrained positions, and a value that never bites (rows all shorter)
    costs nothing to lower. Vision runs build their own sequences, so they are not checked here."""
    limit = context_length(hf_config)
    if cfg.vision.enabled or limit is None or cfg.data.max_seq_length <= limit:
        return []
    return [f"data.max_seq_length={cfg.data.max_seq_length}: longer than the model's context "
            f"(max_position_embeddings={limit}); set data.max_seq_length <= {limit}"]
