"""``hf-dspark export`` and ``hf-dspark push``: write a drafter in one of the export layouts, upload one."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hf_dspark.checkpoints.export import CARD_INPUTS_FILE, EXPORT_FORMATS, export_drafter, human_size, push_drafter
from hf_dspark.checkpoints.model_card import DEFAULT_LICENSE
from hf_dspark.commands import _args


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--draft", required=True, metavar="DIR_OR_ID",
                        help="Trained drafter folder (draft.save_pretrained) or the Hub id of an exported drafter.")
    parser.add_argument("--output", required=True, metavar="OUT", help="Folder to write (must be new or empty).")
    parser.add_argument("--format", default="hub", choices=EXPORT_FORMATS,
                        help="hub: transformers / Hub repository (default); deepspec: DeepSpec's layout; vllm / sglang: "
                             "engine-native layout; speculators: vLLM speculators' DSpark format.")
    parser.add_argument("--eval-json", nargs="+", default=None, metavar="FILE",
                        help="`hf-dspark eval` results to put on the model card (hub).")
    parser.add_argument("--serving-json", nargs="+", default=None, metavar="FILE",
                        help="`hf-dspark bench-batch` / `bench-serve` results for the card's batched-serving section (hub).")
    parser.add_argument("--recipe", default=None, metavar="COMMAND", help="Training command shown on the card (hub).")
    parser.add_argument("--license", default=None,
                        help=f"Hub license id for the card (default {DEFAULT_LICENSE}; use your target's license).")
    parser.add_argument("--repo-id", default=None, metavar="ORG/NAME", help="Hub id used in the card's usage snippet.")
    parser.add_argument("--target", default=None, metavar="DIR_OR_ID",
                        help="Target weights: read for a vLLM / speculators export of a reduced-vocabulary drafter, "
                             "and stored as embed_tokens / lm_head by a deepspec export.")
    parser.add_argument("--target-name", default=None, metavar="HUB_ID",
                        help="The target's Hub id, for drafters that do not record it (DeepSpec checkpoints).")
    parser.add_argument("--expand-draft-vocab", action="store_true",
                        help="SGLang: export a reduced-vocabulary drafter over the full vocabulary (see docs/serving.md).")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing export in --output.")
    parser.add_argument("--ngram-lookup", type=_args.non_negative_int, default=None, metavar="N",
                        help="hub: turn on n-gram rounds in the exported generation_config.json (copy up to N tokens "
                             "after an earlier match of the last tokens instead of drafting; 0 = off; "
                             "default: keep the drafter's setting).")


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


def add_push_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--draft", required=True, metavar="OUT", help="Folder written by `hf-dspark export`.")
    parser.add_argument("--repo", required=True, metavar="ORG/NAME", help="Hub model repository (created if needed).")
    parser.add_argument("--private", action="store_true", help="Create the repository as private.")
    parser.add_argument("--dry-run", action="store_true", help="List what would be uploaded; no network access.")
    parser.add_argument("--commit-message", default=None, help="Commit message of the upload.")


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
