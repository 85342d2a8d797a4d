"""``hf-dspark eval``: acceptance length and speed-up of a drafter, measured side by side.

Usage::

    hf-dspark eval --target gemma-3-270m --draft default --prompts eval/gsm8k.jsonl eval/mt-bench.jsonl \\
        --baseline --prompt-lookup --output results.json --plots plots/
    hf-dspark eval --target T --draft DRAFT_DIR --dataset gsm8k humaneval --max-prompts 50 --baseline
    hf-dspark eval --target T --draft DRAFT_DIR --compare-draft DFLASH_DIR --compare-name dflash --prompts F.jsonl

Prompt files hold one ``{"turns": [...]}`` object per line (only the first turn is used; by
default it is encoded as the drafter's training prompts were: through the target's chat template or
as raw text, see ``--chat-template``); each file is a
*prompt set* named by its file stem. ``--dataset`` fetches a known benchmark from the Hub instead
(see :data:`DATASETS`).

For every prompt, every requested method runs in this process on the same token ids, one after
the other: plain ``generate`` (``--baseline``), the drafter, each ``--compare-draft`` drafter and
transformers' prompt lookup decoding (``--prompt-lookup``). Each run goes through
:func:`measure_generate`, so every number comes from one code path; sampling reseeds torch with
the same per-prompt seed before each method.

The JSON written to ``--output`` holds ``settings``, the macro average over prompt sets at the
top level (``num_prompts``, ``new_tokens`` and ``seconds`` are totals; every other number is the
unweighted mean of the per-set values, ``speedup`` included), and ``datasets[stem]`` with each
set's summary and its per-prompt ``prompts`` records. Summaries are recomputed from the records,
and the file is rewritten atomically after every prompt: an interrupted run keeps what it
measured, and rerunning the same command resumes, skipping finished prompts.

Per set: ``mean_accepted_length`` (tau, bonus token included: accepted tokens / rounds over the
set), ``per_position_acceptance`` (accepted / attempted at each draft position; null where never
attempted), ``tokens_per_second`` (new tokens / wall seconds), and with the matching flags
``baseline_tokens_per_second``, ``speedup``, ``outputs_match_baseline`` (greedy: every output
identical; sampling: null), ``prompt_lookup_tokens_per_second``, ``prompt_lookup_speedup`` and
(sampling with top-k and top-p) ``baseline_fused_tokens_per_second``: plain ``generate`` with
:class:`~hf_dspark.models.dspark.generation_dspark.FusedTopKTopPWarper` as its logits processor. ``speedup`` is
against plain ``generate`` as a user calls it; ``speedup_vs_best_plain`` against the faster of the two
plain runs (``best_plain_tokens_per_second``), and is the figure the README and model cards quote;
``compare[name]`` (with ``dspark_tau_ratio``: tau of the drafter under test over this one's).
``mean_accepted_length_ci90`` and ``dspark_tau_ratio_ci90`` are 90% bootstrap intervals over the
set's prompts (per set only): with a few prompts, and above all when sampling, they are wide.
Prompt sets whose name contains ``gsm8k`` also get ``quality``: the final
number of each answer, compared by exact match between drafter and baseline and, for rows with an
``answer`` field, against the reference.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hf_dspark.errors import DataError, HfDSparkError
from hf_dspark.commands import _args
from hf_dspark.commands.arguments import (
    DrafterArguments, OutputArguments, PromptArguments, RuntimeArguments, SamplingArguments, TargetArguments,
    add_config_argument, add_dataclass_arguments, flag,
)
from hf_dspark.evaluation.measure import (
    Measurement,
    apply_policy,
    drafter_record,
    fused_plain_kwargs,
    greedy_divergence,
    measure_generate,
    timing_record,
)
from hf_dspark.evaluation.plots import write_plots
from hf_dspark.evaluation.prompt_sets import (
    DATASETS,
    QUALITY_KEYWORD,
    PromptSet,
    extract_final_number,
    load_dataset_prompts,
    read_prompt_file,
)
from hf_dspark.evaluation.summary import DRAFT_CHECKSUMS_KEY, DSPARK, EvalResults, merge_results, write_json_atomic


@dataclass
class EvalArguments:
    """What is measured besides the drafter(s) under test."""

    dataset: list[str] = flag([], nargs="+", choices=list(DATASETS), metavar="NAME",
                              help=f"benchmarks fetched from the Hub: {', '.join(DATASETS)}")
    baseline: bool = flag(False, action="store_true", help="also run plain generate (speed-up, output check)")
    prompt_lookup: bool = flag(False, action="store_true", help="also run transformers' prompt lookup decoding")
    prompt_lookup_tokens: int = flag(10, type=_args.positive_int,
                                     help="prompt_lookup_num_tokens for --prompt-lookup (default 10)")
    compare_draft: list[str] = flag([], action="append", metavar="DIR",
                                    help="another drafter (e.g. the DFlash baseline) measured on the same prompts; "
                                         "repeatable")
    compare_name: list[str] = flag([], action="append", metavar="NAME",
                                   help="name of each --compare-draft in the results (default: its folder name)")
    plots: str | None = flag(metavar="DIR", help="write PNG plots to this folder")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataclass_arguments(parser, TargetArguments, ("target", "dtype", "device"), required=("target",))
    add_dataclass_arguments(
        parser, DrafterArguments, ("draft", "policy", "ngram_lookup"), required=("draft",),
        overrides={"draft": {"action": "append", "metavar": "DRAFT",
                             "help": "drafter folder / Hub id, or 'default' (the shipped drafter of the target); "
                                     "repeat to measure more drafters: extra ones are reported under "
                                     "compare[folder name]"},
                   "policy": {"help": "verification policy of the drafter(s) under test (default: the saved one); "
                                      "'cost' without a saved latency table profiles the target first; "
                                      "--compare-draft drafters keep their saved policy"},
                   "ngram_lookup": {"help": "drafter(s) under test also copy up to N tokens after an earlier match "
                                            "of the last 2-3 tokens instead of drafting when one exists "
                                            "(ngram_lookup_tokens; 0 = off; auto: lengths from the target's "
                                            "measured cost curve; default: the saved setting); --compare-draft "
                                            "drafters keep their saved setting"}})
    add_dataclass_arguments(
        parser, PromptArguments, ("prompts", "max_prompts", "strict", "chat_template", "max_new_tokens"),
        defaults={"prompts": [], "max_new_tokens": 256},
        overrides={"prompts": {"help": "JSON Lines prompt files of {'turns': [...]} rows; each is a set named by "
                                       "its file stem"},
                   "max_new_tokens": {"help": "new tokens per prompt (default 256)"}})
    add_dataclass_arguments(parser, SamplingArguments, ("temperature", "top_k", "top_p", "seed"),
                            defaults={"temperature": 0.0},
                            overrides={"temperature": {"help": "0 (default) decodes greedily"},
                                       "seed": {"help": "prompt i of a set is sampled with seed + i"}})
    add_dataclass_arguments(parser, EvalArguments)
    add_dataclass_arguments(parser, OutputArguments, ("output", "overwrite"), overrides={
        "output": {"help": "results JSON (rewritten after every prompt; resumed if present)"},
        "overwrite": {"help": "start --output afresh instead of resuming it"}})
    add_dataclass_arguments(parser, RuntimeArguments, ("no_progress",))
    add_config_argument(parser)


def _hardware(device: torch.device) -> str:
    from hf_dspark.evaluation.measure import cpu_model_name

    text = f"{cpu_model_name()} ({os.cpu_count()} CPUs)"
    if device.type == "cuda":
        text += f", {torch.cuda.get_device_name(device)}"
    return text


def _generation_kwargs(args) -> dict[str, Any]:
    if args.temperature < 0:
        raise DataError(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}.")
    if args.temperature == 0:
        return {"max_new_tokens": args.max_new_tokens, "do_sample": False}
    # Explicit values, so that sampling is what was asked rather than the target's saved defaults.
    return {"max_new_tokens": args.max_new_tokens, "do_sample": True, "temperature": args.temperature,
            "top_k": args.top_k if args.top_k is not None else 0,
            "top_p": args.top_p if args.top_p is not None else 1.0}


def _load_drafter(source: str, target, device, dtype):
    from hf_dspark.checkpoints.loading import load_drafter  # hf-dspark, DeepSpec and speculators folders alike
    from hf_dspark.errors import CheckpointError, CorruptFileError

    try:
        return load_drafter(source, dtype=dtype, device=device, target=target)
    except CorruptFileError:
        raise  # says which file and what to do
    except (OSError, CheckpointError) as error:
        raise DataError(f"Could not load the drafter {source!r}: {error}. Pass a drafter folder (written by "
                        "`hf-dspark train` / save_pretrained, a DeepSpec or a speculators DSpark checkpoint), "
                        "a Hub id, or 'default'.") from error


def _prompt_sets(args) -> list[PromptSet]:
    if not args.prompts and not args.dataset:
        raise DataError("Nothing to evaluate: pass --prompts FILE [FILE ...] and/or --dataset NAME [NAME ...].")
    sets = [read_prompt_file(p, strict=getattr(args, "strict", False)) for p in args.prompts]
    for prompt_set in sets:
        if prompt_set.skipped is not None and prompt_set.skipped.count:
            print(f"Warning: {prompt_set.skipped.describe()} Fix or remove those rows, or pass --strict to stop at "
                  "the first one.", file=sys.stderr, flush=True)
    sets += [load_dataset_prompts(name, args.max_prompts) for name in args.dataset]
    keys = [s.key for s in sets]
    duplicated = sorted({k for k in keys if keys.count(k) > 1})
    if duplicated:
        raise DataError(f"Several prompt sets are named {', '.join(duplicated)} (the file stem); rename the files.")
    if args.max_prompts is not None:
        if args.max_prompts <= 0:
            raise DataError(f"--max-prompts must be positive, got {args.max_prompts}.")
        for s in sets:
            s.rows = s.rows[: args.max_prompts]
    return sets


def _settings(args, drafts: list[tuple[str, str, bool]], device, dtype) -> dict[str, Any]:
    import transformers

    sampling = args.temperature > 0
    return {
        "target": args.target,
        "draft": drafts[0][1],
        "compare": {name: source for name, source, _ in drafts[1:]},
        "policy": args.policy or "saved",
        "ngram_lookup_tokens": _ngram_setting(args, drafts[0][1]),
        "temperature": args.temperature,
        "top_k": (args.top_k if args.top_k is not None else 0) if sampling else None,
        "top_p": (args.top_p if args.top_p is not None else 1.0) if sampling else None,
        "max_new_tokens": args.max_new_tokens,
        "chat_template": getattr(args, "chat_template", "auto"),
        "seed": args.seed,
        "baseline": bool(args.baseline),
        "prompt_lookup_num_tokens": args.prompt_lookup_tokens if args.prompt_lookup else None,
        "dtype": str(dtype).removeprefix("torch."),
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "hardware": _hardware(device),
        DRAFT_CHECKSUMS_KEY: {name: drafter_checksum(source) for name, source, _ in drafts},
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def drafter_checksum(source: str) -> str | None:
    """sha256 over a local drafter folder's config and weight files (``None`` for a Hub id), so a results
    file resumes only with the very drafter it measured."""
    import hashlib

    from hf_dspark.models.dspark.modeling_dspark import file_sha256

    folder = Path(source)
    if not folder.is_dir():
        return None
    names = sorted(p.name for p in folder.iterdir() if p.name in ("config.json", "generation_config.json")
                   or p.name.endswith((".safetensors", ".safetensors.index.json", ".bin")))
    digest = hashlib.sha256()
    for name in names:
        digest.update(f"{name}:{file_sha256(folder / name)}\n".encode())
    return digest.hexdigest()


def _ngram_setting(args, source: str) -> int | str:
    """The n-gram lookup length the drafter under test will use: ``--ngram-lookup``, else its saved setting."""
    value = getattr(args, "ngram_lookup", None)
    if value == "auto":
        return value
    if value is not None:
        if value < 0:
            raise DataError(f"--ngram-lookup must be >= 0 (0 = off), got {value}.")
        return int(value)
    from transformers import GenerationConfig

    try:
        saved = GenerationConfig.from_pretrained(source)
    except (OSError, ValueError):  # no generation_config.json: the drafter's default, off
        return 0
    value = getattr(saved, "ngram_lookup_tokens", 0) or 0
    return value if value == "auto" else int(value)


def _named_drafts(args) -> list[tuple[str, str, bool]]:
    """``(name, source, under_test)`` of every drafter: ``--draft`` ones take ``--policy``, compare ones do not."""
    from hf_dspark.targets import resolve_draft

    if len(args.compare_name) > len(args.compare_draft):
        raise DataError(f"{len(args.compare_name)} --compare-name for {len(args.compare_draft)} --compare-draft; "
                        "give at most one name per compare drafter.")
    drafts = [(DSPARK, resolve_draft(args.draft[0], args.target), True)]
    for source in args.draft[1:]:
        drafts.append((Path(source.rstrip("/")).name, resolve_draft(source, args.target), True))
    for i, source in enumerate(args.compare_draft):
        name = args.compare_name[i] if i < len(args.compare_name) else Path(source.rstrip("/")).name
        drafts.append((name, resolve_draft(source, args.target), False))
    names = [n for n, _, _ in drafts]
    if len(set(names)) != len(names):
        raise DataError(f"Drafter names must differ, got {names}; name them with --compare-name.")
    return drafts


def measure_prompt(target, tokenizer, drafters: dict[str, Any], row: dict[str, Any], index: int, args,
                   want_answers: bool) -> dict[str, Any]:
    """Every requested method on one prompt; returns its record (timings, drafter stats, output checks).

    ``args.use_chat`` (resolved once by :func:`evaluate_drafters`) says whether the chat template encodes it.
    """
    from hf_dspark.data.encoding import encode_prompt

    input_ids = torch.tensor([encode_prompt(tokenizer, row["turns"][0], args.use_chat)])
    kwargs = _generation_kwargs(args)
    seed = args.seed + index
    greedy = not kwargs["do_sample"]
    record: dict[str, Any] = {"index": index, "id": row["id"], "seed": seed, "prompt_tokens": int(input_ids.shape[1])}
    baseline = measure_generate(target, input_ids, kwargs, seed) if args.baseline else None
    outputs: dict[str, Measurement] = {}
    if baseline is not None:
        record["baseline"] = timing_record(baseline)
        fused_kwargs = fused_plain_kwargs(kwargs)
        if fused_kwargs is not None:
            record["baseline_fused"] = timing_record(measure_generate(target, input_ids, fused_kwargs, seed))
    for name, draft in drafters.items():
        outputs[name] = measure_generate(target, input_ids, kwargs, seed, assistant_model=draft)
        entry = drafter_record(outputs[name])
        if baseline is not None:
            entry["matches_baseline"] = torch.equal(outputs[name].output_ids, baseline.output_ids) if greedy else None
            if greedy and not entry["matches_baseline"]:
                entry["divergence"] = greedy_divergence(target, input_ids.shape[1], baseline.output_ids,
                                                        outputs[name].output_ids)
        if name == DSPARK:
            record[DSPARK] = entry
        else:
            record.setdefault("compare", {})[name] = entry
    if args.prompt_lookup:
        lookup = measure_generate(target, input_ids, kwargs, seed, prompt_lookup_num_tokens=args.prompt_lookup_tokens)
        record["prompt_lookup"] = timing_record(lookup)
        if baseline is not None:
            record["prompt_lookup"]["matches_baseline"] = (
                torch.equal(lookup.output_ids, baseline.output_ids) if greedy else None)
            if greedy and not record["prompt_lookup"]["matches_baseline"]:
                # transformers' own assisted decoding parts from plain generate in low precision too: measured
                # the same way, it shows which divergences come from multi-token passes rather than from DSpark
                record["prompt_lookup"]["divergence"] = greedy_divergence(target, input_ids.shape[1],
                                                                          baseline.output_ids, lookup.output_ids)
    n = input_ids.shape[1]
    record["output"] = tokenizer.decode(outputs[DSPARK].output_ids[0, n:], skip_special_tokens=True)
    if want_answers:
        record["answers"] = {DSPARK: extract_final_number(record["output"]),
                             "reference": extract_final_number(row.get("answer"))}
        if baseline is not None:
            text = tokenizer.decode(baseline.output_ids[0, n:], skip_special_tokens=True)
            record["answers"]["baseline"] = extract_final_number(text)
    return record


def _warm_up(target, tokenizer, drafters, row, args) -> None:
    """One short untimed pass of every method, so first-call overheads stay out of the numbers."""
    short = argparse.Namespace(**{**vars(args), "max_new_tokens": min(8, args.max_new_tokens)})
    measure_prompt(target, tokenizer, drafters, row, 0, short, want_answers=False)


def _fmt(value, spec=".2f", suffix="") -> str:
    if value is None or isinstance(value, bool):
        return "-" if value is None else str(value)
    return f"{value:{spec}}{suffix}"


def print_summary(results: dict[str, Any], out=None) -> None:
    """A table of tau, tokens/s and speed-up per prompt set (compare drafters and prompt lookup indented);
    ``out`` defaults to the ``sys.stdout`` of the call (not of the import: a test may have swapped it since)."""
    out = out if out is not None else sys.stdout
    print(f"{'prompt set':<24}{'prompts':>8}{'tau':>7}{'tok/s':>9}{'best plain':>12}{'speed-up':>10}"
          f"{'vs best':>9}{'lossless':>10}", file=out)
    for key, entry in [*results["datasets"].items(), ("macro average", results)]:
        lines = [(key[:23], entry, entry.get("num_prompts"), entry.get("best_plain_tokens_per_second"))]
        lines += [(f"  {name[:21]}", comp, None, None) for name, comp in entry.get("compare", {}).items()]
        if entry.get("prompt_lookup_tokens_per_second") is not None:
            lookup = {"tokens_per_second": entry["prompt_lookup_tokens_per_second"],
                      "speedup": entry.get("prompt_lookup_speedup"),
                      "speedup_vs_best_plain": entry.get("prompt_lookup_speedup_vs_best_plain"),
                      "outputs_match_baseline": entry.get("prompt_lookup_outputs_match_baseline")}
            lines.append(("  prompt lookup", lookup, None, None))
        for label, e, count, base in lines:
            print(f"{label:<24}{_fmt(count, 'd'):>8}{_fmt(e.get('mean_accepted_length')):>7}"
                  f"{_fmt(e.get('tokens_per_second'), '.1f'):>9}{_fmt(base, '.1f'):>12}"
                  f"{_fmt(e.get('speedup'), '.2f', 'x'):>10}{_fmt(e.get('speedup_vs_best_plain'), '.2f', 'x'):>9}"
                  f"{_fmt(e.get('outputs_match_baseline')):>10}", file=out)


def evaluate_drafters(args) -> dict[str, Any]:
    """Run the evaluation described by parsed ``args``; returns the results dict (also written to --output)."""
    from tqdm.auto import tqdm

    from hf_dspark.targets import load_target

    if args.max_new_tokens < 1:
        raise DataError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}.")
    from hf_dspark.targets import dtype_name, resolve_device

    device = resolve_device(args.device)
    requested = _args.resolve_target_dtype(args.dtype, device)
    drafts = _named_drafts(args)
    sets = _prompt_sets(args)

    def open_results(dtype):
        return EvalResults(Path(args.output) if args.output else None, _settings(args, drafts, device, dtype),
                           overwrite=args.overwrite)

    if requested != "auto":  # the result file is checked before the target loads
        results = open_results(getattr(torch, requested))
    target, tokenizer = load_target(args.target, dtype=requested, device=device)
    dtype = getattr(torch, dtype_name(target))
    if requested == "auto":  # the dtype is known once it has been measured on the loaded target
        results = open_results(dtype)
    drafters = {}
    for name, source, under_test in drafts:
        drafters[name] = _load_drafter(source, target, device, dtype)
        if under_test:
            if getattr(args, "ngram_lookup", None) is not None:
                drafters[name].generation_config.ngram_lookup_tokens = args.ngram_lookup
            apply_policy(drafters[name], args.policy, target)
    from hf_dspark.data.encoding import resolve_chat_mode

    trained_with = getattr(drafters[drafts[0][0]].config, "prompt_chat_template", None)
    args.use_chat = resolve_chat_mode(tokenizer, args.chat_template, trained_with)

    _warm_up(target, tokenizer, drafters, sets[0].rows[0], args)
    for prompt_set in sets:
        finished = results.finished(prompt_set)
        todo = [(i, row) for i, row in enumerate(prompt_set.rows) if (i, row["id"]) not in finished]
        bar = tqdm(total=len(prompt_set.rows), initial=len(prompt_set.rows) - len(todo), desc=prompt_set.key,
                   unit="prompt", disable=args.no_progress, dynamic_ncols=True)
        for index, row in todo:
            record = measure_prompt(target, tokenizer, drafters, row, index, args,
                                    want_answers=QUALITY_KEYWORD in prompt_set.key.lower())
            results.add(prompt_set.key, prompt_set.source, record)
            results.write()
            bar.set_postfix(tau=f"{record[DSPARK]['accepted_tokens'] / max(1, record[DSPARK]['rounds']):.2f}")
            bar.update()
        bar.close()
    data = results.write()
    if args.plots:
        write_plots(data, args.plots)
    return data


def run(args) -> int:
    try:
        results = evaluate_drafters(args)
    except HfDSparkError as error:
        print(f"hf-dspark eval: error: {error}", file=sys.stderr)
        return 2
    print_summary(results)
    if args.output:
        print(f"results: {args.output}")
    if args.plots:
        print(f"plots: {args.plots}")
    return 0


@dataclass
class MergeEvalArguments:
    """The files to pool."""

    inputs: list[str] = flag(positional=True, nargs="+", metavar="RESULTS_JSON", help="`hf-dspark eval` files to pool")


def add_merge_eval_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataclass_arguments(parser, MergeEvalArguments)
    add_dataclass_arguments(parser, OutputArguments, ("output",), required=("output",),
                            overrides={"output": {"help": "merged results JSON to write"}})
    add_dataclass_arguments(parser, EvalArguments, ("plots",),
                            overrides={"plots": {"help": "write PNG plots of the merged results"}})


def run_merge_eval(args) -> int:
    try:
        loaded = []
        for path in args.inputs:
            try:
                loaded.append(json.loads(Path(path).read_text(encoding="utf-8")))
            except (OSError, json.JSONDecodeError) as error:
                raise DataError(f"cannot read {path}: {error}") from error
        data = merge_results(loaded)
    except HfDSparkError as error:
        print(f"hf-dspark merge-eval: error: {error}", file=sys.stderr)
        return 2
    write_json_atomic(Path(args.output), data)
    if args.plots:
        write_plots(data, args.plots)
    print_summary(data)
    print(f"results: {args.output}")
    return 0
