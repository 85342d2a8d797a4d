"""``hf-dspark convert``: a DeepSpec or speculators DSpark checkpoint in our Hub layout (see :mod:`hf_dspark.checkpoints.convert`)."""

from __future__ import annotations

import argparse

from hf_dspark.checkpoints.convert import SOURCE_FORMATS, convert_checkpoint


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
    # errors propagate to hf_dspark.cli.main, which prints them as one `hf-dspark convert: error:` line
    out = convert_checkpoint(args.source, args.output, args.source_format, target_model_name=args.target_name,
                             overwrite=args.overwrite, license=args.license)
    print(f"converted {args.source} ({args.source_format}) -> {out} (hf-dspark hub layout)")
    return 0
