"""`hf-dspark convert`: turn a DeepSpec or speculators DSpark checkpoint into our Hub layout.

The output is what ``hf-dspark export --format hub`` writes (``config.json`` with ``auto_map``,
``model.safetensors``, the remote-code files, ``generation_config.json``, a model card), so that
a user with only ``transformers`` installed runs::

    draft = AutoModel.from_pretrained(OUT, trust_remote_code=True)
    out = target.generate(**inputs, assistant_model=draft)

Usage::

    hf-dspark convert --from deepspec dspark_qwen3_4b_block7/ --output qwen3-4b-dspark/ --target-name Qwen/Qwen3-4B
    hf-dspark convert --from speculators my-speculator/ --output my-dspark/

The tensors are copied bit for bit (DeepSpec) or mapped exactly (speculators, see
:mod:`hf_dspark.checkpoints.speculators_format`); ``hf-dspark export --format deepspec|speculators`` goes back.
Without converting, ``hf_dspark.load_drafter(DIR)`` (and every ``--draft`` option) reads the
original folder directly.
"""

from __future__ import annotations

import os
from pathlib import Path

from hf_dspark.errors import CheckpointError, DSparkConfigError
from hf_dspark.checkpoints.loading import detect_checkpoint_format, read_config_dict, resolve_checkpoint

SOURCE_FORMATS = ("deepspec", "speculators")


def convert_checkpoint(
    source: str | os.PathLike,
    output: str | os.PathLike,
    source_format: str,
    target_model_name: str | None = None,
    overwrite: bool = False,
    license: str | None = None,
) -> Path:
    """Convert the ``source_format`` checkpoint at ``source`` into our Hub layout at ``output``."""
    from hf_dspark.checkpoints.export import export_drafter

    if source_format not in SOURCE_FORMATS:
        raise DSparkConfigError(f"--from {source_format!r} is not supported; choose one of {SOURCE_FORMATS}")
    folder = resolve_checkpoint(source)
    found = detect_checkpoint_format(read_config_dict(folder), f"--draft {source}")
    if found != source_format:
        raise CheckpointError(
            f"{source} is a{'n' if found[0] in 'aeiouh' else ''} {found} checkpoint, not {source_format}; "
            f"pass --from {found}" if found in SOURCE_FORMATS else
            f"{source} is already in hf-dspark's layout; use `hf-dspark export --format hub` to re-export it"
        )
    return export_drafter(folder, output, format="hub", target_model_name=target_model_name, overwrite=overwrite,
                          license=license)


__all__ = ["SOURCE_FORMATS", "convert_checkpoint"]
