"""Hardware-aware prefix scheduling: how many draft tokens each request sends to the target.

Pure Python (no torch). Every function works with plain floats, and also with
``fractions.Fraction`` values (nothing is coerced to float), which the tests use for exact
arithmetic.

Vocabulary
----------
* ``survival[r][j-1]`` is ``a_{r,j}``: the probability that draft tokens ``1..j`` of request
  ``r`` are all accepted (the prefix survival, a cumulative product of confidences). It must be
  non-increasing in ``j`` and lie in ``[0, 1]``.
* ``steps_per_second(B)`` is how many target forward passes per second the engine completes when
  one pass scores ``B`` tokens in total (every request contributes its bonus/anchor token plus
  the draft tokens it verifies). It can be a callable or a table ``table[B]`` (index 0 unused).
* A *count* ``l_r`` is the number of draft tokens request ``r`` verifies this round; it always
  admits a prefix ``1..l_r``.

Throughput of an allocation: ``Theta = (sum_r 1 + a_{r,1} + ... + a_{r,l_r}) * SPS(R + sum_r l_r)``
(expected committed tokens per pass times passes per second).

Non-anticipation (why the early stop matters)
---------------------------------------------
Speculative sampling is lossless only if the decision "verify draft token ``x_{r,j}``" does not
depend on the value of ``x_{r,j}``. ``a_{r,j}`` is computed before ``x_{r,j}`` is sampled, but
``a_{r,j+1}`` (through a Markov confidence head) depends on it. :func:`prefix_schedule` walks the
candidates in descending survival and stops at the first step that does not improve throughput,
so whether ``(r, j)`` is admitted depends only on candidates ranked at or before it, none of
which depends on ``x_{r,j}``. :func:`global_search_schedule` looks at the whole path and can
therefore admit ``x_{r,j}`` *because* of a good continuation it produced: it is only safe when
its inputs are not functions of the current draft (see :func:`async_prefix_schedule`).
"""

from __future__ import annotations

import heapq
import math
from numbers import Real
from typing import Callable, Sequence, Union

from hf_dspark.models.dspark.generation_dspark import prefix_length

__all__ = [
    "StepsPerSecond",
    "prefix_schedule",
    "global_search_schedule",
    "admission_budget",
    "top_k_prefix",
    "async_prefix_schedule",
    "expected_throughput",
    "cost_policy_length",
    "single_request_prefix_length",
    "greedy_admission_order",
    "RoundSeconds",
    "padded_schedule",
    "best_padded_allocation",
]

StepsPerSecond = Union[Callable[[int], float], Sequence[float]]


# --------------------------------------------------------------------------- validation


def _is_finite_real(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, Real) and math.isfinite(float(value))


def _check_probability(value, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ValueError(f"{where}: survival probability must be a real number, got {value!r}")
    as_float = float(value)
    if math.isnan(as_float) or not 0.0 <= as_float <= 1.0:
        raise ValueError(f"{where}: survival probability must lie in [0, 1], got {value!r}")


def _validate_request(values, r: int | None) -> list:
    label = "survival" if r is None else f"survival[{r}] (request {r})"
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise ValueError(f"{label} must be a sequence of prefix survival probabilities, got {type(values).__name__}")
    out = list(values)
    for j, value in enumerate(out):
        _check_probability(value, f"{label}, position {j + 1}")
        if j and value > out[j - 1]:
            raise ValueError(
                f"{label}, position {j + 1}: prefix survival must be non-increasing, but "
                f"a_{j + 1} = {value!r} > a_{j} = {out[j - 1]!r} (pass cumulative products of the "
                "per-position confidences, not the confidences themselves)"
            )
    return out


def _validate_survival(survival) -> list[list]:
    if isinstance(survival, (str, bytes)) or not isinstance(survival, Sequence):
        raise ValueError(f"survival must be a sequence of per-request sequences, got {type(survival).__name__}")
    if len(survival) == 0:
        raise ValueError("survival is empty: the scheduler needs at least one active request")
    return [_validate_request(values, r) for r, values in enumerate(survival)]


def _as_rate_function(steps_per_second: StepsPerSecond) -> Callable[[int], float]:
    """Turn a callable or a ``table[B]`` into a checked ``B -> steps per second`` function."""
    if callable(steps_per_second):
        source = steps_per_second

        def lookup(tokens: int):
            return source(tokens)

    elif isinstance(steps_per_second, Sequence) and not isinstance(steps_per_second, (str, bytes)):
        table = steps_per_second

        def lookup(tokens: int):
            if tokens >= len(table):
                raise ValueError(
                    f"steps_per_second table is too short: it has {len(table)} entries (batch sizes "
                    f"0..{len(table) - 1} tokens) but the scheduler needs SPS({tokens}); profile the "
                    f"target up to at least {tokens} tokens per pass"
                )
            return table[tokens]

    else:
        raise ValueError(
            "steps_per_second must be a callable B -> passes/second or a sequence indexed by the "
            f"number of tokens in the batch, got {type(steps_per_second).__name__}"
        )

    def checked(tokens: int):
        value = lookup(tokens)
        if not _is_finite_real(value) or value < 0:
            raise ValueError(f"steps_per_second({tokens}) must be a finite number >= 0, got {value!r}")
        return value

    return checked


# --------------------------------------------------------------------------- core walk


def greedy_admission_order(survival: Sequence[Sequence[float]]) -> list[tuple[int, int, float]]:
    """Candidates ``(r, j, a_{r,j})`` (``j`` 1-based) in admission order.

    Descending survival, ties broken by request index then position; candidates with zero
    survival are left out (they can never be accepted). Because survival is non-increasing per
    request this order is prefix-closed: ``(r, j)`` always comes after ``(r, j-1)``. It is built
    as a merge of the per-request lists, so prefix order holds by construction.
    """
    rows = _validate_survival(survival)
    heap = [(-row[0], r, 1) for r, row in enumerate(rows) if row and row[0] > 0]
    heapq.heapify(heap)
    order: list[tuple[int, int, float]] = []
    while heap:
        neg, r, j = heapq.heappop(heap)
        order.append((r, j, -neg))
        row = rows[r]
        if j < len(row) and row[j] > 0:
            heapq.heappush(heap, (-row[j], r, j + 1))
    return order


def _counts_from_order(n_requests: int, order, admitted: int) -> list[int]:
    counts = [0] * n_requests
    for r, j, _ in order[:admitted]:
        counts[r] = j
    return counts


def _walk(rows: list[list], rate: Callable[[int], float], early_stop: bool, order=None) -> int:
    """Number of candidates admitted along the greedy order (first best; optional early stop)."""
    order = greedy_admission_order(rows) if order is None else order
    tokens = len(rows)
    expected = len(rows)  # every request commits at least its bonus token
    best = expected * rate(tokens)
    best_admitted = 0
    for k, (_, _, a) in enumerate(order, start=1):
        tokens += 1
        expected = expected + a
        throughput = expected * rate(tokens)
        if throughput > best:
            best, best_admitted = throughput, k
        elif early_stop:
            break
    return best_admitted


def prefix_schedule(survival: Sequence[Sequence[float]], steps_per_second: StepsPerSecond) -> list[int]:
    """Algorithm 1: draft tokens to verify per request (greedy path, stop at first non-improvement).

    Starts from every request verifying 0 draft tokens, admits candidates in descending survival
    and keeps the allocation of the last step that strictly improved the expected throughput;
    the first step that does not improve ends the search. Lossless (non-anticipating) even when
    survival comes from a Markov confidence head. Only ``SPS(B)`` up to the stopping point is
    queried, so a table only needs to cover the batch sizes actually visited.
    """
    rows = _validate_survival(survival)
    order = greedy_admission_order(rows)
    return _counts_from_order(len(rows), order, _walk(rows, _as_rate_function(steps_per_second), True, order))


def global_search_schedule(survival: Sequence[Sequence[float]], steps_per_second: StepsPerSecond) -> list[int]:
    """Best allocation along the whole greedy path (no early stop; earliest among equal maxima).

    For non-increasing survival the greedy path contains, for every total batch size, the
    allocation with the most expected accepted tokens, so this is the maximum of the throughput
    over all prefix-closed allocations of positive-survival tokens. NOT lossless when applied to
    survival that depends on the current draft tokens; use it only on information fixed before
    those tokens were sampled (as :func:`async_prefix_schedule` does).
    """
    rows = _validate_survival(survival)
    order = greedy_admission_order(rows)
    return _counts_from_order(len(rows), order, _walk(rows, _as_rate_function(steps_per_second), False, order))


def expected_throughput(
    survival: Sequence[Sequence[float]], counts: Sequence[int], steps_per_second: StepsPerSecond
) -> float:
    """``Theta = (sum_r 1 + sum_{j <= counts[r]} a_{r,j}) * SPS(R + sum_r counts[r])``."""
    rows = _validate_survival(survival)
    if len(counts) != len(rows):
        raise ValueError(f"counts has {len(counts)} entries but survival has {len(rows)} requests")
    expected = 0
    for r, (row, count) in enumerate(zip(rows, counts)):
        if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= len(row):
            raise ValueError(f"counts[{r}] (request {r}) must be an int in [0, {len(row)}], got {count!r}")
        expected = expected + 1 + sum(row[:count])
    return expected * _as_rate_function(steps_per_second)(len(rows) + sum(counts))


# --------------------------------------------------------------------------- asynchronous variant


def admission_budget(
    stale_survival: Sequence[Sequence[float]], steps_per_second: StepsPerSecond, *, global_search: bool = True
) -> int:
    """Total number ``K`` of draft tokens to verify next step, decided from stale predictions.

    ``K`` is the total count of :func:`global_search_schedule` (or :func:`prefix_schedule` when
    ``global_search=False``) on ``stale_survival``. An engine with zero-overhead scheduling
    calls this one step ahead, before the current drafts exist.
    """
    rows = _validate_survival(stale_survival)
    rate = _as_rate_function(steps_per_second)
    return _walk(rows, rate, early_stop=not global_search)


def top_k_prefix(survival: Sequence[Sequence[float]], k: int, max_count: int | None = None) -> list[int]:
    """Per-request counts admitting the ``k`` best candidates (prefix-closed, zero survival excluded).

    If fewer than ``k`` candidates have positive survival, all of them are admitted. With
    ``max_count`` only positions ``j <= max_count`` are candidates (a cap fixed before the
    current drafts existed keeps the selection non-anticipating: it only removes candidates, and
    the rank of ``(r, j)`` among the rest still depends on nothing sampled at or after ``x_{r,j}``).
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"k (number of draft tokens to admit) must be an int >= 0, got {k!r}")
    rows = _capped(_validate_survival(survival), max_count)
    return _counts_from_order(len(rows), greedy_admission_order(rows), k)


def _capped(rows: list[list], max_count: int | None) -> list[list]:
    if max_count is None:
        return rows
    if isinstance(max_count, bool) or not isinstance(max_count, int) or max_count < 0:
        raise ValueError(f"max_count (most draft tokens per request) must be None or an int >= 0, got {max_count!r}")
    return [row[:max_count] for row in rows]


def async_prefix_schedule(
    stale_survival: Sequence[Sequence[float]],
    current_survival: Sequence[Sequence[float]],
    steps_per_second: StepsPerSecond,
    *,
    global_search: bool = True,
) -> list[int]:
    """Production variant: budget ``K`` from stale predictions, tokens chosen by current ones.

    ``K = admission_budget(stale_survival, ...)`` (predictions from two steps back, computed
    before any token of the current drafts was sampled); then the ``K`` highest-ranked current
    candidates are admitted (:func:`top_k_prefix` on ``current_survival``). Returns one count per
    request of ``current_survival`` (the two may differ in request count; only ``K`` is carried
    over).

    Why this stays lossless even with ``global_search=True``: ``K`` is a function of information
    fixed before the current drafts were sampled, so it cannot depend on any current token.
    Whether ``(r, j)`` is admitted is "its rank among current candidates is below ``K``"; that
    rank is decided by ``a_{r,j}`` and by the survivals of other requests, none of which depends
    on ``x_{r,j}``, while the candidates that do depend on it (``a_{r,j+1}``, ...) never rank
    ahead of ``(r, j)``. The global search (no early stop) only looks at stale data, so it can
    jump over jagged ``SPS`` cliffs without peeking at the tokens it admits.
    """
    budget = admission_budget(stale_survival, steps_per_second, global_search=global_search)
    return top_k_prefix(current_survival, budget)


# --------------------------------------------------------------------------- right-padded batches

RoundSeconds = Callable[[int, int, int], float]
"""``round_seconds(width, tokens, drafted_rows)``: wall time of one round of a fixed set of ``R``
requests, where ``width = 1 + max_r l_r`` (a right-padded target pass scores ``R x width``
slots), ``tokens = R + sum_r l_r`` (the slots that hold real tokens) and ``drafted_rows`` is the
number of requests that need the drafter for this allocation (see ``needs_draft``)."""


def padded_schedule(
    survival: Sequence[Sequence[float]],
    round_seconds: RoundSeconds,
    *,
    early_stop: bool,
    needs_draft: Sequence[bool] | None = None,
    max_count: int | None = None,
) -> list[int]:
    """Algorithm 1's admission walk with the cost of a right-padded batch and of the drafter.

    Candidates are admitted in :func:`greedy_admission_order` (positions ``j <= max_count``
    only). Each step scores ``Theta = (R + sum of admitted a_{r,j}) / round_seconds(width,
    tokens, drafted_rows)``, where ``drafted_rows`` counts the requests with ``needs_draft[r]``
    that verify at least one token (a request that verifies nothing need not draft). The start,
    every request verifying nothing, is a plain decoding step when no request needs drafting.
    Returns the allocation of the best step: the last improvement before the first
    non-improvement when ``early_stop`` (the lossless rule for current-draft survival: whether
    ``(r, j)`` is admitted depends only on the candidates ranked at or before it), or the best of
    the whole path otherwise (only for survival fixed before the current drafts were sampled, or
    for greedy decoding, whose output does not depend on the counts).
    """
    rows = _capped(_validate_survival(survival), max_count)
    flags = _draft_flags(needs_draft, len(rows))
    order = greedy_admission_order(rows)
    admitted, _ = _padded_walk(len(rows), order, _checked_seconds(round_seconds), early_stop, flags)
    return _counts_from_order(len(rows), order, admitted)


def best_padded_allocation(
    survival: Sequence[Sequence[float]],
    round_seconds: RoundSeconds,
    *,
    needs_draft: Sequence[bool] | None = None,
) -> list[int]:
    """The best allocation found by the whole-path walk of :func:`padded_schedule` under every cap.

    In a right-padded batch one request growing by a token widens every row, so the admission
    path alone misses allocations like "every request verifies 2". For each cap ``c`` (0 .. the
    longest draft) the path restricted to positions ``j <= c`` is searched to its end, and the
    best allocation over all caps is returned (the smallest cap among equal maxima). NOT
    lossless on survival of the current drafts when sampling; use it for greedy decoding or on
    information fixed before the current drafts were sampled.
    """
    rows = _validate_survival(survival)
    flags = _draft_flags(needs_draft, len(rows))
    seconds = _checked_seconds(round_seconds)
    order = greedy_admission_order(rows)  # the path under cap c is this order without positions j > c
    best_counts, best_value = [0] * len(rows), None
    for cap in range(max((len(row) for row in rows), default=0) + 1):
        restricted = [candidate for candidate in order if candidate[1] <= cap]
        admitted, value = _padded_walk(len(rows), restricted, seconds, False, flags)
        if best_value is None or value > best_value:
            best_counts, best_value = _counts_from_order(len(rows), restricted, admitted), value
    return best_counts


def _draft_flags(needs_draft, n_requests: int) -> list[bool]:
    flags = [True] * n_requests if needs_draft is None else [bool(x) for x in needs_draft]
    if len(flags) != n_requests:
        raise ValueError(f"needs_draft has {len(flags)} entries but survival has {n_requests} requests")
    return flags


def _checked_seconds(round_seconds: RoundSeconds) -> RoundSeconds:
    def seconds(width: int, tokens: int, drafted: int):
        value = round_seconds(width, tokens, drafted)
        if not _is_finite_real(value) or value <= 0:
            raise ValueError(
                f"round_seconds(width={width}, tokens={tokens}, drafted_rows={drafted}) must be a finite number > 0, "
                f"got {value!r}"
            )
        return value

    return seconds


def _padded_walk(n_requests: int, order, seconds, early_stop: bool, flags: list[bool]) -> tuple[int, float]:
    """(candidates admitted, best throughput) along ``order`` for a right-padded round."""
    width, tokens, drafted, expected = 1, n_requests, 0, n_requests
    best, best_admitted = expected / seconds(width, tokens, drafted), 0
    for k, (r, j, a) in enumerate(order, start=1):
        width, tokens, expected = max(width, j + 1), tokens + 1, expected + a
        drafted += j == 1 and flags[r]
        value = expected / seconds(width, tokens, drafted)
        if value > best:
            best, best_admitted = value, k
        elif early_stop:
            break
    return best_admitted, best


# --------------------------------------------------------------------------- batch-1 form


def single_request_prefix_length(
    survival: Sequence[float], round_seconds: Callable[[int], float], *, min_tokens: int = 0
) -> int:
    """Batch-1 Algorithm 1: verify ``L`` draft tokens, ``L`` grown while tokens/second improves.

    ``round_seconds(L)`` is the wall time of one whole round that verifies ``L`` draft tokens
    (drafting included). Starting at ``L = min_tokens``, ``L`` is increased while
    ``(1 + a_1 + ... + a_L) / round_seconds(L)`` strictly improves and stops at the first
    non-improvement (or at the first zero-survival token, or the end of the draft).
    ``min_tokens`` forces a floor: ``generate``'s assisted decoding must submit at least one
    candidate token per round, so it passes ``min_tokens=1``. Forced tokens are fixed before any
    token is sampled, so the rule stays non-anticipating.
    """
    row = _validate_request(survival, None)
    if isinstance(min_tokens, bool) or not isinstance(min_tokens, int) or min_tokens < 0:
        raise ValueError(f"min_tokens must be an int >= 0, got {min_tokens!r}")
    if min_tokens > len(row):
        raise ValueError(f"min_tokens={min_tokens} exceeds the draft length {len(row)}")

    def checked_seconds(length: int) -> float:
        seconds = round_seconds(length)
        if not _is_finite_real(seconds) or seconds <= 0:
            raise ValueError(f"round time for {length} draft tokens must be a finite number > 0, got {seconds!r}")
        return seconds

    return prefix_length(row, checked_seconds, min_tokens)


def cost_policy_length(
    survival: Sequence[float],
    verify_seconds: Callable[[int], float],
    draft_seconds: float = 0.0,
    *,
    min_tokens: int = 0,
) -> int:
    """The "cost" policy of HF ``generate``: number of draft tokens to verify for one request.

    ``verify_seconds(n)`` is the time of one target pass scoring ``n`` tokens (the anchor plus
    ``n - 1`` draft tokens, e.g. :meth:`hf_dspark.decoding.latency.LatencyProfile.verify_seconds`);
    ``draft_seconds`` is the (length-independent) time of one drafter block. Maximises
    ``(1 + sum_{j<=L} a_j) / (draft_seconds + verify_seconds(1 + L))`` with the early-stop rule
    of :func:`single_request_prefix_length`. With ``draft_seconds=0`` this is exactly
    :func:`prefix_schedule` for one request with ``SPS(B) = 1 / verify_seconds(B)``.
    """
    if not _is_finite_real(draft_seconds) or draft_seconds < 0:
        raise ValueError(f"draft_seconds must be a finite number >= 0, got {draft_seconds!r}")
    return single_request_prefix_length(
        survival, lambda length: draft_seconds + verify_seconds(1 + length), min_tokens=min_tokens
    )
