"""OwLore: outlier-weighted layerwise sampled low-rank fine-tuning (arXiv 2405.18380), HF-native.

Library only: no argparse, no prints, no global state (one exception: the import hook below that keeps the module
paths of before the package layout working, with a warning). Entry points are ``train.py``, ``eval/*.py`` and the
``python -m`` modules (``__main__.py``, e.g. ``owlore.memory``); ``cli.py`` holds their shared error path. Those
are the only modules with argparse or prints (``tests/test_imports.py`` checks).

Packages: ``optim`` (GaLoreAdamW and its state), ``layerwise`` (outlier ratios, samplers, the layer-switching
callback), ``methods`` (every training method and what it supports), ``run`` (config, checks, run directory,
resume), ``parallel`` (DDP replacement, FSDP2, DeepSpeed), ``memory`` (memory options and the estimator),
``vision`` (LLaVA building and alignment), ``pruning`` (visual-token pruning), ``evaluation``, ``data``,
``benchmark``.
"""

import importlib.abc
import importlib.util
import sys
import warnings

from owlore.layerwise.calibration import (
    CalibrationSpec,
    OutlierCache,
    calibration_batches,
    outlier_ratios_from_spec,
)
from owlore.layerwise.layers import find_decoder_layers, set_layers_trainable
from owlore.layerwise.outliers import compute_outlier_ratios
from owlore.layerwise.sampler import LayerSampler
from owlore.optim import GaLoreAdamW, adamw_update, create_galore_optimizer, make_param_groups
from owlore.run.config import ConfigError, OwLoreConfig

__version__ = "0.1.0"

MOVED = {  # module paths before 0.1's one-package-per-concern layout -> where they live now (aliases until 0.2)
    "owlore.adamw": "owlore.optim.adamw", "owlore.projector": "owlore.optim.projector",
    "owlore.quant_state": "owlore.optim.quant_state", "owlore.factored": "owlore.optim.factored",
    "owlore.param_groups": "owlore.optim.param_groups", "owlore.optim_state": "owlore.optim.state",
    "owlore.host": "owlore.optim.host", "owlore.outliers": "owlore.layerwise.outliers",
    "owlore.calibration": "owlore.layerwise.calibration", "owlore.sampler": "owlore.layerwise.sampler",
    "owlore.layers": "owlore.layerwise.layers", "owlore.callback": "owlore.layerwise.callback",
    "owlore.checkpointing": "owlore.layerwise.checkpointing", "owlore.plotting": "owlore.layerwise.plotting",
    "owlore.config": "owlore.run.config", "owlore.recipe": "owlore.run.recipe", "owlore.typecheck": "owlore.run.typecheck",
    "owlore.run_dir": "owlore.run.output_dir", "owlore.resume": "owlore.run.resume",
    "owlore.interrupt": "owlore.run.interrupt", "owlore.sources": "owlore.run.sources",
    "owlore.fileio": "owlore.run.fileio", "owlore.metrics": "owlore.run.metrics",
    "owlore.deepspeed_config": "owlore.parallel.deepspeed_config", "owlore.distributed": "owlore.parallel.distributed",
    "owlore.fsdp": "owlore.parallel.fsdp", "owlore.sharded": "owlore.parallel.sharded",
    "owlore.vlm": "owlore.vision.llava", "owlore.vision_align": "owlore.vision.align",
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """``import owlore.callback`` (an old path) gives the module at its new path, with a DeprecationWarning."""

    def find_spec(self, fullname, path, target=None):
        return importlib.util.spec_from_loader(fullname, self) if fullname in MOVED else None

    def create_module(self, spec):
        warnings.warn(f"{spec.name} moved to {MOVED[spec.name]}; the old path goes in 0.2", DeprecationWarning,
                      stacklevel=2)
        return importlib.import_module(MOVED[spec.name])

    def exec_module(self, module) -> None:
        pass


if not any(isinstance(f, _MovedModules) for f in sys.meta_path):
    sys.meta_path.append(_MovedModules())


def __getattr__(name: str):
    # The Trainer integration imports transformers.Trainer (~8 s); load it only when asked for.
    if name in ("OwLoreCallback",):
        from owlore.layerwise.callback import OwLoreCallback

        return OwLoreCallback
    if name in ("install_active_gradient_sync", "ActiveGradientReducer"):
        from owlore.parallel import distributed

        return getattr(distributed, name)
    if name in ("OwLoreTrainer", "create_owlore_optimizer", "KeepOptimizerTrainer"):
        from owlore import trainer

        return getattr(trainer, name)
    if name == "VisualTokenPruner":
        from owlore.pruning import VisualTokenPruner

        return VisualTokenPruner
    raise AttributeError(f"module 'owlore' has no attribute {name!r}")


__all__ = [
    "ActiveGradientReducer",
    "CalibrationSpec",
    "ConfigError",
    "GaLoreAdamW",
    "KeepOptimizerTrainer",
    "LayerSampler",
    "OutlierCache",
    "OwLoreCallback",
    "OwLoreConfig",
    "OwLoreTrainer",
    "VisualTokenPruner",
    "adamw_update",
    "calibration_batches",
    "compute_outlier_ratios",
    "create_galore_optimizer",
    "create_owlore_optimizer",
    "find_decoder_layers",
    "install_active_gradient_sync",
    "make_param_groups",
    "outlier_ratios_from_spec",
    "set_layers_trainable",
]
