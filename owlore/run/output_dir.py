"""An output directory belongs to one run: a second run never silently replaces the first one's results.

A directory "holds a run" when it has a finished record (``owlore_record.json``), a saved model (``final/``) or
checkpoints (``checkpoint-*``). A new run into it must say what it wants: continue (``resume_from_checkpoint``),
replace (``training.overwrite_output_dir=true``, which lists what it deletes), or go elsewhere (a fresh path, e.g.
``training.output_dir=outputs/x-${now}``). A running job's record is written under ``owlore_record.partial.json``
and only a finished run writes ``owlore_record.json`` (atomically), so a crash cannot truncate an earlier record.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

logger = logging.getLogger(__name__)

RECORD_FILE = "owlore_record.json"
PARTIAL_RECORD_FILE = "owlore_record.partial.json"
LAYER_STATE_FILE = "owlore_state.pt"
"""The layer-switching callback's checkpoint file (sampler/schedule state, active layers, history)."""
BYPRODUCTS = ("layers.png", "runs", PARTIAL_RECORD_FILE)
"""Also removed when a run is replaced (plots, TensorBoard events), but not by themselves a finished run."""


def previous_results(out_dir: str | Path) -> list[str]:
    """Names in ``out_dir`` that belong to an earlier run (record, model, checkpoints), sorted."""
    out = Path(out_dir)
    if not out.is_dir():
        return []
    found = [p.name for p in out.iterdir()
             if p.name in (RECORD_FILE, "final") or (p.is_dir() and p.name.startswith("checkpoint-"))]
    return sorted(found)


def claim_output_dir(out_dir: str | Path, *, resume: bool, overwrite: bool, main_process: bool = True) -> list[str]:
    """Make ``out_dir`` this run's, before any weights load; return what was deleted (``overwrite`` only).

    Raises:
        FileExistsError: the directory holds another run and neither ``resume`` nor ``overwrite`` was asked for
            (the message names what is there and the three ways forward).
    """
    found = previous_results(out_dir)
    if not found or resume:
        return []
    if not overwrite:
        shown = ", ".join(found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
        raise FileExistsError(
            f"training.output_dir={str(out_dir)!r} holds another run's results ({shown}); nothing was changed. "
            "Continue it with resume_from_checkpoint=last, replace it with training.overwrite_output_dir=true, "
            f"or write elsewhere, e.g. training.output_dir={str(out_dir).rstrip('/')}-${{now}}")
    out = Path(out_dir)
    removed = [*found, *(name for name in BYPRODUCTS if (out / name).exists())]
    if main_process:  # one process deletes; the others only read the same answer
        for name in removed:
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        logger.warning("training.overwrite_output_dir=true: replaced the earlier run in %s (deleted %s)", out,
                       ", ".join(removed))
    return removed
