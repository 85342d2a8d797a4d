"""``hf-dspark demo``: Gemma 3 270M with its shipped DSpark drafter, next to plain ``generate``.

Usage::

    hf-dspark demo                                   # gemma-3-270m + the shipped drafter, greedy, 128 new tokens
    hf-dspark demo --max-new-tokens 64
    hf-dspark demo --target TARGET --draft DRAFT_DIR # any target and drafter
    hf-dspark demo --tiny                            # same flow on a tiny random target + fresh drafter (seconds)
    hf-dspark demo --policy full                     # verify every drafted token (default: cost policy)
    hf-dspark demo --modes greedy --dtype float32    # one mode, a fixed dtype (default: both modes, dtype auto)

Greedy, then sampling (T=1, top-k 64, top-p 0.95). For each demo prompt, plain ``generate`` (for
sampling also plain ``generate`` with the fused top-k/top-p warper, the fastest exact plain setup) and
``generate(assistant_model=draft)`` run on the same ids (timed by
:func:`hf_dspark.evaluation.measure_generate`, the code path of ``hf-dspark eval``); the demo prints
the text, tau, the speeds and the speed-up over the faster plain run, and checks that greedy outputs
are token for token identical (in bf16/fp16: identical, or parting only where the target's two best
logits are within ``NEAR_TIE_ULPS`` rounding steps, the reduced-precision contract). ``--dtype auto`` profiles the target's verification pass in fp32 and
bf16 and keeps the faster dtype (bf16 needs AVX512-BF16 or a GPU to pay). Exit code 0 when every
greedy output meets that, 1 when one does not, 2 when the models cannot be loaded.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass

import torch

from hf_dspark.commands.arguments import (
    DrafterArguments, PromptArguments, TargetArguments, add_config_argument, add_dataclass_arguments, flag,
)
from hf_dspark.errors import HfDSparkError
from hf_dspark.targets import GEMMA_ALIAS
from hf_dspark.evaluation.measure import apply_policy, measure_generate

DEMO_PROMPTS = [
    "Question: A school bus holds 36 students. The school has 5 buses and 170 students are going on a trip. "
    "How many empty seats will there be?\nAnswer: Let's think step by step.",
    "Write a Python function `is_palindrome(s)` that returns True when the string s reads the same "
    "backwards, ignoring case and spaces.\n\n```python\n",
    "Question: Why do we see lightning before we hear thunder?\nAnswer:",
]
TINY_VOCAB_SIZE = 256  # the tiny demo "tokenizer" maps UTF-8 bytes to ids


@dataclass
class DemoArguments:
    """What the demo shows."""

    modes: list[str] = flag(["greedy", "sampling"], nargs="+", choices=["greedy", "sampling"],
                            help="decoding modes to show (default both; sampling: T=1, top-k 64, top-p 0.95)")
    tiny: bool = flag(False, action="store_true", help="run on a tiny random target and a fresh (untrained) "
                                                       "drafter: checks the flow in seconds")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # The demo runs in the dtype measured fastest on this machine unless told otherwise (--dtype auto):
    # it is the first speed-up a user sees, and bf16 pays only on some CPUs.
    add_dataclass_arguments(parser, TargetArguments, ("target", "dtype"),
                            defaults={"target": GEMMA_ALIAS, "dtype": "auto"},
                            overrides={"target": {"help": "target: Hub id, local folder or 'gemma-3-270m' (default)"},
                                       "dtype": {"help": "target and drafter dtype (default auto: the one whose "
                                                         "8-token verification pass is fastest on this machine, "
                                                         "measured once and cached)"}})
    add_dataclass_arguments(
        parser, DrafterArguments, ("draft", "policy", "ngram_lookup"), defaults={"draft": "default"},
        overrides={"draft": {"help": "drafter folder / Hub id, or 'default' (the drafter shipped for the target)"},
                   "policy": {"help": "verification policy (default: the drafter's saved one; the shipped "
                                      "drafter's is 'auto': the target's verification cost curve is profiled on "
                                      "this machine once, cached, and each round verifies the draft prefix with "
                                      "the best expected tokens/s; 'full' with --tiny)"}})
    add_dataclass_arguments(parser, PromptArguments, ("max_new_tokens",))
    add_dataclass_arguments(parser, DemoArguments)
    add_config_argument(parser)


class ByteCodec:
    """Text <-> ids for the tiny demo: one id per UTF-8 byte (a random model's output is noise anyway)."""

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def tiny_models():
    """A random 4-layer Qwen3 target over 256 byte ids and a fresh drafter built for it (no download)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from hf_dspark.models.dspark.modeling_dspark import DSparkDraftModel

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
        from hf_dspark.data.encoding import resolve_chat_mode

        self.tokenizer = tokenizer
        self.chat = resolve_chat_mode(tokenizer, "auto", trained_with)

    def encode(self, text: str) -> list[int]:
        from hf_dspark.data.encoding import encode_prompt

        return encode_prompt(self.tokenizer, text, self.chat)

    def decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def load_models(target_name: str, draft_name: str):
    """The target, its drafter and a codec for the demo prompts."""
    from hf_dspark.checkpoints.loading import load_drafter
    from hf_dspark.targets import load_target, resolve_draft

    draft_source = resolve_draft(draft_name, target_name)  # fails fast, before the target loads
    target, tokenizer = load_target(target_name)
    draft = load_drafter(draft_source)
    return target, draft, TokenizerCodec(tokenizer, getattr(draft.config, "prompt_chat_template", None))


NEAR_TIE_ULPS = 2  # the bf16/fp16 greedy contract (README): outputs may part only at a tie this close
SAMPLING = {"do_sample": True, "temperature": 1.0, "top_k": 64, "top_p": 0.95}  # Gemma 3's recommended settings


def _pick_dtype(args, target):
    """The target in the dtype asked for, or (``--dtype auto``) in the one measured fastest for verification."""
    from hf_dspark.decoding.latency import choose_dtype

    if args.dtype != "auto":
        return target.to(getattr(torch, args.dtype)), None
    if args.tiny:
        return target, None
    print("measuring the target's verification pass in float32 and bfloat16 (cached for later runs)...", flush=True)
    best, measured = choose_dtype(target, model_name=args.target)
    figures = ", ".join(f"{name} {t[1] * 1e3:.0f} ms (1 token) / {t[8] * 1e3:.0f} ms (8 tokens)"
                        for name, t in measured.items())
    note = f"dtype {best}: fastest 8-token pass on this machine ({figures}); pass --dtype to override"
    return target.to(getattr(torch, best)), note


def _run_mode(target, draft, codec, mode: str, args) -> dict:
    """One decoding mode over the demo prompts: plain (and plain with the fused warper) vs DSpark."""
    from hf_dspark.evaluation import fused_plain_kwargs

    kwargs = {"max_new_tokens": args.max_new_tokens, **(SAMPLING if mode == "sampling" else {"do_sample": False})}
    fused = fused_plain_kwargs(kwargs)
    first = torch.tensor([codec.encode(DEMO_PROMPTS[0])])
    short = {**kwargs, "max_new_tokens": 4}
    measure_generate(target, first, short)  # warm-up, untimed
    measure_generate(target, first, short, assistant_model=draft)
    totals = {"plain": [0, 0.0], "fused": [0, 0.0], "dspark": [0, 0.0], "accepted": 0, "rounds": 0, "ngram_rounds": 0}
    identical_all = True
    for number, prompt in enumerate(DEMO_PROMPTS, start=1):
        input_ids = torch.tensor([codec.encode(prompt)])
        runs = {"plain": measure_generate(target, input_ids, kwargs, seed=number)}
        if fused is not None:
            runs["fused"] = measure_generate(target, input_ids, fused, seed=number)
        runs["dspark"] = spec = measure_generate(target, input_ids, kwargs, seed=number, assistant_model=draft)
        for key, m in runs.items():
            totals[key][0] += m.new_tokens
            totals[key][1] += m.seconds
        stats = spec.stats or {}
        totals["accepted"] += sum(stats.get("accepted_lengths", []))
        totals["rounds"] += stats.get("rounds", 0)
        totals["ngram_rounds"] += stats.get("ngram_rounds", 0)
        best_plain = max(m.new_tokens / m.seconds for key, m in runs.items() if key != "dspark")
        spec_tps = spec.new_tokens / spec.seconds
        line = (f"tau {stats.get('mean_accepted_length') or float('nan'):.2f} | best plain {best_plain:.1f} tok/s | "
                f"DSpark {spec_tps:.1f} tok/s | speed-up {spec_tps / best_plain:.2f}x")
        if mode == "greedy":
            identical, note = greedy_meets_contract(target, input_ids.shape[1], runs["plain"].output_ids, spec.output_ids)
            line += f" | identical to plain generate: {torch.equal(runs['plain'].output_ids, spec.output_ids)}{note}"
            identical_all &= identical
        print(f"--- {mode}, prompt {number} " + "-" * 50)
        print(prompt if not args.tiny else repr(prompt))
        text = codec.decode(spec.output_ids[0, input_ids.shape[1]:])
        print(f">>> {text if not args.tiny else repr(text)}")
        print(line + "\n")
    rate = {key: totals[key][0] / totals[key][1] for key in ("plain", "fused", "dspark") if totals[key][1] > 0}
    best_plain = max(v for k, v in rate.items() if k != "dspark")
    tau = totals["accepted"] / totals["rounds"] if totals["rounds"] else float("nan")
    return {"mode": mode, "tau": tau, "plain": rate["plain"], "fused": rate.get("fused"), "best_plain": best_plain,
            "dspark": rate["dspark"], "speedup": rate["dspark"] / best_plain, "identical": identical_all,
            "ngram_rounds": totals["ngram_rounds"], "rounds": totals["rounds"]}


def greedy_meets_contract(target, prompt_length: int, plain_ids: torch.Tensor, spec_ids: torch.Tensor
                          ) -> tuple[bool, str]:
    """Whether a greedy DSpark output meets the target dtype's contract, and a note saying why.

    fp32: identical token for token. bf16/fp16: identical, or parting first where the target's two best
    logits are within ``NEAR_TIE_ULPS`` rounding steps (a multi-row pass rounds otherwise than one row).
    """
    from hf_dspark.evaluation import greedy_divergence

    if torch.equal(plain_ids, spec_ids):
        return True, ""
    if target.dtype not in (torch.bfloat16, torch.float16):
        return False, ""
    report = greedy_divergence(target, prompt_length, plain_ids, spec_ids) or {}
    margin = report.get("margin_ulps", math.inf)
    within = margin <= NEAR_TIE_ULPS
    return within, (f" (parts at new token {report.get('position')}, where the two best logits are {margin:.1f} "
                    f"rounding steps apart: {'a near-tie, within' if within else 'NOT a near-tie, outside'} the "
                    f"{str(target.dtype).removeprefix('torch.')} contract)")


def run(args) -> int:
    if args.max_new_tokens < 1:
        print(f"hf-dspark demo: error: --max-new-tokens must be >= 1, got {args.max_new_tokens}", file=sys.stderr)
        return 2
    try:
        target, draft, codec = tiny_models() if args.tiny else load_models(args.target, args.draft)
    except HfDSparkError as error:
        print(f"hf-dspark demo: error: {error}", file=sys.stderr)
        return 2
    target, dtype_note = _pick_dtype(args, target)
    draft = draft.to(target.dtype)  # the drafter runs in the target's dtype (fastest on both CPU kinds measured)
    label = "tiny random target + fresh drafter" if args.tiny else f"{args.target} + drafter {args.draft}"
    policy = args.policy or ("full" if args.tiny else draft.generation_config.verification_policy)
    if args.ngram_lookup is not None:
        draft.generation_config.ngram_lookup_tokens = args.ngram_lookup
    ngram = getattr(draft.generation_config, "ngram_lookup_tokens", 0) or 0
    dtype = str(target.dtype).removeprefix("torch.")
    if dtype_note:
        print(dtype_note)
    results = []
    for mode in args.modes:
        mode_policy = policy
        if mode_policy in ("cost", "auto") or ngram == "auto":
            print("profiling the target's verification latency on this machine (cached for later runs)...", flush=True)
        try:
            apply_policy(draft, mode_policy, target)
        except HfDSparkError as error:
            print(f"hf-dspark demo: error: {error}", file=sys.stderr)
            return 2
        print(f"DSpark demo: {label}, {mode}{' (T=1, top-k 64, top-p 0.95)' if mode == 'sampling' else ''}, {dtype}, "
              f"{args.max_new_tokens} new tokens per prompt, verification policy {mode_policy!r}, "
              f"n-gram rounds {'off' if not ngram else 'auto (lengths from the cost curve)' if ngram == 'auto' else f'on ({ngram} tokens)'}\n")
        results.append(_run_mode(target, draft, codec, mode, args))

    print(f"{'mode':<10}{'tau':>6}{'plain tok/s':>13}{'best plain':>12}{'DSpark tok/s':>14}{'speed-up':>10}")
    for r in results:
        print(f"{r['mode']:<10}{r['tau']:>6.2f}{r['plain']:>13.1f}{r['best_plain']:>12.1f}{r['dspark']:>14.1f}"
              f"{r['speedup']:>9.2f}x")
        if ngram:
            print(f"  {r['mode']}: {r['ngram_rounds']} of {r['rounds']} rounds copied earlier tokens instead of drafting")
    print("speed-up: DSpark tok/s over the faster plain generate (sampling: also timed with the fused top-k/top-p "
          f"warper); {dtype}, batch 1")
    all_identical = all(r["identical"] for r in results)
    if any(r["mode"] == "greedy" for r in results):
        exact = dtype == "float32"
        print(("all greedy outputs identical to plain generate" if exact else
               f"all greedy outputs identical to plain generate or parting only at near-ties ({dtype} contract)")
              if all_identical else "MISMATCH: a greedy output differs from plain generate beyond its dtype's contract")
    return 0 if all_identical else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hf-dspark demo", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
