"""Verification pass cost with and without the skinny-product LM head, side by side.

    python benchmarks/bench_verify_head.py --target gemma-3-270m [--max-tokens 16] [--repeats 7]
        [--draft DIR --max-new-tokens 128] [--output results/verify_head.json]

For n = 1..max-tokens, one target forward scoring n new tokens on a 128-token cached context is
timed with transformers' LM head and with the layout a DSpark generation activates
(``hf_dspark.models.dspark.generation_dspark.activate_verify_head``), alternating the two on every repeat so
that machine noise hits both alike; the median of each is printed with the ratio. The largest
logit difference between the two layouts is printed too. With ``--draft``, greedy
``generate(assistant_model=draft)`` on a few prompts is timed with ``fast_verify_head`` on and
off (outputs must be identical to each other and to plain ``generate``).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch

from hf_dspark.models.dspark.generation_dspark import activate_verify_head
from hf_dspark.targets import load_target

PROMPTS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
]


class _Owner:
    pass


def _forward_time(target, ids, context_len, n, cache_factory):
    cache = cache_factory()
    start = time.perf_counter()
    out = target(input_ids=ids[:, context_len:context_len + n], cache=cache, use_cache=True)
    return time.perf_counter() - start, out.logits


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--target", default="gemma-3-270m")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--context-length", type=int, default=128)
    parser.add_argument("--draft", default=None, help="also time generate(assistant_model=draft) both ways")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)

    target, tokenizer = load_target(args.target)
    target.eval()
    vocab = target.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, (1, args.context_length + args.max_tokens), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        prefix = target(input_ids=ids[:, : args.context_length], use_cache=True).cache

    def fresh_cache():
        return copy.deepcopy(prefix)

    rows = []
    print(f"{'n':>3} {'transformers ms':>16} {'skinny ms':>10} {'ratio':>7} {'max |dlogit|':>13}", flush=True)
    with torch.inference_mode():
        for n in range(1, args.max_tokens + 1):
            plain, skinny, diff = [], [], 0.0
            for r in range(args.repeats + 1):
                t0, ref = _forward_time(target, ids, args.context_length, n, fresh_cache)
                owner = _Owner()
                handle = activate_verify_head(target, owner)
                t1, fast = _forward_time(target, ids, args.context_length, n, fresh_cache)
                handle()
                if r:  # first repeat is warm-up
                    plain.append(t0)
                    skinny.append(t1)
                diff = max(diff, (ref - fast).abs().max().item())
            a, b = statistics.median(plain), statistics.median(skinny)
            rows.append(dict(tokens=n, transformers_ms=a * 1e3, skinny_ms=b * 1e3, ratio=a / b, max_abs_logit_diff=diff))
            print(f"{n:>3} {a * 1e3:16.1f} {b * 1e3:10.1f} {a / b:6.2f}x {diff:13.2e}", flush=True)

    result = dict(target=args.target, threads=torch.get_num_threads(), context_length=args.context_length,
                  repeats=args.repeats, forward=rows)

    if args.draft:
        from transformers import AutoModel

        draft = AutoModel.from_pretrained(args.draft, trust_remote_code=True).eval()
        draft.generation_config.verification_policy = "full"
        timings = {"plain": 0.0, "off": 0.0, "on": 0.0}
        tokens = 0
        for text in PROMPTS:
            inputs = tokenizer(text, return_tensors="pt")
            outs = {}
            for mode in ("plain", "off", "on"):
                kwargs = dict(max_new_tokens=args.max_new_tokens, do_sample=False)
                if mode != "plain":
                    draft.generation_config.fast_verify_head = mode == "on"
                    kwargs["assistant_model"] = draft
                start = time.perf_counter()
                outs[mode] = target.generate(**inputs, **kwargs)
                timings[mode] += time.perf_counter() - start
            if not (torch.equal(outs["plain"], outs["off"]) and torch.equal(outs["plain"], outs["on"])):
                raise SystemExit(f"outputs differ on prompt {text[:40]!r}: losslessness broken")
            tokens += outs["plain"].shape[1] - inputs["input_ids"].shape[1]
        speeds = {k: tokens / v for k, v in timings.items()}
        result["generate"] = dict(tokens=tokens, tokens_per_second=speeds,
                                  speedup_head_off=speeds["off"] / speeds["plain"],
                                  speedup_head_on=speeds["on"] / speeds["plain"], outputs_identical=True)
        print(f"generate, {tokens} tokens: plain {speeds['plain']:.2f} tok/s, DSpark head off {speeds['off']:.2f} "
              f"({speeds['off'] / speeds['plain']:.2f}x), head on {speeds['on']:.2f} ({speeds['on'] / speeds['plain']:.2f}x); "
              "outputs identical", flush=True)

    if args.output:
        with open(args.output, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
