"""N-gram rounds inside DSpark generation: lookup rule, lossless greedy, exact sampling, drafter context."""

from __future__ import annotations

import pytest
import torch
from _fixtures import POLICIES, chi_square_rejects, exact_joint, sample_counts, set_policy
from _models import small_vocab_pair, tiny_drafter, tiny_gemma3_target, tiny_qwen3_target

import hf_dspark  # noqa: F401  (installs the hook)
from hf_dspark.models.dspark.generation_dspark import DSparkCandidateGenerator, ngram_continuation


def t(*ids):
    return torch.tensor(ids)


# ------------------------------------------------------------------------- the lookup rule
def test_no_match_gives_none():
    assert ngram_continuation(t(1, 2, 3, 4, 5), 4) is None
    assert ngram_continuation(t(7), 4) is None
    assert ngram_continuation(t(1, 2, 1, 2), 0) is None


def test_longest_suffix_ngram_wins():
    # "3 4" occurs twice; only the second occurrence is preceded by 2 (the 3-gram "2 3 4")
    seq = t(3, 4, 9, 9, 2, 3, 4, 7, 8, 5, 2, 3, 4)
    assert ngram_continuation(seq, 2, max_size=3, min_size=2).tolist() == [7, 8]
    assert ngram_continuation(seq, 2, max_size=2, min_size=2).tolist() == [7, 8]  # latest full occurrence
    assert ngram_continuation(t(5, 6, 1, 5, 7, 9, 9), 3, max_size=3, min_size=2) is None  # 1-grams not allowed
    assert ngram_continuation(t(5, 6, 1, 5), 2, max_size=3, min_size=1).tolist() == [6, 1]


def test_the_latest_occurrence_is_used_and_repeated_past_the_end():
    seq = t(1, 2, 10, 11, 12, 1, 2, 20, 21, 22, 1, 2)
    assert ngram_continuation(seq, 3).tolist() == [20, 21, 22]
    assert ngram_continuation(seq, 5).tolist() == [20, 21, 22, 1, 2]
    # past the end, the 5 tokens between the two occurrences of "1 2" repeat
    assert ngram_continuation(seq, 8).tolist() == [20, 21, 22, 1, 2, 20, 21, 22]


def test_a_short_loop_is_continued_for_the_full_length():
    seq = t(8, 5, 6, 5, 6, 5, 6)
    assert ngram_continuation(seq, 4).tolist() == [5, 6, 5, 6]


def test_invalid_settings_are_a_clear_error():
    target = tiny_qwen3_target()
    draft = set_policy(tiny_drafter(target), verification_policy="full", ngram_lookup_tokens=5,
                       ngram_max_size=1, ngram_min_size=2)
    with pytest.raises(ValueError, match="ngram_min_size <= ngram_max_size"):
        target.generate(torch.tensor([[3, 4, 5]]), max_new_tokens=4, do_sample=False, assistant_model=draft)


# ------------------------------------------------------------------------- greedy: lossless, both round kinds
def repetitive_prompts(n, vocab=90, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        motif = torch.randint(3, vocab, (4,), generator=gen)
        out.append(torch.cat([motif, torch.randint(3, vocab, (2,), generator=gen), motif, motif[:2]])[None])
    return out


@pytest.mark.parametrize("target_name", ["qwen", "gemma"])
@pytest.mark.parametrize("variant", [dict(), dict(draft_vocab_size=48, draft_token_ids=list(range(40, 88)))],
                         ids=["full_vocab", "reduced_vocab"])
def test_greedy_with_ngram_rounds_equals_plain_generate(target_name, variant):
    target = tiny_qwen3_target() if target_name == "qwen" else tiny_gemma3_target()
    draft = tiny_drafter(target, **variant)
    ngram_rounds = drafter_rounds = 0
    for policy, settings in POLICIES.items():
        set_policy(draft, ngram_lookup_tokens=6, **settings)
        for ids in repetitive_prompts(3, seed=len(policy)):
            plain = target.generate(ids, max_new_tokens=40, do_sample=False)
            spec = target.generate(ids, max_new_tokens=40, do_sample=False, assistant_model=draft)
            assert torch.equal(plain, spec), f"{target_name}/{policy}"
            stats = draft.last_generation_stats
            assert stats["ngram_lookup_tokens"] == 6
            assert stats["rounds"] == len(stats["accepted_lengths"])
            assert sum(stats["accepted_lengths"]) >= spec.shape[1] - ids.shape[1] - 1
            assert stats["position_attempted"][0] == stats["rounds"] - stats["ngram_rounds"]
            assert stats["ngram_accepted"] <= stats["ngram_submitted"] <= 6 * stats["ngram_rounds"]
            ngram_rounds += stats["ngram_rounds"]
            drafter_rounds += stats["rounds"] - stats["ngram_rounds"]
    assert ngram_rounds > 0 and drafter_rounds > 0  # both kinds of round really ran


def test_ngram_rounds_hand_every_feature_to_the_drafter_in_order(monkeypatch):
    """Features of n-gram rounds are appended before the next block: the draft cache always holds
    exactly the committed tokens before the anchor, as when every round drafts."""
    target = tiny_qwen3_target()
    draft = set_policy(tiny_drafter(target), verification_policy="full", ngram_lookup_tokens=5)
    lengths, checks = {}, []
    original_get, original_block = DSparkCandidateGenerator.get_candidates, type(draft).draft_block

    def get_candidates(self, input_ids, *args, **kwargs):
        lengths["sequence"] = input_ids.shape[1]
        return original_get(self, input_ids, *args, **kwargs)

    def draft_block(self, anchor_ids, new_target_hidden_states, cache):
        checks.append((cache.get_seq_length() + new_target_hidden_states.shape[1], lengths["sequence"] - 1))
        return original_block(self, anchor_ids, new_target_hidden_states, cache)

    monkeypatch.setattr(DSparkCandidateGenerator, "get_candidates", get_candidates)
    monkeypatch.setattr(type(draft), "draft_block", draft_block)
    for ids in repetitive_prompts(3, seed=11):
        target.generate(ids, max_new_tokens=40, do_sample=False, assistant_model=draft)
        assert draft.last_generation_stats["ngram_rounds"] > 0
    assert checks and all(have == want for have, want in checks), checks


def test_ngram_lookup_is_off_by_default():
    target = tiny_qwen3_target()
    draft = set_policy(tiny_drafter(target), verification_policy="full")
    target.generate(repetitive_prompts(1)[0], max_new_tokens=30, do_sample=False, assistant_model=draft)
    assert draft.last_generation_stats["ngram_rounds"] == 0


# ------------------------------------------------------------------------- sampling stays exact
@pytest.fixture(scope="module")
def small_vocab_ngram():
    target, draft = small_vocab_pair()
    # 1-gram matches over a 6-token vocabulary: most rounds copy, the others draft
    return target, set_policy(draft, ngram_lookup_tokens=3, ngram_max_size=2, ngram_min_size=1)


def count_round_kinds(target, draft, ids, warp, runs):
    ngram = total = 0
    for s in range(runs):
        torch.manual_seed(s)
        target.generate(ids, max_new_tokens=3, do_sample=True, assistant_model=draft, **warp)
        ngram += draft.last_generation_stats["ngram_rounds"]
        total += draft.last_generation_stats["rounds"]
    return ngram, total


@pytest.mark.parametrize(
    "warp",
    [dict(temperature=1.0, top_k=0, top_p=1.0), dict(temperature=0.7, top_k=4, top_p=0.9)],
    ids=["plain", "temp_topk_topp"],
)
def test_sampling_with_ngram_rounds_follows_the_target_distribution(small_vocab_ngram, warp):
    target, draft = small_vocab_ngram
    ids = torch.tensor([[1, 3, 2, 4]])
    exact = exact_joint(target, ids, warp)
    counts = sample_counts(target, draft, ids, warp, runs=1500)
    rejects, stat, crit = chi_square_rejects(counts, exact)
    assert not rejects, f"speculative samples deviate from the target: chi2={stat:.1f} > {crit:.1f}"
    ngram, total = count_round_kinds(target, draft, ids, warp, runs=40)
    assert 0 < ngram < total  # both n-gram and drafter rounds were sampled


def test_a_wrong_ngram_proposal_distribution_is_caught(small_vocab_ngram, monkeypatch):
    """Negative control: reporting a uniform q for copied tokens must fail the exactness test above."""
    target, draft = small_vocab_ngram
    warp = dict(temperature=1.0, top_k=0, top_p=1.0)
    ids = torch.tensor([[1, 3, 2, 4]])
    original = DSparkCandidateGenerator._ngram_candidates

    def lying(self, *args, **kwargs):
        cands, logits = original(self, *args, **kwargs)
        return cands, torch.zeros_like(logits)

    monkeypatch.setattr(DSparkCandidateGenerator, "_ngram_candidates", lying)
    exact = exact_joint(target, ids, warp)
    counts = sample_counts(target, draft, ids, warp, runs=1500)
    assert chi_square_rejects(counts, exact)[0]
