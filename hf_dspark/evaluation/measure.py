"""One timed ``generate`` call per method and prompt, and the per-prompt records built from it."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch


# ----------------------------------------------------------------------------- measurement
@dataclass
class Measurement:
    """One ``generate`` call: output ids [1, prompt + new], new tokens, wall seconds, drafter stats."""

    output_ids: torch.Tensor
    new_tokens: int
    seconds: float
    stats: dict[str, Any] | None = field(default=None)


def cpu_model_name() -> str:
    """The CPU's model name as ``/proc/cpuinfo`` gives it (Linux), else what ``platform`` knows; every
    figure names the machine it was measured on."""
    import platform
    from pathlib import Path

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_generate(
    target,
    input_ids: torch.Tensor,
    generation_kwargs: dict[str, Any],
    seed: int = 0,
    assistant_model=None,
    prompt_lookup_num_tokens: int | None = None,
) -> Measurement:
    """Time one ``target.generate`` call (plain, with a drafter, or with prompt lookup).

    Every benchmark number of :mod:`hf_dspark.evaluation` and :mod:`hf_dspark.commands.demo` comes from
    this function. torch is reseeded with ``seed`` first so that sampled runs are reproducible.
    """
    kwargs = dict(generation_kwargs)
    if assistant_model is not None:
        kwargs["assistant_model"] = assistant_model
    if prompt_lookup_num_tokens is not None:
        kwargs["prompt_lookup_num_tokens"] = prompt_lookup_num_tokens
    input_ids = input_ids.to(target.device)
    attention_mask = torch.ones_like(input_ids)
    torch.manual_seed(seed)
    _synchronize(input_ids.device)
    start = time.perf_counter()
    with torch.no_grad():
        output = target.generate(input_ids, attention_mask=attention_mask, **kwargs)
    _synchronize(input_ids.device)
    seconds = time.perf_counter() - start
    stats = None
    if assistant_model is not None and getattr(assistant_model, "last_generation_stats", None) is not None:
        stats = json.loads(json.dumps(assistant_model.last_generation_stats))  # a detached plain copy
    return Measurement(output.cpu(), int(output.shape[1] - input_ids.shape[1]), seconds, stats)


def fused_plain_kwargs(generation_kwargs: dict[str, Any]) -> dict[str, Any] | None:
    """``generate`` kwargs for plain sampling with :class:`FusedTopKTopPWarper` in place of transformers'
    top-k + top-p pair (the same distribution, one sort of the k survivors instead of the vocabulary).
    ``None`` unless the kwargs sample with both a top-k and a top-p < 1."""
    from transformers import LogitsProcessorList
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    from hf_dspark.models.dspark.warpers_dspark import FusedTopKTopPWarper

    top_k, top_p = generation_kwargs.get("top_k") or 0, generation_kwargs.get("top_p", 1.0)
    if not generation_kwargs.get("do_sample") or top_k <= 0 or top_p is None or top_p >= 1.0:
        return None
    fused = FusedTopKTopPWarper(TopKLogitsWarper(top_k), TopPLogitsWarper(top_p))
    # transformers adds temperature first and appends custom processors after it: the usual order
    return {**generation_kwargs, "top_k": 0, "top_p": 1.0, "logits_processor": LogitsProcessorList([fused])}


def greedy_divergence(target, prompt_length: int, baseline_ids: torch.Tensor, other_ids: torch.Tensor) -> dict | None:
    """Where a greedy output first differs from plain ``generate``, and how close to a tie the target was there.

    The common prefix is re-scored by one target forward; ``logit_margin`` is the gap between the logits
    of the two tokens chosen there and ``margin_ulps`` that gap in units of the target dtype's rounding
    step at their magnitude (bf16: 8 mantissa bits). A divergence at ``margin_ulps`` <= 2 sits at a
    numerical near-tie: the verification pass (several rows, other kernels) and the one-row decode step
    rounded differently. ``None`` when the outputs are identical.
    """
    n = min(baseline_ids.shape[-1], other_ids.shape[-1])
    differ = (baseline_ids[0, :n] != other_ids[0, :n]).nonzero()
    if differ.numel() == 0:
        return None if baseline_ids.shape[-1] == other_ids.shape[-1] else {"position": n - prompt_length,
                                                                           "length_differs": True}
    at = int(differ[0])
    with torch.no_grad():
        logits = target(baseline_ids[:, :at].to(target.device)).logits[0, -1].float()
    a, b = int(baseline_ids[0, at]), int(other_ids[0, at])
    magnitude = max(abs(float(logits[a])), abs(float(logits[b])), 1e-30)
    mantissa_bits = {torch.bfloat16: 8, torch.float16: 11}.get(target.dtype, 24)
    ulp = 2.0 ** (math.floor(math.log2(magnitude)) - (mantissa_bits - 1))
    margin = abs(float(logits[a]) - float(logits[b]))
    return {"position": at - prompt_length, "baseline_token": a, "token": b, "logit_margin": margin,
            "rounding_step": ulp, "margin_ulps": margin / ulp}


def timing_record(m: Measurement) -> dict[str, Any]:
    """The part of a results record every method has: new tokens and seconds."""
    return {"new_tokens": m.new_tokens, "seconds": m.seconds}


def drafter_record(m: Measurement) -> dict[str, Any]:
    """The results record of a speculative run: :func:`timing_record` plus the round statistics of ``m``."""
    stats = m.stats or {}
    return {
        **timing_record(m),
        "rounds": stats.get("rounds", 0),
        "accepted_tokens": sum(stats.get("accepted_lengths", [])),
        "position_attempted": stats.get("position_attempted", []),
        "position_accepted": stats.get("position_accepted", []),
        "draft_seconds": stats.get("draft_seconds"),
        "verify_seconds": stats.get("verify_seconds"),
        "policy": stats.get("policy"),
        "ngram_rounds": stats.get("ngram_rounds", 0),
        "ngram_accepted_tokens": stats.get("ngram_accepted", 0),
        "ngram_submitted_tokens": stats.get("ngram_submitted", 0),
        "extended_rounds": stats.get("extended_rounds", 0),
        "extension_accepted_tokens": stats.get("extension_accepted", 0),
    }


# ----------------------------------------------------------------------------- summaries


CURVE_TOKENS = 16  # the cost-curve settings read verification passes of up to this many tokens


def apply_policy(draft, policy: str | None, target) -> None:
    """Set the drafter's verification policy (``None``: keep the saved one) and give the settings that read
    the target's cost curve one: ``cost``, an explicit ``auto`` or ``ngram_lookup_tokens="auto"`` without a
    latency table measured where the target runs profile the target first (cached once per machine)."""
    from hf_dspark.models.dspark.generation_dspark import latency_table_fits

    config = draft.generation_config
    if policy is not None:
        config.verification_policy = policy
    wants_curve = policy in ("cost", "auto") or getattr(config, "ngram_lookup_tokens", None) == "auto"
    if wants_curve and (not config.latency_table or not latency_table_fits(config.latency_profile_key, target)):
        from hf_dspark.decoding.latency import profile_latency

        profile = profile_latency(target, token_counts=range(1, max(draft.config.block_size + 2, CURVE_TOKENS + 1)))
        config.latency_table = {str(n): s for n, s in sorted(profile.table[1].items())}
        config.latency_profile_key = profile.key
