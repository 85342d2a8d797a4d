"""Where does one DSpark round go? A timed split inside real ``generate(assistant_model=...)`` calls.

    python benchmarks/profile_round.py --target gemma-3-270m --dtype bfloat16 [--sample] \
        [--draft DIR] [--prompts FILE --num-prompts 3] [--max-new-tokens 128] [--ngram-lookup 0] \
        [--output results/round_split_bf16_sampling.json]

The script wraps (for the duration of the run only) the pieces of a round and accumulates wall time:

* ``target_forward``: the target model's forward (the verification pass; prefill excluded);
* ``draft_backbone``: ``draft.draft_block`` (context projection + drafter layers + draft logits);
* ``markov_loop``: ``draft.sample_block`` minus the per-position choice function;
* ``draft_choice``: the per-position choice inside the Markov loop (warpers + argmax/sampling);
* ``verify_warpers``: the logits processors transformers runs on the target logits, per position;
* ``acceptance``: ``_speculative_sampling`` (sampling) -- greedy acceptance is a few tensor ops and
  lands in ``bookkeeping``;
* ``bookkeeping``: everything else in the round (transformers' loop, cache crop, the generator's
  Python, dtype casts, n-gram search).

It also times plain ``generate`` on the same prompts and a hand-written decode loop (one forward per
token, the same processors), interleaved with the DSpark calls, so the printout gives T(1), the round
split, tau, and the batch-1 limit ``tau * T(1) / (T_round)``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time

import torch
import transformers.generation.utils as gen_utils
from transformers import AutoModel

import hf_dspark  # noqa: F401  (installs the generate hook)
from hf_dspark.targets import load_target

DEFAULT_PROMPTS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?",
    "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. How much did she earn?",
    "Betty is saving money for a new wallet which costs $100. Betty has only half of the money she needs. Her parents "
    "decided to give her $15 for that purpose, and her grandparents twice as much as her parents. How much more money "
    "does Betty need to buy the wallet?",
]

PHASES = ("target_forward", "draft_backbone", "markov_loop", "draft_choice", "verify_warpers", "acceptance")


class Timer:
    def __init__(self):
        self.totals = dict.fromkeys(PHASES, 0.0)
        self.active = False
        self.in_draft = False

    @contextlib.contextmanager
    def phase(self, name):
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.active:
                self.totals[name] += time.perf_counter() - start


def instrument(target, draft, timer: Timer):
    """Wrap the round's pieces; returns a function that undoes it."""
    undo = []

    def wrap_attr(obj, name, make):
        original = getattr(obj, name)
        setattr(obj, name, make(original))
        undo.append(lambda: setattr(obj, name, original))

    prefill = {"seen": False}

    def target_forward(original):
        def forward(*args, **kwargs):
            if not prefill["seen"]:  # the first forward of a generate call is the prefill
                prefill["seen"] = True
                return original(*args, **kwargs)
            with timer.phase("target_forward"):
                return original(*args, **kwargs)
        return forward

    wrap_attr(target, "forward", target_forward)

    def draft_block(original):
        def run(*args, **kwargs):
            with timer.phase("draft_backbone"):
                return original(*args, **kwargs)
        return run

    wrap_attr(draft, "draft_block", draft_block)

    def sample_block(original):
        def run(base_logits, hidden, anchor_ids, choose=None, num_tokens=None):
            spent = [0.0]
            timed_choose = None
            if choose is not None:
                def timed_choose(logits_k, k):
                    start = time.perf_counter()
                    timer.in_draft = True
                    try:
                        return choose(logits_k, k)
                    finally:
                        timer.in_draft = False
                        spent[0] += time.perf_counter() - start
            start = time.perf_counter()
            out = original(base_logits, hidden, anchor_ids, choose=timed_choose, num_tokens=num_tokens)
            if timer.active:
                timer.totals["markov_loop"] += time.perf_counter() - start - spent[0]
                timer.totals["draft_choice"] += spent[0]
            return out
        return run

    wrap_attr(draft, "sample_block", sample_block)

    def speculative_sampling(original):
        def run(*args, **kwargs):
            with timer.phase("acceptance"):
                return original(*args, **kwargs)
        return run

    wrap_attr(gen_utils, "_speculative_sampling", speculative_sampling)

    def reset_prefill():
        prefill["seen"] = False

    return reset_prefill, lambda: [u() for u in reversed(undo)]


def time_verify_warpers(processors, timer: Timer):
    """Time the LogitsProcessorList calls made outside the draft (transformers' per-position verify loop)."""
    original = processors.__call__

    def call(self, input_ids, scores, **kwargs):
        if timer.in_draft:
            return original(input_ids, scores, **kwargs)
        with timer.phase("verify_warpers"):
            return original(input_ids, scores, **kwargs)

    processors.__class__ = type("TimedLogitsProcessorList", (type(processors),), {"__call__": call})
    return processors


def hand_written_decode(target, input_ids, max_new_tokens, sample_kwargs, processors):
    """One forward per token with the KV cache: the floor plain ``generate`` is measured against."""
    from transformers import DynamicCache

    cache = DynamicCache(config=target.config)
    out = target(input_ids=input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    ids = input_ids
    for _ in range(max_new_tokens):
        scores = out.logits[:, -1].float()
        if processors is not None:
            scores = processors(ids, scores)
        if sample_kwargs.get("do_sample"):
            token = torch.multinomial(torch.softmax(scores, -1), 1)
        else:
            token = scores.argmax(-1, keepdim=True)
        ids = torch.cat([ids, token], dim=1)
        out = target(input_ids=token, past_key_values=cache, use_cache=True, logits_to_keep=1)
    return ids


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--target", default="gemma-3-270m")
    parser.add_argument("--draft", default="hf_dspark/assets/gemma-3-270m-dspark")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--draft-dtype", default=None, choices=["bfloat16", "float32"],
                        help="drafter dtype (default: the target's)")
    parser.add_argument("--sample", action="store_true", help="T=1, top-k 64, top-p 0.95 (default greedy)")
    parser.add_argument("--prompts", default=None, help="JSONL prompt file ({'turns': [...]}); default: 3 gsm8k")
    parser.add_argument("--num-prompts", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--ngram-lookup", type=lambda v: v if v == "auto" else int(v), default=0)
    parser.add_argument("--policy", default="full")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    target, tokenizer = load_target(args.target, dtype=dtype)
    draft = AutoModel.from_pretrained(args.draft, dtype=getattr(torch, args.draft_dtype or args.dtype)).eval()
    draft.generation_config.verification_policy = args.policy
    draft.generation_config.ngram_lookup_tokens = args.ngram_lookup

    prompts = DEFAULT_PROMPTS
    if args.prompts:
        with open(args.prompts) as f:
            prompts = [json.loads(line)["turns"][0] for line in f if line.strip()]
    prompts = prompts[: args.num_prompts]
    sample_kwargs = dict(do_sample=True, temperature=1.0, top_k=64, top_p=0.95) if args.sample else dict(do_sample=False)

    timer = Timer()
    reset_prefill, undo = instrument(target, draft, timer)
    # time the processors transformers builds: hook the list builder for this run only
    original_get_processor = type(target)._get_logits_processor

    def get_processor(self, *a, **k):
        return time_verify_warpers(original_get_processor(self, *a, **k), timer)

    type(target)._get_logits_processor = get_processor

    from hf_dspark.evaluation import fused_plain_kwargs

    fused_kwargs = fused_plain_kwargs(sample_kwargs)
    plain_s = dspark_s = hand_s = fused_s = 0.0
    plain_tokens = dspark_tokens = hand_tokens = fused_tokens = 0
    rounds = accepted = 0
    identical = True
    try:
        for rep in range(args.repeats + 1):  # the first pass warms up and is not counted
            for text in prompts:
                ids = tokenizer(text, return_tensors="pt").input_ids
                torch.manual_seed(rep)
                start = time.perf_counter()
                base = target.generate(ids, max_new_tokens=args.max_new_tokens, **sample_kwargs)
                t_plain = time.perf_counter() - start
                t_fused, n_fused = 0.0, 0
                if fused_kwargs is not None:
                    torch.manual_seed(rep)
                    start = time.perf_counter()
                    fused_out = target.generate(ids, max_new_tokens=args.max_new_tokens, **fused_kwargs)
                    t_fused, n_fused = time.perf_counter() - start, fused_out.shape[1] - ids.shape[1]

                start = time.perf_counter()
                with torch.no_grad():
                    proc = None
                    if args.sample:
                        from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper,
                                                                            TopKLogitsWarper, TopPLogitsWarper)
                        proc = LogitsProcessorList([TemperatureLogitsWarper(1.0), TopKLogitsWarper(64), TopPLogitsWarper(0.95)])
                        hf_dspark.fuse_top_k_top_p(proc)
                    hand = hand_written_decode(target, ids, args.max_new_tokens, sample_kwargs, proc)
                t_hand = time.perf_counter() - start

                torch.manual_seed(rep)
                reset_prefill()
                timer.active = rep > 0
                start = time.perf_counter()
                out = target.generate(ids, max_new_tokens=args.max_new_tokens, assistant_model=draft, **sample_kwargs)
                t_dspark = time.perf_counter() - start
                timer.active = False
                if rep == 0:
                    continue
                stats = draft.last_generation_stats
                plain_s += t_plain
                fused_s += t_fused
                fused_tokens += n_fused
                hand_s += t_hand
                dspark_s += t_dspark - stats["prefill_seconds"]
                plain_tokens += base.shape[1] - ids.shape[1]
                hand_tokens += hand.shape[1] - ids.shape[1]
                dspark_tokens += out.shape[1] - ids.shape[1]
                rounds += stats["rounds"]
                accepted += sum(stats["accepted_lengths"])
                if not args.sample:
                    identical &= torch.equal(base, out)
    finally:
        undo()
        type(target)._get_logits_processor = original_get_processor

    per_round = {k: v / rounds * 1000 for k, v in timer.totals.items()}
    round_ms = dspark_s / rounds * 1000
    per_round["bookkeeping"] = round_ms - sum(per_round.values())
    tau = accepted / rounds
    t1_ms = hand_s / hand_tokens * 1000
    outside = round_ms - per_round["target_forward"]
    result = {
        "target": args.target, "dtype": args.dtype, "draft_dtype": args.draft_dtype or args.dtype,
        "sampling": args.sample, "ngram_lookup_tokens": args.ngram_lookup, "policy": args.policy,
        "prompts": len(prompts), "max_new_tokens": args.max_new_tokens, "threads": args.threads,
        "rounds": rounds, "tau": tau, "round_ms": round_ms, "split_ms_per_round": per_round,
        "outside_target_ms_per_round": outside, "outside_target_share": outside / round_ms,
        "plain_generate_tok_s": plain_tokens / plain_s, "hand_decode_tok_s": hand_tokens / hand_s,
        "plain_generate_fused_tok_s": fused_tokens / fused_s if fused_s else None,
        "dspark_tok_s": dspark_tokens / dspark_s, "t1_ms_hand_decode": t1_ms,
        "speedup_vs_plain_generate": (dspark_tokens / dspark_s) / (plain_tokens / plain_s),
        "limit_tau_t1_over_round": tau * t1_ms / round_ms,
        # the bound with the round overhead (warpers, acceptance, bookkeeping) removed
        "limit_without_overhead": tau * t1_ms / (per_round["target_forward"] + per_round["draft_backbone"]
                                                 + per_round["markov_loop"] + per_round["draft_choice"]),
        "greedy_identical_to_plain": identical if not args.sample else None,
    }
    print(json.dumps(result, indent=2))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
