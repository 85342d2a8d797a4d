"""Training DSpark drafters: ``from hf_dspark.trainer import DSparkTrainer, DSparkTrainingArguments``.

The pipeline behind ``hf-dspark prepare-data`` -> ``build-cache`` -> ``train`` (docs/training.md):

* ``DSparkTrainingArguments`` / ``DSparkTrainer``: a ``TrainingArguments`` dataclass and a
  ``Trainer`` subclass that overrides ``compute_loss`` and ``log``;
* ``OnlineDataset`` (target features computed on the fly) and ``CachedFeatureDataset`` /
  ``FeatureCaches`` (memory-mapped shards written by ``build-cache``), batched by
  ``DSparkDataCollator``;
* ``target_features``: the target pass whose hidden states feed the drafter;
* ``load_target_parts`` / ``TargetParts``: the target's embedding and LM head alone, all that
  training from a cache needs of it.

Names are imported on first use, so ``hf-dspark prepare-data`` does not pay for ``Trainer``.
"""

from __future__ import annotations

import importlib

from hf_dspark.deprecation import moved_names

_EXPORTS = {
    "DSparkTrainer": "dspark_trainer",
    "load_trained_drafter": "dspark_trainer",
    "trainable_parameter_count": "dspark_trainer",
    "DSparkTrainingArguments": "training_args",
    "CachedFeatureDataset": "data",
    "DSparkDataCollator": "data",
    "FeatureCaches": "data",
    "OnlineDataset": "data",
    "choose_draft_vocab": "data",
    "load_cache_manifest": "data",
    "read_data_rows": "data",
    "target_features": "feature_cache",
    "TargetParts": "target_parts",
    "load_target_parts": "target_parts",
}
# Reading prompts moved to hf_dspark.data (the commands read prompts too): old names warn for one release.
_moved = moved_names(__name__, dict.fromkeys(("holdout_split", "load_prompts"), "hf_dspark.data"))

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        return _moved(name)  # a name that moved (with a FutureWarning), else AttributeError
    value = getattr(importlib.import_module(f"hf_dspark.trainer.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
