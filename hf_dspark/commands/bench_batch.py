"""`hf-dspark bench-batch`: the batched speculative engine vs plain batched ``generate``, side by side.

For every concurrency ``C`` the same prompts are decoded, in one process, by each method of
``--methods`` (default: all four):

* ``plain``: transformers' batched ``generate`` (left-padded batches of ``C`` prompts), given the
  engine's exact speed-ups that do not draft: the LM head's skinny layout for 2-8 rows on CPU fp32
  (``generation_dspark.activate_verify_head``, faster than transformers' layout for a few rows; see
  docs/experiments.md, "The verification head on CPU"; ``--plain-head transformers`` turns it off) and,
  when sampling with top-k and top-p, the fused warper (the same distribution at a fraction of the cost);
* ``full``: :class:`~hf_dspark.decoding.batched.BatchedSpeculativeGenerator` with ``C`` requests in flight,
  every request verifying its whole draft block;
* ``scheduler``: the same engine with the hardware-aware prefix scheduler (Algorithm 1) fed
  with the round's time model (:class:`~hf_dspark.decoding.round_cost.RoundCost`: the target's measured
  latency curve, ``profile_latency``, cached on disk, plus the drafter's measured time);
* ``async``: the engine with the asynchronous scheduler (budget from predictions two rounds old);
* ``plain_engine`` (only when asked for): the engine without drafting, i.e. plain
  continuous-batching decoding, the baseline of ``hf-dspark bench-serve``;
* ``oracle`` (only when asked for, greedy, with ``plain``): the engine verifying exactly the draft
  tokens the target accepts, read from plain's outputs (:mod:`hf_dspark.decoding.oracle`). It runs
  twice: drafting every row without an n-gram copy (``oracle_draft_everywhere_seconds``), then
  drafting only where the first run's drafts were accepted (the reported time): the ceiling of every
  scheduler with this drafter on this machine.

The speculative runs use n-gram rounds when ``--ngram-lookup N`` is given (default: the
drafter's saved ``ngram_lookup_tokens``). With ``--repeats R`` every method runs ``R`` times per
concurrency, in a rotated order, and the median is reported (with the spread).

It prints total tokens/s, mean per-request tokens/s, mean draft tokens verified per request
per round, mean accepted length, request-rounds that skipped the drafter and the ratios to
``plain``; ``--output`` writes them as JSON (after every concurrency, so a long run leaves its
finished part behind; ``--resume`` skips the concurrencies already in that file) and ``--plot``
draws the verified draft tokens per request and the throughput against concurrency.

Example::

    hf-dspark bench-batch --target gemma-3-270m --draft runs/drafter --concurrency 1 4 8 16 \\
        --num-prompts 32 --max-new-tokens 128 --output bench.json --plot bench.png
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from hf_dspark.decoding.batched import BatchedSpeculativeGenerator
from hf_dspark.models.dspark.generation_config_dspark import DSparkGenerationConfig
from hf_dspark.errors import DSparkConfigError
from hf_dspark.commands import _args
from hf_dspark.commands.arguments import (
    DrafterArguments, OutputArguments, PromptArguments, RuntimeArguments, SamplingArguments, TargetArguments,
    add_config_argument, add_dataclass_arguments, flag,
)
from hf_dspark.evaluation.measure import fused_plain_kwargs
from hf_dspark.models.dspark.generation_dspark import activate_verify_head

METHODS = ("plain", "full", "scheduler", "async")
EXTRA_METHODS = ("plain_engine", "oracle")
ENGINE_SCHEDULERS = {"full": "full", "scheduler": "cost", "async": "async", "plain_engine": "plain",
                     "oracle": "oracle"}
SPECULATIVE_STATS = ("mean_verified_draft_tokens", "mean_accepted_length", "rounds", "request_rounds",
                     "ngram_request_rounds", "drafted_request_rounds", "draft_skipped_request_rounds",
                     "draft_skipped_rounds", "probe_request_rounds", "draft_seconds", "verify_seconds",
                     "model_seconds", "modelled_round_seconds", "prefill_seconds", "prefill_forwards",
                     "oracle_draft_everywhere_seconds")

# Used when no --prompts file is given: short, varied requests.
BUILTIN_PROMPTS = [
    "Write a Python function that returns the n-th Fibonacci number.",
    "Explain why the sky is blue in two sentences.",
    "A train travels 120 km in 1.5 hours. What is its average speed? Think step by step.",
    "List three differences between lists and tuples in Python.",
    "Summarize the plot of a heist movie in one paragraph.",
    "What is the derivative of x^3 + 2x? Show the steps.",
    "Give me a recipe for a simple tomato soup.",
    "Translate 'good morning, how are you?' into French and Spanish.",
    "Write a haiku about autumn leaves.",
    "How many minutes are there in a week? Explain the calculation.",
    "Describe how a hash map works.",
    "Write a SQL query that counts orders per customer.",
    "What are the main causes of inflation?",
    "Write a short story that starts with 'The door was already open.'",
    "Sort the numbers 7, 2, 9, 4 in increasing order and explain the method.",
    "What is the capital of Australia, and why is it not Sydney?",
]


# ----------------------------------------------------------------------------- measurement
class _HeadOwner:
    """What the plain baseline ties the LM head's fast layout to (released when the run ends)."""


def plain_batched(target, prompts, concurrency, max_new_tokens, sampling, eos, pad_id, fast_head: bool = True) -> dict:
    """transformers' batched generate over left-padded chunks of ``concurrency`` prompts (with the
    fast LM-head layout unless ``fast_head`` is False)."""
    owner = _HeadOwner()  # the layout lasts while this local lives, i.e. until the run ends
    release = activate_verify_head(target, owner) if fast_head else None
    try:
        return _plain_chunks(target, prompts, concurrency, max_new_tokens, sampling, eos, pad_id)
    finally:
        if release is not None:
            release()


def _plain_chunks(target, prompts, concurrency, max_new_tokens, sampling, eos, pad_id) -> dict:
    outputs, per_request, start = [], [], time.perf_counter()
    device = next(target.parameters()).device
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=sampling["do_sample"], pad_token_id=pad_id)
    if eos is not None:
        kwargs["eos_token_id"] = eos
    if sampling["do_sample"]:
        kwargs.update(temperature=sampling["temperature"], top_k=sampling["top_k"] or 0, top_p=sampling["top_p"] or 1.0)
        kwargs = fused_plain_kwargs(kwargs) or kwargs  # the fastest exact warper for top-k + top-p, as the engine's
    eos_set = set() if eos is None else ({eos} if isinstance(eos, int) else set(eos))
    for i in range(0, len(prompts), concurrency):
        chunk = prompts[i : i + concurrency]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, p in enumerate(chunk):
            ids[row, width - len(p) :] = torch.tensor(p)
            mask[row, width - len(p) :] = 1
        chunk_start = time.perf_counter()
        with torch.no_grad():
            out = target.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
        seconds = time.perf_counter() - chunk_start
        for row in out[:, width:].tolist():
            tokens = []
            for token in row:
                tokens.append(token)
                if token in eos_set:
                    break
            outputs.append(tokens)
            per_request.append(len(tokens) / seconds if seconds > 0 else 0.0)
    seconds = time.perf_counter() - start
    return dict(outputs=outputs, seconds=seconds, per_request=per_request)


def _speculative(target, draft, prompts, concurrency, max_new_tokens, sampling, eos, scheduler, profile,
                 ngram_lookup_tokens: int = 0, round_cost=None, references=None, draft_outcomes=None) -> dict:
    settings = {key: value for key, value in sampling.items() if key != "seed"}
    config = DSparkGenerationConfig(verification_policy=scheduler, ngram_lookup_tokens=ngram_lookup_tokens, **settings)
    if scheduler == "oracle":  # scheduled by the references: no cost model
        engine = BatchedSpeculativeGenerator(target, draft, config, max_batch_size=concurrency, seed=sampling.get("seed"))
        engine.policy.known_outcomes = draft_outcomes
    else:
        engine = BatchedSpeculativeGenerator(target, draft, config, latency_profile=profile, max_batch_size=concurrency,
                                             round_cost=round_cost, seed=sampling.get("seed"))
    if scheduler in ("cost", "async"):
        engine._cost()  # measured (drafter time, padding discount) before the clock starts
    start = time.perf_counter()
    if references is None:
        ids = [engine.add_request(p, max_new_tokens, eos) for p in prompts]
    else:
        ids = [engine.add_request(p, max_new_tokens, eos, reference=r) for p, r in zip(prompts, references)]
    while engine.has_unfinished():
        engine.step()
    seconds = time.perf_counter() - start
    requests = [engine.pop(i) for i in ids]
    engine.close()  # the plain baseline that follows runs transformers' LM head unchanged
    stats = engine.stats
    request_rounds = max(1, stats["request_rounds"])
    out = dict(
        outputs=[r.output_ids for r in requests],
        seconds=seconds,
        per_request=[r.tokens_per_second() for r in requests],
        mean_verified_draft_tokens=stats["verified_draft_tokens"] / request_rounds,
        mean_accepted_length=(stats["accepted_draft_tokens"] + stats["request_rounds"]) / request_rounds,
        round_cost=engine.round_cost,
    )
    if scheduler == "oracle":
        out["draft_outcomes"] = engine.policy.draft_outcomes
    out.update({key: stats[key] for key in SPECULATIVE_STATS if key in stats})
    return out


def _run_method(method, target, draft, prompts, concurrency, max_new_tokens, sampling, seed, eos, pad_token_id,
                latency_profile, ngram_lookup_tokens, round_cost, plain_fast_head: bool = True, references=None):
    if method == "plain":
        torch.manual_seed(seed)
        return plain_batched(target, prompts, concurrency, max_new_tokens, sampling, eos, pad_token_id,
                             plain_fast_head)
    args = (target, draft, prompts, concurrency, max_new_tokens, dict(sampling, seed=seed), eos,
            ENGINE_SCHEDULERS[method], latency_profile, 0 if method == "plain_engine" else ngram_lookup_tokens,
            round_cost)
    if method != "oracle":
        return _speculative(*args)
    everywhere = _speculative(*args, references=references)  # records where drafts were accepted
    out = _speculative(*args, references=references, draft_outcomes=everywhere["draft_outcomes"])
    out["oracle_draft_everywhere_seconds"] = everywhere["seconds"]
    return out


def _median_run(runs: list[dict]) -> dict:
    """The run with the median time, plus the spread of tokens/s over all runs."""
    ordered = sorted(runs, key=lambda r: r["seconds"])
    chosen = dict(ordered[(len(ordered) - 1) // 2])
    tokens = sum(len(o) for o in chosen["outputs"])
    chosen["tokens_per_second_runs"] = [tokens / r["seconds"] for r in runs if r["seconds"] > 0]
    return chosen


def benchmark_batch(target, draft, prompts: Sequence[Sequence[int]], concurrency: Sequence[int], max_new_tokens: int,
                    latency_profile, do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None,
                    top_p: float | None = None, seed: int = 0, eos_token_id=None, pad_token_id: int = 0,
                    progress: bool = True, ngram_lookup_tokens: int = 0, methods: Sequence[str] = METHODS,
                    repeats: int = 1, done: Sequence[dict] = (), on_concurrency=None,
                    plain_fast_head: bool = True) -> dict:
    """Run ``methods`` for every concurrency; returns the JSON-ready results.

    ``done`` are result rows of an earlier, interrupted run with the same settings: their
    concurrencies are skipped and the rows kept. ``on_concurrency(results)`` is called after every
    concurrency (to write partial results). ``plain_fast_head=False`` runs the ``plain`` baseline with
    transformers' own LM head (see the module docstring)."""
    prompts = [list(map(int, p)) for p in prompts]
    eos = eos_token_id if eos_token_id is not None else getattr(target.generation_config, "eos_token_id", None)
    sampling = dict(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p)
    methods = [m for m in METHODS + EXTRA_METHODS if m in methods]
    check_oracle_request(methods, do_sample)
    results = dict(
        settings=dict(concurrency=list(concurrency), num_prompts=len(prompts), max_new_tokens=max_new_tokens,
                      do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                      block_size=draft.config.block_size, device=str(next(target.parameters()).device),
                      ngram_lookup_tokens=ngram_lookup_tokens, methods=methods, repeats=repeats,
                      threads=torch.get_num_threads(), draft_dtype=str(next(draft.parameters()).dtype).removeprefix("torch."),
                      latency_profile=getattr(latency_profile, "key", None),
                      plain_head="fast" if plain_fast_head else "transformers"),
        results=list(done),
    )
    finished = {r["concurrency"] for r in done}
    # warm-up (first-call allocations, kernel selection), not timed
    plain_batched(target, prompts[:1], 1, 4, sampling, eos, pad_token_id, plain_fast_head)
    _speculative(target, draft, prompts[:1], 1, 4, dict(sampling, seed=seed), eos, "full", latency_profile)

    for c in concurrency:
        if c in finished:
            continue
        runs = {m: [] for m in methods}
        round_cost = None
        rotated = [m for m in methods if m != "oracle"]  # the oracle reads plain's outputs: it runs last
        for repeat in range(repeats):
            shift = repeat % len(rotated)
            for method in rotated[shift:] + rotated[:shift] + methods[len(rotated):]:  # rotate between repeats
                references = runs["plain"][-1]["outputs"] if method == "oracle" else None
                r = _run_method(method, target, draft, prompts, c, max_new_tokens, sampling, seed, eos, pad_token_id,
                                latency_profile, ngram_lookup_tokens, round_cost, plain_fast_head, references)
                round_cost = r.get("round_cost") or round_cost  # measured once per concurrency, then shared
                runs[method].append(r)
        chosen = {m: _median_run(runs[m]) for m in methods}
        rows = []
        for method in methods:
            r = chosen[method]
            tokens = sum(len(o) for o in r["outputs"])
            row = dict(
                concurrency=c, method=method, requests=len(prompts), total_tokens=tokens, seconds=r["seconds"],
                tokens_per_second=tokens / r["seconds"] if r["seconds"] > 0 else 0.0,
                tokens_per_second_runs=r["tokens_per_second_runs"],
                per_request_tokens_per_second=sum(r["per_request"]) / max(1, len(r["per_request"])),
            )
            row.update({key: r[key] for key in SPECULATIVE_STATS if key in r})
            base = chosen.get("plain")
            if method != "plain" and base is not None:
                base_tps = sum(len(o) for o in base["outputs"]) / base["seconds"] if base["seconds"] > 0 else 0.0
                base_per_request = sum(base["per_request"]) / max(1, len(base["per_request"]))
                row["throughput_ratio_vs_plain"] = row["tokens_per_second"] / base_tps if base_tps else None
                everywhere = row.get("oracle_draft_everywhere_seconds")
                if everywhere and base_tps:
                    row["oracle_draft_everywhere_ratio_vs_plain"] = tokens / everywhere / base_tps
                row["per_request_ratio_vs_plain"] = (
                    row["per_request_tokens_per_second"] / base_per_request if base_per_request else None
                )
                if not do_sample:  # greedy: how many requests agree token for token with plain batched generate
                    same = sum(a == b for a, b in zip(r["outputs"], base["outputs"]))
                    row["greedy_agreement_with_plain"] = same / len(prompts)
            if method == "async" and "scheduler" in chosen:
                sched = chosen["scheduler"]
                sched_tps = sum(len(o) for o in sched["outputs"]) / sched["seconds"] if sched["seconds"] > 0 else 0.0
                row["throughput_ratio_vs_scheduler"] = row["tokens_per_second"] / sched_tps if sched_tps else None
            rows.append(row)
            if progress:
                print(_format_row(row), flush=True)
        results["results"].extend(rows)
        if on_concurrency is not None:
            on_concurrency(results)
    return results


def check_oracle_request(methods: Sequence[str], do_sample: bool) -> None:
    """``oracle`` schedules by plain's greedy outputs: it needs ``plain`` in the run and greedy decoding."""
    if "oracle" not in methods:
        return
    if do_sample:
        raise DSparkConfigError("--methods oracle measures greedy decoding only (sampled tokens are not known in "
                                "advance); drop --do-sample or drop oracle")
    if "plain" not in methods:
        raise DSparkConfigError("--methods oracle reads the plain run's outputs; add plain to --methods")


def _format_row(row: dict) -> str:
    text = (f"C={row['concurrency']:>3}  {row['method']:<12}  {row['tokens_per_second']:9.1f} tok/s  "
            f"per-request {row['per_request_tokens_per_second']:8.1f} tok/s")
    if len(row.get("tokens_per_second_runs", ())) > 1:
        runs = row["tokens_per_second_runs"]
        text += f" (runs {min(runs):.1f}-{max(runs):.1f})"
    if "mean_verified_draft_tokens" in row:
        text += f"  verified/req {row['mean_verified_draft_tokens']:.2f}  tau {row['mean_accepted_length']:.2f}"
        text += f"  skipped drafter {row.get('draft_skipped_request_rounds', 0)}/{row.get('request_rounds', 0)} req-rounds"
        if row.get("model_seconds"):
            text += f"  time model x{row['modelled_round_seconds'] / row['model_seconds']:.2f}"
    if row.get("throughput_ratio_vs_plain") is not None:
        text += (f"  x{row['throughput_ratio_vs_plain']:.2f} total, x{row['per_request_ratio_vs_plain'] or 0:.2f} "
                 "per-request")
    if row.get("throughput_ratio_vs_scheduler") is not None:
        text += f"  x{row['throughput_ratio_vs_scheduler']:.2f} vs scheduler"
    if row.get("oracle_draft_everywhere_ratio_vs_plain") is not None:
        text += f"  (drafting every row: x{row['oracle_draft_everywhere_ratio_vs_plain']:.2f})"
    return text


COLORS = {"plain": "tab:gray", "plain_engine": "black", "full": "tab:blue", "scheduler": "tab:orange",
          "async": "tab:green", "oracle": "tab:purple"}
STYLES = {"plain": "^:", "plain_engine": "v:", "full": "o--", "scheduler": "s-", "async": "D-", "oracle": "*:"}


def plot_results(results: dict, path: str | Path) -> Path:
    """Mean verified draft tokens per request (left) and total tokens/s (right) vs concurrency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["results"]
    present = [m for m in METHODS + EXTRA_METHODS if any(r["method"] == m for r in rows)]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for method in present:
        points = [(r["concurrency"], r["mean_verified_draft_tokens"]) for r in rows
                  if r["method"] == method and "mean_verified_draft_tokens" in r]
        if points and method != "plain_engine":
            left.plot(*zip(*points), STYLES[method], color=COLORS[method], label=method)
    left.set_ylabel("draft tokens verified per request per round")
    left.set_ylim(bottom=0)
    for method in present:
        points = [(r["concurrency"], r["tokens_per_second"]) for r in rows if r["method"] == method]
        right.plot(*zip(*points), STYLES[method], color=COLORS[method], label=method)
    right.set_ylabel("total tokens / s")
    concurrency = sorted({r["concurrency"] for r in rows})
    for axis in (left, right):
        axis.set_xscale("log", base=2)
        axis.set_xticks(concurrency, [str(c) for c in concurrency])
        axis.set_xlabel("concurrency (requests in flight)")
        axis.grid(alpha=0.3)
        axis.legend(loc="best", fontsize="small")
    fig.suptitle("Batched DSpark speculative decoding")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


@dataclass
class BenchBatchArguments:
    """What is benchmarked."""

    concurrency: list[int] = flag([1, 4, 8, 16], type=_args.positive_int, nargs="+",
                                  help="requests in flight (default 1 4 8 16)")
    methods: list[str] = flag(
        list(METHODS), nargs="+", choices=METHODS + EXTRA_METHODS,
        help="methods to run (default: plain full scheduler async; plain_engine = the engine without drafting; "
             "oracle = the engine verifying exactly what the target accepts, greedy, with plain)")
    repeats: int = flag(1, type=_args.positive_int, help="runs per method and concurrency, median reported (default 1)")
    plain_head: str = flag("fast", choices=("fast", "transformers"),
                           help="LM head of the plain baseline: fast = the engine's exact skinny layout for 2-8 rows "
                                "on CPU fp32 (default), transformers = transformers' own")


# Flags shared by bench-batch and bench-serve whose meaning is the same in both.
BENCH_PROMPTS = ("prompts", "num_prompts", "chat_template", "max_new_tokens")
BENCH_SAMPLING_DEFAULTS = {"temperature": 1.0}
BENCH_NGRAM = {"ngram_lookup": {"type": _args.non_negative_int, "metavar": "N",
                                "help": "n-gram rounds in the speculative runs: copy up to N tokens after an earlier "
                                        "match of the last tokens instead of the drafted block (0 = off; default: "
                                        "the drafter's setting)"}}


@dataclass
class ResumeArguments:
    """Resuming a benchmark."""

    resume: bool = flag(False, action="store_true",
                        help="keep the runs already in --output (same settings) and run only the others")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataclass_arguments(parser, TargetArguments, ("target", "dtype", "device"), required=("target",))
    add_dataclass_arguments(parser, DrafterArguments, ("draft", "draft_dtype", "ngram_lookup"), required=("draft",),
                            overrides=BENCH_NGRAM)
    add_dataclass_arguments(parser, BenchBatchArguments)
    add_dataclass_arguments(
        parser, PromptArguments, BENCH_PROMPTS,
        overrides={"num_prompts": {"help": "prompts per run (default 2 x the largest concurrency)"},
                   "prompts": {"help": "prompt files (.jsonl/.json/.parquet); default: built-in prompts"}})
    add_dataclass_arguments(parser, SamplingArguments, defaults=BENCH_SAMPLING_DEFAULTS,
                            overrides={"temperature": {"help": "sampling temperature (default 1.0)"}})
    add_dataclass_arguments(parser, RuntimeArguments, ("threads", "latency_profile", "latency_cache_dir",
                                                       "profile_repeats"))
    add_dataclass_arguments(parser, OutputArguments, ("output", "plot"), overrides={
        "output": {"help": "write the results as JSON to this file (after every concurrency)"},
        "plot": {"help": "draw verified draft tokens per request vs concurrency to this PNG"}})
    add_dataclass_arguments(parser, ResumeArguments, overrides={"resume": {
        "help": "keep the concurrencies already in --output (same settings) and run only the others"}})
    add_config_argument(parser)


def load_draft(name: str, target, target_name: str, device):
    """The drafter ``--draft`` names: a saved folder, or a name ``targets.resolve_draft`` knows for the target."""
    from hf_dspark.checkpoints.loading import load_drafter

    if not Path(name).expanduser().exists():
        from hf_dspark import targets

        resolve = getattr(targets, "resolve_draft", None)
        if resolve is None:
            raise DSparkConfigError(f"--draft {name!r} is not a folder; pass the folder a drafter was saved to")
        resolved = resolve(name, target_name)
        if not isinstance(resolved, (str, Path)):
            return resolved.to(device).eval()
        name = str(resolved)
    return load_drafter(str(Path(name).expanduser()), device=device)


def check_prompt_sources(sources) -> None:
    """Fail on missing prompt files now, before the target is loaded and profiled (minutes)."""
    if sources:
        from hf_dspark.data.prompts import expand_sources

        expand_sources(list(sources))


def encoded_prompts(args, tokenizer, trained_with: bool | None = None) -> list[list[int]]:
    """Token ids of the benchmark prompts: the first turns of ``--prompts`` (shuffled with ``--seed``), or the
    built-in prompts, ``--num-prompts`` of them (default twice the largest concurrency)."""
    from hf_dspark.data.encoding import encode_prompt, resolve_chat_mode

    count = args.num_prompts or 2 * max(args.concurrency)
    chat = resolve_chat_mode(tokenizer, args.chat_template, trained_with)
    if args.prompts:
        from hf_dspark.data.prompts import load_prompts

        rows = load_prompts(args.prompts, num_prompts=count, seed=args.seed)
        texts = [row["turns"][0] for row in rows]
        return [encode_prompt(tokenizer, text, chat) for text in texts]
    return [encode_prompt(tokenizer, BUILTIN_PROMPTS[i % len(BUILTIN_PROMPTS)], chat) for i in range(count)]


def run(args: argparse.Namespace) -> int:
    if min(args.concurrency) < 1:
        raise DSparkConfigError(f"--concurrency values must be >= 1, got {args.concurrency}")
    if args.max_new_tokens < 1:
        raise DSparkConfigError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.num_prompts is not None and args.num_prompts < 1:
        raise DSparkConfigError(f"--num-prompts must be >= 1, got {args.num_prompts}")
    if args.ngram_lookup is not None and args.ngram_lookup < 0:
        raise DSparkConfigError(f"--ngram-lookup must be >= 0 (0 = off), got {args.ngram_lookup}")
    if args.repeats < 1:
        raise DSparkConfigError(f"--repeats must be >= 1, got {args.repeats}")
    if args.resume and not args.output:
        raise DSparkConfigError("--resume needs --output (the file whose finished concurrencies are kept)")
    check_prompt_sources(args.prompts)
    check_oracle_request(args.methods, args.do_sample)
    setup = load_setup(args, batch_sizes=profile_batch_sizes(max(args.concurrency), args.concurrency))
    concurrency = sorted(set(args.concurrency))
    prompts = encoded_prompts(args, setup.tokenizer, setup.draft.config.prompt_chat_template)
    settings = dict(target=args.target, draft=args.draft, dtype=args.dtype)
    done = _resumable_rows(args.output, settings, args) if args.resume else []
    out = Path(args.output) if args.output else None

    def write(results):
        if out is not None:
            results["settings"].update(settings)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")

    results = benchmark_batch(
        setup.target, setup.draft, prompts, concurrency, args.max_new_tokens, setup.profile, do_sample=args.do_sample,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed, pad_token_id=setup.pad_id,
        ngram_lookup_tokens=setup.ngram, methods=args.methods, repeats=args.repeats, done=done, on_concurrency=write,
        plain_fast_head=args.plain_head == "fast",
    )
    write(results)
    if out is not None:
        print(f"wrote {out}")
    if args.plot:
        print(f"wrote {plot_results(results, args.plot)}")
    return 0


@dataclass
class BenchSetup:
    """What bench-batch and bench-serve load: target, tokenizer, drafter, latency profile, n-gram setting."""

    target: object
    tokenizer: object
    draft: object
    profile: object
    pad_id: int
    ngram: int


def load_setup(args: argparse.Namespace, batch_sizes: Sequence[int]) -> BenchSetup:
    """Threads, target (``--dtype``), drafter (``--draft-dtype``), latency profile up to ``batch_sizes``."""
    from hf_dspark.decoding.latency import LatencyProfile, format_table, profile_latency
    from hf_dspark.targets import dtype_name, load_target

    if args.threads is not None:
        if args.threads < 1:
            raise DSparkConfigError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    target, tokenizer = load_target(args.target, dtype=_args.resolve_target_dtype(args.dtype, args.device),
                                    device=args.device)
    args.dtype = dtype_name(target)  # what ran (recorded in the settings of the result file)
    draft = load_draft(args.draft, target, args.target, target.device)
    if args.draft_dtype != "saved":
        # CPUs without bf16 instructions run a bf16 drafter several times slower than an fp32 one
        draft = draft.to(getattr(torch, args.dtype if args.draft_dtype == "auto" else args.draft_dtype))
    if args.latency_profile:
        profile = LatencyProfile.from_json(args.latency_profile)
    else:
        profile = profile_latency(target, token_counts=range(1, draft.config.block_size + 2), batch_sizes=batch_sizes,
                                  repeats=args.profile_repeats, cache_dir=args.latency_cache_dir, model_name=args.target)
    print(format_table(profile))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ngram = args.ngram_lookup
    if ngram is None:
        from hf_dspark.models.dspark.generation_dspark import fixed_ngram_tokens

        ngram = fixed_ngram_tokens(getattr(draft.generation_config, "ngram_lookup_tokens", 0), draft.config.block_size)
    return BenchSetup(target, tokenizer, draft, profile, pad_id, ngram)


def profile_batch_sizes(largest: int, also: Sequence[int] = ()) -> list[int]:
    """Rows to profile: powers of two up to ``largest``, plus ``largest`` and ``also``. With continuous
    batching the number of active requests varies, so the curve is needed below the concurrency too."""
    sizes = {b for b in (1, 2, 4, 8, 16, 32, 64, 128) if b <= largest} | {largest} | set(also)
    return sorted(sizes)


def _resumable_rows(path, settings: dict, args) -> list[dict]:
    """Rows of an earlier run in ``path`` measured with the same settings (all methods per concurrency)."""
    path = Path(path)
    if not path.exists():
        return []
    earlier = json.loads(path.read_text(encoding="utf-8"))
    same = dict(settings, max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, seed=args.seed,
                repeats=args.repeats, plain_head=args.plain_head)
    before = {"plain_head": "transformers", **earlier["settings"]}  # files written before --plain-head existed
    mismatched = {k: (before.get(k), v) for k, v in same.items() if before.get(k) != v}
    if mismatched:
        raise DSparkConfigError(f"--resume: {path} was measured with other settings ({mismatched}); use another --output")
    wanted = set(args.methods)
    complete = [c for c in {r["concurrency"] for r in earlier["results"]}
                if wanted <= {r["method"] for r in earlier["results"] if r["concurrency"] == c}]
    return [r for r in earlier["results"] if r["concurrency"] in complete and r["method"] in wanted]
