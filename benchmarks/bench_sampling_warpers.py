"""Sampling with a reduced draft vocabulary: warpers applied in the draft vocabulary vs the full one.

    python benchmarks/bench_sampling_warpers.py --target gemma-3-270m --draft DIR [--prompts FILE]
        [--num-prompts 3] [--max-new-tokens 128]

Runs plain sampling, DSpark with the warpers (temperature 1, top-k 64, top-p 0.95) applied to the
full-vocabulary scores, and DSpark with them applied in the draft vocabulary (the default), on the
same prompts in one process; prints tokens/s, tau and the ratios. Sampled texts differ between runs
(different random draws); each run follows the target's distribution exactly.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import AutoModel

import hf_dspark.generation_dspark as generation
from hf_dspark.targets import load_target


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--target", default="gemma-3-270m")
    parser.add_argument("--draft", required=True)
    parser.add_argument("--prompts", default="../shared/data/prompts/eval/gsm8k.jsonl")
    parser.add_argument("--num-prompts", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    args = parser.parse_args(argv)

    target, tokenizer = load_target(args.target)
    draft = AutoModel.from_pretrained(args.draft, trust_remote_code=True).eval()
    draft.generation_config.verification_policy = "full"
    with open(args.prompts, encoding="utf-8") as fh:
        texts = [json.loads(line)["turns"][0] for line in fh][: args.num_prompts]
    warp = dict(do_sample=True, temperature=1.0, top_k=64, top_p=0.95, max_new_tokens=args.max_new_tokens)
    local = generation.VOCAB_LOCAL_WARPERS
    results = {}
    for mode in ("plain", "full_vocab_warpers", "draft_vocab_warpers"):
        generation.VOCAB_LOCAL_WARPERS = () if mode == "full_vocab_warpers" else local
        tokens = rounds = accepted = 0
        seconds = 0.0
        for i, text in enumerate(texts):
            ids = tokenizer(text, return_tensors="pt").input_ids
            torch.manual_seed(i)
            kwargs = dict(warp) if mode == "plain" else dict(warp, assistant_model=draft)
            start = time.perf_counter()
            with torch.inference_mode():
                out = target.generate(ids, **kwargs)
            seconds += time.perf_counter() - start
            tokens += out.shape[1] - ids.shape[1]
            if mode != "plain":
                stats = draft.last_generation_stats
                rounds += stats["rounds"]
                accepted += sum(stats["accepted_lengths"])
        results[mode] = dict(tokens_per_second=tokens / seconds, tau=accepted / rounds if rounds else None,
                             seconds_per_round=seconds / rounds if rounds else None)
        print(mode, {k: (round(v, 3) if isinstance(v, float) else v) for k, v in results[mode].items()}, flush=True)
    generation.VOCAB_LOCAL_WARPERS = local
    base = results["plain"]["tokens_per_second"]
    for mode in ("full_vocab_warpers", "draft_vocab_warpers"):
        print(f"{mode}: {results[mode]['tokens_per_second'] / base:.2f}x plain")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
