"""``hf-dspark prepare-data``: load prompts and regenerate their answers with the target.

Writes to ``--output DATA_DIR``:

* ``prompts.jsonl``: the deduplicated, shuffled prompts kept (after the length
  filter), each with ``"split": "train" | "holdout"``;
* ``holdout.jsonl`` and ``train.jsonl``: regenerated rows (format in
  :mod:`hf_dspark.trainer.regenerate`); the small holdout set is generated first;
* ``data_config.json``: target name, sampling settings and counts.

Rerunning the same command resumes: finished prompts are skipped, and prompts
already assigned to a split keep it (so ``--num-prompts`` can be raised later to
add more). Rerunning with a different target or sampling settings is refused.

Default sampling: if the target's ``generation_config`` samples by default
(``do_sample=True``), its temperature / top-p / top-k are used, since that is the
distribution the target is served with; otherwise temperature 1.0 and top-p 0.95
(plain sampling from the model, lightly truncated). ``--temperature``,
``--top-p`` and ``--top-k`` override single values; ``--greedy`` decodes greedily.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hf_dspark.errors import DataError
from hf_dspark.outputs import claim_output_folder
from hf_dspark.commands.arguments import (
    OutputArguments, PromptArguments, RuntimeArguments, SamplingArguments, TargetArguments, add_config_argument,
    add_dataclass_arguments, flag, fraction, non_negative_int, positive_float, positive_int, resolve_target_dtype,
)
from hf_dspark.data import encode_prompt, holdout_split, load_prompts, resolve_chat_mode

from .regenerate import regenerate_in_process, regenerate_openai

DATA_FORMAT_VERSION = 1
FALLBACK_SAMPLING = {"do_sample": True, "temperature": 1.0, "top_p": 0.95, "top_k": None}
# Every file prepare-data writes into --output (and so may replace); an input among them is refused.
WRITTEN_FILES = ("prompts.jsonl", "prompts.jsonl.tmp", "train.jsonl", "holdout.jsonl", "data_config.json",
                 "data_config.json.tmp")
# Settings that must not change between a run and its resumption.
_RESUME_KEYS = ("target", "sampling", "max_new_tokens", "chat_template", "seed", "max_prompt_tokens")
# Settings that may change (e.g. to speed up a resumed run) but shift the answers slightly: warn only.
_WARN_KEYS = ("dtype", "generator")


@dataclass
class PrepareDataArguments:
    """How answers are generated."""

    batch_size: int = flag(16, type=positive_int, help="prompts per generate call (default 16)")
    holdout: float = flag(0.02, type=fraction, help="fraction held out for evaluation (default 0.02)")
    greedy: bool = flag(False, action="store_true", help="greedy decoding instead of sampling")
    server_url: str | None = flag(help="OpenAI-compatible server running the target (e.g. http://localhost:8000)")
    server_model: str | None = flag(help="model name to request from --server-url")
    concurrency: int = flag(8, type=positive_int, help="parallel requests to the server (default 8)")
    timeout: float = flag(120.0, type=positive_float, metavar="SECONDS",
                          help="seconds to wait for the server before a request is retried (default 120; raise it "
                               "for long answers from a slow server)")
    retries: int = flag(5, type=non_negative_int,
                        help="tries after the first for a request that timed out or failed (default 5, waiting "
                             "1, 2, 4, ... s, at most 30 s, between them)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the ``prepare-data`` options on ``parser``."""
    add_dataclass_arguments(parser, TargetArguments, ("target", "dtype", "device"), required=("target",))
    add_dataclass_arguments(
        parser, PromptArguments, ("prompts", "num_prompts", "max_new_tokens", "max_prompt_tokens", "split", "column",
                                  "strict", "chat_template"),
        required=("prompts",), defaults={"max_new_tokens": 192},
        overrides={"prompts": {"metavar": "FILE_OR_DATASET", "help": "prompt files (.jsonl/.json/.parquet), folders "
                                                                     "of them, or Hub dataset ids"},
                   "num_prompts": {"help": "use at most this many prompts"},
                   "max_new_tokens": {"help": "answer length limit (default 192)"},
                   "max_prompt_tokens": {"help": "drop prompts longer than this many tokens (default: keep all)"},
                   "chat_template": {"help": "wrap prompts in the chat template: auto (if the tokenizer has one), "
                                             "yes, no"}})
    add_dataclass_arguments(parser, SamplingArguments, ("temperature", "top_p", "top_k", "seed"), overrides={
        "temperature": {"type": positive_float, "help": "sampling temperature (default: the target's)"},
        "seed": {"help": "seed of the shuffle, the split and sampling (default 0)"}})
    add_dataclass_arguments(parser, PrepareDataArguments)
    add_dataclass_arguments(parser, OutputArguments, ("output",), required=("output",), overrides={
        "output": {"metavar": "DATA_DIR", "help": "output folder (resumed if present)"}})
    add_dataclass_arguments(parser, RuntimeArguments, ("threads", "no_progress"))
    add_config_argument(parser)


def resolve_sampling(args: argparse.Namespace, generation_config=None) -> dict[str, Any]:
    """Sampling settings from the CLI flags on top of the target's defaults (see module docstring)."""
    if args.greedy:
        if any(value is not None for value in (args.temperature, args.top_p, args.top_k)):
            raise DataError("--greedy cannot be combined with --temperature/--top-p/--top-k; drop one of them.")
        return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    sampling = dict(FALLBACK_SAMPLING)
    if generation_config is not None and getattr(generation_config, "do_sample", False):
        sampling = {
            "do_sample": True,
            "temperature": getattr(generation_config, "temperature", None) or 1.0,
            "top_p": getattr(generation_config, "top_p", None),
            "top_k": getattr(generation_config, "top_k", None),
        }
    if args.temperature is not None:
        if args.temperature <= 0:
            raise DataError(f"--temperature must be > 0 (use --greedy for greedy decoding), got {args.temperature}.")
        sampling["temperature"] = args.temperature
    if args.top_p is not None:
        if not 0 < args.top_p <= 1:
            raise DataError(f"--top-p must be in (0, 1], got {args.top_p}.")
        sampling["top_p"] = args.top_p
    if args.top_k is not None:
        sampling["top_k"] = args.top_k or None
    return sampling


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _write_prompts(path: Path, prompts: list[dict[str, Any]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        for prompt in prompts:
            handle.write(json.dumps(prompt, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _count_lines(path: Path) -> tuple[int, int]:
    rows = tokens = 0
    if path.exists():
        with path.open(encoding="utf-8") as handle:
            for line in handle:
                if line.endswith("\n") and line.strip():
                    rows += 1
                    tokens += json.loads(line)["num_answer_tokens"]
    return rows, tokens


def _check_resume(config_path: Path, settings: dict[str, Any]) -> None:
    if not config_path.exists():
        return
    previous = json.loads(config_path.read_text(encoding="utf-8"))
    for key in _WARN_KEYS:
        if key in previous and previous[key] != settings.get(key):
            print(f"Warning: {config_path.parent} was started with {key}={previous[key]!r}, resuming with "
                  f"{settings.get(key)!r}; the answers will mix both.", flush=True)
    for key in _RESUME_KEYS:
        if previous.get(key) != settings.get(key):
            raise DataError(
                f"{config_path.parent} was prepared with {key}={previous.get(key)!r}, this run asks for "
                f"{settings.get(key)!r}. Use a new --output folder, or rerun with the original settings to resume."
            )


def assign_splits(
    prompts: list[dict[str, Any]], previous: list[dict[str, Any]], fraction: float, seed: int
) -> list[dict[str, Any]]:
    """Give each prompt a ``"split"``, keeping the split of prompts listed in ``previous``."""
    known = {row["id"]: row["split"] for row in previous if "id" in row and "split" in row}
    fresh = [p for p in prompts if p["id"] not in known]
    _, holdout = holdout_split(fresh, fraction, seed)
    holdout_ids = {p["id"] for p in holdout}
    result = []
    for prompt in prompts:
        split = known.get(prompt["id"]) or ("holdout" if prompt["id"] in holdout_ids else "train")
        result.append({**prompt, "split": split})
    return result


def describe_loaded(prompts: list[dict[str, Any]], reports) -> str:
    """What was loaded: prompts kept, rows read, duplicates, and every skipped row by reason."""
    rows, duplicates = sum(r.rows_read for r in reports), sum(r.duplicates for r in reports)
    lines = [f"Loaded {len(prompts)} unique prompts from {rows} rows of {len(reports)} source(s)"
             + (f" ({duplicates} duplicate{'s' if duplicates != 1 else ''})." if duplicates else ".")]
    skipped = [report for report in reports if report.count]
    lines += [f"Warning: {report.describe()}" for report in skipped]
    if skipped:
        lines.append("Fix or remove those rows, or pass --strict to stop at the first one.")
    return "\n".join(lines)


def _load_target(args):
    """``(model or None, tokenizer, generation_config or None)`` for the requested mode."""
    from transformers import GenerationConfig

    from hf_dspark import targets

    if args.server_url:
        tokenizer = targets.load_target_tokenizer(args.target)
        try:
            generation_config = GenerationConfig.from_pretrained(targets.resolve_target_source(args.target))
        except OSError:
            generation_config = None
        return None, tokenizer, generation_config
    model, tokenizer = targets.load_target(args.target, dtype=args.dtype, device=args.device)
    args.dtype = targets.dtype_name(model)  # what ran (--dtype auto picks one), as data_config.json records it
    return model, tokenizer, model.generation_config


def run(args: argparse.Namespace) -> int:
    """Run ``prepare-data``; returns the process exit code."""
    from hf_dspark import targets

    if args.server_url and not args.server_model:
        raise DataError("--server-url needs --server-model (the model name the server serves).")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if not args.server_url:
        args.dtype = resolve_target_dtype(args.dtype, args.device)
    output = Path(args.output)
    config_path = output / "data_config.json"
    show = not args.no_progress
    resolve_sampling(args)  # refuses --greedy with sampling flags before anything loads
    # Before any work: the prompt files must not be among what this run writes, and the folder must be
    # new, empty, or an earlier prepare-data output (data_config.json predates the marker).
    claim_output_folder(output, "prepare-data", inputs=[("--prompts", source) for source in args.prompts],
                        written=WRITTEN_FILES, legacy_files=("data_config.json",), create=False)

    if args.num_prompts is not None and args.num_prompts <= 0:
        raise DataError(f"--num-prompts must be positive, got {args.num_prompts}.")
    reports = []
    prompts = load_prompts(args.prompts, split=args.split, column=args.column, seed=args.seed,
                           strict=args.strict, skipped=reports)
    print(describe_loaded(prompts, reports), flush=True)
    start = time.time()
    model, tokenizer, generation_config = _load_target(args)
    print(f"Loaded target {args.target!r} in {time.time() - start:.1f} s.", flush=True)
    chat = resolve_chat_mode(tokenizer, args.chat_template)
    sampling = resolve_sampling(args, generation_config)
    settings = {
        "format_version": DATA_FORMAT_VERSION,
        "target": targets.resolve_target_name(args.target),
        "sampling": sampling,
        "max_new_tokens": args.max_new_tokens,
        "max_prompt_tokens": args.max_prompt_tokens,
        "chat_template": chat,
        "seed": args.seed,
        "holdout_fraction": args.holdout,
        "sources": [str(s) for s in args.prompts],
        "generator": "server" if args.server_url else "in_process",
        "dtype": None if args.server_url else args.dtype,
    }
    _check_resume(config_path, settings)

    if args.max_prompt_tokens is not None:
        kept = [p for p in prompts if len(encode_prompt(tokenizer, p["turns"][0], chat)) <= args.max_prompt_tokens]
        print(f"Dropped {len(prompts) - len(kept)} prompts longer than {args.max_prompt_tokens} tokens.", flush=True)
        prompts = kept
    if args.num_prompts is not None:
        prompts = prompts[: args.num_prompts]  # after the length filter: N usable prompts
    if not prompts:
        raise DataError("No prompts left to regenerate; check --prompts, --column and --max-prompt-tokens.")
    # only now: a bad --target or prompt file leaves no folder behind
    claim_output_folder(output, "prepare-data", written=WRITTEN_FILES, legacy_files=("data_config.json",))
    prompts = assign_splits(prompts, _read_jsonl(output / "prompts.jsonl"), args.holdout, args.seed)
    _write_prompts(output / "prompts.jsonl", prompts)
    by_split = {name: [p for p in prompts if p["split"] == name] for name in ("holdout", "train")}
    settings["num_prompts"] = {name: len(rows) for name, rows in by_split.items()}
    _write_json_atomic(config_path, {**settings, "status": "running"})
    print(f"Regenerating {settings['num_prompts']} prompts into {output} ({'chat template' if chat else 'raw text'}, "
          f"sampling {sampling}).", flush=True)

    kwargs = dict(max_new_tokens=args.max_new_tokens, do_sample=sampling["do_sample"],
                  temperature=sampling["temperature"], top_p=sampling["top_p"], top_k=sampling["top_k"],
                  use_chat_template=chat, seed=args.seed, show_progress=show)
    stats = {}
    for name, split_prompts in by_split.items():
        if not split_prompts:
            continue
        path = output / f"{name}.jsonl"
        if args.server_url:
            stats[name] = regenerate_openai(args.server_url, args.server_model, tokenizer, split_prompts, path,
                                            concurrency=args.concurrency, timeout=args.timeout,
                                            max_retries=args.retries, **kwargs)
        else:
            stats[name] = regenerate_in_process(model, tokenizer, split_prompts, path,
                                                batch_size=args.batch_size, **kwargs)
        print(f"{name}: {stats[name]}", flush=True)

    counts = {}
    for name in ("train", "holdout"):
        rows, tokens = _count_lines(output / f"{name}.jsonl")
        counts[name] = {"rows": rows, "answer_tokens": tokens}
    complete = all(counts[name]["rows"] >= len(by_split[name]) for name in by_split)
    _write_json_atomic(config_path, {**settings, "counts": counts, "status": "complete" if complete else "partial"})
    print(f"Done: {counts}", flush=True)
    return 0
