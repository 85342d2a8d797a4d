"""``hf-dspark profile``: measure the target's forward latency against tokens per pass (the latency profile)."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path


from hf_dspark.decoding.latency import LatencyProfile, format_table, profile_latency
from hf_dspark.errors import DSparkConfigError, LatencyProfileError
from hf_dspark.commands import _args
from hf_dspark.commands.arguments import (
    DrafterArguments, OutputArguments, TargetArguments, add_config_argument, add_dataclass_arguments, flag,
)


@dataclass
class ProfileArguments:
    """What to measure."""

    max_tokens: int = flag(16, type=_args.positive_int, help="profile 1..N tokens per row (default 16)")
    batch_sizes: list[int] = flag([1], type=_args.positive_int, nargs="+", help="rows per pass (default 1)")
    context_length: int = flag(128, type=_args.non_negative_int, help="tokens already in the KV cache (default 128)")
    warmup: int = flag(2, type=_args.non_negative_int, help="untimed passes per point (default 2)")
    repeats: int = flag(5, type=_args.positive_int, help="timed passes per point, median kept (default 5)")
    cache_dir: str | None = flag(help="profile cache folder (default ~/.cache/hf_dspark/latency)")
    force: bool = flag(False, action="store_true", help="measure again even if a cached profile exists")
    verify_head: bool = flag(
        True, action="store_false", flags=("--no-verify-head", "--no_verify_head"),
        help="time transformers' LM head as is instead of the skinny verification layout that DSpark generation "
             "uses on CPU fp32 (see benchmarks/bench_verify_head.py)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``hf-dspark profile``."""
    add_dataclass_arguments(parser, TargetArguments, ("target", "dtype", "device"), required=("target",))
    add_dataclass_arguments(parser, ProfileArguments)
    add_dataclass_arguments(parser, DrafterArguments, ("draft",), overrides={"draft": {
        "help": "drafter folder: store the batch-1 table as its generation_config latency_table (enables the "
                "'cost' verification policy)"}})
    add_dataclass_arguments(parser, OutputArguments, ("output",),
                            overrides={"output": {"help": "also write the profile JSON to this file"}})
    add_config_argument(parser)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``hf-dspark profile``: load the target, profile it, print the table."""
    if args.max_tokens < 1:
        raise DSparkConfigError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    from hf_dspark.targets import load_target  # lazy: heavy, and owned by another module

    model, _tokenizer = load_target(args.target, dtype=_args.resolve_target_dtype(args.dtype, args.device),
                                    device=args.device)
    profile = profile_latency(
        model,
        token_counts=range(1, args.max_tokens + 1),
        batch_sizes=args.batch_sizes,
        context_length=args.context_length,
        warmup=args.warmup,
        repeats=args.repeats,
        cache_dir=args.cache_dir,
        force=args.force,
        model_name=args.target,
        verify_head=args.verify_head,
    )
    print(format_table(profile))
    if args.output:
        print(f"wrote {profile.to_json(args.output)}")
    if args.draft:
        path = attach_latency_table(args.draft, profile)
        print(f"stored the batch-1 latency table in {path}")
    return 0


def attach_latency_table(draft_dir: str | os.PathLike, profile: LatencyProfile, batch_size: int = 1) -> Path:
    """Write ``profile``'s ``batch_size`` row into the drafter's ``generation_config.json`` as
    ``latency_table`` (seconds per target pass by tokens), which the ``cost`` policy reads."""
    from transformers import GenerationConfig

    folder = Path(draft_dir)
    if not (folder / "config.json").exists():
        raise LatencyProfileError(f"--draft {folder} is not a drafter folder (no config.json)")
    if batch_size not in profile.table:
        raise LatencyProfileError(f"the profile has no batch size {batch_size}; profile with --batch-sizes {batch_size}")
    try:
        config = GenerationConfig.from_pretrained(folder)
    except OSError:
        config = GenerationConfig()
    config.latency_table = {int(n): float(t) for n, t in sorted(profile.table[batch_size].items())}
    config.latency_profile_key = profile.key
    config.save_pretrained(folder)
    return folder / "generation_config.json"
