"""`hf-dspark bench-serve`: the batched engine under arrival load, per-request latency against throughput.

A server does not see a fixed number of requests in flight: requests arrive over time and the
engine admits them as they come (continuous batching, at most ``--max-concurrency`` at once, the
rest queue). This benchmark replays one workload at several arrival rates and, per rate and per
mode, measures what a serving setup is chosen on:

* throughput (output tokens/s from the first arrival to the last completion),
* per-request time per output token (TPOT: time from a request's first token to its last,
  over its tokens after the first), p50 and p90,
* time to first token (TTFT, from arrival, queueing included), p50 and p90,
* the mean draft tokens verified per request per round, and the request-rounds that skipped
  the drafter.

Workload: ``--num-requests`` prompts drawn (seeded) from the ``--prompts`` files, each with an
output length drawn uniformly from ``--min-new-tokens .. --max-new-tokens`` (a request stops
earlier at EOS); arrivals are a Poisson process (exponential gaps, the same draws scaled for
every rate). Rates are given in requests/s (``--rates``) or, by default, as fractions of plain
decoding's capacity (``--load``): plain is first run with every request arriving at once, and
its throughput divided by the mean output length is the rate it can sustain.

Modes: ``plain`` (the engine without drafting: plain continuous-batching decoding), ``full``,
``algorithm1`` and ``async`` (see :mod:`hf_dspark.decoding.batched`). Every mode decodes the same
requests at the same arrival times in one process. Idle stretches (nothing in flight, nothing
queued) are skipped on the clock instead of slept through, which changes no measured time.

Greedy decoding is lossless here too: every request's output is compared with what the target
alone gives that request (transformers ``generate``, batch 1, computed once per run); a mismatch
is reported and makes the command fail.

``--output`` gets JSON after every (rate, mode) (``--resume`` continues an interrupted run from
it); ``--plot`` draws TPOT against throughput, one curve per mode.

Example::

    hf-dspark bench-serve --target gemma-3-270m --draft hf_dspark/assets/gemma-3-270m-dspark \\
        --prompts gsm8k.jsonl humaneval.jsonl mt-bench.jsonl --num-requests 32 --max-concurrency 16 \\
        --load 0.25 0.5 0.8 1.0 1.3 --output results/bench_serve.json --plot results/plots/bench_serve.png
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from hf_dspark.commands.arguments import (
    DrafterArguments, OutputArguments, PromptArguments, RuntimeArguments, SamplingArguments, TargetArguments,
    add_config_argument, add_dataclass_arguments, flag,
)
from hf_dspark.commands.bench_batch import (
    BENCH_NGRAM, BENCH_SAMPLING_DEFAULTS, ResumeArguments, check_prompt_sources, encoded_prompts, load_setup,
    profile_batch_sizes,
)
from hf_dspark.decoding.batched import BatchedSpeculativeGenerator
from hf_dspark.errors import DSparkConfigError
from hf_dspark.models.dspark.generation_config_dspark import DSparkGenerationConfig
from hf_dspark.commands import _args

MODES = {"plain": "plain", "full": "full", "algorithm1": "cost", "async": "async"}  # mode -> verification policy


@dataclass
class Workload:
    """The requests of one run: prompts, output lengths and unit-rate arrival gaps (seeded)."""

    prompts: list[list[int]]
    max_new_tokens: list[int]
    unit_gaps: list[float]  # exponential(1) draws: gaps at rate r are unit_gaps / r

    @classmethod
    def build(cls, prompts: Sequence[Sequence[int]], min_new: int, max_new: int, seed: int) -> "Workload":
        rng = random.Random(seed)
        lengths = [rng.randint(min_new, max_new) for _ in prompts]
        gaps = [rng.expovariate(1.0) for _ in prompts]
        return cls([list(map(int, p)) for p in prompts], lengths, gaps)

    def arrivals(self, rate: float) -> list[float]:
        """Arrival times in seconds at ``rate`` requests/s (all at 0 for an infinite rate)."""
        if math.isinf(rate):
            return [0.0] * len(self.prompts)
        times, now = [], 0.0
        for gap in self.unit_gaps:
            now += gap / rate
            times.append(now)
        return [t - times[0] for t in times]  # the first request arrives at 0


def _percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def serve(engine: BatchedSpeculativeGenerator, workload: Workload, rate: float, eos=None) -> dict:
    """Replay ``workload`` at ``rate`` through ``engine`` (step API); returns outputs and timings.

    The clock is wall time minus the idle stretches skipped (no request in flight or queued, the
    next one not arrived yet). A request's first token and finish are stamped at the end of the
    round that produced them."""
    arrivals = workload.arrivals(rate)
    start, skipped = time.perf_counter(), 0.0

    def clock() -> float:
        return time.perf_counter() - start + skipped

    ids: list[int | None] = [None] * len(arrivals)
    first_token: dict[int, float] = {}
    finished: dict[int, float] = {}
    waiting = 0  # next request to arrive
    while waiting < len(arrivals) or engine.has_unfinished():
        now = clock()
        while waiting < len(arrivals) and arrivals[waiting] <= now:
            ids[waiting] = engine.add_request(workload.prompts[waiting], workload.max_new_tokens[waiting], eos)
            waiting += 1
        if not engine.has_unfinished():
            skipped += arrivals[waiting] - now  # idle: jump to the next arrival
            continue
        done = engine.step()
        now = clock()
        for request in engine._active + done:
            if request.output_ids and request.request_id not in first_token:
                first_token[request.request_id] = now
        for request in done:
            finished[request.request_id] = now
    requests = [engine.pop(i) for i in ids]
    return dict(
        outputs=[r.output_ids for r in requests],
        arrival=arrivals,
        first_token=[first_token[r.request_id] for r in requests],
        finished=[finished.get(r.request_id, first_token[r.request_id]) for r in requests],
        stats=dict(engine.stats),
    )


def summarize(run: dict) -> dict:
    """Throughput, TPOT and TTFT percentiles, verified draft tokens and drafter skips of one run."""
    tokens = [len(o) for o in run["outputs"]]
    span = max(run["finished"]) - min(run["arrival"])
    tpot = [(f - s) / (n - 1) for f, s, n in zip(run["finished"], run["first_token"], tokens) if n > 1]
    ttft = [s - a for s, a in zip(run["first_token"], run["arrival"])]
    stats = run["stats"]
    rounds = max(1, stats["request_rounds"])
    return dict(
        requests=len(tokens), total_tokens=sum(tokens), seconds=span,
        tokens_per_second=sum(tokens) / span if span > 0 else 0.0,
        tpot_p50=_percentile(tpot, 0.5), tpot_p90=_percentile(tpot, 0.9),
        ttft_p50=_percentile(ttft, 0.5), ttft_p90=_percentile(ttft, 0.9),
        mean_verified_draft_tokens=stats["verified_draft_tokens"] / rounds,
        mean_accepted_length=(stats["accepted_draft_tokens"] + stats["request_rounds"]) / rounds,
        rounds=stats["rounds"], request_rounds=stats["request_rounds"], max_active=stats["max_active"],
        drafted_request_rounds=stats["drafted_request_rounds"],
        draft_skipped_request_rounds=stats["draft_skipped_request_rounds"],
        draft_skipped_rounds=stats["draft_skipped_rounds"], probe_request_rounds=stats["probe_request_rounds"],
        ngram_request_rounds=stats["ngram_request_rounds"],
        model_seconds=stats["model_seconds"], modelled_round_seconds=stats["modelled_round_seconds"],
    )


@torch.no_grad()
def reference_outputs(target, workload: Workload, eos=None) -> list[list[int]]:
    """What each request gets alone: transformers' greedy ``generate`` at batch 1."""
    eos_set = set() if eos is None else ({eos} if isinstance(eos, int) else set(eos))
    device = next(target.parameters()).device
    outputs = []
    for prompt, n in zip(workload.prompts, workload.max_new_tokens):
        ids = torch.tensor([prompt], device=device)
        kwargs = {} if eos is None else {"eos_token_id": eos}
        out = target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False, **kwargs)
        tokens = []
        for token in out[0, ids.shape[1]:].tolist():
            tokens.append(token)
            if token in eos_set:
                break
        outputs.append(tokens)
    return outputs


def benchmark_serve(target, draft, workload: Workload, modes: Sequence[str], max_concurrency: int, latency_profile,
                    rates: Sequence[float] | None = None, load: Sequence[float] | None = None,
                    ngram_lookup_tokens: int = 0, sampling: dict | None = None, seed: int = 0, check_greedy: bool = True,
                    results: dict | None = None, on_result=None, progress: bool = True,
                    deadline: float | None = None) -> dict:
    """Every mode at every rate; ``results`` (an earlier partial run) is continued, ``on_result(results)``
    is called after every (rate, mode). No new run starts after ``deadline`` (a ``time.monotonic()``
    value): ``results["complete"]`` says whether every run is in. Returns the JSON-ready results."""
    sampling = dict(do_sample=False) if sampling is None else dict(sampling)
    eos = getattr(target.generation_config, "eos_token_id", None)
    results = results or dict(settings={}, references=None, capacity=None, results=[])
    greedy = not sampling.get("do_sample")
    if greedy and check_greedy and results.get("references") is None:
        if progress:
            print(f"reference: {len(workload.prompts)} requests alone with transformers generate", flush=True)
        results["references"] = reference_outputs(target, workload, eos)
    costs = {}

    def run(mode: str, rate: float) -> dict:
        config = DSparkGenerationConfig(verification_policy=MODES[mode], ngram_lookup_tokens=ngram_lookup_tokens,
                                        **sampling)
        engine = BatchedSpeculativeGenerator(target, draft, config, latency_profile=latency_profile,
                                             max_batch_size=max_concurrency, round_cost=costs.get("shared"), seed=seed)
        if MODES[mode] in ("cost", "async"):
            costs["shared"] = engine._cost()  # measured once, before any clock starts
        out = serve(engine, workload, rate, eos)
        engine.close()
        row = dict(rate=rate, mode=mode, **summarize(out))
        if results.get("capacity"):
            row["load"] = rate / results["capacity"]["requests_per_second"]
        if results.get("references") is not None:
            matches = [a == b for a, b in zip(out["outputs"], results["references"])]
            row["outputs_equal_alone"] = sum(matches)
            row["mismatched_requests"] = [i for i, same in enumerate(matches) if not same]
        return row

    def record(row: dict) -> None:
        results["results"].append(row)
        if progress:
            print(_format_row(row), flush=True)
        if on_result is not None:
            on_result(results)

    def done(mode: str, rate: float) -> bool:
        return any(r["mode"] == mode and r["rate"] == rate for r in results["results"])

    def out_of_time() -> bool:
        return deadline is not None and time.monotonic() > deadline

    results["complete"] = False

    if rates is None:
        # plain's capacity: every request at once
        if results.get("capacity") is None:
            if not done("plain", math.inf):
                record(run("plain", math.inf))
            saturated = next(r for r in results["results"] if r["mode"] == "plain" and math.isinf(r["rate"]))
            mean_tokens = saturated["total_tokens"] / saturated["requests"]
            results["capacity"] = dict(tokens_per_second=saturated["tokens_per_second"],
                                       requests_per_second=saturated["tokens_per_second"] / mean_tokens)
        rates = [f * results["capacity"]["requests_per_second"] for f in load] + [math.inf]
        results["settings"]["load"] = list(load)
    results["settings"]["rates"] = [r for r in rates]
    for rate in rates:
        for mode in modes:
            if not done(mode, rate):
                if out_of_time():
                    return results
                record(run(mode, rate))
    results["complete"] = True
    return results


def _format_row(row: dict) -> str:
    rate = "inf" if math.isinf(row["rate"]) else f"{row['rate']:.3f}"
    text = (f"rate {rate:>7} req/s  {row['mode']:<10}  {row['tokens_per_second']:7.1f} tok/s  "
            f"TPOT p50 {1e3 * (row['tpot_p50'] or 0):7.1f} ms p90 {1e3 * (row['tpot_p90'] or 0):7.1f} ms  "
            f"TTFT p50 {row['ttft_p50']:6.2f} s  verified/req {row['mean_verified_draft_tokens']:.2f}  "
            f"skipped drafter {row['draft_skipped_request_rounds']}/{row['request_rounds']}")
    if "outputs_equal_alone" in row:
        text += f"  equal alone {row['outputs_equal_alone']}/{row['requests']}"
    return text


def plot_results(results: dict, path: str | Path) -> Path:
    """TPOT p50 (solid, p90 dotted) against throughput, one curve per mode, points by arrival rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"plain": "tab:gray", "full": "tab:blue", "algorithm1": "tab:orange", "async": "tab:green"}
    markers = {"plain": "^", "full": "o", "algorithm1": "s", "async": "D"}
    fig, axis = plt.subplots(figsize=(6.4, 4.4))
    for mode in MODES:
        rows = sorted((r for r in results["results"] if r["mode"] == mode and r["tpot_p50"] is not None),
                      key=lambda r: r["rate"])
        if not rows:
            continue
        x = [r["tokens_per_second"] for r in rows]
        axis.plot(x, [1e3 * r["tpot_p50"] for r in rows], "-", marker=markers[mode], color=colors[mode],
                  label=f"{mode} (p50)")
        axis.plot(x, [1e3 * r["tpot_p90"] for r in rows], ":", color=colors[mode], alpha=0.7)
    axis.set_xlabel("throughput (output tokens / s)")
    axis.set_ylabel("time per output token, per request (ms)")
    axis.set_ylim(bottom=0)
    axis.grid(alpha=0.3)
    axis.legend(loc="best", fontsize="small", title="dotted: p90", title_fontsize="small")
    settings = results.get("settings", {})
    axis.set_title(f"Poisson arrivals, up to {settings.get('max_concurrency', '?')} requests in flight", fontsize="medium")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


@dataclass
class BenchServeArguments:
    """The workload."""

    num_requests: int = flag(32, type=_args.positive_int, help="requests in the workload (default 32)")
    min_new_tokens: int = flag(16, type=_args.positive_int, help="shortest output length drawn (default 16)")
    max_concurrency: int = flag(16, type=_args.positive_int, help="most requests in flight (default 16)")
    rates: list[float] | None = flag(type=_args.positive_float, nargs="+", help="arrival rates in requests/s")
    load: list[float] = flag(
        [0.25, 0.5, 0.8, 1.0, 1.3], type=_args.positive_float, nargs="+",
        help="arrival rates as fractions of plain decoding's capacity, measured first with every request arriving "
             "at once (default 0.25 0.5 0.8 1.0 1.3; that saturated run is kept)")
    modes: list[str] = flag(list(MODES), nargs="+", choices=list(MODES), help="default: all four")
    stop_after: float | None = flag(
        type=_args.non_negative_float, metavar="MINUTES",
        help="start no new (rate, mode) run after this many minutes (0: stop after the first); --resume continues")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataclass_arguments(parser, TargetArguments, ("target", "dtype", "device"), required=("target",))
    add_dataclass_arguments(parser, DrafterArguments, ("draft", "draft_dtype", "ngram_lookup"), required=("draft",),
                            overrides=BENCH_NGRAM)
    add_dataclass_arguments(parser, BenchServeArguments, exclusive=("rates", "load"))
    add_dataclass_arguments(
        parser, PromptArguments, ("prompts", "chat_template", "max_new_tokens"), defaults={"max_new_tokens": 96},
        overrides={"prompts": {"help": "prompt files (.jsonl/.json/.parquet); default: built-in"},
                   "max_new_tokens": {"help": "longest output length drawn (default 96)"}})
    add_dataclass_arguments(parser, SamplingArguments, defaults=BENCH_SAMPLING_DEFAULTS,
                            overrides={"temperature": {"help": "sampling temperature (default 1.0)"},
                                       "do_sample": {"help": "sample instead of greedy decoding (no output check)"},
                                       "seed": {"help": "seed of the workload and of sampling (default 0)"}})
    add_dataclass_arguments(parser, RuntimeArguments, ("threads", "latency_profile", "latency_cache_dir",
                                                       "profile_repeats"))
    add_dataclass_arguments(parser, OutputArguments, ("output", "plot"), overrides={
        "output": {"help": "write the results as JSON to this file (after every run)"},
        "plot": {"help": "draw TPOT against throughput to this PNG"}})
    add_dataclass_arguments(parser, ResumeArguments,
                            overrides={"resume": {"help": "continue the run in --output (same settings)"}})
    add_config_argument(parser)


def _check_args(args) -> None:
    for name in ("num_requests", "min_new_tokens", "max_concurrency"):
        if getattr(args, name) < 1:
            raise DSparkConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.max_new_tokens < args.min_new_tokens:
        raise DSparkConfigError(
            f"--max-new-tokens ({args.max_new_tokens}) must be >= --min-new-tokens ({args.min_new_tokens})")
    if args.rates is not None and min(args.rates) <= 0:
        raise DSparkConfigError(f"--rates must be > 0 requests/s, got {args.rates}")
    if args.rates is None and min(args.load) <= 0:
        raise DSparkConfigError(f"--load fractions must be > 0, got {args.load}")
    if args.rates is None and "plain" not in args.modes:
        raise DSparkConfigError("--load rates are fractions of plain's capacity: keep 'plain' in --modes or pass --rates")
    if args.resume and not args.output:
        raise DSparkConfigError("--resume needs --output (the file of the run to continue)")
    if args.ngram_lookup is not None and args.ngram_lookup < 0:
        raise DSparkConfigError(f"--ngram-lookup must be >= 0 (0 = off), got {args.ngram_lookup}")
    check_prompt_sources(args.prompts)


def run(args: argparse.Namespace) -> int:
    _check_args(args)
    setup = load_setup(args, batch_sizes=profile_batch_sizes(args.max_concurrency))
    args.num_prompts, args.concurrency = args.num_requests, [args.max_concurrency]  # what encoded_prompts reads
    prompts = encoded_prompts(args, setup.tokenizer, setup.draft.config.prompt_chat_template)
    workload = Workload.build(prompts, args.min_new_tokens, args.max_new_tokens, args.seed)
    settings = dict(target=args.target, draft=args.draft, dtype=args.dtype, num_requests=len(prompts),
                    min_new_tokens=args.min_new_tokens, max_new_tokens=args.max_new_tokens,
                    max_concurrency=args.max_concurrency, modes=list(args.modes), seed=args.seed,
                    do_sample=args.do_sample, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                    ngram_lookup_tokens=setup.ngram, threads=torch.get_num_threads(),
                    draft_dtype=str(next(setup.draft.parameters()).dtype).removeprefix("torch."),
                    latency_profile=getattr(setup.profile, "key", None), prompts=args.prompts)
    out = Path(args.output) if args.output else None
    results = None
    if args.resume and out.exists():
        results = json.loads(out.read_text(encoding="utf-8"))
        keys = [k for k in settings if k != "latency_profile"]
        mismatched = {k: (results["settings"].get(k), settings[k]) for k in keys if results["settings"].get(k) != settings[k]}
        if mismatched:
            raise DSparkConfigError(f"--resume: {out} was measured with other settings ({mismatched}); use another --output")
        for row in results["results"]:
            row["rate"] = float(row["rate"])  # "inf" for the run with every request at once

    def write(results: dict) -> None:
        if out is not None:
            results["settings"].update(settings)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(_finite(results), indent=2) + "\n", encoding="utf-8")

    sampling = dict(do_sample=args.do_sample, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    deadline = None if args.stop_after is None else time.monotonic() + 60 * args.stop_after
    results = benchmark_serve(setup.target, setup.draft, workload, args.modes, args.max_concurrency, setup.profile,
                              rates=args.rates, load=None if args.rates else args.load, ngram_lookup_tokens=setup.ngram,
                              sampling=sampling, seed=args.seed, results=results, on_result=write, deadline=deadline)
    results["settings"].update(settings)
    if not results["complete"]:
        write(results)
        print(f"stopped after {args.stop_after} minutes with {len(results['results'])} runs done; "
              f"continue with the same command plus --resume")
        return 0
    results["summary"] = summary(results)
    write(results)
    for line in results["summary"]["lines"]:
        print(line)
    if out is not None:
        print(f"wrote {out}")
    if args.plot:
        print(f"wrote {plot_results(results, args.plot)}")
    mismatched = [(r["mode"], r["rate"], r["mismatched_requests"]) for r in results["results"] if r.get("mismatched_requests")]
    if mismatched:
        print(f"ERROR: outputs differ from the requests decoded alone: {mismatched}")
        return 1
    return 0


def _finite(value):
    """A copy that standard JSON can hold: an infinite rate (every request at once) becomes "inf"."""
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def summary(results: dict) -> dict:
    """Each mode against plain at the same rate: TPOT p50 ratio (plain / mode) and throughput ratio."""
    lines, table = [], []
    for row in results["results"]:
        if row["mode"] == "plain":
            continue
        base = next((r for r in results["results"] if r["mode"] == "plain" and r["rate"] == row["rate"]), None)
        if base is None or not base["tpot_p50"] or not row["tpot_p50"]:
            continue
        entry = dict(rate=row["rate"], mode=row["mode"], tpot_p50_speedup=base["tpot_p50"] / row["tpot_p50"],
                     throughput_ratio=row["tokens_per_second"] / base["tokens_per_second"])
        table.append(entry)
        rate = "inf" if math.isinf(row["rate"]) else f"{row['rate']:.3f}"
        lines.append(f"rate {rate:>7}  {row['mode']:<10}  TPOT p50 x{entry['tpot_p50_speedup']:.2f} better than plain, "
                     f"throughput x{entry['throughput_ratio']:.2f}")
    return dict(vs_plain=table, lines=lines)
