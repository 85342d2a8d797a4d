"""The per-round rules of DSpark decoding that need no model: prefix survival, the ``threshold`` and
``cost`` verification lengths, latency-table interpolation and n-gram continuation.

Ships as remote code beside drafter checkpoints (imports torch and the standard library only);
:mod:`generation_dspark` re-exports every name, which is where the rest of hf-dspark imports them from.
"""

from __future__ import annotations

import bisect

import torch


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


def prefix_length(survival, round_seconds, min_tokens: int = 0) -> int:
    """Batch-1 Algorithm 1 with early stop (docs/design.md, "Scheduling"): draft tokens to verify.

    ``round_seconds(L)`` is the time of a round verifying ``L`` draft tokens. Starting from the
    ``min_tokens`` that must be submitted, ``L`` grows while ``(1 + a_1 + ... + a_L) / round_seconds(L)``
    strictly improves, and stops at the first non-improvement or zero-survival token. The forced
    tokens are fixed before any token is sampled, so the rule stays non-anticipating.
    :func:`hf_dspark.decoding.scheduling.single_request_prefix_length` is this rule with input checks.
    """
    length = min_tokens
    expected = 1 + sum(survival[:length])
    best = expected / round_seconds(length)
    while length < len(survival) and survival[length] > 0:
        candidate = (expected + survival[length]) / round_seconds(length + 1)
        if not candidate > best:
            break
        best, expected, length = candidate, expected + survival[length], length + 1
    return length


def cost_length(survival: list[float], draft_seconds: float, verify_seconds, min_tokens: int = 1) -> int:
    """The ``cost`` policy: :func:`prefix_length` with a round costing one drafter block plus one target
    pass over the anchor and the ``L`` draft tokens (``verify_seconds(1 + L)``)."""
    return prefix_length(survival, lambda length: draft_seconds + verify_seconds(1 + length),
                         min(min_tokens, len(survival)))


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
    """Tokens worth submitting from a deterministic proposal: :func:`prefix_length` with at least one.

    ``round_seconds(L)`` is the time of the round that verifies ``L`` proposed tokens."""
    return prefix_length(survival, round_seconds, min(1, len(survival)))


def expected_rate(survival: list[float], seconds: float) -> float:
    """Expected committed tokens per second of a round: ``(1 + sum(survival)) / seconds``."""
    return (1.0 + sum(survival)) / max(seconds, 1e-12)
