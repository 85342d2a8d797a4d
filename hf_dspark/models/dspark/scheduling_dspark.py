"""Pure scheduling math of DSpark decoding: how many proposed tokens a round verifies.

No model and no tensors beyond the n-gram lookup: the functions take plain floats (and
``fractions.Fraction`` values, which the tests use for exact arithmetic: nothing is coerced to float).
Ships as remote code beside drafter checkpoints (imports: torch and the standard library only);
``generate`` (:mod:`generation_dspark`), the policy registry (:mod:`policies_dspark`) and the batched
engine (``hf_dspark.decoding``) all import the rules from here, so each rule has one function.

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

The rules, one function each
----------------------------
* :func:`threshold_length`: cut at the first prefix survival below a threshold;
* :func:`prefix_length`: the prefix-survival rule for one request (grow ``L`` while tokens per second
  improve, stop at the first non-improvement); :func:`cost_length` is it with a round costing one
  drafter block plus one verification pass from the latency curve;
* :func:`prefix_schedule` / :func:`padded_schedule` / :func:`best_padded_allocation`: the same walk
  over a batch (Algorithm 1), with the cost of a right-padded round;
* :func:`top_k_prefix` / :func:`admission_budget` / :func:`async_prefix_schedule`: the asynchronous
  variant.

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

import bisect
import heapq
import math
from numbers import Real
from typing import Callable, Sequence, Union

import torch

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


# --------------------------------------------------------------------------- per-request rules and the cost curve


def prefix_survival(confidence: torch.Tensor) -> torch.Tensor:
    """[n] per-position conditional survival c_k -> prefix survival a_k = prod_{i<=k} c_i."""
    return torch.cumprod(confidence.float(), dim=-1)


def threshold_length(survival: list[float], threshold: float, min_tokens: int = 1) -> int:
    """Number of draft tokens before the first a_k < threshold (at least ``min_tokens``)."""
    n = 0
    for a in survival:
        if a < threshold:
            break
        n += 1
    return max(min(min_tokens, len(survival)), n)


def latency_points(table: dict) -> list[tuple[int, float]]:
    """Sorted (tokens, seconds) points of a latency table (JSON keys may be strings), made non-decreasing."""
    points = sorted((int(k), float(v)) for k, v in table.items())
    if not points:
        raise ValueError("latency_table is empty; profile the target with hf_dspark.profile_latency(target)")
    return nondecreasing_fit(points)


def nondecreasing_fit(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The least-squares non-decreasing fit of sorted ``(x, y)`` points (pool adjacent violators).

    A pass scoring more tokens never costs less, but medians of timed passes on a busy CPU can dip
    (one count measured slower than both its neighbours). Left as measured, such a
    bump ends the early-stopping scheduler's search at the bump. Points that already rise stay as they are.
    """
    blocks: list[list[float]] = []  # [sum of y, count], means non-decreasing from left to right
    for _, y in points:
        blocks.append([y, 1])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            total, count = blocks.pop()
            blocks[-1][0] += total
            blocks[-1][1] += count
    fitted = [total / count for total, count in blocks for _ in range(count)]
    return [(x, y) for (x, _), y in zip(points, fitted)]


def interpolate(points: list[tuple[float, float]], x: float) -> float:
    """Piecewise-linear through sorted ``points``; linear extrapolation from the two end points
    (one point: constant). The one copy: ``latency`` and ``round_cost`` import it from here."""
    if len(points) == 1:
        return points[0][1]
    # the segment holding x, or the first / last segment when x lies outside the points
    i = min(max(bisect.bisect_left([p for p, _ in points], x), 1), len(points) - 1)
    (x0, y0), (x1, y1) = points[i - 1], points[i]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def interpolate_latency(points: list[tuple[int, float]], n_tokens: int) -> float:
    """T_verify(n): linear interpolation between points, linear extrapolation past the ends (>= 0)."""
    return max(0.0, interpolate(points, n_tokens))


def latency_from_table(table: dict, n_tokens: int) -> float:
    """T_verify(n) from a {tokens: seconds} table: linear interpolation, linear extrapolation."""
    return interpolate_latency(latency_points(table), n_tokens)


def prefix_length(survival: Sequence[float], round_seconds: Callable[[int], float], min_tokens: int = 0, *,
                  checked: bool = False) -> int:
    """The prefix-survival rule (batch-1 Algorithm 1 with its early stop): draft tokens to verify.

    ``round_seconds(L)`` is the wall time of a whole round verifying ``L`` draft tokens (drafting
    included). Starting from the ``min_tokens`` that must be submitted (``generate`` must submit at
    least one token per round), ``L`` grows while ``(1 + a_1 + ... + a_L) / round_seconds(L)``
    strictly improves, and stops at the first non-improvement, at the first zero-survival token or at
    the end of the draft. Forced tokens are fixed before any token is sampled, so the rule stays
    non-anticipating (docs/design.md, "Scheduling").

    ``checked=True`` first validates the inputs (survival probabilities non-increasing in ``[0, 1]``,
    ``min_tokens`` an int no longer than the draft, round times finite and > 0) and raises
    ``ValueError`` naming the bad value; the per-round callers inside ``generate`` build valid inputs
    and skip the checks. Works with ``fractions.Fraction`` values as well as floats.
    """
    if checked:
        survival = _validate_request(survival, None)
        if isinstance(min_tokens, bool) or not isinstance(min_tokens, int) or min_tokens < 0:
            raise ValueError(f"min_tokens must be an int >= 0, got {min_tokens!r}")
        if min_tokens > len(survival):
            raise ValueError(f"min_tokens={min_tokens} exceeds the draft length {len(survival)}")
        round_seconds = _checked_round_seconds(round_seconds)
    length = min_tokens
    expected = 1 + sum(survival[:length])
    best = expected / round_seconds(length)
    while length < len(survival) and survival[length] > 0:
        candidate = (expected + survival[length]) / round_seconds(length + 1)
        if not candidate > best:
            break
        best, expected, length = candidate, expected + survival[length], length + 1
    return length


def _checked_round_seconds(round_seconds: Callable[[int], float]) -> Callable[[int], float]:
    def seconds(length: int):
        value = round_seconds(length)
        if not _is_finite_real(value) or value <= 0:
            raise ValueError(f"round time for {length} draft tokens must be a finite number > 0, got {value!r}")
        return value

    return seconds


def cost_length(survival: Sequence[float], draft_seconds: float, verify_seconds: Callable[[int], float],
                min_tokens: int = 1, *, checked: bool = False) -> int:
    """The cost rule (``verification_policy="cost"`` of ``generate``): :func:`prefix_length` with a round
    costing one drafter block (``draft_seconds``, independent of the length) plus one target pass over the
    anchor and the ``L`` draft tokens (``verify_seconds(1 + L)``, e.g.
    ``hf_dspark.decoding.latency.LatencyProfile.verify_seconds``).

    With ``draft_seconds=0`` and ``min_tokens=0`` this is :func:`prefix_schedule` for one request with
    ``SPS(B) = 1 / verify_seconds(B)``. Unchecked, ``min_tokens`` is capped at the draft's length;
    ``checked=True`` validates every input instead (see :func:`prefix_length`).
    """
    if checked:
        if not _is_finite_real(draft_seconds) or draft_seconds < 0:
            raise ValueError(f"draft_seconds must be a finite number >= 0, got {draft_seconds!r}")
    else:
        min_tokens = min(min_tokens, len(survival))
    return prefix_length(survival, lambda length: draft_seconds + verify_seconds(1 + length), min_tokens,
                         checked=checked)


def check_ngram_settings(lookup_tokens: int, max_size: int, min_size: int) -> None:
    """Raise ``ValueError`` unless ``lookup_tokens >= 0`` (0 = off) and ``1 <= min_size <= max_size``."""
    if lookup_tokens < 0 or not 1 <= min_size <= max_size:
        raise ValueError(
            f"n-gram lookup settings ngram_lookup_tokens={lookup_tokens}, ngram_max_size={max_size}, "
            f"ngram_min_size={min_size} are invalid: need ngram_lookup_tokens >= 0 (0 = off) and "
            "1 <= ngram_min_size <= ngram_max_size."
        )


def fixed_ngram_tokens(value, block_size: int) -> int:
    """A fixed n-gram copy length for code without a cost curve: ``"auto"`` copies one block."""
    return block_size if value == "auto" else int(value or 0)


def ngram_continuation(tokens: torch.Tensor, num_tokens: int, max_size: int = 3, min_size: int = 2) -> torch.Tensor | None:
    """``num_tokens`` tokens that followed the latest earlier occurrence of the sequence's last n tokens.

    ``tokens`` is 1-D. Suffix n-grams are tried from ``max_size`` down to ``min_size``; the first
    size with an earlier occurrence wins and its latest occurrence is used. The tokens between
    that occurrence and the end of the sequence repeat with period ``d`` (the distance between
    the two occurrences), so when they run out the continuation keeps repeating them: a loop is
    proposed for the full length. ``None`` when no suffix n-gram occurred before.
    """
    found = ngram_match(tokens, num_tokens, max_size, min_size)
    return None if found is None else found[0]


def ngram_match(tokens: torch.Tensor, num_tokens: int, max_size: int = 3, min_size: int = 2):
    """:func:`ngram_continuation` and the size of the suffix n-gram that matched: ``(tokens, size)`` or ``None``."""
    length = tokens.shape[0]
    if num_tokens <= 0:
        return None
    for size in range(min(max_size, length - 1), max(min_size, 1) - 1, -1):
        windows = tokens[: length - 1].unfold(0, size, 1)  # every earlier n-gram, excluding the suffix itself
        starts = (windows == tokens[length - size:]).all(dim=1).nonzero().flatten()
        if starts.numel() == 0:
            continue
        begin = int(starts[-1]) + size
        period = length - begin
        return tokens[begin + torch.arange(num_tokens, device=tokens.device) % period], size
    return None


class ProposalAcceptance:
    """Running per-position acceptance of deterministic proposals (n-gram copies, block extensions).

    ``record(submitted, accepted)`` after each verified proposal; position ``j`` was attempted when
    every earlier one was accepted. :meth:`survival` estimates the probability that the first ``j``
    proposed tokens are all accepted: per position, the observed conditional rate shrunk towards the
    rate pooled over all positions (itself shrunk towards ``prior``), so a position seldom reached
    borrows the pooled rate. Estimates come from finished rounds only, which keeps every length
    chosen from them non-anticipating.
    """

    def __init__(self, prior: float = 0.5, prior_weight: float = 2.0, shrink: float = 2.0):
        self.prior, self.prior_weight, self.shrink = prior, prior_weight, shrink
        self.attempted: list[int] = []
        self.accepted: list[int] = []

    def record(self, submitted: int, accepted: int) -> None:
        accepted = max(0, min(accepted, submitted))
        reached = min(accepted + 1, submitted)
        if len(self.attempted) < reached:
            grow = reached - len(self.attempted)
            self.attempted += [0] * grow
            self.accepted += [0] * grow
        for j in range(reached):
            self.attempted[j] += 1
        for j in range(accepted):
            self.accepted[j] += 1

    def pooled_rate(self) -> float:
        return (sum(self.accepted) + self.prior * self.prior_weight) / (sum(self.attempted) + self.prior_weight)

    def survival(self, length: int, start: float = 1.0) -> list[float]:
        """``[start * r_1, start * r_1 * r_2, ...]`` for ``length`` positions."""
        pooled = self.pooled_rate()
        out, alive = [], start
        for j in range(length):
            seen = self.attempted[j] if j < len(self.attempted) else 0
            hits = self.accepted[j] if j < len(self.accepted) else 0
            alive *= (hits + pooled * self.shrink) / (seen + self.shrink)
            out.append(alive)
        return out


def curve_tokens(points: list[tuple[int, float]]) -> int:
    """The most tokens a verification pass of the latency curve was measured at."""
    return max(n for n, _ in points)


def copy_length(survival: list[float], round_seconds) -> int:
    """Tokens worth submitting from a deterministic proposal: the ``L >= 1`` with the best expected tokens
    per second ``(1 + a_1 + ... + a_L) / round_seconds(L)`` over every length (the shortest among equal
    rates); 0 for an empty proposal.

    ``round_seconds(L)`` is the time of the round that verifies ``L`` proposed tokens. Unlike
    :func:`prefix_length` the search does not stop at the first length that does not improve: a measured
    curve has steps (a pass over 11 tokens may cost clearly more than one over 10 and no less than one
    over 15), and past a step a longer copy can pay again. Looking past it stays lossless because a
    copy's survival comes from finished rounds only, not from the tokens being proposed."""
    best_length, best_rate, expected = 0, 0.0, 1.0
    for length, alive in enumerate(survival, start=1):
        expected += alive
        rate = expected / round_seconds(length)
        if best_length == 0 or rate > best_rate:
            best_length, best_rate = length, rate
    return best_length


def expected_rate(survival: list[float], seconds: float) -> float:
    """Expected committed tokens per second of a round: ``(1 + sum(survival)) / seconds``."""
    return (1.0 + sum(survival)) / max(seconds, 1e-12)
