"""``hf-dspark demo``: Gemma 3 270M with its shipped DSpark drafter, next to plain ``generate``.

Usage::

    hf-dspark demo                                   # gemma-3-270m + the shipped drafter, greedy, 128 new tokens
    hf-dspark demo --max-new-tokens 64
    hf-dspark demo --target TARGET --draft DRAFT_DIR # any target and drafter
    hf-dspark demo --tiny                            # same flow on a tiny random target + fresh drafter (seconds)
    hf-dspark demo --policy full                     # verify every drafted token (default: cost policy)

For each demo prompt, plain ``generate`` and ``generate(assistant_model=draft)`` run on the same
ids (timed by :func:`hf_dspark.evaluation.measure_generate`, the code path of ``hf-dspark eval``);
the demo prints the text, the mean accepted length tau, both speeds and the speed-up, and checks
that the two outputs are token for token identical. Exit code 0 when every output matches, 1 when
one does not, 2 when the models cannot be loaded.
"""

from __future__ import annotations

import argparse
import sys

import torch

from .errors import HfDSparkError
from .evaluation import _apply_policy, measure_generate

DEMO_PROMPTS = [
    "Question: A school bus holds 36 students. The school has 5 buses and 170 students are going on a trip. "
    "How many empty seats will there be?\nAnswer: Let's think step by step.",
    "Write a Python function `is_palindrome(s)` that returns True when the string s reads the same "
    "backwards, ignoring case and spaces.\n\n```python\n",
    "Question: Why do we see lightning before we hear thunder?\nAnswer:",
]
TINY_VOCAB_SIZE = 256  # the tiny demo "tokenizer" maps UTF-8 bytes to ids


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default="gemma-3-270m", help="Target: Hub id, local folder or 'gemma-3-270m'.")
    parser.add_argument("--draft", default="default",
                        help="Drafter folder / Hub id, or 'default' (the drafter shipped for the target).")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="New tokens per prompt (default 128).")
    parser.add_argument("--policy", choices=["full", "threshold", "cost", "auto"], default=None,
                        help="Verification policy (default: 'cost' on a real target: the target's verify latency is "
                             "profiled on this machine once, cached, and each round verifies the draft prefix with the "
                             "best expected tokens/s; 'full' with --tiny).")
    parser.add_argument("--ngram-lookup", type=int, default=None, metavar="N",
                        help="n-gram rounds: copy up to N tokens after an earlier match of the last tokens instead of "
                             "drafting (0 = off; default: the drafter's saved setting).")
    parser.add_argument("--tiny", action="store_true",
                        help="Run on a tiny random target and a fresh (untrained) drafter: checks the flow in seconds.")


class ByteCodec:
    """Text <-> ids for the tiny demo: one id per UTF-8 byte (a random model's output is noise anyway)."""

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def tiny_models():
    """A random 4-layer Qwen3 target over 256 byte ids and a fresh drafter built for it (no download)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from .modeling_dspark import DSparkDraftModel

    torch.manual_seed(0)
    target = Qwen3ForCausalLM(
        Qwen3Config(vocab_size=TINY_VOCAB_SIZE, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16, intermediate_size=128, eos_token_id=None, pad_token_id=0)
    ).eval()
    target.generation_config.eos_token_id = None
    target.generation_config.pad_token_id = 0
    draft = DSparkDraftModel.from_target(target, block_size=5, markov_rank=16).eval()
    return target, draft, ByteCodec()


class TokenizerCodec:
    """Text <-> ids through the target's tokenizer, rendering prompts as ``hf-dspark eval`` does."""

    def __init__(self, tokenizer, trained_with: bool | None = None):
        from .trainer.regenerate import resolve_chat_mode

        self.tokenizer = tokenizer
        self.chat = resolve_chat_mode(tokenizer, "auto", trained_with)

    def encode(self, text: str) -> list[int]:
        from .trainer.regenerate import encode_prompt

        return encode_prompt(self.tokenizer, text, self.chat)

    def decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def load_models(target_name: str, draft_name: str):
    """The target, its drafter and a codec for the demo prompts."""
    from .loading import load_drafter
    from .targets import load_target, resolve_draft

    draft_source = resolve_draft(draft_name, target_name)  # fails fast, before the target loads
    target, tokenizer = load_target(target_name)
    draft = load_drafter(draft_source)
    return target, draft, TokenizerCodec(tokenizer, getattr(draft.config, "prompt_chat_template", None))


def run(args) -> int:
    if args.max_new_tokens < 1:
        print(f"hf-dspark demo: error: --max-new-tokens must be >= 1, got {args.max_new_tokens}", file=sys.stderr)
        return 2
    try:
        target, draft, codec = tiny_models() if args.tiny else load_models(args.target, args.draft)
    except HfDSparkError as error:
        print(f"hf-dspark demo: error: {error}", file=sys.stderr)
        return 2
    kwargs = {"max_new_tokens": args.max_new_tokens, "do_sample": False}
    label = "tiny random target + fresh drafter" if args.tiny else f"{args.target} + drafter {args.draft}"
    policy = args.policy or ("full" if args.tiny else "cost")
    if policy == "cost" and not draft.generation_config.latency_table:
        print("profiling the target's verification latency on this machine (cached for later runs)...", flush=True)
    if args.ngram_lookup is not None:
        if args.ngram_lookup < 0:
            print(f"hf-dspark demo: error: --ngram-lookup must be >= 0 (0 = off), got {args.ngram_lookup}",
                  file=sys.stderr)
            return 2
        draft.generation_config.ngram_lookup_tokens = args.ngram_lookup
    try:
        _apply_policy(draft, policy, target)
    except HfDSparkError as error:
        print(f"hf-dspark demo: error: {error}", file=sys.stderr)
        return 2
    ngram = int(getattr(draft.generation_config, "ngram_lookup_tokens", 0) or 0)
    print(f"DSpark demo: {label}, greedy, {args.max_new_tokens} new tokens per prompt, "
          f"verification policy {policy!r}, n-gram rounds {f'on ({ngram} tokens)' if ngram else 'off'}\n")

    first = torch.tensor([codec.encode(DEMO_PROMPTS[0])])
    measure_generate(target, first, {**kwargs, "max_new_tokens": 4})  # warm-up, untimed
    measure_generate(target, first, {**kwargs, "max_new_tokens": 4}, assistant_model=draft)

    totals = {"plain": [0, 0.0], "dspark": [0, 0.0], "accepted": 0, "rounds": 0, "ngram_rounds": 0}
    all_identical = True
    for number, prompt in enumerate(DEMO_PROMPTS, start=1):
        input_ids = torch.tensor([codec.encode(prompt)])
        plain = measure_generate(target, input_ids, kwargs)
        spec = measure_generate(target, input_ids, kwargs, assistant_model=draft)
        identical = torch.equal(plain.output_ids, spec.output_ids)
        all_identical &= identical
        stats = spec.stats or {}
        tau = stats.get("mean_accepted_length") or float("nan")
        plain_tps, spec_tps = plain.new_tokens / plain.seconds, spec.new_tokens / spec.seconds
        for key, m in (("plain", plain), ("dspark", spec)):
            totals[key][0] += m.new_tokens
            totals[key][1] += m.seconds
        totals["accepted"] += sum(stats.get("accepted_lengths", []))
        totals["rounds"] += stats.get("rounds", 0)
        totals["ngram_rounds"] += stats.get("ngram_rounds", 0)

        print(f"--- prompt {number} " + "-" * 60)
        print(prompt if not args.tiny else repr(prompt))
        text = codec.decode(spec.output_ids[0, input_ids.shape[1]:])
        print(f">>> {text if not args.tiny else repr(text)}")
        print(f"tau {tau:.2f} | plain {plain_tps:.1f} tok/s | DSpark {spec_tps:.1f} tok/s | "
              f"speed-up {spec_tps / plain_tps:.2f}x | identical to plain generate: {identical}\n")

    plain_tps = totals["plain"][0] / totals["plain"][1]
    spec_tps = totals["dspark"][0] / totals["dspark"][1]
    tau = totals["accepted"] / totals["rounds"] if totals["rounds"] else float("nan")
    print(f"overall: tau {tau:.2f}, plain {plain_tps:.1f} tok/s, DSpark {spec_tps:.1f} tok/s, "
          f"speed-up {spec_tps / plain_tps:.2f}x")
    if ngram:
        print(f"n-gram rounds: {totals['ngram_rounds']} of {totals['rounds']} rounds copied earlier tokens "
              "instead of drafting")
    print("all outputs identical to plain generate" if all_identical
          else "MISMATCH: an output differs from plain generate")
    return 0 if all_identical else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hf-dspark demo", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
