"""Quickstart: speculative decoding with a DSpark drafter through plain `generate`.

    python examples/quickstart.py                                  # tiny random models, runs anywhere in seconds
    python examples/quickstart.py --target gemma-3-270m --draft default   # the shipped Gemma 3 270M drafter

With your own models: ``--target <hub id or folder> --draft <drafter folder or hub id>``.
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import AutoModel

import hf_dspark  # noqa: F401  (registers the DSpark classes and the generate() hook)


def tiny_models():
    """A random 4-layer Qwen3 target and a fresh drafter built for it (no download)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    target = Qwen3ForCausalLM(
        Qwen3Config(vocab_size=256, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16, intermediate_size=128, eos_token_id=None)
    ).eval()
    draft = hf_dspark.DSparkDraftModel.from_target(target, block_size=5, markov_rank=16).eval()
    return target, draft, None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--target", default=None, help="target model (hub id, folder or 'gemma-3-270m'); default: tiny random")
    parser.add_argument("--draft", default=None, help="drafter folder / hub id, or 'default' for the shipped one")
    parser.add_argument("--prompt", default="Question: what is 12 times 7?\nAnswer:")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args(argv)

    if args.target is None:
        target, draft, tokenizer = tiny_models()
        input_ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(1))
    else:
        from hf_dspark.targets import load_target, resolve_draft

        target, tokenizer = load_target(args.target)
        draft = AutoModel.from_pretrained(resolve_draft(args.draft, args.target)).eval()  # hf_dspark is imported: no remote code
        input_ids = tokenizer(args.prompt, return_tensors="pt").input_ids

    start = time.perf_counter()
    plain = target.generate(input_ids, max_new_tokens=args.max_new_tokens, do_sample=False)
    plain_s = time.perf_counter() - start
    start = time.perf_counter()
    spec = target.generate(input_ids, max_new_tokens=args.max_new_tokens, do_sample=False, assistant_model=draft)
    spec_s = time.perf_counter() - start

    stats = draft.last_generation_stats
    new = spec.shape[1] - input_ids.shape[1]
    if tokenizer is not None:
        print(tokenizer.decode(spec[0, input_ids.shape[1]:], skip_special_tokens=True))
    print(f"identical to plain generate: {torch.equal(plain, spec)}")
    print(f"rounds {stats['rounds']}, mean accepted length (tau) {stats['mean_accepted_length']:.2f}")
    print(f"plain {new / plain_s:.1f} tok/s, DSpark {new / spec_s:.1f} tok/s, speedup {plain_s / spec_s:.2f}x")
    return 0 if torch.equal(plain, spec) else 1


if __name__ == "__main__":
    raise SystemExit(main())
