"""Hardware-aware prefix scheduling: how many draft tokens each request sends to the target.

The math lives in one remote-code module, :mod:`hf_dspark.models.dspark.scheduling_dspark`, which
``generate`` and the batched engine both import; this module re-exports its batch scheduling functions
(see there for the vocabulary and why the early stop keeps sampling lossless), and keeps the batch-1
names of earlier releases as deprecated aliases of its one rule per concept:

* ``single_request_prefix_length(survival, round_seconds, *, min_tokens=0)`` ->
  ``prefix_length(survival, round_seconds, min_tokens, checked=True)``;
* ``cost_policy_length(survival, verify_seconds, draft_seconds=0.0, *, min_tokens=0)`` ->
  ``cost_length(survival, draft_seconds, verify_seconds, min_tokens, checked=True)``.
"""

from __future__ import annotations

import warnings
from typing import Callable, Sequence

from hf_dspark.models.dspark.scheduling_dspark import (
    RoundSeconds,
    StepsPerSecond,
    admission_budget,
    async_prefix_schedule,
    best_padded_allocation,
    cost_length,
    expected_throughput,
    global_search_schedule,
    greedy_admission_order,
    padded_schedule,
    prefix_length,
    prefix_schedule,
    top_k_prefix,
)

__all__ = [
    "StepsPerSecond",
    "prefix_schedule",
    "global_search_schedule",
    "admission_budget",
    "top_k_prefix",
    "async_prefix_schedule",
    "expected_throughput",
    "prefix_length",
    "cost_length",
    "cost_policy_length",
    "single_request_prefix_length",
    "greedy_admission_order",
    "RoundSeconds",
    "padded_schedule",
    "best_padded_allocation",
]


def _deprecated(old: str, new: str) -> None:
    warnings.warn(f"hf_dspark.decoding.scheduling.{old} is deprecated and will be removed in the next release; use "
                  f"hf_dspark.models.dspark.scheduling_dspark.{new}", FutureWarning, stacklevel=3)


def single_request_prefix_length(
    survival: Sequence[float], round_seconds: Callable[[int], float], *, min_tokens: int = 0
) -> int:
    """Deprecated alias of :func:`~hf_dspark.models.dspark.scheduling_dspark.prefix_length` (checked inputs)."""
    _deprecated("single_request_prefix_length", "prefix_length(survival, round_seconds, min_tokens, checked=True)")
    return prefix_length(survival, round_seconds, min_tokens, checked=True)


def cost_policy_length(
    survival: Sequence[float],
    verify_seconds: Callable[[int], float],
    draft_seconds: float = 0.0,
    *,
    min_tokens: int = 0,
) -> int:
    """Deprecated alias of :func:`~hf_dspark.models.dspark.scheduling_dspark.cost_length` (checked inputs;
    note its argument order: ``draft_seconds`` before ``verify_seconds``)."""
    _deprecated("cost_policy_length", "cost_length(survival, draft_seconds, verify_seconds, min_tokens, checked=True)")
    return cost_length(survival, draft_seconds, verify_seconds, min_tokens, checked=True)
