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
:mod:`hf_dspark.speculators_format`); ``hf-dspark export --format deepspec|speculators`` goes back.
Without converting, ``hf_dspark.load_drafter(DIR)`` (and every ``--draft`` option) reads the
original folder directly.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .errors import HfDSparkError
from .loading import detect_checkpoint_format, read_config_dict, resolve_checkpoint

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
    from .export import export_drafter

    if source_format not in SOURCE_FORMATS:
        raise ValueError(f"--from {source_format!r} is not supported; choose one of {SOURCE_FORMATS}")
    folder = resolve_checkpoint(source)
    found = detect_checkpoint_format(read_config_dict(folder), f"--draft {source}")
    if found != source_format:
        raise HfDSparkError(
            f"{source} is a{'n' if found[0] in 'aeiouh' else ''} {found} checkpoint, not {source_format}; "
            f"pass --from {found}" if found in SOURCE_FORMATS else
            f"{source} is already in hf-dspark's layout; use `hf-dspark export --format hub` to re-export it"
        )
    return export_drafter(folder, output, format="hub", target_model_name=target_model_name, overwrite=overwrite,
                          license=license)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--from", dest="source_format", required=True, choices=SOURCE_FORMATS,
                        help="Format of the checkpoint: deepspec (DeepSpec's save_pretrained, e.g. "
                             "deepseek-ai/dspark_qwen3_4b_block7) or speculators (speculators_model_type 'dspark').")
    parser.add_argument("source", metavar="DIR_OR_ID", help="Checkpoint folder or Hub id.")
    parser.add_argument("--output", required=True, metavar="OUT", help="Folder to write (must be new or empty).")
    parser.add_argument("--target-name", default=None, metavar="HUB_ID",
                        help="The target's Hub id (model card base_model), for checkpoints that do not record it "
                             "(DeepSpec's), e.g. Qwen/Qwen3-4B.")
    parser.add_argument("--license", default=None, help="Hub license id for the card (use the target's license).")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing conversion in --output.")


def run(args: argparse.Namespace) -> int:
    try:
        out = convert_checkpoint(args.source, args.output, args.source_format, target_model_name=args.target_name,
                                 overwrite=args.overwrite, license=args.license)
    except (HfDSparkError, FileExistsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"converted {args.source} ({args.source_format}) -> {out} (hf-dspark hub layout)")
    return 0


__all__ = ["SOURCE_FORMATS", "convert_checkpoint", "add_arguments", "run"]
