"""``hf-dspark convert``: a DeepSpec or speculators DSpark checkpoint in our Hub layout (see :mod:`hf_dspark.checkpoints.convert`)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from hf_dspark.checkpoints.convert import SOURCE_FORMATS, convert_checkpoint
from hf_dspark.commands.arguments import OutputArguments, TargetArguments, add_dataclass_arguments, flag
from hf_dspark.commands.export import ExportArguments


@dataclass
class ConvertArguments:
    """The checkpoint to convert."""

    source_format: str = flag(
        flags=("--from",), choices=SOURCE_FORMATS,
        help="format of the checkpoint: deepspec (DeepSpec's save_pretrained, e.g. "
             "deepseek-ai/dspark_qwen3_4b_block7) or speculators (speculators_model_type 'dspark')")
    source: str = flag(positional=True, metavar="DIR_OR_ID", help="checkpoint folder or Hub id")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataclass_arguments(parser, ConvertArguments, required=("source_format",))
    add_dataclass_arguments(parser, OutputArguments, ("output", "overwrite"), required=("output",), overrides={
        "output": {"metavar": "OUT", "help": "folder to write (must be new or empty)"},
        "overwrite": {"help": "replace an existing conversion in --output"}})
    add_dataclass_arguments(parser, TargetArguments, ("target_name",))
    add_dataclass_arguments(parser, ExportArguments, ("license",), overrides={
        "license": {"help": "Hub license id for the card (use the target's license)"}})


def run(args: argparse.Namespace) -> int:
    # errors propagate to hf_dspark.cli.main, which prints them as one `hf-dspark convert: error:` line
    out = convert_checkpoint(args.source, args.output, args.source_format, target_model_name=args.target_name,
                             overwrite=args.overwrite, license=args.license)
    print(f"converted {args.source} ({args.source_format}) -> {out} (hf-dspark hub layout)")
    return 0
