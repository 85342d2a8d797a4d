"""Where does a DSpark round spend its time? Draft vs verify on a real target.

    python benchmarks/bench_round_split.py --target gemma-3-270m [--draft DIR] [--block-size 7]
        [--draft-vocab-size 32768] [--prompts FILE] [--num-prompts 3] [--max-new-tokens 64]

Without ``--draft`` a random drafter is built with ``DSparkDraftModel.from_target`` (the split
only depends on shapes, not on training). Prints T_verify(n) for n = 1..16 (one target forward
scoring n new tokens on a 128-token context), the per-round split measured inside real
``generate(assistant_model=...)`` calls (draft = drafter block + Markov loop + confidences;
verify = target forward + acceptance), and the draft share of a round.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from hf_dspark import DSparkDraftModel, profile_latency
from hf_dspark.targets import load_target

DEFAULT_PROMPTS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Write a short paragraph explaining why the sky is blue.",
]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--target", default="gemma-3-270m")
    parser.add_argument("--draft", default=None, help="drafter folder; default: a random drafter built from the target")
    parser.add_argument("--block-size", type=int, default=7)
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--draft-vocab-size", type=int, default=32768, help="0 = full target vocabulary")
    parser.add_argument("--markov-rank", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--max-verify-tokens", type=int, default=16)
    parser.add_argument("--output", default=None, help="write the figures as JSON here")
    args = parser.parse_args(argv)

    target, tokenizer = load_target(args.target)
    if args.draft:
        from transformers import AutoModel

        draft = AutoModel.from_pretrained(args.draft, trust_remote_code=True).eval()
    else:
        overrides = dict(block_size=args.block_size, num_hidden_layers=args.num_layers, markov_rank=args.markov_rank)
        if args.draft_vocab_size:
            overrides["draft_token_ids"] = list(range(args.draft_vocab_size))
        draft = DSparkDraftModel.from_target(target, tokenizer, **overrides).eval()
    draft.generation_config.verification_policy = "full"

    profile = profile_latency(target, token_counts=range(1, args.max_verify_tokens + 1), context_length=128)
    table = profile.table[1]
    print("T_verify(n): one target forward scoring n tokens (128-token context)")
    for n in sorted(table):
        print(f"  n={n:2d}  {table[n] * 1000:7.1f} ms")

    rounds = draft_s = verify_s = 0.0
    for text in DEFAULT_PROMPTS:
        ids = tokenizer(text, return_tensors="pt").input_ids
        target.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False, assistant_model=draft)
        stats = draft.last_generation_stats
        rounds += stats["rounds"]
        draft_s += stats["draft_seconds"]
        verify_s += stats["verify_seconds"]
    per_round_draft = draft_s / rounds
    per_round_verify = verify_s / rounds
    share = per_round_draft / (per_round_draft + per_round_verify)
    print(f"\nper round (block {draft.config.block_size}, {int(rounds)} rounds over {len(DEFAULT_PROMPTS)} prompts):")
    print(f"  draft  {per_round_draft * 1000:7.1f} ms")
    print(f"  verify {per_round_verify * 1000:7.1f} ms")
    print(f"  draft share of a round: {share:.1%} (goal <= 15%)")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(
                {
                    "target": args.target,
                    "block_size": draft.config.block_size,
                    "draft_vocab_size": draft.config.draft_vocab_size,
                    "num_draft_layers": draft.config.num_hidden_layers,
                    "t_verify_seconds": {str(k): v for k, v in sorted(table.items())},
                    "draft_seconds_per_round": per_round_draft,
                    "verify_seconds_per_round": per_round_verify,
                    "draft_share": share,
                    "torch_threads": torch.get_num_threads(),
                },
                f,
                indent=2,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
