"""Tests of the hardware-aware prefix scheduler (pure math, exact arithmetic via Fraction)."""

from __future__ import annotations

import itertools
import random
from fractions import Fraction as F

import pytest

from hf_dspark.decoding.scheduling import (
    admission_budget,
    async_prefix_schedule,
    best_padded_allocation,
    padded_schedule,
    cost_policy_length,
    expected_throughput,
    global_search_schedule,
    greedy_admission_order,
    prefix_schedule,
    single_request_prefix_length,
    top_k_prefix,
)
from hf_dspark.models.dspark.scheduling_dspark import cost_length, prefix_length

# ----------------------------------------------------------------------------- helpers


def random_survival(rng: random.Random, n_requests: int, max_tokens: int = 4):
    """Monotone prefix survival from random per-position confidences on a coarse grid (ties happen)."""
    rows = []
    for _ in range(n_requests):
        a, row = F(1), []
        for _ in range(rng.randint(0, max_tokens)):
            a *= F(rng.choice([0, 3, 5, 6, 8, 9, 10, 10]), 10)
            row.append(a)
        rows.append(row)
    return rows


def random_sps(rng: random.Random, max_tokens: int, decreasing: bool = True):
    """Table indexed by B (entry 0 unused); strictly decreasing unless ``decreasing=False``."""
    values, current = [F(0)], F(rng.randint(50, 100))
    for _ in range(max_tokens):
        values.append(current)
        if decreasing:
            current -= F(rng.randint(1, 30), 2)
            current = max(current, F(1, 1000 + len(values)))
        else:
            current = F(rng.randint(1, 100))
    return values


def independent_path(rows):
    """Greedy admission order computed directly: sort all positive candidates by (-a, r, j)."""
    cands = sorted((-a, r, j) for r, row in enumerate(rows) for j, a in enumerate(row, start=1) if a > 0)
    return [(r, j, -neg) for neg, r, j in cands]


def path_throughputs(rows, sps):
    tokens = expected = len(rows)
    out = [expected * sps[tokens]]
    for _, _, a in independent_path(rows):
        tokens += 1
        expected += a
        out.append(expected * sps[tokens])
    return out


def counts_after(rows, k):
    counts = [0] * len(rows)
    for r, j, _ in independent_path(rows)[:k]:
        counts[r] = max(counts[r], j)
    return counts


# ----------------------------------------------------------------------------- Algorithm 1


@pytest.mark.parametrize("decreasing", [True, False])
def test_prefix_schedule_is_first_local_maximum_of_greedy_path(decreasing):
    rng = random.Random(1234 + decreasing)
    for _ in range(400):
        rows = random_survival(rng, rng.randint(1, 3))
        sps = random_sps(rng, len(rows) + sum(map(len, rows)), decreasing)
        thetas = path_throughputs(rows, sps)
        k = 0
        while k + 1 < len(thetas) and thetas[k + 1] > thetas[k]:
            k += 1
        expected = counts_after(rows, k)
        assert prefix_schedule(rows, sps) == expected
        assert prefix_schedule(rows, lambda b: sps[b]) == expected
        assert expected_throughput(rows, expected, sps) == thetas[k]


@pytest.mark.parametrize("decreasing", [True, False])
def test_global_search_matches_brute_force_over_prefix_closed_allocations(decreasing):
    rng = random.Random(99 + decreasing)
    for _ in range(300):
        rows = random_survival(rng, rng.randint(1, 3))
        sps = random_sps(rng, len(rows) + sum(map(len, rows)), decreasing)
        # candidate space of the paper: tokens with positive survival only
        ranges = [range(sum(1 for a in row if a > 0) + 1) for row in rows]
        best = max(expected_throughput(rows, list(c), sps) for c in itertools.product(*ranges))
        chosen = global_search_schedule(rows, sps)
        assert expected_throughput(rows, chosen, sps) == best
        thetas = path_throughputs(rows, sps)
        assert chosen == counts_after(rows, thetas.index(max(thetas)))  # earliest maximum on the path
        # early stop never beats the global search
        assert expected_throughput(rows, prefix_schedule(rows, sps), sps) <= best


def test_greedy_order_is_prefix_closed_and_breaks_ties_by_request_then_position():
    rows = [[F(1, 2), F(1, 2), F(1, 4)], [F(1, 2), F(1, 4)], [F(0)]]
    assert greedy_admission_order(rows) == [
        (0, 1, F(1, 2)), (0, 2, F(1, 2)), (1, 1, F(1, 2)), (0, 3, F(1, 4)), (1, 2, F(1, 4))
    ]


def test_simple_cases():
    # flat SPS: every positive token helps
    assert prefix_schedule([[0.9, 0.5, 0.1], [0.2]], lambda b: 1.0) == [3, 1]
    # a very steep SPS: verifying anything costs more than it gains
    assert prefix_schedule([[0.9, 0.5]], lambda b: 1.0 / b**3) == [0]
    # zero-survival tokens are never admitted
    assert prefix_schedule([[0.9, 0.0, 0.0]], lambda b: 1.0) == [1]
    # requests with no draft tokens
    assert prefix_schedule([[], []], [0, 1, 1]) == [0, 0]


def test_early_stop_only_queries_table_up_to_the_stop():
    # SPS(3) < SPS(2) makes the second token not worth it; the table need not go further
    assert prefix_schedule([[0.8, 0.1, 0.05]], [0.0, 1.0, 0.9, 0.3]) == [1]
    with pytest.raises(ValueError, match="too short"):
        global_search_schedule([[0.8, 0.1, 0.05]], [0.0, 1.0, 0.9, 0.3])


def test_non_anticipation_property_on_random_instances():
    """Admission of (r, j) never changes when only values that depend on x_{r,j} change.

    ``a_{r,j+1}, a_{r,j+2}, ...`` are the only scheduler inputs that are functions of the sampled
    token ``x_{r,j}``. Algorithm 1 (early stop) must give the same answer to "is (r, j) admitted"
    whatever those values are; the global search is allowed to fail this, and does on some instance.
    """
    rng = random.Random(7)
    global_violations = 0
    for _ in range(300):
        rows = random_survival(rng, rng.randint(1, 3))
        sps = random_sps(rng, len(rows) + sum(map(len, rows)), decreasing=rng.random() < 0.5)
        for r, row in enumerate(rows):
            for j in range(1, len(row)):  # token j (1-based) has later positions depending on it
                altered = [list(x) for x in rows]
                a = row[j - 1]
                for k in range(j, len(row)):  # a fresh continuation of x_{r,j}: new c's from the grid
                    a *= F(rng.choice([0, 3, 8, 10]), 10)
                    altered[r][k] = a
                before = prefix_schedule(rows, sps)[r] >= j
                after = prefix_schedule(altered, sps)[r] >= j
                assert before == after
                global_violations += (global_search_schedule(rows, sps)[r] >= j) != (
                    global_search_schedule(altered, sps)[r] >= j
                )
    assert global_violations > 0


# ----------------------------------------------------------------------------- Appendix A, exactly

VOCAB = ("A", "B")
P_TARGET = {"A": F(7, 10), "B": F(3, 10)}
P_DRAFT = {"A": F(1, 2), "B": F(1, 2)}
# Markov confidence head: c_2 is a function of the sampled first draft token
C2_GIVEN_X1 = {"A": F(9, 10), "B": F(0)}
SPS_APPENDIX = [F(0), F(1), F(1, 2), F(45, 100)]  # SPS(1)=1.0, SPS(2)=0.5, SPS(3)=0.45


def first_token_distribution(schedule):
    """Exact law of the first committed token, enumerating the sampled draft token x1.

    For each x1 (probability p_d(x1)) the scheduler sees the survival it would see in practice:
    a_1 (known before x1 is sampled) and a_2 = a_1 * c_2(x1). If it verifies l >= 1 tokens, x1 is
    accepted with probability min(1, p_t/p_d), otherwise the output comes from the residual
    normalize(max(p_t - p_d, 0)); if l = 0 the target samples the token itself from p_t.
    Returns the distribution and the decision l as a function of x1.
    """
    a1 = sum(min(P_TARGET[x], P_DRAFT[x]) for x in VOCAB)
    assert a1 == F(4, 5)
    residual_mass = {x: max(P_TARGET[x] - P_DRAFT[x], F(0)) for x in VOCAB}
    residual = {x: residual_mass[x] / sum(residual_mass.values()) for x in VOCAB}
    law = {x: F(0) for x in VOCAB}
    decisions = {}
    for x1 in VOCAB:
        survival = [[a1, a1 * C2_GIVEN_X1[x1]]]
        length = schedule(survival, SPS_APPENDIX)[0]
        decisions[x1] = length
        if length >= 1:
            accept = min(F(1), P_TARGET[x1] / P_DRAFT[x1])
            law[x1] += P_DRAFT[x1] * accept
            for y in VOCAB:
                law[y] += P_DRAFT[x1] * (1 - accept) * residual[y]
        else:
            for y in VOCAB:
                law[y] += P_DRAFT[x1] * P_TARGET[y]
    assert sum(law.values()) == 1
    return law, decisions


def test_appendix_a_global_search_without_early_stop_is_biased():
    law, decisions = first_token_distribution(global_search_schedule)
    # the decision to verify x1 depends on x1 itself ...
    assert decisions == {"A": 2, "B": 0}
    # ... which biases the output: 0.85 / 0.15 instead of 0.7 / 0.3
    assert law == {"A": F(85, 100), "B": F(15, 100)}
    # the throughputs quoted in the appendix
    assert expected_throughput([[F(4, 5), F(72, 100)]], [2], SPS_APPENDIX) == F(1134, 1000)
    assert expected_throughput([[F(4, 5), F(0)]], [1], SPS_APPENDIX) == F(9, 10)


def test_appendix_a_early_stop_is_lossless():
    law, decisions = first_token_distribution(prefix_schedule)
    assert law == P_TARGET  # exactly 0.7 / 0.3
    # Why: the decision does not depend on the sampled token. It equals the decision made from
    # pre-token information only (a_1, before x1 exists), because Theta_1 = 0.9 <= Theta_0 = 1.0
    # stops the walk before a_2 = a_1 * c_2(x1) is ever used.
    pre_token_decision = prefix_schedule([[F(4, 5)]], SPS_APPENDIX)[0]
    assert pre_token_decision == 0
    assert decisions == {"A": pre_token_decision, "B": pre_token_decision}


def test_appendix_a_async_variant_is_lossless_with_global_search():
    # K comes from stale predictions (fixed before x1 is sampled); whichever stale state, the law
    # of the first token is the target law even though the budget search has no early stop.
    for stale in ([[F(4, 5), F(72, 100)]], [[F(4, 5), F(0)]]):
        law, decisions = first_token_distribution(
            lambda surv, sps, stale=stale: async_prefix_schedule(stale, surv, sps, global_search=True)
        )
        assert law == P_TARGET
        # the admission of x1 itself is the same for both values of x1
        assert (decisions["A"] >= 1) == (decisions["B"] >= 1)


# ----------------------------------------------------------------------------- asynchronous variant


def test_async_with_fresh_predictions_equals_global_search():
    rng = random.Random(5)
    for _ in range(300):
        rows = random_survival(rng, rng.randint(1, 3))
        sps = random_sps(rng, len(rows) + sum(map(len, rows)), decreasing=rng.random() < 0.5)
        assert async_prefix_schedule(rows, rows, sps) == global_search_schedule(rows, sps)
        assert async_prefix_schedule(rows, rows, sps, global_search=False) == prefix_schedule(rows, sps)


def test_async_budget_depends_only_on_stale_predictions():
    rng = random.Random(11)
    for _ in range(300):
        stale = random_survival(rng, rng.randint(1, 3))
        sps = random_sps(rng, 3 + 3 * 4 + len(stale) + sum(map(len, stale)), decreasing=rng.random() < 0.5)
        budget = admission_budget(stale, sps)
        assert budget == sum(global_search_schedule(stale, sps))
        for _ in range(3):
            current = random_survival(rng, len(stale))
            counts = async_prefix_schedule(stale, current, sps)
            available = len(independent_path(current))
            assert sum(counts) == min(budget, available)
            assert counts == counts_after(current, budget)  # top-K by current survival


def test_top_k_prefix():
    rows = [[0.9, 0.2], [0.5, 0.4, 0.0]]
    assert top_k_prefix(rows, 0) == [0, 0]
    assert top_k_prefix(rows, 2) == [1, 1]
    assert top_k_prefix(rows, 3) == [1, 2]
    assert top_k_prefix(rows, 99) == [2, 2]


# ----------------------------------------------------------------------------- right-padded batches


def random_padded_cost(rng: random.Random, n_requests: int, max_tokens: int = 4):
    """Exact round times: a table by width (jagged when ``rng`` says so), a per-token term and a drafter
    term per drafted row; the same shapes the engine's RoundCost produces."""
    by_width = [None]
    current = F(rng.randint(10, 40))
    for _ in range(max_tokens + 1):
        by_width.append(current)
        current += F(rng.choice([0, 0, 1, 3, 8, 20]))
    per_token, per_draft, fixed_draft = F(rng.randint(0, 4), 2), F(rng.randint(0, 6)), F(rng.randint(0, 10))

    def seconds(width, tokens, drafted):
        return by_width[width] + per_token * tokens + (fixed_draft + per_draft * drafted if drafted else 0)

    return seconds


def padded_value(rows, counts, seconds, needs_draft=None):
    drafted = sum(1 for r, c in enumerate(counts) if c and (needs_draft is None or needs_draft[r]))
    expected = len(rows) + sum(sum(row[:c]) for row, c in zip(rows, counts))
    return expected / seconds(1 + max(counts), len(rows) + sum(counts), drafted)


def test_padded_schedule_reduces_to_algorithm_1_when_only_the_token_count_matters():
    rng = random.Random(21)
    for _ in range(300):
        rows = random_survival(rng, rng.randint(1, 3))
        sps = random_sps(rng, len(rows) + sum(map(len, rows)), decreasing=rng.random() < 0.5)
        seconds = lambda width, tokens, drafted: 1 / sps[tokens]  # noqa: E731
        assert padded_schedule(rows, seconds, early_stop=True) == prefix_schedule(rows, sps)
        assert padded_schedule(rows, seconds, early_stop=False) == global_search_schedule(rows, sps)


def test_best_padded_allocation_is_the_best_over_caps_and_never_worse_than_the_path():
    rng = random.Random(22)
    beat_path = 0
    for _ in range(300):
        rows = random_survival(rng, rng.randint(1, 3))
        seconds = random_padded_cost(rng, len(rows))
        flags = [rng.random() < 0.7 for _ in rows]
        chosen = best_padded_allocation(rows, seconds, needs_draft=flags)
        # brute force over allocations where every request takes the same cap or its whole positive draft
        caps = range(max(map(len, rows), default=0) + 1)
        capped = [[min(c, sum(1 for a in row if a > 0)) for row in rows] for c in caps]
        best_capped = max(padded_value(rows, counts, seconds, flags) for counts in capped)
        value = padded_value(rows, chosen, seconds, flags)
        assert value >= best_capped
        assert value >= padded_value(rows, [0] * len(rows), seconds, flags)  # never below a plain step
        path = padded_schedule(rows, seconds, early_stop=False, needs_draft=flags)
        assert value >= padded_value(rows, path, seconds, flags)
        beat_path += value > padded_value(rows, path, seconds, flags)
    assert beat_path > 0  # the cap search finds allocations the plain path misses


def test_padded_schedule_counts_the_drafter_once_per_drafted_request():
    rows = [[0.9, 0.8], [0.9, 0.8]]
    seen = []

    def seconds(width, tokens, drafted):
        seen.append((width, tokens, drafted))
        return 1.0 + 0.1 * drafted

    padded_schedule(rows, seconds, early_stop=False, needs_draft=[True, False])
    # path: (0,1) (1,1) (0,2) (1,2); only request 0 needs the drafter
    assert seen == [(1, 2, 0), (2, 3, 1), (2, 4, 1), (3, 5, 1), (3, 6, 1)]
    # a drafter that costs more than anything can gain keeps every request off it
    assert best_padded_allocation(rows, lambda w, t, d: 1.0 + 10.0 * d) == [0, 0]
    assert best_padded_allocation(rows, lambda w, t, d: 1.0 + 10.0 * d, needs_draft=[False, False]) == [2, 2]


def test_padded_early_stop_is_non_anticipating():
    """As for Algorithm 1: with early stop, whether (r, j) is admitted never depends on a_{r,j+1}, ... ."""
    rng = random.Random(23)
    global_violations = 0
    for _ in range(300):
        rows = random_survival(rng, rng.randint(1, 3))
        seconds = random_padded_cost(rng, len(rows))
        for r, row in enumerate(rows):
            for j in range(1, len(row)):
                altered = [list(x) for x in rows]
                a = row[j - 1]
                for k in range(j, len(row)):
                    a *= F(rng.choice([0, 3, 8, 10]), 10)
                    altered[r][k] = a
                before = padded_schedule(rows, seconds, early_stop=True)[r] >= j
                assert before == (padded_schedule(altered, seconds, early_stop=True)[r] >= j)
                global_violations += (best_padded_allocation(rows, seconds)[r] >= j) != (
                    best_padded_allocation(altered, seconds)[r] >= j
                )
    assert global_violations > 0


def test_capped_top_k_is_non_anticipating():
    """The async admission (top K of the current ranking, positions up to a stale cap) never depends on
    values that are functions of the token it admits."""
    rng = random.Random(24)
    for _ in range(300):
        rows = random_survival(rng, rng.randint(1, 3))
        k, cap = rng.randint(0, 8), rng.randint(0, 4)
        for r, row in enumerate(rows):
            for j in range(1, len(row)):
                altered = [list(x) for x in rows]
                a = row[j - 1]
                for i in range(j, len(row)):
                    a *= F(rng.choice([0, 3, 8, 10]), 10)
                    altered[r][i] = a
                assert (top_k_prefix(rows, k, max_count=cap)[r] >= j) == (top_k_prefix(altered, k, max_count=cap)[r] >= j)
    assert top_k_prefix([[0.9, 0.8, 0.7], [0.5]], 3, max_count=1) == [1, 1]
    with pytest.raises(ValueError, match="max_count"):
        top_k_prefix([[0.9]], 1, max_count=-1)


def test_round_seconds_must_be_positive():
    with pytest.raises(ValueError, match=r"round_seconds\(width=1, tokens=1, drafted_rows=0\)"):
        padded_schedule([[0.5]], lambda w, t, d: 0.0, early_stop=True)
    with pytest.raises(ValueError, match="needs_draft has 1 entries"):
        padded_schedule([[0.5], [0.5]], lambda w, t, d: 1.0, early_stop=True, needs_draft=[True])


# ----------------------------------------------------------------------------- batch-1 form


def test_cost_rule_matches_algorithm_1_for_one_request():
    rng = random.Random(3)
    for _ in range(300):
        row = random_survival(rng, 1, max_tokens=6)[0]
        times = [None] + [F(rng.randint(1, 50), 10) for _ in range(len(row) + 1)]
        times[1:] = sorted(times[1:])  # passes over more tokens are not faster
        expected = prefix_schedule([row], lambda b: 1 / times[b])[0]
        assert cost_length(row, 0, lambda n: times[n], 0, checked=True) == expected
        assert prefix_length(row, lambda length: times[1 + length], checked=True) == expected
        assert prefix_length(row, lambda length: times[1 + length]) == expected  # unchecked: the same rule


def test_cost_rule_with_draft_time_and_min_tokens():
    survival = [0.9, 0.8, 0.5, 0.1]
    verify = lambda n: 1.0 + 0.1 * n  # noqa: E731
    # tokens/s for L = 0..4: 0.476, 0.864, 1.174, 1.333, 1.320 -> stop at L = 3
    assert cost_length(survival, 1.0, verify, 0, checked=True) == 3
    # a costly pass per token stops earlier
    assert cost_length(survival, 0.0, lambda n: float(n), 0, checked=True) == 0
    assert cost_length(survival, 0.0, lambda n: float(n), 1, checked=True) == 1
    assert cost_length([], 0.0, verify, 0, checked=True) == 0
    assert cost_length([], 0.0, verify) == 0  # unchecked, min_tokens is capped at the draft's length
    with pytest.raises(ValueError, match="min_tokens=1 exceeds the draft length 0"):
        cost_length([], 0.0, verify, 1, checked=True)
    with pytest.raises(ValueError, match="draft_seconds"):
        cost_length(survival, -1.0, verify, checked=True)
    with pytest.raises(ValueError, match="round time"):
        cost_length(survival, 0.0, lambda n: 0.0, checked=True)
    with pytest.raises(ValueError, match="non-increasing"):
        prefix_length([0.5, 0.9], lambda length: 1.0, checked=True)


def test_a_zero_survival_token_ends_the_prefix_even_when_longer_rounds_are_cheaper():
    # a measured latency table can be noisy: here rounds get cheaper with length (1 / (L + 1) s),
    # so tokens/s keeps rising, but a token with survival 0 is never submitted, nor any after it
    survival = [0.9, 0.0, 0.0]
    assert prefix_length(survival, lambda length: 1 / (length + 1), checked=True) == 1
    assert cost_length(survival, 0.0, lambda n: 1 / n, 0, checked=True) == 1
    assert prefix_length([0.0, 0.0], lambda length: 1 / (length + 1), checked=True) == 0


def test_min_tokens_must_be_a_non_negative_int():
    times = lambda length: 1.0 + length  # noqa: E731
    for bad in (-1, True, 1.0, "1"):
        with pytest.raises(ValueError, match="min_tokens must be an int >= 0"):
            prefix_length([0.9, 0.5], times, bad, checked=True)
    assert prefix_length([0.9, 0.5], times, 2, checked=True) == 2


def test_the_old_batch_1_names_warn_and_run_the_one_rule():
    rng = random.Random(5)
    for _ in range(50):
        row = random_survival(rng, 1, max_tokens=6)[0]
        times = [None] + sorted(F(rng.randint(1, 50), 10) for _ in range(len(row) + 1))
        with pytest.warns(FutureWarning, match="single_request_prefix_length is deprecated"):
            old = single_request_prefix_length(row, lambda length: times[1 + length], min_tokens=0)
        assert old == prefix_length(row, lambda length: times[1 + length], 0, checked=True)
        with pytest.warns(FutureWarning, match="cost_policy_length is deprecated"):
            old = cost_policy_length(row, lambda n: times[n], draft_seconds=F(1, 2))
        assert old == cost_length(row, F(1, 2), lambda n: times[n], 0, checked=True)
    with pytest.warns(FutureWarning), pytest.raises(ValueError, match="min_tokens=1 exceeds the draft length 0"):
        cost_policy_length([], lambda n: 1.0, min_tokens=1)  # the old checks, too


# ----------------------------------------------------------------------------- errors


def test_errors_name_request_and_position():
    sps = lambda b: 1.0  # noqa: E731
    message = r"survival\[1\] \(request 1\), position 3: prefix survival must be non-increasing"
    with pytest.raises(ValueError, match=message):
        prefix_schedule([[0.5], [0.9, 0.8, 0.85]], sps)
    with pytest.raises(ValueError, match=r"survival\[0\] \(request 0\), position 2: .*\[0, 1\]"):
        prefix_schedule([[0.9, 1.5]], sps)
    with pytest.raises(ValueError, match=r"position 1: .*\[0, 1\]"):
        prefix_schedule([[float("nan")]], sps)
    with pytest.raises(ValueError, match="at least one active request"):
        prefix_schedule([], sps)
    with pytest.raises(ValueError, match="real number"):
        prefix_schedule([["0.5"]], sps)
    with pytest.raises(ValueError, match="must be a sequence"):
        prefix_schedule([0.5, 0.4], sps)
    with pytest.raises(ValueError, match="table is too short: it has 2 entries"):
        prefix_schedule([[0.9], [0.9]], [0.0, 1.0])
    with pytest.raises(ValueError, match=r"steps_per_second\(1\) must be a finite number"):
        prefix_schedule([[0.9]], lambda b: -1.0)
    with pytest.raises(ValueError, match="callable"):
        prefix_schedule([[0.9]], 3.0)
    with pytest.raises(ValueError, match=r"counts\[0\] \(request 0\) must be an int in \[0, 1\]"):
        expected_throughput([[0.9]], [2], sps)
    with pytest.raises(ValueError, match="counts has 2 entries"):
        expected_throughput([[0.9]], [0, 0], sps)
    with pytest.raises(ValueError, match="k .* must be an int >= 0"):
        top_k_prefix([[0.9]], -1)
