"""Where sampling time goes: the warpers (temperature 1, top-k 64, top-p 0.95) in DSpark generation.

    python benchmarks/bench_sampling_warpers.py --target gemma-3-270m --draft DIR [--prompts FILE]
        [--num-prompts 3] [--max-new-tokens 128] [--modes plain full_vocab_warpers ...]

Modes, run on the same prompts in one process, interleaved prompt by prompt:
  plain                transformers' sampling without a drafter
  plain_fused          the same, with the fused top-k + top-p warper passed as a logits processor (what
                       plain sampling would gain from the fused warper alone)
  full_vocab_warpers   DSpark; the drafter warps full-vocabulary scores; transformers' top-k/top-p pair
  draft_vocab_warpers  DSpark; the drafter warps in its reduced vocabulary; transformers' top-k/top-p pair
  fused_warpers        DSpark defaults: draft-vocabulary warping and the fused top-k + top-p warper on
                       both the draft and the verification side
Prints tokens/s, tau, seconds per round and the ratios to plain. Sampled texts differ between runs
(different random draws); each run follows the target's distribution exactly.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import AutoModel, LogitsProcessorList
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

import hf_dspark.models.dspark.generation_dspark as generation
from hf_dspark.targets import load_target

MODES = ("plain", "plain_fused", "full_vocab_warpers", "draft_vocab_warpers", "fused_warpers")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--target", default="gemma-3-270m")
    parser.add_argument("--draft", required=True)
    parser.add_argument("--prompts", default="../shared/data/prompts/eval/gsm8k.jsonl")
    parser.add_argument("--num-prompts", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--output", help="write the figures as JSON")
    args = parser.parse_args(argv)

    target, tokenizer = load_target(args.target)
    draft = AutoModel.from_pretrained(args.draft, trust_remote_code=True).eval()
    draft.generation_config.verification_policy = "full"
    with open(args.prompts, encoding="utf-8") as fh:
        texts = [json.loads(line)["turns"][0] for line in fh][: args.num_prompts]
    warp = dict(do_sample=True, temperature=1.0, top_k=64, top_p=0.95, max_new_tokens=args.max_new_tokens)
    local = generation.VOCAB_LOCAL_WARPERS
    totals = {mode: dict(tokens=0, seconds=0.0, rounds=0, accepted=0) for mode in args.modes}
    for i, text in enumerate(texts):
        ids = tokenizer(text, return_tensors="pt").input_ids
        for mode in args.modes:
            generation.VOCAB_LOCAL_WARPERS = () if mode == "full_vocab_warpers" else local
            draft.generation_config.fast_warpers = mode == "fused_warpers"
            torch.manual_seed(i)
            if mode == "plain":
                kwargs = dict(warp)
            elif mode == "plain_fused":
                fused = generation.FusedTopKTopPWarper(TopKLogitsWarper(warp["top_k"]), TopPLogitsWarper(warp["top_p"]))
                kwargs = dict(warp, top_k=0, top_p=1.0, logits_processor=LogitsProcessorList([fused]))
            else:
                kwargs = dict(warp, assistant_model=draft)
            start = time.perf_counter()
            with torch.inference_mode():
                out = target.generate(ids, **kwargs)
            total = totals[mode]
            total["seconds"] += time.perf_counter() - start
            total["tokens"] += out.shape[1] - ids.shape[1]
            if not mode.startswith("plain"):
                stats = draft.last_generation_stats
                total["rounds"] += stats["rounds"]
                total["accepted"] += sum(stats["accepted_lengths"])
        print(f"prompt {i + 1}/{len(texts)} done", flush=True)
    generation.VOCAB_LOCAL_WARPERS = local
    draft.generation_config.fast_warpers = True
    results = {}
    for mode, t in totals.items():
        results[mode] = dict(tokens_per_second=t["tokens"] / t["seconds"],
                             tau=t["accepted"] / t["rounds"] if t["rounds"] else None,
                             seconds_per_round=t["seconds"] / t["rounds"] if t["rounds"] else None)
        print(mode, {k: (round(v, 3) if isinstance(v, float) else v) for k, v in results[mode].items()}, flush=True)
    if "plain" in results:
        base = results["plain"]["tokens_per_second"]
        for mode in results:
            if mode != "plain":
                print(f"{mode}: {results[mode]['tokens_per_second'] / base:.2f}x plain")
    if args.output:
        with open(args.output, "w", encoding="utf-8") as fh:
            json.dump(dict(settings=vars(args), results=results), fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
