"""``hf-dspark verify DIR``: check a drafter folder's weights against the sha256 its export recorded."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from hf_dspark.commands.arguments import add_dataclass_arguments, flag
from hf_dspark.checkpoints.verify import CONFIG_FILES, check_tensors, verify_checksums
from hf_dspark.errors import CheckpointError
from hf_dspark.models.dspark.modeling_dspark import CARD_FILE, CHECKSUMS_KEY


@dataclass
class VerifyArguments:
    """The folder to check."""

    folder: str = flag(positional=True, metavar="DIR",
                       help="drafter folder (an `hf-dspark export` or any save_pretrained)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataclass_arguments(parser, VerifyArguments)


def run(args: argparse.Namespace) -> int:
    folder = Path(args.folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder; pass a drafter folder (an `hf-dspark export` output).")
    checked = verify_checksums(folder)
    tensors = check_tensors(folder)
    for name, digest in checked.items():
        print(f"  {name:32s} sha256 {digest}  ok")
    if checked:
        configs = sum(name in CONFIG_FILES for name in checked)
        print(f"{folder}: {len(checked) - configs} weight file(s) match the sha256 recorded in {CARD_FILE}"
              + (f", and {configs} config file(s)" if configs else "") + f"; {tensors} tensors parse and are finite.")
    else:
        print(f"Warning: {folder} records no sha256 of its weights ({CARD_FILE} '{CHECKSUMS_KEY}'; `hf-dspark "
              f"export` writes it), so flipped bytes cannot be detected; {tensors} tensors parse and are finite.")
    return 0
