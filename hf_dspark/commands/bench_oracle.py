"""`hf-dspark bench-oracle`: how close the implementation gets to the bound, drafter quality set aside.

Every measured speed-up mixes the drafter's acceptance with the system's cost. Here acceptance is
fixed: the target's greedy continuation of each prompt is computed first with plain ``generate``
(timed: the baseline), then each requested ``tau`` runs speculative decoding whose drafter really
drafts every round (backbone block and Markov loop, so its cost is paid) and whose proposals are
then replaced by ``tau - 1`` true tokens followed by wrong ones
(:mod:`hf_dspark.decoding.oracle_proposals`). Every round verifies the whole block and accepts
exactly ``tau - 1`` drafts plus the target's own token.

For each tau and each mode (``generate`` at batch 1; the batched engine at each ``--batch-sizes``)
a row of ``results`` reports:

* ``tau_measured``; ``tokens_per_second`` and ``plain_tokens_per_second`` (plain ``generate``; at
  batch B > 1 transformers' batched ``generate`` over chunks of B prompts), plain being timed again
  beside every run (for ``generate`` just before each prompt's oracle run) so that ``speedup`` is a
  side-by-side ratio on a machine whose speed drifts;
* ``ideal_speedup`` = tau x T(1) / T_verify(1 + block_size): a round that cost only its verification
  pass, from :func:`~hf_dspark.decoding.latency.profile_latency` on the same target, measured again
  just before each row (same dtype, device and threads, a context of the mean prompt plus half the new tokens, the verification LM-head
  layout the run uses; batch B's row for the engine at batch B), and ``efficiency`` = speedup / ideal;
  the two profiled times are in the row (``profile_one_token_ms``, ``profile_verify_ms``) to compare
  with ``verify_ms``;
* the split of a mean round in ms: ``draft_ms`` (drafter block + Markov loop), ``verify_ms`` (the
  target pass; for ``generate`` also transformers' acceptance), ``oracle_ms`` (checking the
  committed tokens against the reference and overwriting the proposals: the instrument's own cost), ``other_ms`` (everything else, per-call setup included),
  ``round_ms`` (their sum), and ``prefill_ms`` per prompt;
* ``resyncs``: how often the committed tokens left the reference (a bf16/fp16 near-tie, below) and the
  reference was recomputed by plain greedy ``generate`` from the committed prefix, so that tau stays
  imposed; ``resync_seconds``, the time of those recomputations, is left out of ``tokens_per_second``
  and of the round split.

Every oracle run's output is compared with plain ``generate``'s: in float32 they must be identical
(else the command fails); in bf16/fp16 a divergence is accepted only at a numerical near-tie
(``margin_ulps`` <= 2, see :func:`hf_dspark.evaluation.greedy_divergence`), and recorded.

Timing does not depend on the weights, so ``--target-config qwen3-4b`` (or ``qwen3-8b``, or any JSON
config file) builds a target with random weights (:mod:`hf_dspark.random_target`) and, without
``--draft``, a fresh random drafter (``--draft-layers``, default 5): prompts are then random token ids.

Example::

    hf-dspark bench-oracle --target-config qwen3-4b --dtype bfloat16 --device cuda --tau 2 4 6 \\
        --num-prompts 8 --max-new-tokens 128 --output oracle.json
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from hf_dspark.commands import _args
from hf_dspark.commands.arguments import (
    DrafterArguments, OutputArguments, PromptArguments, RuntimeArguments, SamplingArguments, TargetArguments,
    add_config_argument, add_dataclass_arguments, flag,
)
from hf_dspark.errors import DSparkConfigError, LosslessnessError

RESULT_KEYS = ("mode", "batch_size", "tau", "tau_measured", "tokens_per_second", "plain_tokens_per_second", "speedup",
               "ideal_speedup", "efficiency", "draft_ms", "verify_ms", "oracle_ms", "other_ms", "round_ms", "prefill_ms",
               "rounds", "new_tokens", "output_equals_plain", "resyncs", "resync_seconds", "profile_one_token_ms",
               "profile_verify_ms")
MODES = ("generate", "engine")
NEAR_TIE_ULPS = 2.0


# An oracle run's greedy output differs from plain ``generate`` away from a numerical near-tie (a bug).
OracleOutputMismatch = LosslessnessError


@dataclass
class BenchOracleArguments:
    """The imposed acceptance and the fresh drafter."""

    draft_layers: int = flag(5, type=_args.positive_int, help="layers of a fresh drafter (default 5)")
    block_size: int = flag(7, type=_args.positive_int, help="block size of a fresh drafter (default 7)")
    prompt_length: int = flag(64, type=_args.positive_int,
                              help="tokens per random prompt with --target-config (default 64)")
    tau: list[int] = flag([2, 4, 6], type=_args.positive_int, nargs="+",
                          help="acceptance lengths to impose (default 2 4 6; at most block_size + 1)")
    modes: list[str] = flag(list(MODES), nargs="+", choices=MODES, help="generate and/or engine (default both)")
    batch_sizes: list[int] = flag([1, 8], type=_args.positive_int, nargs="+",
                                  help="requests in flight in the engine (default 1 8)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``hf-dspark bench-oracle``."""
    add_dataclass_arguments(parser, TargetArguments, ("target", "target_config", "dtype", "device"),
                            exclusive=("target", "target_config"), exclusive_required=True)
    add_dataclass_arguments(parser, DrafterArguments, ("draft",), overrides={"draft": {
        "help": "drafter folder; default: a fresh random drafter (timing does not depend on its weights)"}})
    add_dataclass_arguments(parser, BenchOracleArguments)
    add_dataclass_arguments(
        parser, PromptArguments, ("prompts", "num_prompts", "max_new_tokens"), defaults={"num_prompts": 8},
        overrides={"prompts": {"help": "prompt files (.jsonl/.json/.parquet); default: bench-batch's built-in "
                                       "prompts, or random ids with --target-config"},
                   "num_prompts": {"help": "prompts per run (default 8)"},
                   "max_new_tokens": {"help": "tokens per prompt (default 128)"}})
    add_dataclass_arguments(parser, SamplingArguments, ("seed",),
                            overrides={"seed": {"help": "seed of random weights and prompts (default 0)"}})
    add_dataclass_arguments(parser, RuntimeArguments, ("threads", "profile_repeats", "latency_cache_dir"))
    add_dataclass_arguments(parser, OutputArguments, ("output",),
                            overrides={"output": {"help": "write the results as JSON to this file"}})
    add_config_argument(parser)


# ----------------------------------------------------------------------------- setup
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine_info(device: torch.device) -> dict:
    """What the figures were measured on."""
    import transformers

    from hf_dspark.evaluation.measure import cpu_model_name

    info = {"cpu": cpu_model_name(), "gpu": None, "device": str(device), "torch": torch.__version__,
            "transformers": transformers.__version__, "threads": torch.get_num_threads(), "python": platform.python_version()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def fresh_drafter(target, layers: int = 5, block_size: int = 7, seed: int = 0):
    """A random DSpark drafter for ``target``, built directly on its device in its dtype."""
    from hf_dspark import DSparkDraftModel

    param = next(target.parameters())
    torch.manual_seed(seed)
    with torch.device(param.device):
        draft = DSparkDraftModel.from_target(target, num_hidden_layers=layers, block_size=block_size)
    return draft.to(param.dtype).eval()


def load_models(args):
    """(target, drafter, tokenizer or None, target name)."""
    from hf_dspark.targets import dtype_name, resolve_device

    device = resolve_device(args.device)
    requested = _args.resolve_target_dtype(args.dtype, device)
    tokenizer = None
    if args.target_config:
        from hf_dspark.decoding.latency import choose_dtype
        from hf_dspark.random_target import random_target_from_config

        build = torch.float32 if requested == "auto" else getattr(torch, requested)
        target = random_target_from_config(args.target_config, dtype=build, device=device, seed=args.seed)
        if requested == "auto" and device.type == "cpu":
            target.to(getattr(torch, choose_dtype(target)[0]))
        elif requested == "auto":
            target.to(torch.bfloat16)
        name = target.config.name_or_path
    else:
        from hf_dspark.targets import load_target

        target, tokenizer = load_target(args.target, dtype=requested, device=device)
        name = args.target
    args.dtype = dtype_name(target)  # what ran, as the results record it
    dtype = getattr(torch, args.dtype)
    if args.draft:
        from hf_dspark.commands.bench_batch import load_draft

        draft = load_draft(args.draft, target, name, target.device).to(dtype)
    else:
        draft = fresh_drafter(target, args.draft_layers, args.block_size, args.seed)
    return target, draft, tokenizer, name


def prompt_ids(args, tokenizer, vocab_size: int, trained_with=None) -> list[list[int]]:
    """Tokenized prompts, or random ids (seeded) when there is no tokenizer."""
    if tokenizer is None:
        if args.prompts:
            raise DSparkConfigError("--prompts needs a tokenizer; with --target-config prompts are random token ids")
        gen = torch.Generator().manual_seed(args.seed)
        return torch.randint(0, vocab_size, (args.num_prompts, args.prompt_length), generator=gen).tolist()
    from hf_dspark.commands.bench_batch import BUILTIN_PROMPTS
    from hf_dspark.data.encoding import encode_prompt, resolve_chat_mode

    chat = resolve_chat_mode(tokenizer, "auto", trained_with)
    if args.prompts:
        from hf_dspark.data.prompts import load_prompts

        texts = [row["turns"][0] for row in load_prompts(args.prompts, num_prompts=args.num_prompts, seed=args.seed)]
    else:
        texts = [BUILTIN_PROMPTS[i % len(BUILTIN_PROMPTS)] for i in range(args.num_prompts)]
    return [encode_prompt(tokenizer, text, chat) for text in texts]


# ----------------------------------------------------------------------------- runs
def _new_tokens(output: torch.Tensor, prompt_length: int) -> list[int]:
    return output[0, prompt_length:].tolist()


@torch.no_grad()
def plain_generate(target, prompts, max_new_tokens: int) -> tuple[list[list[int]], float]:
    """Greedy plain ``generate`` one prompt at a time (one untimed warm-up call first): (new tokens, seconds)."""
    device = target.device
    warm = torch.tensor([prompts[0]], device=device)
    target.generate(warm, max_new_tokens=min(8, max_new_tokens), do_sample=False)
    outputs, seconds = [], 0.0
    for prompt in prompts:
        ids = torch.tensor([prompt], device=device)
        synchronize(device)
        start = time.perf_counter()
        out = target.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
        synchronize(device)
        seconds += time.perf_counter() - start
        outputs.append(_new_tokens(out, ids.shape[1]))
    return outputs, seconds


@torch.no_grad()
def plain_batched(target, prompts, batch_size: int, max_new_tokens: int, pad_id: int) -> float:
    """Seconds of transformers' batched greedy ``generate`` over chunks of ``batch_size`` (after a warm-up chunk)."""
    from hf_dspark.commands.bench_batch import plain_batched

    eos = target.generation_config.eos_token_id
    sampling = dict(do_sample=False)
    plain_batched(target, prompts[:batch_size], batch_size, min(8, max_new_tokens), sampling, eos, pad_id)
    synchronize(target.device)
    out = plain_batched(target, prompts, batch_size, max_new_tokens, sampling, eos, pad_id)
    synchronize(target.device)
    return out["seconds"]


def _split(totals: dict, rounds: int, prompts: int) -> dict:
    """Mean round split in ms, prefill per prompt, and the resynchronisation time (left out of the timed run)."""
    per_round = {f"{k}_ms": 1e3 * totals.get(k, 0.0) / max(rounds, 1) for k in ("draft", "verify", "oracle", "other")}
    per_round["round_ms"] = sum(per_round.values())
    per_round["prefill_ms"] = 1e3 * totals.get("prefill", 0.0) / max(prompts, 1)
    per_round["resync_seconds"] = totals.get("resync", 0.0)
    return per_round


def _timed_plain(target, prompt, max_new_tokens: int) -> float:
    ids = torch.tensor([prompt], device=target.device)
    synchronize(target.device)
    start = time.perf_counter()
    target.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    synchronize(target.device)
    return time.perf_counter() - start


@torch.no_grad()
def oracle_generate(target, draft, prompts, references, tau: int, max_new_tokens: int, continuations=None,
                    time_plain: bool = False) -> dict:
    """``generate(assistant_model=draft)`` with oracle proposals at ``tau`` for every prompt (one untimed warm-up).

    ``time_plain``: also time plain ``generate`` of each prompt just before its oracle run (``plain_seconds``),
    so that the two are measured side by side on a machine whose speed drifts."""
    from hf_dspark.decoding.oracle_proposals import OracleCandidateGenerator, RoundClock

    device = target.device
    config = draft.generation_config
    saved = (config.verification_policy, getattr(config, "ngram_lookup_tokens", None))
    # every round drafts and verifies the whole block: no confidence cut, and no n-gram rounds (those skip the
    # drafter, whose cost the oracle must pay every round)
    config.verification_policy = "full"
    config.ngram_lookup_tokens = 0
    try:
        def run(prompt, reference, new_tokens, clock=None):
            draft.candidate_generator_class = functools.partial(OracleCandidateGenerator, reference=reference, tau=tau,
                                                                clock=clock, continuations=continuations)
            ids = torch.tensor([prompt], device=device)
            out = target.generate(ids, max_new_tokens=new_tokens, do_sample=False, assistant_model=draft)
            return _new_tokens(out, ids.shape[1]), draft.last_generation_stats

        run(prompts[0], references[0], min(2 * draft.config.block_size, max_new_tokens))  # warm-up
        clock = RoundClock(device)
        outputs, rounds, accepted, resyncs, seconds, plain_seconds = [], 0, 0, 0, 0.0, 0.0
        for prompt, reference in zip(prompts, references):
            if time_plain:
                plain_seconds += _timed_plain(target, prompt, max_new_tokens)
            synchronize(device)
            start = time.perf_counter()
            clock.mark("other")
            tokens, stats = run(prompt, reference, max_new_tokens, clock)
            clock.mark("end")
            synchronize(device)
            seconds += time.perf_counter() - start
            outputs.append(tokens)
            rounds += stats["rounds"]
            accepted += sum(stats["accepted_lengths"])
            resyncs += stats["oracle_resyncs"]
    finally:
        draft.candidate_generator_class = None
        config.verification_policy, config.ngram_lookup_tokens = saved
    split = _split(clock.totals(), rounds, len(prompts))
    return dict(outputs=outputs, seconds=seconds - split["resync_seconds"], rounds=rounds, resyncs=resyncs,
                tau_measured=accepted / max(rounds, 1), plain_seconds=plain_seconds if time_plain else None, **split)


@torch.no_grad()
def oracle_engine(target, draft, prompts, references, tau: int, max_new_tokens: int, batch_size: int,
                  continuations=None) -> dict:
    """The batched engine with oracle proposals at ``tau``, ``batch_size`` requests in flight (warm-up first)."""
    from hf_dspark.decoding.oracle_proposals import OracleProposalEngine, RoundClock

    device = target.device
    warm = OracleProposalEngine(target, draft, tau=tau, max_batch_size=batch_size, continuations=continuations)
    warm.generate(prompts[:batch_size], min(2 * draft.config.block_size, max_new_tokens), references[:batch_size])
    warm.close()
    clock = RoundClock(device)
    engine = OracleProposalEngine(target, draft, tau=tau, max_batch_size=batch_size, clock=clock,
                                  continuations=continuations)
    synchronize(device)
    start = time.perf_counter()
    clock.mark("other")
    outputs = engine.generate(prompts, max_new_tokens, references)
    clock.mark("end")
    synchronize(device)
    seconds = time.perf_counter() - start
    engine.close()
    stats = engine.stats
    request_rounds = max(stats["request_rounds"], 1)
    split = _split(clock.totals(), stats["rounds"], len(prompts))
    return dict(outputs=outputs, seconds=seconds - split["resync_seconds"], rounds=stats["rounds"],
                resyncs=engine.resyncs,
                tau_measured=(stats["accepted_draft_tokens"] + stats["request_rounds"]) / request_rounds, **split)


def check_outputs(target, prompts, references, outputs, where: str) -> dict:
    """Compare an oracle run with plain generate; raise :class:`OracleOutputMismatch` unless every difference
    is a numerical near-tie of a bf16/fp16 target (float32 must be identical)."""
    from hf_dspark.evaluation.measure import greedy_divergence

    divergences = []
    for prompt, reference, output in zip(prompts, references, outputs):
        if output == reference:
            continue
        plain_ids = torch.tensor([prompt + reference])
        other_ids = torch.tensor([prompt + output])
        report = greedy_divergence(target, len(prompt), plain_ids, other_ids)
        divergences.append(report)
        near_tie = report is not None and report.get("margin_ulps", float("inf")) <= NEAR_TIE_ULPS
        if target.dtype == torch.float32 or not near_tie:
            raise OracleOutputMismatch(
                f"bench-oracle {where}: the greedy output differs from plain generate ({report}); "
                f"speculative decoding must reproduce it{'' if target.dtype == torch.float32 else ' outside near-ties'}")
    return {"output_equals_plain": not divergences, "near_tie_divergences": divergences}


def ideal_speedup(profile, tau: int, block_size: int, batch_size: int) -> float:
    return tau * profile.verify_seconds(1, batch_size) / profile.verify_seconds(1 + block_size, batch_size)


def benchmark_oracle(target, draft, prompts, max_new_tokens: int, taus, modes=MODES, batch_sizes=(1, 8),
                     profile=None, pad_id: int = 0, progress=print, profile_repeats: int = 5,
                     cache_dir=None) -> dict:
    """Run the whole measurement; returns ``{"results": [...], "plain": {...}, "profile": {...}}``."""
    from hf_dspark.decoding.latency import profile_latency

    block = draft.config.block_size
    too_long = [t for t in taus if t > block + 1]
    if too_long:
        raise DSparkConfigError(f"--tau {too_long} exceeds block_size + 1 = {block + 1}: a round accepts at most the "
                                "whole block plus one token")
    batch_sizes = sorted(set(batch_sizes)) if "engine" in modes else []
    given = profile
    context = int(sum(len(p) for p in prompts) / len(prompts) + max_new_tokens / 2)

    def profile_beside(b: int):
        # measured again just before every row (a few seconds), like plain: on a machine whose speed drifts a
        # profile taken once at the start can be off by more than the overheads this benchmark looks for
        if given is not None:
            return given
        return profile_latency(target, token_counts=[1, block + 1], batch_sizes=[b], context_length=context,
                               repeats=profile_repeats, cache_dir=cache_dir, force=True)

    references, plain_seconds = plain_generate(target, prompts, max_new_tokens)
    tokens_total = sum(len(r) for r in references)
    plain_tps = {1: tokens_total / plain_seconds}
    progress(f"plain generate: {plain_tps[1]:.2f} tokens/s ({tokens_total} tokens)")
    for b in batch_sizes:
        if b > 1:
            plain_tps[b] = tokens_total / plain_batched(target, prompts, b, max_new_tokens, pad_id)
            progress(f"plain batched generate, batch {b}: {plain_tps[b]:.2f} tokens/s")
    runs = [("generate", 1)] if "generate" in modes else []
    runs += [("engine", b) for b in batch_sizes]
    results, first_profile = [], given
    continuations: dict = {}  # resync continuations by prefix, shared by every run (the same near-ties recur)
    for tau in taus:
        for mode, b in runs:
            profile = profile_beside(b)
            first_profile = first_profile or profile
            # plain is timed again beside every run (per prompt for generate): the speed-up is a side-by-side ratio
            if mode == "generate":
                run = oracle_generate(target, draft, prompts, references, tau, max_new_tokens, continuations,
                                      time_plain=True)
                plain_seconds = run["plain_seconds"]
            else:
                plain_seconds = (sum(_timed_plain(target, p, max_new_tokens) for p in prompts) if b == 1 else
                                 plain_batched(target, prompts, b, max_new_tokens, pad_id))
                run = oracle_engine(target, draft, prompts, references, tau, max_new_tokens, b, continuations)
            check = check_outputs(target, prompts, references, run["outputs"], f"{mode} batch {b} tau {tau}")
            tps = sum(len(o) for o in run["outputs"]) / run["seconds"]
            ideal = ideal_speedup(profile, tau, block, b)
            plain_row_tps = tokens_total / plain_seconds
            speedup = tps / plain_row_tps
            row = dict(mode=mode, batch_size=b, tau=tau, tau_measured=run["tau_measured"], tokens_per_second=tps,
                       plain_tokens_per_second=plain_row_tps, speedup=speedup, ideal_speedup=ideal,
                       efficiency=speedup / ideal, rounds=run["rounds"], new_tokens=sum(len(o) for o in run["outputs"]),
                       profile_one_token_ms=1e3 * profile.verify_seconds(1, b),
                       profile_verify_ms=1e3 * profile.verify_seconds(1 + block, b),
                       **{k: run[k] for k in ("draft_ms", "verify_ms", "oracle_ms", "other_ms", "round_ms", "prefill_ms",
                                              "resyncs", "resync_seconds")},
                       **check)
            results.append(row)
            progress(format_row(row))
    return {"results": results, "profile": None if first_profile is None else first_profile.to_dict(),
            "plain": {"tokens_per_second": {str(b): v for b, v in plain_tps.items()}, "new_tokens": tokens_total}}


def format_row(row: dict) -> str:
    return (f"{row['mode']:>8} B={row['batch_size']:<2} tau {row['tau']} (measured {row['tau_measured']:.2f}): "
            f"{row['tokens_per_second']:.2f} tok/s = {row['speedup']:.2f}x plain, ideal {row['ideal_speedup']:.2f}x, "
            f"efficiency {row['efficiency']:.2f}; round {row['round_ms']:.2f} ms = draft {row['draft_ms']:.2f} + "
            f"verify {row['verify_ms']:.2f} + oracle {row['oracle_ms']:.2f} + other {row['other_ms']:.2f}; "
            f"{row['resyncs']} resyncs")


def run(args: argparse.Namespace) -> int:
    """Entry point of ``hf-dspark bench-oracle``."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    target, draft, tokenizer, name = load_models(args)
    vocab = target.get_input_embeddings().num_embeddings
    prompts = prompt_ids(args, tokenizer, vocab, getattr(draft.config, "prompt_chat_template", None))
    pad_id = 0 if tokenizer is None or tokenizer.pad_token_id is None else tokenizer.pad_token_id
    out = benchmark_oracle(target, draft, prompts, args.max_new_tokens, args.tau, args.modes, args.batch_sizes,
                           pad_id=pad_id, profile_repeats=args.profile_repeats, cache_dir=args.latency_cache_dir)
    out["machine"] = machine_info(target.device)
    out["settings"] = dict(target=name, target_config=args.target_config, draft=args.draft or
                           f"random ({draft.config.num_hidden_layers} layers)", block_size=draft.config.block_size,
                           dtype=args.dtype, num_prompts=len(prompts), max_new_tokens=args.max_new_tokens,
                           taus=list(args.tau), modes=list(args.modes),
                           batch_sizes=list(args.batch_sizes) if "engine" in args.modes else [])
    if args.output:
        path = Path(args.output)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {path}")
    return 0
