"""The ``lmms_eval.models`` entry point: registers ``owlore_vlm`` (``owlore.pruning.lmms_eval_model.OwloreVLM``).

Kept apart from the model so that lmms-eval's start-up, which loads every entry point, imports only this manifest;
the model (torch, transformers) loads when a run names it.
"""

from __future__ import annotations

from lmms_eval.models.registry_v2 import ModelManifest

MANIFESTS = [ModelManifest(model_id="owlore_vlm", simple_class_path="owlore.pruning.lmms_eval_model.OwloreVLM",
                           aliases=("owlore",))]
