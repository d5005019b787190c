"""What a benchmark runs: columns (a method, or a method with options), learning-rate grids, seeds, repeats, and
the ``train.py`` command of each run, started in a fresh process and skipped on a rerun when already done.

Every run is its own process (no run inherits another's allocator state, caches or peak memory) that writes
``owlore_record.json``; ``run.json`` beside it holds the command and its resolved settings (``Fingerprint``). A
rerun of the same plan skips every run whose record exists and whose settings match, so a stopped sweep resumes
where it stopped, a changed setting reruns only what it changes, and a sweep may pin a value that a shipped
default later leaves (``owlore.gamma=4``) without rerunning what it already measured.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RECORD = "owlore_record.json"
"""The run record ``train.py`` writes into its output directory (``owlore.layerwise.callback.RECORD_FILE``)."""
RUN_FILE = "run.json"
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}
"""Set in every child unless already in the environment: glibc then returns every freed block over 64 KiB to the
OS, so the peak RSS follows the live bytes instead of heap fragmentation (160-300 MiB on SmolLM2)."""


@dataclass(frozen=True)
class Column:
    """One benchmark column: ``method`` with ``overrides``; ``learning_rates`` None keeps the config's."""

    label: str
    method: str
    overrides: tuple[str, ...] = ()
    learning_rates: tuple[float, ...] | None = None


@dataclass(frozen=True)
class Run:
    """One planned ``train.py`` process."""

    column: Column
    lr: float | None
    seed: int | None
    repeat: int
    out_dir: Path
    command: tuple[str, ...] = field(default=(), compare=False)
    grid: int = 0
    """Position of ``lr`` in the column's grid: runs at the same position are paired for ratios."""

    @property
    def label(self) -> str:
        return self.column.label


# ------------------------------------------------------------------------------------------------ columns
def split_overrides(text: str) -> list[str]:
    """``a.b=1,c.d=[x,y]`` -> ``["a.b=1", "c.d=[x,y]"]``: a comma starts a new override only where the next
    piece has its own ``=`` (so list values keep their commas)."""
    out: list[str] = []
    for piece in text.split(","):
        if out and "=" not in piece:
            out[-1] += "," + piece
        elif piece:
            out.append(piece)
    return out


def parse_variant(text: str) -> tuple[str, str, list[str]]:
    """``label=method[:override,override...]`` -> ``(label, method, overrides)``.

    Raises:
        ValueError: without ``label=method``, or a label with ``:``, ``=``, ``/`` or spaces (it names a folder).
    """
    label, sep, rest = text.partition("=")
    method, _, overrides = rest.partition(":")
    if not sep or not label or not method or any(c in label for c in ":=/ ,"):
        raise ValueError(f"--variants {text!r}: expected label=method[:section.key=value,...], e.g. "
                         "owlore_opt=owlore:memory.chunked_loss=1024,training.max_grad_norm=0")
    return label, method, split_overrides(overrides)


def column_overrides(label: str, method: str, overrides: Sequence[str]) -> list[str]:
    """The overrides for one column: the unprefixed ones and those prefixed ``<method>:`` or ``<label>:``, in
    the order given (``owlore:owlore.gamma=2`` goes to owlore's columns only: a method's own section is an error
    in another method's config)."""
    out = []
    for o in overrides:
        prefix, sep, rest = o.partition(":")
        if sep and "=" not in prefix:  # a ':' inside the value (a URL, a path) is no prefix
            if prefix in (method, label):
                out.append(rest)
        else:
            out.append(o)
    return out


def config_args(method: str, *, config_dir: Path, base: Path, base_given: bool = False) -> list[str]:
    """``--config configs/smollm2_<method>.yaml`` when that file exists and no base was asked for, else the base
    file plus ``method=`` (the method's sections at their defaults, unless overridden)."""
    path = Path(config_dir) / f"smollm2_{method}.yaml"
    if path.is_file() and not base_given:
        return ["--config", str(path)]
    return ["--config", str(base), f"method={method}"]


def run_command(method: str, *, steps: int, batch: int, seq: int, output_dir: Path, config_dir: Path, base: Path,
                overrides: Sequence[str] = (), task: Path | None = None, python: str = sys.executable,
                script: str = "train.py", base_given: bool = False) -> list[str]:
    """The ``train.py`` command line of one run; every run gets the same model, data, batch and steps.

    Losses are logged every step (the final-loss tail needs them), input tokens counted without padding, the
    memory probe on (live bytes by kind), checkpoints off. ``task`` is a config overlay (``configs/tasks/``)
    added after the method's file; ``overrides`` come last, so they win.
    """
    cmd = [python, script, *config_args(method, config_dir=config_dir, base=base, base_given=base_given)]
    if task is not None:
        cmd += ["--config", str(task)]
    cmd += [f"training.max_steps={steps}", f"training.per_device_train_batch_size={batch}",
            f"data.max_seq_length={seq}", f"training.output_dir={output_dir}", "training.save_strategy=no",
            "training.report_to=none", "training.logging_steps=1",
            "training.include_num_input_tokens_seen=non_padding", "memory.profile=true"]
    return [*cmd, *overrides]


def lr_text(lr: float) -> str:
    """``3e-04`` style, for folder names and tables."""
    return f"{lr:.0e}"


def run_dir(out: Path, label: str, *, lr: float | None, seed: int | None, repeat: int, repeats: int) -> Path:
    """``<out>/<label>`` for a plain single run; ``/lr<lr>`` ``_s<seed>`` ``_r<k>`` name the grid point."""
    parts = ([f"lr{lr_text(lr)}"] if lr is not None else []) + ([f"s{seed}"] if seed is not None else []) + (
        [f"r{repeat + 1}"] if repeats > 1 else [])
    return Path(out) / label / "_".join(parts) if parts else Path(out) / label


def plan(columns: Sequence[Column], *, out: Path, seeds: Sequence[int] | None = None,
         learning_rates: Sequence[float] | None = None, repeats: int = 1) -> list[Run]:
    """Every run, in the order to run them: repeats outermost, then the grid's k-th learning rate of every
    column (so the first pass gives every column at its first value, a comparison worth having if the sweep
    is stopped), then seeds, then columns (A B C A B C: slow host phases hit every column alike)."""
    runs: list[Run] = []
    grid = {c.label: list(c.learning_rates or learning_rates or [None]) for c in columns}
    depth = max(len(g) for g in grid.values())
    for repeat in range(repeats):
        for k in range(depth):
            for seed in (list(seeds) if seeds else [None]):
                for c in columns:
                    if k < len(grid[c.label]):
                        lr = grid[c.label][k]
                        runs.append(Run(c, lr, seed, repeat, run_dir(out, c.label, lr=lr, seed=seed, repeat=repeat,
                                                                       repeats=repeats), grid=k))
    return runs


def run_overrides(run: Run) -> list[str]:
    """The grid point's overrides: learning rate and seed (``training.seed`` and the method's sampling seed)."""
    out = list(run.column.overrides)
    if run.lr is not None:
        out.append(f"training.learning_rate={run.lr}")
    if run.seed is not None:
        out.append(f"training.seed={run.seed}")
        from owlore.methods import get_method

        seed_key = get_method(run.column.method).seed_key
        if seed_key:
            out.append(f"{seed_key}={run.seed}")
    return out


# ------------------------------------------------------------------------------------------------ processes
def child_env(malloc: bool) -> dict[str, str]:
    """The environment of a run: ours, no tokenizer threads, and (unless off or set already) ``MALLOC_ENV``."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": os.environ.get("TOKENIZERS_PARALLELISM", "false")}
    return {**MALLOC_ENV, **env} if malloc else env


SECTIONS = ("model", "data", "eval", "memory", "parallel", "vision", "pruning")


@dataclass(frozen=True)
class Fingerprint:
    """What a run *is*: every setting of its resolved configuration (after includes, overlays and overrides,
    without the output folder), each section's defaults, and a sha256 of the data files it reads.

    ``run.json`` keeps ``settings`` and ``files``; a rerun is the same run when every setting matches, where an
    option that did not exist when the run was made counts as matching while it is at its default (options are
    added off, so the earlier run behaved as the default does). A changed value, a changed default, task file or
    data set makes a different run; a reworded comment or a moved folder does not. The model's weights are named,
    not hashed (517 MB)."""

    settings: dict[str, Any]
    defaults: dict[str, dict[str, Any]]
    files: str

    def matches(self, stored: Mapping[str, Any]) -> bool:
        """True when ``stored`` (a ``run.json``'s ``settings`` and ``files``) describes this run."""
        then = stored.get("settings")
        if stored.get("files") != self.files or not isinstance(then, dict) or set(then) - set(self.settings):
            return False
        for name, now in self.settings.items():
            was = then.get(name)
            if not isinstance(now, dict) or name == "training":
                if was != now:
                    return False
                continue
            if not isinstance(was, dict) or set(was) - set(now):
                return False  # a section or an option the run had is gone
            defaults = self.defaults.get(name, {})
            if any(was[k] != v if k in was else (k not in defaults or defaults[k] != v) for k, v in now.items()):
                return False
        return True


def _plain(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists, paths strings), so stored and fresh compare."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def _defaults(section: Any) -> dict[str, Any]:
    """A config section's defaults; empty when the section has no default instance (then nothing counts as new)."""
    import dataclasses

    try:
        return _plain(dataclasses.asdict(type(section)()))
    except TypeError:
        return {}


def run_fingerprint(command: Sequence[str], root: Path) -> Fingerprint | None:
    """The ``Fingerprint`` of a ``train.py`` command; None when its configuration is invalid (the run will fail
    with that message, it has no setting to compare)."""
    import dataclasses
    import hashlib

    from owlore.run.recipe import load_config

    args = list(command[2:])
    configs = [str(root / args[i + 1]) for i, a in enumerate(args) if a == "--config"]
    overrides = [a for i, a in enumerate(args) if a != "--config" and (i == 0 or args[i - 1] != "--config")]
    try:
        cfg = load_config(configs, overrides)
    except ValueError:  # a ConfigError
        return None
    sections = {**{name: getattr(cfg, name) for name in SECTIONS}, **cfg.sections}
    settings = {"method": cfg.method, "training": {k: v for k, v in cfg.training.items() if k != "output_dir"},
                **{name: dataclasses.asdict(sec) for name, sec in sections.items()}}
    h = hashlib.sha256()
    for f in [cfg.data.train, *cfg.eval.answers.values(), *cfg.eval.perplexity.values()]:
        path = Path(f) if Path(f).is_absolute() else root / f
        if path.is_file():
            h.update(path.read_bytes())
    return Fingerprint(_plain(settings), {name: _defaults(sec) for name, sec in sections.items()},
                       h.hexdigest()[:16])


def same_run(info: Mapping[str, Any], command: Sequence[str], fingerprint: Fingerprint | None = None) -> bool:
    """True when ``info`` (a ``run.json``) describes the run of ``command``: the same settings and data when both
    sides have them (an override that restates a value, a pin added to a sweep, a moved folder leave the run as
    it was), else exactly the same command (the interpreter aside)."""
    if fingerprint is not None and isinstance(info.get("settings"), dict):
        return fingerprint.matches(info)
    return info.get("command") == list(command[1:])


def done(out_dir: Path, command: Sequence[str], fingerprint: Fingerprint | None = None) -> bool:
    """True when ``out_dir`` holds a record of this run (``same_run``): a rerun can skip it."""
    meta, record = Path(out_dir) / RUN_FILE, Path(out_dir) / RECORD
    if not (meta.is_file() and record.is_file()):
        return False
    try:
        info = json.loads(meta.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(info, dict) and same_run(info, command, fingerprint)


def run_process(cmd: Sequence[str], out_dir: Path, *, cwd: Path, timeout: float | None = None,
                env: Mapping[str, str] | None = None, who: str = "bench.py",
                fingerprint: Fingerprint | None = None) -> tuple[int, str]:
    """Run one ``train.py`` process with its logs in ``out_dir`` (``train.log``, ``train.stderr``) after deleting
    a record left by an earlier run; write ``run.json`` (the command, the exit code); return the exit code (124
    when ``timeout`` killed it) and the stderr tail."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / RECORD).unlink(missing_ok=True)  # never read a stale record from an earlier run
    (out_dir / RUN_FILE).unlink(missing_ok=True)
    with (out_dir / "train.log").open("w") as out, (out_dir / "train.stderr").open("w") as err:
        try:
            rc = subprocess.run(list(cmd), stdout=out, stderr=err, cwd=cwd, env=None if env is None else dict(env),
                                timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            err.write(f"\n{who}: killed after {timeout:.0f} s (--timeout)\n")
            rc = 124
    from owlore.run.fileio import atomic_write

    info: dict[str, Any] = {"command": list(cmd[1:]), "returncode": rc}
    if fingerprint is not None:
        info |= {"settings": fingerprint.settings, "files": fingerprint.files}
    atomic_write(out_dir / RUN_FILE, lambda tmp: Path(tmp).write_text(json.dumps(info, indent=1)))
    return rc, tail((out_dir / "train.stderr").read_text(errors="replace"))


def tail(text: str, lines: int = 15, chars: int = 2000) -> str:
    """The last ``lines`` lines (at most ``chars`` characters) of a log, where the error usually is."""
    out = "\n".join(text.rstrip().splitlines()[-lines:])
    return out[-chars:]


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON file, or None when it is missing or cut off."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
