"""Drafter checkpoints in every format: loading, exporting, converting, checking, model cards.

- :mod:`~hf_dspark.checkpoints.loading`: :func:`load_drafter` reads hf-dspark, DeepSpec (Qwen3, Gemma 4)
  and speculators folders;
- :mod:`~hf_dspark.checkpoints.export`: the ``hub``, ``deepspec``, ``vllm``, ``sglang`` and ``speculators``
  layouts, and uploads;
- :mod:`~hf_dspark.checkpoints.convert`: a DeepSpec or speculators folder in our Hub layout;
- :mod:`~hf_dspark.checkpoints.speculators_format`: the config and tensor mapping of speculators' DSpark;
- :mod:`~hf_dspark.checkpoints.verify`: weight sha256 checks;
- :mod:`~hf_dspark.checkpoints.model_card`: the model card written with an export.
"""

from hf_dspark.checkpoints.loading import load_drafter

__all__ = ["load_drafter"]
