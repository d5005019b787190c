"""Checkpoints that are checked before a run continues from them.

Every checkpoint a run writes gets a manifest, ``owlore_manifest.json``, written last and atomically: each file's
size (and a SHA-256 for files up to ``HASH_LIMIT``; hashing a 7B model's weights and optimizer state would cost
minutes per save), the method and its settings. So:

* a checkpoint without a manifest was interrupted while it was being saved (or predates manifests);
* a truncated or replaced file no longer matches its size or hash;
* ``resume_from_checkpoint=last`` takes the newest checkpoint that verifies and says which newer ones it skipped;
* resuming with another method or other settings (γ, rank, interval ...) than the checkpoint's is refused with
  both values, unless ``training.resume_allow_changes=true`` (then each change is logged): an OwLore checkpoint
  resumed as LISA with γ=2 would otherwise restore OwLore's active layers and record γ=2.

The Trainer deletes old checkpoints (``save_total_limit``) before the new one's manifest exists; with a limit of
1 a crash in that window leaves no verified checkpoint. Keep ``save_total_limit >= 2`` where that matters.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from owlore.errors import UsageError
from owlore.run.fileio import atomic_write

logger = logging.getLogger(__name__)

MANIFEST_FILE = "owlore_manifest.json"
HASH_LIMIT = 64 * 2**20
"""Files up to this size are hashed as well as sized (trainer state, layer state, RNG, scheduler, small models)."""
IGNORED_SETTINGS = frozenset({"cache_dir"})
"""Keys whose change cannot change what training does (where a cache lives)."""


class CheckpointError(UsageError):
    """A checkpoint that cannot be resumed as asked: unverified, or trained with other settings."""

    kind = "checkpoint error"


def run_settings(method: str, sections: dict[str, Any]) -> dict[str, Any]:
    """The method and its sections as plain JSON values (what a resume must match)."""
    plain = {name: dataclasses.asdict(s) if dataclasses.is_dataclass(s) else s for name, s in sections.items()}
    return {"method": method, "sections": json.loads(json.dumps(plain, default=str))}


def write_manifest(checkpoint: str | Path, settings: dict[str, Any], global_step: int) -> Path:
    """List every file of ``checkpoint`` (size, and hash up to ``HASH_LIMIT``), then write the manifest last."""
    root = Path(checkpoint)
    files = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != MANIFEST_FILE and not p.name.endswith(".tmp"):
            entry: dict[str, Any] = {"size": p.stat().st_size}
            if entry["size"] <= HASH_LIMIT:
                entry["sha256"] = _sha256(p)
            files[str(p.relative_to(root))] = entry
    data = {"format": 1, "global_step": global_step, **settings, "files": files}
    return atomic_write(root / MANIFEST_FILE, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=1)))


def read_manifest(checkpoint: str | Path) -> dict[str, Any] | None:
    path = Path(checkpoint) / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {"files": None}  # unreadable: verify() reports it


def verify(checkpoint: str | Path) -> list[str]:
    """Why ``checkpoint`` cannot be trusted (empty: it verifies). Each problem names the file."""
    return _problems(Path(checkpoint), read_manifest(checkpoint))


def _problems(root: Path, manifest: dict[str, Any] | None) -> list[str]:
    """``verify`` against a manifest already read (None: there is none)."""
    if manifest is None:
        return [f"{root / MANIFEST_FILE}: missing (the save was interrupted, or an older version wrote it)"]
    if not isinstance(manifest.get("files"), dict):
        return [f"{root / MANIFEST_FILE}: unreadable"]
    problems = []
    for name, entry in manifest["files"].items():
        p = root / name
        if not p.is_file():
            problems.append(f"{p}: missing")
        elif p.stat().st_size != entry["size"]:
            problems.append(f"{p}: {p.stat().st_size} bytes, the manifest says {entry['size']} (truncated?)")
        elif "sha256" in entry and _sha256(p) != entry["sha256"]:
            problems.append(f"{p}: contents changed since it was saved (SHA-256 differs)")
    return problems


def checkpoints(output_dir: str | Path) -> list[Path]:
    """``checkpoint-N`` directories of ``output_dir``, oldest first."""
    found = [p for p in Path(output_dir).glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def newest_verified(output_dir: str | Path) -> tuple[Path | None, list[tuple[Path, list[str]]]]:
    """The newest checkpoint that verifies, and the newer ones skipped with their problems."""
    skipped = []
    for ckpt in reversed(checkpoints(output_dir)):
        problems = verify(ckpt)
        if not problems:
            return ckpt, skipped
        skipped.append((ckpt, problems))
    return None, skipped


def settings_changes(manifest: dict[str, Any], settings: dict[str, Any]) -> list[str]:
    """``key: checkpoint X, now Y`` for the method and every method setting that differs."""
    if manifest.get("method") != settings["method"]:
        return [f"method: the checkpoint was trained with {manifest.get('method')!r}, this run asks for "
                f"{settings['method']!r}"]
    out = []
    old, new = manifest.get("sections", {}), settings["sections"]
    for section in sorted(set(old) | set(new)):
        a, b = old.get(section, {}), new.get(section, {})
        for key in sorted(set(a) | set(b)):
            if key not in IGNORED_SETTINGS and a.get(key) != b.get(key):
                out.append(f"{section}.{key}: checkpoint {a.get(key)!r}, now {b.get(key)!r}")
    return out


def choose_checkpoint(output_dir: str | Path, requested: str | None, settings: dict[str, Any], *,
                      allow_changes: bool = False) -> str | None:
    """The checkpoint to resume from (``requested`` = ``"last"``, a path, or None), verified and matching.

    Raises:
        CheckpointError: an explicit checkpoint that fails verification (naming the bad file), or a checkpoint
            trained with another method or settings while ``allow_changes`` is False.
    """
    if not requested:
        return None
    if requested == "last":
        chosen, skipped = newest_verified(output_dir)
        for ckpt, problems in skipped:
            logger.warning("resume: skipped %s (%s)", ckpt.name, "; ".join(problems))
        logger.info("resuming from %s", chosen or "scratch (no verified checkpoint)")
    else:
        chosen = Path(requested)
        manifest = read_manifest(chosen)
        problems = _problems(chosen, manifest)
        if problems and manifest is not None:
            raise CheckpointError(f"training.resume_from_checkpoint={requested}: does not verify:\n  - "
                                  + "\n  - ".join(problems) + "\nResume from an earlier checkpoint, or use 'last' "
                                  "(the newest one that verifies).")
        if problems:
            logger.warning("resume: %s has no %s (written before manifests existed?): its files are not verified",
                           chosen, MANIFEST_FILE)
    if chosen is None:
        return None
    if requested == "last":
        manifest = read_manifest(chosen)
    changes = settings_changes(manifest, settings) if manifest and "method" in manifest else []
    if changes and not allow_changes:
        raise CheckpointError(f"{chosen} was trained with other settings than this run's:\n  - "
                              + "\n  - ".join(changes) + "\nUse the checkpoint's settings, start a fresh run, or "
                              "set training.resume_allow_changes=true to continue with the new ones anyway.")
    for change in changes:
        logger.warning("resume with training.resume_allow_changes=true: %s", change)
    return str(chosen)


class ManifestCallback(TrainerCallback):
    """Writes each checkpoint's manifest after everything else in it (put it last among the callbacks)."""

    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = settings

    def on_save(self, args, state, control, **kwargs):
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and ckpt.is_dir():
            write_manifest(ckpt, self.settings, state.global_step)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
