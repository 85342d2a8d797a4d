"""``ngram_lookup_tokens="auto"``: copy lengths, block extensions and the n-gram-or-drafter choice read the
target's cost curve; decoding stays lossless (issue 31)."""

from __future__ import annotations

import math

import pytest
import torch
from _fixtures import chi_square_rejects
from _models import tiny_drafter, tiny_qwen3_target

import hf_dspark  # noqa: F401  (installs the hook and registers the latency cache as a latency source)
from hf_dspark.errors import DSparkConfigError
from hf_dspark.models.dspark.generation_dspark import (
    DSparkCandidateGenerator,
    DSparkGenerationConfig,
    ProposalAcceptance,
    copy_length,
    expected_rate,
)

FLAT = {str(n): 0.010 for n in range(1, 17)}  # a pass over 1..16 tokens costs the same: every token is free
STEEP = {str(n): 0.010 * n for n in range(1, 17)}  # a pass costs in proportion to its tokens


# ------------------------------------------------------------------------- the rules, by hand
def test_proposal_acceptance_by_hand():
    acceptance = ProposalAcceptance(prior=0.5, prior_weight=2.0, shrink=2.0)
    assert acceptance.survival(2) == pytest.approx([0.5, 0.25])  # nothing seen: the prior at every position
    acceptance.record(submitted=3, accepted=2)  # positions 1, 2 accepted, 3 rejected
    pooled = (2 + 0.5 * 2) / (3 + 2)
    assert acceptance.pooled_rate() == pytest.approx(pooled)
    r1 = (1 + 2 * pooled) / (1 + 2)
    r3 = (0 + 2 * pooled) / (1 + 2)
    r4 = (0 + 2 * pooled) / (0 + 2)  # never reached: the pooled rate
    expected = [r1, r1 * r1, r1 * r1 * r3, r1 * r1 * r3 * r4]
    assert acceptance.survival(4) == pytest.approx(expected)
    assert acceptance.survival(2, start=0.5) == pytest.approx([0.5 * r1, 0.5 * r1 * r1])
    acceptance.record(submitted=2, accepted=5)  # more matches than submitted tokens count as all accepted
    assert acceptance.attempted[:2] == [2, 2] and acceptance.accepted[:2] == [2, 2]


def test_copy_length_follows_the_curve():
    survival = [0.9, 0.8, 0.7, 0.3, 0.2, 0.1]
    flat = copy_length(survival, lambda n: 1.0)
    assert flat == 6  # every token is free: submit all that can be accepted
    # round time 1 + 0.1 L: rates (1 + a_1 + .. + a_L) / (1 + 0.1 L) are 1.727, 2.25, 2.615, 2.643, 2.6: L = 4
    assert copy_length(survival, lambda n: 1.0 + 0.1 * n) == 4
    # round time 1 + L: 1.9 / 2 = 0.95, then 2.7 / 3 = 0.9: one token, the least a copy submits
    assert copy_length(survival, lambda n: 1.0 + n) == 1
    assert copy_length([], lambda n: 1.0) == 0
    # a step in the curve: 3 tokens cost 1.0, 4 or more 1.5. The rate falls at 4 (4.8 / 1.5 = 3.2 against
    # 3.85) but the whole copy pays more (10.5 / 1.5 = 7.0): the search looks past the step
    stepped = lambda n: 1.0 if n <= 3 else 1.5  # noqa: E731
    assert copy_length([0.95] * 10, stepped) == 10
    # equal rates: the shortest
    assert copy_length([1.0, 0.0, 0.0], lambda n: 1.0) == 1
    assert expected_rate([0.5, 0.25], 2.0) == pytest.approx(1.75 / 2.0)


def test_auto_is_a_valid_ngram_setting_and_nonsense_is_refused():
    config = DSparkGenerationConfig(ngram_lookup_tokens="auto")
    config.validate()
    with pytest.raises(DSparkConfigError, match='ngram_lookup_tokens.*"auto"'):
        DSparkGenerationConfig(ngram_lookup_tokens="longest")


# ------------------------------------------------------------------------- generate
@pytest.fixture(scope="module")
def pair():
    target = tiny_qwen3_target(seed=1, eos_token_id=None)
    target.generation_config.eos_token_id = None
    return target, tiny_drafter(target, seed=2, block_size=4)


def configure(draft, table, ngram="auto", policy="auto"):
    config = draft.generation_config
    config.latency_table, config.latency_profile_key = table, None
    config.ngram_lookup_tokens, config.verification_policy = ngram, policy
    return draft


LOOPING = torch.tensor([[5] + [10, 11, 12, 13, 14, 15] * 5])


def test_greedy_with_curve_lengths_equals_plain_generate(pair):
    target, draft = pair
    configure(draft, FLAT)
    plain = target.generate(LOOPING, max_new_tokens=48, do_sample=False)
    spec = target.generate(LOOPING, max_new_tokens=48, do_sample=False, assistant_model=draft)
    stats = draft.last_generation_stats
    assert torch.equal(plain, spec)
    assert stats["policy"] == "cost"
    # the prompt loops: copies longer than the drafter's block were proposed
    assert stats["ngram_rounds"] > 0 and max(stats["submitted_lengths"]) > draft.config.block_size


def test_auto_lengths_reach_the_longest_measured_pass(pair):
    target, draft = pair
    configure(draft, FLAT)
    generator = DSparkCandidateGenerator(target, draft, target.generation_config, input_ids=LOOPING)
    assert generator.adaptive and generator.num_drafting_tokens == 15  # 16-token pass: anchor + 15
    configure(draft, None)  # no curve: one block per copy, the whole block verified
    generator = DSparkCandidateGenerator(target, draft, target.generation_config, input_ids=LOOPING)
    assert not generator.adaptive and generator.policy == "full"
    assert generator.num_drafting_tokens == draft.config.block_size == generator.ngram_tokens


def test_a_steep_curve_copies_less_than_a_flat_one(pair):
    target, draft = pair
    lengths = {}
    for name, table in (("flat", FLAT), ("steep", STEEP)):
        configure(draft, table)
        target.generate(LOOPING, max_new_tokens=40, do_sample=False, assistant_model=draft)
        stats = draft.last_generation_stats
        lengths[name] = stats["ngram_submitted"] / max(stats["ngram_rounds"], 1)
    assert lengths["steep"] < lengths["flat"]


def test_rounds_where_the_drafter_does_not_pay_are_plain_rounds(pair):
    """A steep curve and a drafter whose tokens are seldom accepted: plain decoding commits more per second,
    so most rounds skip the drafter (its features wait for its next block); every few skipped rounds it
    drafts again, and greedy output still equals plain generate."""
    from hf_dspark.models.dspark.generation_dspark import DRAFTER_RETRY

    target, draft = pair
    configure(draft, STEEP, ngram="auto")
    draft.generation_config.ngram_min_size = 3  # keep n-gram rounds out of this random prompt
    ids = torch.tensor([[5, 17, 40, 3, 61, 22, 9, 33]])
    try:
        plain = target.generate(ids, max_new_tokens=40, do_sample=False)
        spec = target.generate(ids, max_new_tokens=40, do_sample=False, assistant_model=draft)
    finally:
        draft.generation_config.ngram_min_size = 2
    stats = draft.last_generation_stats
    assert torch.equal(plain, spec)
    drafted_rounds = stats["rounds"] - stats["plain_rounds"] - stats["ngram_rounds"]
    assert stats["plain_rounds"] > drafted_rounds > 0
    assert stats["plain_rounds"] <= DRAFTER_RETRY * (drafted_rounds + 1)  # the drafter is retried


def test_a_copy_is_passed_over_when_the_drafter_pays_more_and_retried(pair):
    """Copies whose tokens are seldom accepted lose to a drafter committing more per second; every
    DRAFTER_RETRY-th match is copied anyway, so the copies' estimate keeps learning."""
    from hf_dspark.models.dspark.generation_dspark import DRAFTER_RETRY

    target, draft = pair
    configure(draft, FLAT)
    generator = DSparkCandidateGenerator(target, draft, target.generation_config, input_ids=LOOPING)
    assert generator._copy_pays(3, 2)  # no drafter rate yet: copy
    for _ in range(6):
        generator.ngram_acceptance[2].record(submitted=3, accepted=0)
    generator.drafter_rate_ema = 2.5 / generator._round_seconds(4)  # 2.5 tokens per drafter round
    decisions = [generator._copy_pays(1, 2) for _ in range(2 * (DRAFTER_RETRY + 1))]
    assert decisions == ([False] * DRAFTER_RETRY + [True]) * 2
    generator.drafter_rate_ema = 0.5 / generator._round_seconds(4)  # a drafter worse than any copy
    assert generator._copy_pays(1, 2)


def test_retried_copies_that_lose_to_the_drafter_come_less_often(pair):
    """A copy retried after DRAFTER_RETRY passed-over matches that commits less per second than the drafter
    doubles the wait before the next retry (up to COPY_RETRY_MAX); one that commits more resets it."""
    from hf_dspark.models.dspark.generation_dspark import COPY_RETRY_MAX, DRAFTER_RETRY

    target, draft = pair
    configure(draft, FLAT)
    generator = DSparkCandidateGenerator(target, draft, target.generation_config, input_ids=LOOPING)
    for _ in range(6):
        generator.ngram_acceptance[2].record(submitted=3, accepted=0)
    seconds = generator._round_seconds(4)
    generator.drafter_rate_ema = 2.5 / seconds  # 2.5 tokens per drafter round

    def passed_over_before_a_retry(committed):
        count = 0
        while not generator._copy_pays(1, 2):
            count += 1
        assert generator._retried_copy
        generator._round_model = (0.0, seconds - generator.overhead_ema)  # the copy round's modelled time
        generator._after_retried_copy(committed)
        return count

    waits = [passed_over_before_a_retry(committed=1) for _ in range(6)]  # each retry commits 1 < 2.5
    assert waits == [DRAFTER_RETRY, 2 * DRAFTER_RETRY, 4 * DRAFTER_RETRY, 8 * DRAFTER_RETRY, COPY_RETRY_MAX,
                     COPY_RETRY_MAX]
    assert passed_over_before_a_retry(committed=4) == COPY_RETRY_MAX  # this retry paid more than the drafter
    assert passed_over_before_a_retry(committed=1) == DRAFTER_RETRY  # so the next came after DRAFTER_RETRY
    assert not (generator._copy_pays(1, 2) and generator._retried_copy)  # a passed-over match is no retry


def test_the_drafters_rate_is_a_ratio_of_decayed_sums(pair):
    """The rate copies and plain rounds are compared with: committed tokens over modelled seconds of the
    drafter's rounds, both summed with DRAFTER_RATE_DECAY (not a mean of each round's own rate)."""
    from hf_dspark.models.dspark.generation_dspark import DRAFTER_RATE_DECAY

    target, draft = pair
    configure(draft, FLAT)
    generator = DSparkCandidateGenerator(target, draft, target.generation_config, input_ids=LOOPING)
    generator._is_prefill = False
    generator._round_start = 0.0
    rounds = [(3, 1, 0.2), (3, 3, 0.1), (3, 0, 0.4)]  # (submitted, accepted, modelled seconds)
    tokens = seconds = 0.0
    for submitted, accepted, modelled in rounds:
        generator._submitted, generator._round_model = submitted, (0.0, modelled)
        generator.update_candidate_strategy(LOOPING, None, accepted)
        tokens = DRAFTER_RATE_DECAY * tokens + 1 + accepted
        seconds = DRAFTER_RATE_DECAY * seconds + modelled + generator.overhead_ema
    assert generator.drafter_rate_ema == pytest.approx(tokens / seconds)
    mean_of_rates = sum((1 + a) / m for _, a, m in rounds) / len(rounds)
    assert generator.drafter_rate_ema != pytest.approx(mean_of_rates)


def test_a_cached_profile_of_this_target_is_found(pair, tmp_path, monkeypatch):
    """No table in the drafter: generate reads the profile cached for this target, dtype and device."""
    from hf_dspark.decoding.latency import cached_latency_table, profile_latency

    target, draft = pair
    monkeypatch.setenv("HF_DSPARK_CACHE", str(tmp_path))
    configure(draft, None)
    assert cached_latency_table(target) is None
    profile_latency(target, token_counts=range(1, 9), warmup=0, repeats=1, model_name="any name")
    table = cached_latency_table(target)
    assert table is not None and sorted(int(n) for n in table) == list(range(1, 9))
    generator = DSparkCandidateGenerator(target, draft, target.generation_config, input_ids=LOOPING)
    assert generator.policy == "cost" and generator.adaptive and generator.num_drafting_tokens == 7
    assert cached_latency_table(target.to(torch.float64)) is None  # measured in float32, not float64
    target.to(torch.float32)


# ------------------------------------------------------------------------- sampling stays exact
@pytest.fixture(scope="module")
def small_extended():
    """A 6-token target and a 2-token drafter: with 4 new tokens, the first drafter round (after the prefill's
    token) may append one n-gram continuation token after its block, the fourth new token."""
    target = tiny_qwen3_target(seed=7, vocab_size=6, num_layers=4, eos_token_id=None)
    target.generation_config.eos_token_id = None
    draft = tiny_drafter(target, seed=3, block_size=2, markov_rank=4, mask_token_id=5)
    configure(draft, FLAT)
    draft.generation_config.ngram_max_size, draft.generation_config.ngram_min_size = 2, 1
    return target, draft


NEW_TOKENS = 4


def exact_last_two(target, ids) -> torch.Tensor:
    """Exact P(x3, x4) of plain sampling at temperature 1 (x1, x2 marginalised), by enumeration."""
    size = target.config.vocab_size
    joint = torch.zeros(size, size, dtype=torch.float64)

    def walk(prefix, probability, depth):
        with torch.no_grad():
            probs = torch.softmax(target(prefix).logits[0, -1].double(), dim=-1)
        for token in range(size):
            p = probability * probs[token].item()
            longer = torch.cat([prefix, torch.tensor([[token]])], dim=1)
            if depth == NEW_TOKENS - 2:  # x3 chosen: x4 comes from one more step
                with torch.no_grad():
                    last = torch.softmax(target(longer).logits[0, -1].double(), dim=-1)
                joint[token] += p * last
            else:
                walk(longer, p, depth + 1)

    walk(ids, 1.0, 0)
    return joint


def extended_counts(target, draft, ids, warp, runs):
    size = target.config.vocab_size
    counts = torch.zeros(size, size, dtype=torch.long)
    kinds = {"extended": 0, "ngram": 0}
    for seed in range(runs):
        torch.manual_seed(seed)
        out = target.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=True, assistant_model=draft, **warp)
        counts[out[0, -2], out[0, -1]] += 1
        kinds["extended"] += draft.last_generation_stats["extended_rounds"]
        kinds["ngram"] += draft.last_generation_stats["ngram_rounds"]
    return counts, kinds


WARP = dict(temperature=1.0, top_k=0, top_p=1.0)
# top-k over the whole 6-token vocabulary leaves the law unwarped but takes the support path (sampling_dspark.py)
SUPPORT_WARP = dict(temperature=1.0, top_k=6, top_p=1.0)


@pytest.mark.parametrize("warp", [WARP, SUPPORT_WARP], ids=["full_vocabulary", "support"])
def test_sampling_with_extensions_follows_the_target_distribution(small_extended, warp):
    target, draft = small_extended
    ids = torch.tensor([[1, 3, 2, 4]])
    counts, kinds = extended_counts(target, draft, ids, warp, runs=1500)
    rejects, stat, crit = chi_square_rejects(counts, exact_last_two(target, ids))
    assert not rejects, f"speculative samples deviate from the target: chi2={stat:.1f} > {crit:.1f}"
    assert kinds["extended"] > 100  # the extension was proposed in many runs, not a corner case
    assert draft.last_generation_stats["support_sampling"] == (warp is SUPPORT_WARP)


def test_a_wrong_extension_law_on_the_support_is_caught(small_extended, monkeypatch):
    """Negative control of the support path: copied and appended tokens reported as drawn uniformly."""
    from hf_dspark.models.dspark import generation_dspark, sampling_dspark

    class Uniform(sampling_dspark.ProposalLaw):
        @classmethod
        def one_hot(cls, tokens):
            rows = tokens.reshape(-1).shape[0]
            return sampling_dspark.ProposalLaw(torch.arange(6).expand(rows, 6), torch.full((rows, 6), 1 / 6))

    monkeypatch.setattr(generation_dspark, "ProposalLaw", Uniform)
    target, draft = small_extended
    ids = torch.tensor([[1, 3, 2, 4]])
    counts, _ = extended_counts(target, draft, ids, SUPPORT_WARP, runs=600)
    assert chi_square_rejects(counts, exact_last_two(target, ids))[0]


def test_a_wrong_extension_distribution_is_caught(small_extended, monkeypatch):
    """Negative control: a uniform q reported for the appended tokens must fail the test above."""
    target, draft = small_extended
    ids = torch.tensor([[1, 3, 2, 4]])
    monkeypatch.setattr(DSparkCandidateGenerator, "_one_hot",
                        lambda self, tokens, device: torch.zeros(1, tokens.shape[0], self.vocab_size, device=device))
    counts, _ = extended_counts(target, draft, ids, WARP, runs=600)
    assert chi_square_rejects(counts, exact_last_two(target, ids))[0]


def test_profile_timing_goes_round_robin_over_token_counts():
    """A slow spell of the machine must land on every token count alike, not bend the curve."""
    from hf_dspark.decoding import latency

    order = []

    class Recorder(torch.nn.Module):
        def forward(self, input_ids, cache=None, use_cache=True):
            order.append(input_ids.shape[1])

    class Context:
        def ready(self):
            return None

        def rollback(self, n):
            pass

    ids = torch.zeros(1, 3, dtype=torch.long)
    result = latency._time_passes(Recorder(), Context(), ids, [1, 2, 3], warmup=1, repeats=2, device=torch.device("cpu"))
    assert order == [1, 2, 3, 1, 2, 3, 1, 2, 3]
    assert sorted(result) == [1, 2, 3] and all(math.isfinite(seconds) for seconds, _ in result.values())
