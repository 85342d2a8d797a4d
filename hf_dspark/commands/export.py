"""``hf-dspark export`` and ``hf-dspark push``: write a drafter in one of the export layouts, upload one."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from hf_dspark.checkpoints.export import CARD_INPUTS_FILE, EXPORT_FORMATS, export_drafter, human_size, push_drafter
from hf_dspark.checkpoints.model_card import DEFAULT_LICENSE
from hf_dspark.commands import _args
from hf_dspark.commands.arguments import (
    DrafterArguments, OutputArguments, TargetArguments, add_dataclass_arguments, flag,
)


@dataclass
class ExportArguments:
    """What goes into the export."""

    format: str = flag("hub", choices=EXPORT_FORMATS,
                       help="hub: transformers / Hub repository (default); deepspec: DeepSpec's layout; vllm / sglang: "
                            "engine-native layout; speculators: vLLM speculators' DSpark format")
    eval_json: list[str] | None = flag(nargs="+", metavar="FILE",
                                       help="`hf-dspark eval` results to put on the model card (hub)")
    serving_json: list[str] | None = flag(
        nargs="+", metavar="FILE",
        help="`hf-dspark bench-batch` / `bench-serve` results for the card's batched-serving section (hub)")
    recipe: str | None = flag(metavar="COMMAND", help="training command shown on the card (hub)")
    license: str | None = flag(help=f"Hub license id for the card (default {DEFAULT_LICENSE}; use the target's license)")
    repo_id: str | None = flag(metavar="ORG/NAME", help="Hub id used in the card's usage snippet")
    expand_draft_vocab: bool = flag(
        False, action="store_true",
        help="SGLang: export a reduced-vocabulary drafter over the full vocabulary (see docs/formats.md)")


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataclass_arguments(parser, DrafterArguments, ("draft", "ngram_lookup"), required=("draft",), overrides={
        "draft": {"metavar": "DIR_OR_ID", "help": "trained drafter folder (draft.save_pretrained) or the Hub id of "
                                                  "an exported drafter"},
        "ngram_lookup": {"type": _args.non_negative_int, "metavar": "N",
                         "help": "hub: turn on n-gram rounds in the exported generation_config.json (copy up to N "
                                 "tokens after an earlier match of the last tokens instead of drafting; 0 = off; "
                                 "default: keep the drafter's setting)"}})
    add_dataclass_arguments(parser, ExportArguments)
    add_dataclass_arguments(parser, TargetArguments, ("target", "target_name"), overrides={
        "target": {"metavar": "DIR_OR_ID", "help": "target weights: read for a vLLM / speculators export of a "
                                                   "reduced-vocabulary drafter, and stored as embed_tokens / lm_head "
                                                   "by a deepspec export"}})
    add_dataclass_arguments(parser, OutputArguments, ("output", "overwrite"), required=("output",), overrides={
        "output": {"metavar": "OUT", "help": "folder to write (must be new or empty)"},
        "overwrite": {"help": "replace an existing export in --output"}})


def run_export(args: argparse.Namespace) -> int:
    # errors propagate to hf_dspark.cli.main, which prints them as one `hf-dspark export: error:` line
    out = export_drafter(
        args.draft, args.output, format=args.format, eval_json=args.eval_json, recipe=args.recipe,
        license=args.license, repo_id=args.repo_id, target=args.target,
        expand_draft_vocab=args.expand_draft_vocab, overwrite=args.overwrite,
        ngram_lookup_tokens=args.ngram_lookup, target_model_name=args.target_name,
        serving_json=args.serving_json,
    )
    print(f"exported {args.draft} ({args.format}) -> {out}")
    for path in sorted(out.iterdir()):
        print(f"  {path.name:32s} {human_size(path.stat().st_size):>10s}")
    return 0


@dataclass
class PushArguments:
    """The upload."""

    repo: str = flag(metavar="ORG/NAME", help="Hub model repository (created if needed)")
    private: bool = flag(False, action="store_true", help="create the repository as private")
    dry_run: bool = flag(False, action="store_true", help="list what would be uploaded; no network access")
    commit_message: str | None = flag(help="commit message of the upload")


def add_push_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataclass_arguments(parser, DrafterArguments, ("draft",), required=("draft",), overrides={
        "draft": {"metavar": "OUT", "help": "folder written by `hf-dspark export`"}})
    add_dataclass_arguments(parser, PushArguments, required=("repo",))


def run_push(args: argparse.Namespace) -> int:
    result = push_drafter(args.draft, args.repo, private=args.private, dry_run=args.dry_run,
                          commit_message=args.commit_message)
    card = Path(args.draft) / CARD_INPUTS_FILE
    if json.loads((Path(args.draft) / "config.json").read_text()).get("model_type") == "dspark" and not (
        card.is_file() and "weights_sha256" in json.loads(card.read_text())
    ):
        print(f"Warning: {args.draft} records no sha256 of its weights, so nobody can check them after the upload; "
              "export it again with `hf-dspark export` to record them.", file=sys.stderr)
    if args.dry_run:
        visibility = "private" if args.private else "public"
        print(f"dry run: would upload {len(result)} files to https://huggingface.co/{args.repo} ({visibility}):")
        for name, size in result:
            print(f"  {name:32s} {human_size(size):>10s}")
        print(f"  total {human_size(sum(size for _, size in result))}")
    else:
        print(f"uploaded {args.draft} -> {result}")
    return 0
