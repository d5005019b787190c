"""OwLore: outlier-weighted layerwise sampled low-rank fine-tuning (arXiv 2405.18380), HF-native.

Library only: no argparse, no prints, no global state. Entry points are ``train.py`` and ``eval/*.py``.
"""

from owlore.calibration import CalibrationSpec, OutlierCache, calibration_batches, outlier_ratios_from_spec
from owlore.config import ConfigError, OwLoreConfig
from owlore.layers import find_decoder_layers, set_layers_trainable
from owlore.optim import GaLoreAdamW, adamw_update, create_galore_optimizer, make_param_groups
from owlore.outliers import compute_outlier_ratios
from owlore.sampler import LayerSampler

__version__ = "0.1.0"


def __getattr__(name: str):
    # The Trainer integration imports transformers.Trainer (~8 s); load it only when asked for.
    if name in ("OwLoreCallback",):
        from owlore.callback import OwLoreCallback

        return OwLoreCallback
    if name in ("install_active_gradient_sync", "ActiveGradientReducer"):
        from owlore import distributed

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
