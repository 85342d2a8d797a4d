"""The drafter's own cost per round, piece by piece, outside ``generate``.

    flock /tmp/hf_dspark_cpu.lock python benchmarks/bench_drafter_cost.py [--target gemma-3-270m] \
        [--draft hf_dspark/assets/gemma-3-270m-dspark] [--dtype bfloat16] [--threads 2] [--rounds 200] \
        [--prompt-tokens 150] [--new-tokens 4] [--flush-mb 256] [--output FILE.json]

Loads the target and the drafter (bound to it), prefills the drafter's context cache with the
target features of a ``--prompt-tokens`` prompt, then runs ``--rounds`` rounds. Every round the
context cache is cropped back to the prompt, so each round appends ``--new-tokens`` committed tokens
to the same context, as a round of ``generate`` at that acceptance does. Each piece is timed on its
own, after a pass over a ``--flush-mb`` buffer (a round's target forward evicts the drafter's
weights from the CPU caches, so the drafter reads them from memory):

* ``project_context``: the new tokens' target features through ``fc`` and ``hidden_norm``;
* ``backbone``: the drafter layers over the block (context keys/values appended to the cache);
* ``compute_logits``: the draft head over the block's hidden states;
* ``draft_block``: the three above in one call, as ``generate`` makes it;
* ``sample_block_greedy``: the Markov loop with the choice ``generate`` makes for greedy decoding
  (argmax over the draft vocabulary, the drafted target ids collected);
* ``sample_block_sampling``: the same with top-k 64 / top-p 0.95, drawn as ``generate`` draws with its
  fast warpers: from the law on its support (``SupportWarp.law``), or, in code without it, through one
  fused top-k / top-p warper over the draft vocabulary.

Prints the median and the 20th percentile per piece in ms. Timings of two code versions are only
comparable from runs on the same machine under the same load.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
from transformers import LogitsProcessorList, TopKLogitsWarper, TopPLogitsWarper

from hf_dspark.checkpoints.loading import load_drafter
from hf_dspark.models.dspark.cache_dspark import DSparkDraftCache
from hf_dspark.models.dspark.warpers_dspark import fuse_top_k_top_p

try:
    from hf_dspark.models.dspark.sampling_dspark import SupportWarp
except ImportError:  # code from before the support sampling path
    SupportWarp = None
from hf_dspark.targets import load_target

PROMPT = (
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many "
    "clips did Natalia sell altogether in April and May? Weng earns $12 an hour for babysitting. Yesterday, she "
    "just did 50 minutes of babysitting. How much did she earn? Betty is saving money for a new wallet which "
    "costs $100. Betty has only half of the money she needs. Her parents decided to give her $15 for that "
    "purpose, and her grandparents twice as much as her parents. How much more money does Betty need to buy "
    "the wallet? James writes a 3-page letter to 2 different friends twice a week. How many pages does he "
    "write a year? Mark has a garden with flowers. He planted plants of three different colors in it."
)

PIECES = ("project_context", "backbone", "compute_logits", "draft_block", "sample_block_greedy",
          "sample_block_sampling")


def greedy_choice(draft, drafted):
    def choose(logits_k, k):
        draft_ids = logits_k.argmax(-1)
        drafted.append(draft.draft_ids_to_target(draft_ids)[:, None])
        return draft_ids, logits_k

    return choose


def sampling_choice(draft, drafted, input_ids):
    warpers = LogitsProcessorList([TopKLogitsWarper(64), TopPLogitsWarper(0.95)])
    warp = SupportWarp.from_processors(warpers) if SupportWarp is not None else None
    if warp is not None:  # generate's choice with fast warpers: a draw from the law on its support

        def choose(logits_k, k):
            ids, probs = warp.law(logits_k, keep_ties=False)
            draft_ids = ids.gather(-1, torch.multinomial(probs, num_samples=1)).squeeze(-1)
            drafted.append(draft.draft_ids_to_target(draft_ids)[:, None])
            return draft_ids, logits_k

        return choose
    fuse_top_k_top_p(warpers)  # older code: one fused top-k / top-p warper over the draft vocabulary

    def choose(logits_k, k):
        scores = logits_k.float()
        for warper in warpers:
            scores = warper(input_ids, scores)
        draft_ids = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(-1)
        drafted.append(draft.draft_ids_to_target(draft_ids)[:, None])
        return draft_ids, scores

    return choose


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--target", default="gemma-3-270m")
    parser.add_argument("--draft", default="hf_dspark/assets/gemma-3-270m-dspark")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--prompt-tokens", type=int, default=150)
    parser.add_argument("--new-tokens", type=int, default=4, help="committed tokens appended per round")
    parser.add_argument("--flush-mb", type=int, default=256, help="buffer read before each timed piece (0: none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None, help="write the figures as JSON here")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    dtype = getattr(torch, args.dtype)
    target, tokenizer = load_target(args.target, dtype=dtype)
    draft = load_drafter(args.draft, dtype=dtype, target=target)
    config = draft.config

    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    if ids.shape[1] < args.prompt_tokens + args.new_tokens:
        raise SystemExit(f"the prompt has only {ids.shape[1]} tokens; lower --prompt-tokens")
    ids = ids[:, : args.prompt_tokens + args.new_tokens]
    with torch.no_grad():
        hidden = target(ids, output_hidden_states=True).hidden_states
    features = torch.cat([hidden[i + 1] for i in config.target_layer_ids], dim=-1)
    prompt_features, new_features = features[:, : args.prompt_tokens], features[:, args.prompt_tokens:]
    anchor = ids[:, -1]

    flush = torch.ones(args.flush_mb * 2**18) if args.flush_mb else None
    times = {name: [] for name in PIECES}

    def timed(name, fn):
        if flush is not None:
            flush.mul_(1.0)
        start = time.perf_counter()
        out = fn()
        times[name].append(time.perf_counter() - start)
        return out

    with torch.inference_mode():
        cache = DSparkDraftCache(config.num_hidden_layers)
        draft.draft_block(ids[:, args.prompt_tokens - 1], prompt_features, cache)
        past = cache.get_seq_length()
        context_positions = torch.arange(past, past + args.new_tokens)[None]
        block_positions = torch.arange(past + args.new_tokens, past + args.new_tokens + config.block_size)[None]
        block_embeds = draft.embed(draft.block_input_ids(anchor))
        for round_index in range(args.rounds + 5):
            if round_index == 5:  # warm-up rounds are not samples
                times = {name: [] for name in PIECES}
            context = timed("project_context", lambda: draft.project_context(new_features))
            cache.crop(past)
            out = timed("backbone", lambda: draft.backbone(block_embeds, block_positions, context,
                                                           context_positions, None, cache))
            timed("compute_logits", lambda: draft.compute_logits(out))
            cache.crop(past)
            block = timed("draft_block", lambda: draft.draft_block(anchor, new_features, cache))
            drafted = []
            timed("sample_block_greedy", lambda: draft.sample_block(
                block.base_logits, block.hidden_states, anchor, choose=greedy_choice(draft, drafted)))
            drafted = []
            timed("sample_block_sampling", lambda: draft.sample_block(
                block.base_logits, block.hidden_states, anchor, choose=sampling_choice(draft, drafted, ids)))

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    figures = {
        name: {"median_ms": statistics.median(v) * 1e3, "p20_ms": statistics.quantiles(v, n=5)[0] * 1e3}
        for name, v in times.items()
    }
    print(f"{cpu}, {torch.backends.cpu.get_cpu_capability()}, {args.threads} threads, {args.dtype}, "
          f"{args.rounds} rounds, context {past} + {args.new_tokens} tokens, block {config.block_size}")
    for name, f in figures.items():
        print(f"  {name:24s} median {f['median_ms']:7.3f} ms   p20 {f['p20_ms']:7.3f} ms")
    per_round = figures["draft_block"]["median_ms"]
    print(f"  draft_block + sample_block: greedy {per_round + figures['sample_block_greedy']['median_ms']:.3f} ms, "
          f"sampling {per_round + figures['sample_block_sampling']['median_ms']:.3f} ms")
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"cpu": cpu, "capability": torch.backends.cpu.get_cpu_capability(), "threads": args.threads,
                       "dtype": args.dtype, "rounds": args.rounds, "context_tokens": past,
                       "new_tokens": args.new_tokens, "torch": torch.__version__, "pieces": figures}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
