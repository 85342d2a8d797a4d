"""Batched speculative engine: the accept/reject rule without a model, lossless greedy decoding on
ragged batches (Qwen3 and sliding-window Gemma3), exact sampling, joining/leaving requests, CLI."""

from __future__ import annotations

import copy
import itertools
import json
import math
from collections import defaultdict

import pytest
import torch
from _fixtures import (chi_square_rejects, mixed_prompts, plain, repetitive_prompts, synthetic_cost,
                       synthetic_profile, train_prompts)
from _models import briefly_trained_drafter, target_features, tiny_drafter, tiny_gemma3_target, tiny_qwen3_target

import hf_dspark.decoding.verification as verification
from hf_dspark import DSparkDraftCache, DSparkGenerationConfig
from hf_dspark.decoding.batch_requests import SpeculativeRequest
from hf_dspark.decoding.batched import BatchedSpeculativeGenerator, RaggedSlots
from hf_dspark.decoding.latency import LatencyProfile
from hf_dspark.decoding.packing import position_wise_modules, real_slots_only
from hf_dspark.decoding.ragged import PendingFeatures
from hf_dspark.decoding.round_cost import RoundCost, token_seconds
from hf_dspark.decoding.round_plan import RoundPlanner
from hf_dspark.decoding.scheduling import best_padded_allocation
from hf_dspark.decoding.verification import accept_probabilities, residual_distribution, verify_block
from hf_dspark.models.dspark.policies_dspark import AsyncPolicy, CostPolicy, FullPolicy, ThresholdPolicy


def policy_config(policy: str, **settings) -> DSparkGenerationConfig:
    """The engine's decoding settings: ``policy`` (a registered verification policy) and ``settings``."""
    return DSparkGenerationConfig(verification_policy=policy, **settings)


# ============================================================================ the rule, no model
def test_greedy_keeps_drafts_while_they_match_the_argmax():
    target = torch.full((4, 5), -1.0)
    for j, best in enumerate([3, 1, 4, 0]):
        target[j, best] = 2.0
    assert verify_block(torch.tensor([3, 1, 4]), None, target, 3) == (3, 0)  # all match: bonus = argmax p_4
    assert verify_block(torch.tensor([3, 2, 4]), None, target, 3) == (1, 1)  # x_2 wrong: correction = argmax p_2
    assert verify_block(torch.tensor([0, 1, 4]), None, target, 3) == (0, 3)
    assert verify_block(torch.tensor([3, 1, 4]), None, target, 1) == (1, 1)  # only x_1 submitted
    assert verify_block(torch.tensor([3, 1, 4]), None, target, 0) == (0, 3)  # nothing submitted


def _tables(vocab: int, depth: int, seed: int, sparse: bool) -> dict:
    """A distribution over ``vocab`` tokens for every prefix of length 0..depth (some zeros when sparse)."""
    gen = torch.Generator().manual_seed(seed)
    tables = {}
    for length in range(depth + 1):
        for prefix in itertools.product(range(vocab), repeat=length):
            logits = 1.5 * torch.randn(vocab, generator=gen, dtype=torch.float64)
            if sparse and torch.rand(1, generator=gen).item() < 0.5:
                logits[torch.randint(vocab, (1,), generator=gen)] = -math.inf  # e.g. cut by top-k
            tables[prefix] = torch.softmax(logits, -1)
    return tables


def _extensions(p: dict, prefix: tuple, length: int, vocab: int):
    """Plain target sampling from ``prefix`` to ``length`` tokens: yields (tail, probability)."""
    if len(prefix) == length:
        yield (), 1.0
        return
    dist = p[prefix]
    for y in range(vocab):
        if dist[y] > 0:
            for tail, prob in _extensions(p, prefix + (y,), length, vocab):
                yield (y,) + tail, float(dist[y]) * prob


def _round_law(p: dict, q: dict, n: int, vocab: int, residual=residual_distribution) -> dict:
    """Exact law of the first n+1 emitted tokens: one speculative round over n drafts x ~ q (the rule
    stated by accept_probabilities / residual_distribution), then plain target sampling."""
    law = defaultdict(float)
    for x in itertools.product(range(vocab), repeat=n):
        q_x = math.prod(float(q[x[:j]][x[j]]) for j in range(n))
        if q_x == 0:
            continue
        p_rows = torch.stack([p[x[:j]] for j in range(n + 1)])
        q_rows = torch.stack([q[x[:j]] for j in range(n)])
        accept = accept_probabilities(torch.tensor(x), q_rows, p_rows[:n]).tolist()
        survive = 1.0
        for k in range(n + 1):
            if k < n:  # x_1..x_k accepted, x_{k+1} rejected, replacement from the residual
                stop, next_law = survive * (1 - accept[k]), residual(p_rows[k], q_rows[k])
            else:  # all accepted, bonus from p_{n+1}
                stop, next_law = survive, p_rows[n]
            for y in range(vocab):
                weight = q_x * stop * float(next_law[y])
                if weight > 0:
                    emitted = x[:k] + (y,)
                    for tail, prob in _extensions(p, emitted, n + 1, vocab):
                        law[emitted + tail] += weight * prob
            if k < n:
                survive *= accept[k]
    return law


@pytest.mark.parametrize("n, sparse", [(1, False), (2, True), (3, True)])
def test_one_round_is_lossless_by_exact_enumeration(n, sparse):
    vocab = 3
    p, q = _tables(vocab, n + 1, seed=n, sparse=sparse), _tables(vocab, n, seed=100 + n, sparse=sparse)
    law = _round_law(p, q, n, vocab)
    for seq in itertools.product(range(vocab), repeat=n + 1):
        exact = math.prod(float(p[seq[:t]][seq[t]]) for t in range(n + 1))
        assert law.get(seq, 0.0) == pytest.approx(exact, abs=1e-12), seq
    assert sum(law.values()) == pytest.approx(1.0, abs=1e-12)


def test_exact_enumeration_catches_a_broken_rule():
    """Negative control: drawing the replacement from p instead of max(p - q, 0) biases the output."""
    vocab, n = 3, 2
    p, q = _tables(vocab, n + 1, seed=2, sparse=False), _tables(vocab, n, seed=102, sparse=False)
    law = _round_law(p, q, n, vocab, residual=lambda p_row, q_row: p_row)
    worst = max(
        abs(law.get(seq, 0.0) - math.prod(float(p[seq[:t]][seq[t]]) for t in range(n + 1)))
        for seq in itertools.product(range(vocab), repeat=n + 1)
    )
    assert worst > 1e-3


def round_law(tokens, q, p, n: int, vocab: int) -> torch.Tensor:
    """Exact law of (accepted count k, next token) of one verified round of ``n`` drafted ``tokens``."""
    accept = accept_probabilities(tokens, q, p[:n]).tolist() if n else []
    law, survive = torch.zeros(n + 1, vocab, dtype=torch.float64), 1.0
    for k in range(n + 1):
        if k < n:
            law[k] = survive * (1 - accept[k]) * residual_distribution(p[k], q[k])
            survive *= accept[k]
        else:
            law[k] = survive * p[n]
    return law


def test_verify_block_draws_follow_the_rule():
    """The sampler realises the stated law of (accepted count, next token) for fixed drafts."""
    vocab, n = 4, 3
    gen = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(n + 1, vocab, generator=gen, dtype=torch.float64), -1)
    q = torch.softmax(2 * torch.randn(n, vocab, generator=gen, dtype=torch.float64), -1)
    x = torch.tensor([1, 2, 0])
    law = round_law(x, q, p, n, vocab)
    counts = torch.zeros(n + 1, vocab, dtype=torch.long)
    draws = torch.Generator().manual_seed(1)
    for _ in range(6000):
        k, y = verify_block(x, q, p, n, draws)
        counts[k, y] += 1
    rejects, stat, crit = chi_square_rejects(counts, law)
    assert not rejects, f"chi2={stat:.1f} > {crit:.1f}"


def test_all_rows_verified_at_once_follow_the_rule_of_each_row():
    """verify_rows_sampled (one accept/reject step for every row, one batched draw) gives each row the law
    of (accepted count, next token) that verify_block's rule states, rows of different counts side by side;
    verify_rows_greedy equals verify_block row by row."""
    vocab, counts = 4, [3, 0, 1, 2]
    gen = torch.Generator().manual_seed(0)
    p_rows = [torch.softmax(torch.randn(n + 1, vocab, generator=gen, dtype=torch.float64), -1) for n in counts]
    q_rows = [torch.softmax(2 * torch.randn(max(n, 1), vocab, generator=gen, dtype=torch.float64), -1) for n in counts]
    tokens = torch.tensor([[1, 2, 0], [0, 0, 0], [3, 0, 0], [2, 1, 0]])
    packed = torch.cat(p_rows).float()
    draft_probs = [q.float() if n else None for q, n in zip(q_rows, counts)]
    laws = []
    for row, n in enumerate(counts):
        p, q = packed[sum(counts[:row]) + row:][: n + 1].double(), q_rows[row].float().double()
        laws.append(round_law(tokens[row, :n], q, p, n, vocab))
    observed = [torch.zeros(n + 1, vocab, dtype=torch.long) for n in counts]
    draws = torch.Generator().manual_seed(1)
    for _ in range(5000):
        accepted, next_tokens = verification.verify_rows_sampled(tokens, draft_probs, packed, counts, draws)
        for row, (k, y) in enumerate(zip(accepted, next_tokens)):
            observed[row][k, y] += 1
    for row in range(len(counts)):
        rejects, stat, crit = chi_square_rejects(observed[row], laws[row])
        assert not rejects, f"row {row}: chi2={stat:.1f} > {crit:.1f}"
    logits = torch.randn(sum(counts) + len(counts), vocab, generator=gen)
    logits[0, 1] = logits[1, 2] = 9.0  # row 0 keeps its first two drafts
    kept, chosen = verification.verify_rows_greedy(tokens, logits, torch.tensor(counts))
    starts = [sum(counts[:row]) + row for row in range(len(counts))]
    expected = [verify_block(tokens[row], None, logits[start:], n) for row, (start, n) in enumerate(zip(starts, counts))]
    assert list(zip(kept.tolist(), chosen.tolist())) == expected and expected[0][0] >= 2


def test_a_broken_residual_in_the_row_step_is_caught(monkeypatch):
    """Negative control for the test above: the replacement drawn from p instead of max(p - q, 0)."""
    monkeypatch.setattr(verification, "residual_distribution", lambda p, q: p)
    with pytest.raises(AssertionError, match="chi2"):
        test_all_rows_verified_at_once_follow_the_rule_of_each_row()


def test_nothing_submitted_samples_from_the_target():
    p = torch.tensor([[0.0, 1.0, 0.0]])
    assert verify_block(torch.tensor([2]), torch.tensor([[0.0, 0.0, 1.0]]), p, 0, torch.Generator()) == (0, 1)


def test_ragged_slots_compaction_keeps_valid_slots_in_order():
    valid = torch.tensor([[True, False, True, False], [False, False, False, True]])
    positions = torch.tensor([[0, 9, 1, 9], [9, 9, 9, 0]])
    index = RaggedSlots(valid, positions).compaction_index()
    assert index.tolist() == [[0, 2], [2, 3]]
    assert valid.gather(1, index).tolist() == [[True, True], [False, True]]
    assert positions.gather(1, index)[0].tolist() == [0, 1]


# ============================================================================ greedy: lossless on ragged batches
@pytest.fixture(scope="module")
def qwen():
    return tiny_qwen3_target()


@pytest.fixture(scope="module")
def gemma():
    return tiny_gemma3_target()  # every layer uses a sliding window of 8


@pytest.fixture(scope="module")
def qwen_drafter(qwen):
    return briefly_trained_drafter(qwen, train_prompts(), steps=30)


@pytest.fixture(scope="module")
def gemma_drafter(gemma):
    return briefly_trained_drafter(gemma, train_prompts(), steps=30)


@pytest.mark.parametrize("target_name", ["qwen", "gemma"])
def test_greedy_batched_equals_per_request_generate(request, target_name):
    target = request.getfixturevalue(target_name)
    draft = request.getfixturevalue(f"{target_name}_drafter")
    prompts = mixed_prompts(target, train_prompts())
    new_tokens = 28
    reference = [plain(target, p, new_tokens) for p in prompts]
    verified = {}
    for scheduler in ("full", "threshold", "cost", "async"):
        engine = BatchedSpeculativeGenerator(target, draft, policy_config(scheduler, confidence_threshold=0.8),
                                             round_cost=synthetic_cost(), max_batch_size=5)
        outputs = engine.generate(prompts, max_new_tokens=new_tokens)
        for prompt, ref, out in zip(prompts, reference, outputs):
            assert out == ref, f"{target_name}/{scheduler}: prompt of length {len(prompt)}"
        stats = engine.stats
        assert stats["ragged_rounds"] > 0, "rows should have accepted different numbers of tokens in some round"
        assert sum(stats["accepted_histogram"][2:]) > 0, f"{scheduler}: expected multi-token acceptances"
        assert stats["compactions"] > 0
        verified[scheduler] = stats["verified_draft_tokens"]
    assert verified["full"] > max(verified["threshold"], verified["cost"], verified["async"])
    plain_engine = BatchedSpeculativeGenerator(target, draft, policy_config("plain"),
                                               max_batch_size=5)
    assert plain_engine.generate(prompts, max_new_tokens=new_tokens) == reference
    assert plain_engine.stats["verified_draft_tokens"] == plain_engine.stats["drafted_request_rounds"] == 0
    assert len(prompts[3]) + new_tokens > 4 * gemma_window()  # contexts well past Gemma's sliding window


@pytest.mark.parametrize("target_name", ["qwen", "gemma"])
def test_greedy_batched_in_bf16_equals_per_request_generate(request, target_name):
    """The bf16 contract (README, docs/benchmarks.md): outputs equal one-request plain ``generate`` except
    where the target's two best logits are within 2 bf16 rounding steps of each other. There a batched
    pass (other shapes, other kernels and accumulation orders) may round the other way; on AVX-512 CPUs
    the engine without any drafting (scheduler="plain") does too. Anything else is a bug."""
    from hf_dspark.evaluation import greedy_divergence

    target = copy.deepcopy(request.getfixturevalue(target_name)).to(torch.bfloat16)
    draft = copy.deepcopy(request.getfixturevalue(f"{target_name}_drafter")).to(torch.bfloat16)
    prompts = mixed_prompts(target, train_prompts())
    reference = [plain(target, p, 20) for p in prompts]
    for scheduler in ("cost", "async"):
        engine = BatchedSpeculativeGenerator(target, draft, policy_config(scheduler),
                                             round_cost=synthetic_cost(), max_batch_size=5)
        outputs = engine.generate(prompts, max_new_tokens=20)
        assert sum(o == r for o, r in zip(outputs, reference)) >= len(prompts) - 2, scheduler
        for prompt, output, expected in zip(prompts, outputs, reference):
            report = greedy_divergence(target, len(prompt), torch.tensor([prompt + expected]),
                                       torch.tensor([prompt + output]))
            assert report is None or report.get("margin_ulps", math.inf) <= 2, (scheduler, report)
        assert engine.stats["verified_draft_tokens"] > 0


def gemma_window():
    return tiny_gemma3_target().config.sliding_window


def test_eager_attention_masks_are_lossless_too():
    target = tiny_gemma3_target(seed=1)
    target.set_attn_implementation("eager")
    draft = tiny_drafter(target)
    prompts = [[5, 9, 11, 40, 7, 3, 12, 60, 33, 21], [8], [70, 71, 72]]
    outputs = BatchedSpeculativeGenerator(target, draft, policy_config("full"),
                                          max_batch_size=3).generate(prompts, 16)
    assert outputs == [plain(target, p, 16) for p in prompts]


@pytest.mark.parametrize("skip_some", [False, True])
def test_batched_drafting_matches_draft_block_row_by_row(qwen, qwen_drafter, monkeypatch, skip_some):
    """The ragged, batched drafter call equals draft_block on each request's own sequence, also when the
    rows skipped the drafter in earlier rounds and catch up with the target features they missed."""
    draft = qwen_drafter
    engine = BatchedSpeculativeGenerator(qwen, draft, policy_config("full"),
                                         max_batch_size=3)
    captured, drafting = [], []
    plan, sample_block = engine._plan, draft.sample_block

    def some_rows(limits):
        rows = plan(limits)
        if skip_some:  # each request drafts one round in three, requests at different rounds
            rows = [row for row in rows if (engine.stats["rounds"] + engine._active[row].request_id) % 3 == 0]
        drafting[:] = rows
        return rows

    def spy(base_logits, hidden, anchor_ids, choose=None, num_tokens=None):
        requests = [engine._active[row] for row in drafting]
        captured.append((hidden.clone(), [r.prompt_ids + r.output_ids for r in requests]))
        return sample_block(base_logits, hidden, anchor_ids, choose, num_tokens)

    monkeypatch.setattr(engine, "_plan", some_rows)
    monkeypatch.setattr(draft, "sample_block", spy)
    prompts = mixed_prompts(qwen, train_prompts())[:5]
    assert engine.generate(prompts, max_new_tokens=12) == [plain(qwen, p, 12) for p in prompts]
    assert len(captured) > 3
    if skip_some:
        assert any(len(seqs) < min(3, engine.stats["max_active"]) for _, seqs in captured)  # partial drafter calls
    for hidden, sequences in captured:
        assert hidden.shape[0] == len(sequences)
        for row, seq in enumerate(sequences):
            context = target_features(qwen, torch.tensor([seq[:-1]]), draft.config.target_layer_ids) if len(seq) > 1 else None
            ref = draft.draft_block(torch.tensor([seq[-1]]), context, DSparkDraftCache(draft.config.num_hidden_layers))
            # the block is drafted whole, the heads run on the positions that may be verified
            torch.testing.assert_close(hidden[row], ref.hidden_states[0][: hidden.shape[1]], atol=2e-4, rtol=2e-4)


def test_pending_features_append_after_what_a_row_missed():
    pending = PendingFeatures.empty(2, 1, torch.float32, "cpu")
    pending.append(torch.tensor([[[1.0], [2.0]], [[5.0], [6.0]]]), torch.tensor([2, 1]))
    assert pending.lengths.tolist() == [2, 1]
    pending.consume(torch.tensor([1]))  # row 1 drafted: its features were read
    pending.append(torch.tensor([[[3.0], [0.0]], [[7.0], [8.0]]]), torch.tensor([1, 2]))
    assert pending.lengths.tolist() == [3, 2]
    assert pending.features[0, :3, 0].tolist() == [1.0, 2.0, 3.0]
    assert pending.features[1, :2, 0].tolist() == [7.0, 8.0]
    pending.consume(torch.tensor([0, 1]))
    assert pending.features.shape[1] == 0 and pending.lengths.tolist() == [0, 0]


def test_eos_inside_an_accepted_block_stops_exactly(qwen, qwen_drafter):
    prompts = mixed_prompts(qwen, train_prompts())
    free = plain(qwen, prompts[0], 30, eos=[])
    cut_mid_block = 0
    for eos in (free[5], free[9], free[14]):
        engine = BatchedSpeculativeGenerator(qwen, qwen_drafter, policy_config("full"), max_batch_size=4)
        ids = [engine.add_request(p, 30, eos_token_id=eos) for p in prompts]
        while engine.has_unfinished():
            engine.step()
        for prompt, rid in zip(prompts, ids):
            req = engine.pop(rid)
            assert req.output_ids == plain(qwen, prompt, 30, eos=eos), f"eos={eos}, prompt length {len(prompt)}"
            if req.finish_reason == "eos":
                assert req.output_ids[-1] == eos
                cut_mid_block += req.committed[-1] < req.accepted[-1] + 1  # tokens after EOS were dropped
            else:
                assert len(req.output_ids) == 30
    assert cut_mid_block > 0


def test_requests_join_between_rounds_and_compaction_every_round(gemma, gemma_drafter):
    prompts = mixed_prompts(gemma, train_prompts())
    lengths = [20, 9, 25, 1, 14, 30, 6, 17]
    engine = BatchedSpeculativeGenerator(gemma, gemma_drafter, policy_config("cost"),
                                         round_cost=synthetic_cost(), max_batch_size=3)
    engine.compaction_slack, engine.compaction_fraction = 0, 0.0  # compact whenever any garbage exists
    first = [engine.add_request(p, n) for p, n in zip(prompts[:2], lengths[:2])]
    finished = engine.step() + engine.step()
    later = [engine.add_request(p, n) for p, n in zip(prompts[2:], lengths[2:])]
    while engine.has_unfinished():
        finished += engine.step()
    assert sorted(r.request_id for r in finished) == sorted(first + later)
    requests = [engine.pop(i) for i in first + later]
    for prompt, n, req in zip(prompts, lengths, requests):
        assert req.output_ids == plain(gemma, prompt, n)
        assert req.finish_reason in ("eos", "length")
    assert requests[2].started_at > requests[0].started_at  # joined later, while others were decoding
    assert engine.stats["max_active"] == 3 and engine.stats["compactions"] >= engine.stats["rounds"] // 2


def test_zero_new_tokens_and_validation(qwen):
    draft = tiny_drafter(qwen)
    engine = BatchedSpeculativeGenerator(qwen, draft, policy_config("full"))
    assert engine.generate([[5, 6], [7]], max_new_tokens=0) == [[], []]
    assert engine.generate([[5, 6, 7]], max_new_tokens=1) == [plain(qwen, [5, 6, 7], 1)]
    with pytest.raises(ValueError, match=r"verification_policy='fastest' is invalid: choose one of \['auto'"):
        BatchedSpeculativeGenerator(qwen, draft, policy_config("fastest"))
    with pytest.raises(ValueError, match="confidence head"):
        BatchedSpeculativeGenerator(qwen, tiny_drafter(qwen, enable_confidence_head=False), policy_config("cost"))
    with pytest.raises(ValueError, match="empty"):
        engine.add_request([], 4)
    with pytest.raises(ValueError, match="temperature"):
        BatchedSpeculativeGenerator(qwen, draft, policy_config("full", do_sample=True, temperature=0.0))
    with pytest.raises(ValueError, match="temperature"):
        engine.generate([[5, 6]], 2, do_sample=True, temperature=0.0)


def test_unsupported_attention_is_a_clear_error():
    target = tiny_qwen3_target()
    target.config._attn_implementation_internal = "flash_attention_2"  # as if loaded with it (no flash-attn here)
    with pytest.raises(ValueError, match="attn_implementation"):
        BatchedSpeculativeGenerator(target, tiny_drafter(target), policy_config("full"))


# ============================================================================ sampling: exact
@pytest.fixture(scope="module")
def small_vocab():
    target = tiny_qwen3_target(seed=7, vocab_size=6, num_layers=4, eos_token_id=None)
    target.generation_config.eos_token_id = None
    draft = tiny_drafter(target, seed=3, block_size=4, markov_rank=4, mask_token_id=5)
    with torch.no_grad():
        target.lm_head.weight.mul_(4.0)  # a peaked target: a wrong rule shows up in few samples
        for p in draft.parameters():  # a draft clearly different from the target
            p.mul_(2.0)
    return target, draft


@pytest.fixture(scope="module")
def small_vocab_reduced_draft(small_vocab):
    """The same target with a drafter that drafts from 4 of the 6 tokens (a reduced draft vocabulary)."""
    target, _ = small_vocab
    draft = tiny_drafter(target, seed=3, block_size=4, markov_rank=4, mask_token_id=5, draft_vocab_size=4)
    draft.set_draft_vocab([4, 0, 2, 1])
    with torch.no_grad():
        for p in draft.parameters():
            p.mul_(2.0)
    return target, draft


def exact_triple(target, prompt, warp):
    """Exact P(x1, x2, x3) of plain sampling, each step processed by transformers' own warpers."""

    def step_probs(seq):
        ids = torch.tensor([seq])
        out = target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=True,
                              output_scores=True, return_dict_in_generate=True, **warp)
        return torch.softmax(out.scores[0][0].double(), -1)

    V = target.config.vocab_size
    law = torch.zeros(V, V, V, dtype=torch.float64)
    p1 = step_probs(prompt)
    for a in torch.nonzero(p1 > 0).flatten().tolist():
        p2 = step_probs(prompt + [a])
        for b in torch.nonzero(p2 > 0).flatten().tolist():
            law[a, b] = p1[a] * p2[b] * step_probs(prompt + [a, b])
    return law


def per_token_cost(max_batch=4096, row_seconds=2.5e-4, token_seconds=5e-4, draft_row_seconds=5e-5):
    """A round costs ``row_seconds`` per row plus ``token_seconds`` per real token whatever the padding
    (the profile's per-slot time is all LM head), plus ``draft_row_seconds`` per row that drafts: a
    token pays while its survival is above about 3/4, and a row whose expected gain is small does not
    draft, so the schedulers cut inside the block and skip the drafter for some rows."""
    table = {b: {n: b * (row_seconds + token_seconds * n) for n in range(1, 9)} for b in (1, 4, 16, 256, max_batch)}
    profile = LatencyProfile(model_name="synthetic", dtype="float32", device="cpu", num_threads=1,
                             context_length=128, table=table)
    draft = {1: draft_row_seconds, 2: 2 * draft_row_seconds} if draft_row_seconds else {}
    return RoundCost(profile, draft_seconds=draft, padding_discount=token_seconds)


def sample_triples(target, draft, prompts, runs, warp, scheduler, seed, max_batch_size=1000, round_cost=None,
                   **settings):
    """Decode ``runs`` copies of each prompt as ragged batches of up to ``max_batch_size`` requests
    (finished requests leave, queued ones join); counts of the first three tokens, per prompt."""
    V = target.config.vocab_size
    engine = BatchedSpeculativeGenerator(target, draft, policy_config(scheduler, **settings),
                                         round_cost=round_cost or per_token_cost(), max_batch_size=max_batch_size)
    batch = [p for _ in range(runs) for p in prompts]
    outputs = engine.generate(batch, max_new_tokens=3, do_sample=True, seed=seed, **warp)
    fused = [type(w).__name__ for w in engine._warpers].count("FusedTopKTopPWarper")
    assert fused == (1 if warp.get("top_k") and warp.get("top_p") else 0)  # top-k + top-p run fused
    counts = [torch.zeros(V, V, V, dtype=torch.long) for _ in prompts]
    for i, out in enumerate(outputs):
        counts[i % len(prompts)][out[0], out[1], out[2]] += 1
    return counts, engine.stats


SAMPLING_CASES = {
    "plain_full": (dict(temperature=1.0, top_k=None, top_p=None), "full"),
    "warped_cost": (dict(temperature=0.7, top_k=4, top_p=0.9), "cost"),
    "warped_async": (dict(temperature=0.7, top_k=4, top_p=0.9), "async"),
}


def hf_warp(warp):
    return dict(temperature=warp.get("temperature", 1.0), top_k=warp.get("top_k") or 0, top_p=warp.get("top_p") or 1.0)


@pytest.mark.parametrize("case", list(SAMPLING_CASES))
def test_sampling_follows_the_target_distribution(small_vocab, case):
    target, draft = small_vocab
    warp, scheduler = SAMPLING_CASES[case]
    prompts = [[1, 3, 2, 4], [2, 5, 1, 1, 3, 0, 4]]
    counts, stats = sample_triples(target, draft, prompts, runs=2000, warp=warp, scheduler=scheduler, seed=11)
    for prompt, count in zip(prompts, counts):
        rejects, stat, crit = chi_square_rejects(count, exact_triple(target, prompt, hf_warp(warp)))
        assert not rejects, f"{case}, prompt {prompt}: chi2={stat:.1f} > {crit:.1f}"
    assert stats["verified_draft_tokens"] > 0 and stats["ragged_rounds"] > 0
    assert sum(stats["accepted_histogram"][1:]) > 0 and stats["accepted_histogram"][0] > 0


@pytest.mark.parametrize("scheduler", ["full", "async"])
def test_sampling_with_a_reduced_draft_vocabulary_follows_the_target(small_vocab_reduced_draft, scheduler):
    """Warping and sampling in the draft vocabulary (then spread over the full one) is exact: tokens the
    drafter cannot propose still come out with the target's probability (residual and bonus draws)."""
    target, draft = small_vocab_reduced_draft
    warp = dict(temperature=0.8, top_k=3, top_p=0.95)
    prompts = [[1, 3, 2, 4], [2, 5, 1, 1, 3, 0, 4]]
    counts, stats = sample_triples(target, draft, prompts, runs=2000, warp=warp, scheduler=scheduler, seed=13)
    for prompt, count in zip(prompts, counts):
        rejects, stat, crit = chi_square_rejects(count, exact_triple(target, prompt, hf_warp(warp)))
        assert not rejects, f"{scheduler}, prompt {prompt}: chi2={stat:.1f} > {crit:.1f}"
    assert stats["accepted_draft_tokens"] > 0


def test_sampling_in_bf16_follows_the_target_distribution(small_vocab):
    target, draft = (copy.deepcopy(m).to(torch.bfloat16) for m in small_vocab)
    warp = dict(temperature=0.7, top_k=4, top_p=0.9)
    prompts = [[1, 3, 2, 4]]
    counts, stats = sample_triples(target, draft, prompts, runs=2000, warp=warp, scheduler="async", seed=17)
    rejects, stat, crit = chi_square_rejects(counts[0], exact_triple(target, prompts[0], hf_warp(warp)))
    assert not rejects, f"bf16 async: chi2={stat:.1f} > {crit:.1f}"
    assert stats["accepted_draft_tokens"] > 0


def test_a_broken_residual_is_caught(small_vocab, monkeypatch):
    """Negative control: drawing the replacement from p instead of max(p - q, 0) must fail the test above."""
    target, draft = small_vocab
    monkeypatch.setattr(verification, "residual_distribution", lambda p, q: p)
    prompt = [1, 3, 2, 4]
    counts, _ = sample_triples(target, draft, [prompt], runs=2000, warp={}, scheduler="full", seed=11)
    rejects, stat, crit = chi_square_rejects(counts[0], exact_triple(target, prompt, hf_warp({})))
    assert rejects, f"a broken rule went unnoticed: chi2={stat:.1f} <= {crit:.1f}"


# ---------------------------------------------------------------------------- Appendix A, in the engine
APPENDIX_A_COST = RoundCost(LatencyProfile(  # one request: SPS(1) = 1, SPS(2) = 0.5, SPS(3) = 1 / 2.12, then costly
    model_name="appendix-a", dtype="float32", device="cpu", num_threads=1, context_length=128,
    table={1: {1: 1.0, 2: 2.0, 3: 2.12, 4: 10.0, 5: 20.0}}))


def markov_confidence_as_in_appendix_a(draft, monkeypatch, favoured=(1, 4)):
    """A Markov confidence head as in the paper's Appendix A: c_1 = 0.8 whatever the block, and c_2 close
    to 1 when the sampled x_1 is one of ``favoured``, close to 0 otherwise (so a_2 depends on x_1).
    With the cost above, verifying x_1 alone never pays ((1 + 0.8) / 2 < 1) and verifying x_1, x_2 pays
    exactly when a_2 > 0.32. ``favoured`` are tokens the tiny target likes more than the draft does."""
    sample_block = draft.sample_block

    def crafted(base_logits, hidden, anchor_ids, choose=None, num_tokens=None):
        tokens, logits, confidence = sample_block(base_logits, hidden, anchor_ids, choose, num_tokens)
        logit = torch.full_like(confidence, -12.0)
        logit[:, 0] = math.log(0.8 / 0.2)
        if logit.shape[1] > 1:
            logit[:, 1] = torch.where(torch.isin(tokens[:, 0], torch.tensor(favoured)), 12.0, -12.0)
        return tokens, logits, logit

    monkeypatch.setattr(draft, "sample_block", crafted)


@pytest.mark.parametrize("scheduler", ["async", "global_search_on_current_scores"])
def test_appendix_a_selection_bias_in_the_engine(small_vocab, monkeypatch, scheduler):
    """The paper's Appendix A, end to end: one request at a time, the Appendix's kind of cost curve and a
    Markov confidence head. A global search on the current scores (no early stop, no stale budget)
    verifies x_1 exactly when x_1 gives a confident continuation, which biases the first token (the
    chi-square test rejects). The async scheduler takes its budget from predictions made two rounds
    earlier (or the prior, which follows past predictions): it verifies x_1 in some rounds and not in
    others too, and its output follows the target."""
    target, draft = small_vocab
    markov_confidence_as_in_appendix_a(draft, monkeypatch)
    if scheduler == "async":
        engine = BatchedSpeculativeGenerator(target, draft, policy_config("async"),
                                             round_cost=APPENDIX_A_COST, max_batch_size=1)
    else:  # every request drafts; the count is the best of the whole path on the current survival
        engine = BatchedSpeculativeGenerator(target, draft, policy_config("full"),
                                             max_batch_size=1)
        cost = APPENDIX_A_COST.round_seconds(1, 1 + draft.config.block_size)
        monkeypatch.setattr(engine, "_schedule", lambda survival, limits, drafted_rows=0, tokens=None: best_padded_allocation(
            [row[:limit] for row, limit in zip(survival, limits)], cost))
    prompt = [1, 3, 2, 4]
    outputs = engine.generate([prompt] * 1500, max_new_tokens=3, do_sample=True, seed=5)
    first = torch.zeros(target.config.vocab_size, dtype=torch.long)
    for out in outputs:
        first[out[0]] += 1
    rejects, stat, crit = chi_square_rejects(first, exact_triple(target, prompt, hf_warp({})).sum((1, 2)))
    stats = engine.stats
    assert 0 < stats["verified_draft_tokens"] < 2 * stats["drafted_request_rounds"]  # sometimes 2, sometimes 0
    if scheduler == "async":
        assert stats["draft_skipped_request_rounds"] > 0 and stats["drafted_request_rounds"] > 0
        assert not rejects, f"async scheduler: chi2={stat:.1f} > {crit:.1f}"
    else:
        assert rejects, f"the Appendix A bias went unnoticed: chi2={stat:.1f} <= {crit:.1f}"


# ---------------------------------------------------------------------------- n-gram rounds
@pytest.mark.parametrize("target_name", ["qwen", "gemma"])
def test_greedy_batched_with_ngram_rounds_equals_per_request_generate(request, target_name):
    target = request.getfixturevalue(target_name)
    draft = request.getfixturevalue(f"{target_name}_drafter")
    prompts = repetitive_prompts() + mixed_prompts(target, train_prompts())[:4]
    reference = [plain(target, p, 30) for p in prompts]
    for scheduler in ("full", "threshold", "cost", "async"):
        config = policy_config(scheduler, confidence_threshold=0.5, ngram_lookup_tokens=5)
        engine = BatchedSpeculativeGenerator(target, draft, config, round_cost=synthetic_cost(), max_batch_size=4)
        assert engine.generate(prompts, max_new_tokens=30) == reference, scheduler
        stats = engine.stats
        assert 0 < stats["ngram_request_rounds"] < stats["request_rounds"], scheduler  # both kinds of row ran
        assert stats["ngram_accepted_tokens"] <= stats["ngram_verified_tokens"] <= 5 * stats["ngram_request_rounds"]
        assert stats["ngram_position_attempted"][0] <= stats["ngram_request_rounds"]


def test_ngram_settings_are_validated(qwen, qwen_drafter):
    with pytest.raises(ValueError, match="ngram_min_size <= ngram_max_size"):
        BatchedSpeculativeGenerator(qwen, qwen_drafter,
                                    policy_config("full", ngram_lookup_tokens=4, ngram_min_size=4, ngram_max_size=2))
    with pytest.raises(ValueError, match="ngram_lookup_tokens=-1 is invalid: use an integer >= 0"):
        BatchedSpeculativeGenerator(qwen, qwen_drafter, policy_config("full", ngram_lookup_tokens=-1))


def test_greedy_schedule_looks_along_the_whole_path_and_sampling_stops_early(qwen, qwen_drafter):
    """A right-padded pass costs the same for 4 rows whether one or all of them grow by a token: growing one
    row does not pay, growing all four does. Greedy takes the latter; sampling keeps Algorithm 1's early stop."""
    table = {4: {1: 0.100, 2: 0.150, 3: 0.300}}
    profile = LatencyProfile(model_name="synthetic", dtype="float32", device="cpu", num_threads=1,
                             context_length=128, table=table)
    engine = BatchedSpeculativeGenerator(qwen, qwen_drafter, policy_config("cost"),
                                         round_cost=RoundCost(profile))
    survival, limits = [[0.9, 0.5]] * 4, [2] * 4
    assert engine._schedule(survival, limits, drafted_rows=4) == [1, 1, 1, 1]  # (4 + 3.6) / 0.15 beats 4 / 0.10
    sampled = BatchedSpeculativeGenerator(qwen, qwen_drafter, policy_config("cost", do_sample=True),
                                          round_cost=RoundCost(profile))
    assert sampled._schedule(survival, limits, drafted_rows=4) == [0, 0, 0, 0]  # (4 + 0.9) / 0.15 does not: stop


def test_ngram_survival_starts_from_the_prior_and_learns(qwen, qwen_drafter):
    engine = BatchedSpeculativeGenerator(qwen, qwen_drafter, policy_config("full", ngram_lookup_tokens=4))
    assert engine.ngram.survival(3) == pytest.approx([0.9, 0.81, 0.729])
    for _ in range(40):
        engine.ngram.record(submitted=4, n_accepted=1)  # position 1 always survives, position 2 never
    survival = engine.ngram.survival(3)
    assert survival[0] == pytest.approx((40 + 3.6) / 44)
    assert survival[1] == pytest.approx(survival[0] * 3.6 / 44)
    assert engine.stats["ngram_position_attempted"][:3] == [40, 40, 0]


def test_planner_draft_length_stops_at_the_plan_widest_request():
    """``async`` drafts up to the plan's widest request, ``cost`` one token more (never past the
    limit); a plan that gave nobody a token (a probe round) and the other schedulers draft the limit."""
    planner = RoundPlanner(AsyncPolicy(), block_size=5, cost=lambda: None)
    planner.plan_counts = [2, 0, 1]
    assert (planner.draft_length(5), planner.draft_length(1)) == (2, 1)
    planner.plan_counts = [1, 0]
    assert planner.draft_length(5) == 1
    for probe in ([0, 0], []):
        planner.plan_counts = probe
        assert planner.draft_length(5) == 5
    planner = RoundPlanner(CostPolicy(), block_size=5, cost=lambda: None)
    planner.plan_counts = [2, 0, 1]
    assert (planner.draft_length(5), planner.draft_length(2)) == (3, 2)
    for policy in (FullPolicy(), ThresholdPolicy()):
        planner = RoundPlanner(policy, block_size=5, cost=lambda: None)
        planner.plan_counts = [2, 0, 1]  # left over: these schedulers do not plan
        assert planner.draft_length(5) == 5


def test_planner_reads_predictions_two_rounds_old_and_falls_back_on_a_monotone_prior():
    planner = RoundPlanner(AsyncPolicy(), block_size=3, cost=lambda: None)
    request = SpeculativeRequest(0, [1, 2], 10, frozenset())
    assert planner.prediction(request, now=0, limit=3) == pytest.approx([0.8, 0.64, 0.512])  # the stated prior
    planner.STALE_WEIGHT = 1.0  # the request's own prediction alone
    planner.record(request, 5, [0.9, 0.5, 0.1])
    planner.record(request, 6, [0.7, 0.6, 0.2])
    assert planner.prediction(request, now=7, limit=3) == [0.9, 0.5, 0.1]  # made at 5, two rounds old
    assert planner.prediction(request, now=8, limit=2) == [0.7, 0.6]  # made at 6
    planner.STALE_WEIGHT = 0.25  # shrunk toward the prior (which now follows the two records)
    prior = planner.prior[:2]
    assert planner.prediction(request, now=8, limit=2) == pytest.approx(
        [0.25 * 0.7 + 0.75 * prior[0], min(0.25 * 0.7 + 0.75 * prior[0], 0.25 * 0.6 + 0.75 * prior[1])])
    assert planner.prediction(request, now=6 + planner.PREDICTION_TTL + 1, limit=3) == planner.prediction(
        SpeculativeRequest(1, [1], 5, frozenset()), now=20, limit=3)  # expired: the prior, like a new request
    planner.STALE_WEIGHT = 1.0  # exactly PREDICTION_TTL rounds old: still read
    assert planner.prediction(request, now=6 + planner.PREDICTION_TTL, limit=3) == [0.7, 0.6, 0.2]
    planner.STALE_WEIGHT = 0.25
    for _ in range(200):  # one-token blocks pull position 1 down, position 2 only hears long blocks
        planner.record(request, 7, [0.1])
    prior = planner.prediction(SpeculativeRequest(2, [1], 5, frozenset()), now=300, limit=3)
    assert prior == sorted(prior, reverse=True) and prior[0] == pytest.approx(0.1, abs=1e-3)
    assert len(request.predictions) == AsyncPolicy.prediction_lag == 2


NGRAM = dict(ngram_lookup_tokens=3, ngram_max_size=2, ngram_min_size=1)  # 1-gram matches in a 6-token vocabulary


@pytest.mark.parametrize("case", list(SAMPLING_CASES))
def test_sampling_with_ngram_rounds_follows_the_target_distribution(small_vocab, case):
    target, draft = small_vocab
    warp, scheduler = SAMPLING_CASES[case]
    prompts = [[1, 3, 2, 4], [2, 5, 1, 1, 3, 0, 4]]
    counts, stats = sample_triples(target, draft, prompts, runs=2000, warp=warp, scheduler=scheduler, seed=12, **NGRAM)
    for prompt, count in zip(prompts, counts):
        rejects, stat, crit = chi_square_rejects(count, exact_triple(target, prompt, hf_warp(warp)))
        assert not rejects, f"{case}, prompt {prompt}: chi2={stat:.1f} > {crit:.1f}"
    assert 0 < stats["ngram_request_rounds"] < stats["request_rounds"]
    assert 0 < stats["ngram_accepted_tokens"] < stats["ngram_verified_tokens"]


def test_a_wrong_ngram_proposal_law_is_caught(small_vocab, monkeypatch):
    """Negative control: copied tokens verified against a uniform q instead of the one-hot q must fail."""
    target, draft = small_vocab
    original = BatchedSpeculativeGenerator._ngram_proposals

    def uniform_q(self, tokens, draft_probs, survival, limits):
        tokens, draft_probs, survival, limits = original(self, tokens, draft_probs, survival, limits)
        for row, copied in enumerate(self.ngram.rows):
            if copied:
                draft_probs[row] = torch.full_like(draft_probs[row], 1.0 / draft_probs[row].shape[-1])
        return tokens, draft_probs, survival, limits

    monkeypatch.setattr(BatchedSpeculativeGenerator, "_ngram_proposals", uniform_q)
    prompt = [1, 3, 2, 4]
    counts, _ = sample_triples(target, draft, [prompt], runs=2000, warp={}, scheduler="full", seed=12, **NGRAM)
    rejects, stat, crit = chi_square_rejects(counts[0], exact_triple(target, prompt, hf_warp({})))
    assert rejects, f"a wrong proposal law went unnoticed: chi2={stat:.1f} <= {crit:.1f}"


# ============================================================================ bench-batch CLI
def test_bench_batch_cli_writes_results(tiny_target_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from hf_dspark.cli import main

    target = AutoModelForCausalLM.from_pretrained(tiny_target_dir)
    tiny_drafter(target, target_layer_ids=[0, 1]).save_pretrained(tmp_path / "draft")
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    code = main(["bench-batch", "--target", str(tiny_target_dir), "--draft", str(tmp_path / "draft"),
                 "--concurrency", "1", "2", "--num-prompts", "3", "--max-new-tokens", "6", "--device", "cpu",
                 "--latency-cache-dir", str(tmp_path / "latency"), "--profile-repeats", "1",
                 "--output", str(out), "--plot", str(png)])
    assert code == 0
    results = json.loads(out.read_text())
    rows = results["results"]
    methods = ("plain", "full", "scheduler", "async")
    assert {(r["concurrency"], r["method"]) for r in rows} == {(c, m) for c in (1, 2) for m in methods}
    for row in rows:
        assert 0 < row["total_tokens"] <= 3 * 6 and row["requests"] == 3
        assert row["tokens_per_second"] == pytest.approx(row["total_tokens"] / row["seconds"])
        assert row["per_request_tokens_per_second"] >= row["tokens_per_second"] / row["requests"] * (1 - 1e-9)
        if row["method"] != "plain":
            for key in ("mean_verified_draft_tokens", "mean_accepted_length", "throughput_ratio_vs_plain",
                        "per_request_ratio_vs_plain", "greedy_agreement_with_plain", "draft_skipped_request_rounds",
                        "draft_skipped_rounds"):
                assert key in row
            assert row["greedy_agreement_with_plain"] == 1.0
    assert all("throughput_ratio_vs_scheduler" in r for r in rows if r["method"] == "async")
    assert results["settings"]["num_prompts"] == 3 and results["settings"]["ngram_lookup_tokens"] == 0
    assert png.stat().st_size > 0
    assert all(r["ngram_request_rounds"] == 0 for r in rows if r["method"] != "plain")

    code = main(["bench-batch", "--target", str(tiny_target_dir), "--draft", str(tmp_path / "draft"),
                 "--concurrency", "2", "--num-prompts", "3", "--max-new-tokens", "24", "--device", "cpu",
                 "--latency-cache-dir", str(tmp_path / "latency"), "--profile-repeats", "1",
                 "--ngram-lookup", "4", "--output", str(out)])
    assert code == 0
    results = json.loads(out.read_text())
    assert results["settings"]["ngram_lookup_tokens"] == 4
    assert sum(r["ngram_request_rounds"] for r in results["results"] if r["method"] != "plain") > 0

    # --methods, --repeats and --resume: concurrency 2 is kept from the file, only 1 is measured
    common = ["bench-batch", "--target", str(tiny_target_dir), "--draft", str(tmp_path / "draft"), "--num-prompts", "3",
              "--max-new-tokens", "6", "--device", "cpu", "--latency-cache-dir", str(tmp_path / "latency"),
              "--profile-repeats", "1", "--methods", "plain", "async", "plain_engine", "--repeats", "2",
              "--output", str(out)]
    assert main(common + ["--concurrency", "2"]) == 0
    kept = json.loads(out.read_text())["results"]
    assert main(common + ["--concurrency", "1", "2", "--resume"]) == 0
    results = json.loads(out.read_text())
    rows = results["results"]
    assert {(r["concurrency"], r["method"]) for r in rows} == {(c, m) for c in (1, 2) for m in ("plain", "async", "plain_engine")}
    assert [r for r in rows if r["concurrency"] == 2] == kept
    assert all(len(r["tokens_per_second_runs"]) == 2 for r in rows)
    assert all(r["greedy_agreement_with_plain"] == 1.0 for r in rows if r["method"] != "plain")
    assert main(common[:-2] + ["--concurrency", "1", "--resume"]) == 2  # --resume needs --output


def test_an_adaptive_round_cost_learns_what_rounds_really_take():
    fixed = synthetic_cost()
    adaptive = RoundCost(fixed.verify, draft_seconds=dict(fixed.draft_seconds), adapt=True)
    verify, draft = adaptive.verify_seconds(4, 3, 10), adaptive.drafter_seconds(2)
    for _ in range(60):  # rounds that take twice the modelled forward and three times the modelled drafter call
        for cost in (fixed, adaptive):
            cost.observe(4, 3, 10, 2, 3 * draft, 2 * verify)
    assert fixed.verify_seconds(4, 3, 10) == verify and fixed.drafter_seconds(2) == draft  # adapt=False: unchanged
    assert adaptive.verify_seconds(4, 3, 10) == pytest.approx(2 * verify, rel=0.01)
    assert adaptive.drafter_seconds(2) == pytest.approx(3 * draft, rel=0.01)
    seconds = adaptive.round_seconds(4, 3)
    assert seconds(3, 10, 2) == pytest.approx(2 * verify + 3 * draft, rel=0.01)
    adaptive.observe(4, 3, 10, 0, 1.0, 2 * verify)  # no row drafted: nothing learnt about the drafter
    assert adaptive.drafter_seconds(2) == pytest.approx(3 * draft, rel=0.01)
    for _ in range(200):
        adaptive.observe(4, 3, 10, 2, 1e3, 1e3)
    assert adaptive.verify_scale == 4.0 and adaptive.draft_scale == 4.0  # bounded


def test_the_adaptive_round_cost_learns_each_width_on_its_own():
    # plain steps (width 1) run as modelled, wide rounds take twice the model: one shared scale would
    # price the plain step 1.5x too high and the wide round 25% too low
    base = synthetic_cost()
    adaptive = RoundCost(base.verify, draft_seconds=dict(base.draft_seconds), adapt=True)
    plain, wide = adaptive.verify_seconds(4, 1, 4), adaptive.verify_seconds(4, 6, 24)
    for _ in range(80):
        adaptive.observe(4, 1, 4, 0, 0.0, plain)
        adaptive.observe(4, 6, 24, 2, 0.0, 2 * wide)
    assert adaptive.verify_seconds(4, 1, 4) == pytest.approx(plain, rel=0.02)
    assert adaptive.verify_seconds(4, 6, 24) == pytest.approx(2 * wide, rel=0.02)
    seconds = adaptive.round_seconds(4, 6)
    assert seconds(1, 4, 0) == pytest.approx(plain, rel=0.02) and seconds(6, 24, 0) == pytest.approx(2 * wide, rel=0.02)
    unseen = adaptive.verify_seconds(4, 3, 12) / base.verify_seconds(4, 3, 12)
    assert 1.0 < unseen < 2.0 and unseen == pytest.approx(adaptive.verify_scale)  # unseen widths: the all-widths scale


def test_prefill_groups_keep_padding_small_and_small_groups_together():
    from hf_dspark.decoding.batch_requests import prefill_groups

    lengths = [160, 50, 47, 100, 55, 167, 97, 60]
    groups = prefill_groups(lengths, padding_slack=0.25, min_tokens=0)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for group in groups:
        padded, tokens = max(lengths[i] for i in group) * len(group), sum(lengths[i] for i in group)
        assert padded <= 1.25 * tokens, group
    assert len(groups) > 1 and {1, 2} <= set(groups[0])  # the shortest go first, together
    assert prefill_groups(lengths, min_tokens=10_000) == [sorted(range(8), key=lambda i: lengths[i])]  # one forward
    assert prefill_groups([]) == []


def test_grouped_prefill_is_lossless(gemma, gemma_drafter):
    prompts = mixed_prompts(gemma, train_prompts())
    reference = [plain(gemma, p, 12) for p in prompts]
    engine = BatchedSpeculativeGenerator(gemma, gemma_drafter, policy_config("async"),
                                         round_cost=synthetic_cost(), max_batch_size=len(prompts))
    engine.PREFILL_MIN_TOKENS, engine.PREFILL_PADDING_SLACK = 0, 0.0  # one group per distinct length
    assert engine.generate(prompts, max_new_tokens=12) == reference
    assert engine.stats["prefill_forwards"] == len({len(p) for p in prompts if len(p) > 1}) > 2  # 1-token prompts: none


def test_the_adaptive_round_cost_learns_from_a_widths_first_rounds():
    base = synthetic_cost()
    adaptive = RoundCost(base.verify, draft_seconds=dict(base.draft_seconds), adapt=True)
    wide = adaptive.verify_seconds(4, 6, 24)
    for _ in range(4):  # a width seen four times in a run, each round twice the model
        adaptive.observe(4, 6, 24, 0, 0.0, 2 * wide)
    assert adaptive.verify_seconds(4, 6, 24) == pytest.approx(1.8 * wide)  # the mean of 1 (the model) and four 2s


def test_bench_batch_samples_plain_generate_with_the_fused_warper(tiny_target_dir, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from hf_dspark.cli import main
    from hf_dspark.models.dspark.warpers_dspark import FusedTopKTopPWarper

    target = AutoModelForCausalLM.from_pretrained(tiny_target_dir)
    tiny_drafter(target, target_layer_ids=[0, 1]).save_pretrained(tmp_path / "draft")
    calls = []
    original = FusedTopKTopPWarper.__call__
    monkeypatch.setattr(FusedTopKTopPWarper, "__call__", lambda self, ids, scores: calls.append(ids is not None) or
                        original(self, ids, scores))
    out = tmp_path / "bench.json"
    assert main(["bench-batch", "--target", str(tiny_target_dir), "--draft", str(tmp_path / "draft"), "--concurrency", "2",
                 "--num-prompts", "2", "--max-new-tokens", "5", "--device", "cpu", "--methods", "plain",
                 "--latency-cache-dir", str(tmp_path / "latency"), "--profile-repeats", "1", "--do-sample",
                 "--top-k", "8", "--top-p", "0.9", "--output", str(out)]) == 0
    assert True in calls  # transformers' generate (which passes input ids; the engine passes None) used it
    assert json.loads(out.read_text())["settings"]["do_sample"] is True


def test_bench_batch_gives_plain_generate_the_fast_head_layout_unless_told_not_to(tiny_target_dir, tmp_path, monkeypatch):
    """The baseline gets the engine's exact non-speculative speed-ups: the skinny LM-head layout for 2-8 rows."""
    from transformers import AutoModelForCausalLM, GenerationMixin

    from hf_dspark.cli import main
    from hf_dspark.models.dspark import verify_head_dspark

    target = AutoModelForCausalLM.from_pretrained(tiny_target_dir)
    tiny_drafter(target, target_layer_ids=[0, 1]).save_pretrained(tmp_path / "draft")
    in_generate, skinny_rows = [], []  # rows of the skinny products computed inside transformers' generate
    original_skinny = verify_head_dspark.skinny_linear
    monkeypatch.setattr(verify_head_dspark, "skinny_linear", lambda x, w, b=None: (
        skinny_rows.append(x.numel() // x.shape[-1]) if in_generate else None) or original_skinny(x, w, b))
    original_generate = GenerationMixin.generate

    def generate(self, *args, **kwargs):
        in_generate.append(True)
        try:
            return original_generate(self, *args, **kwargs)
        finally:
            in_generate.pop()

    monkeypatch.setattr(GenerationMixin, "generate", generate)
    common = ["bench-batch", "--target", str(tiny_target_dir), "--draft", str(tmp_path / "draft"), "--concurrency", "2",
              "--num-prompts", "2", "--max-new-tokens", "4", "--device", "cpu", "--methods", "plain",
              "--latency-cache-dir", str(tmp_path / "latency"), "--profile-repeats", "1"]
    assert main(common + ["--output", str(tmp_path / "fast.json")]) == 0
    assert 2 in skinny_rows  # the timed 2-row generate ran its LM head in the skinny layout
    assert json.loads((tmp_path / "fast.json").read_text())["settings"]["plain_head"] == "fast"
    skinny_rows.clear()
    assert main(common + ["--plain-head", "transformers", "--output", str(tmp_path / "hf.json")]) == 0
    assert skinny_rows == []  # transformers' own head throughout
    assert json.loads((tmp_path / "hf.json").read_text())["settings"]["plain_head"] == "transformers"


def test_rounds_that_realize_less_than_expected_raise_the_hurdle_for_drafting():
    base = synthetic_cost()
    cost = RoundCost(base.verify, draft_seconds=dict(base.draft_seconds), adapt=True)
    plain_step = cost.round_seconds(4, 6)(1, 4, 0)
    predictions = [[0.9, 0.8, 0.6]] * 4
    assert best_padded_allocation(predictions, cost.round_seconds(4, 6)) != [0, 0, 0, 0]  # the model says: draft
    for _ in range(12):  # drafted rounds realize half the rate the plan expected
        cost.observe_gain(expected_tokens=12.0, model_seconds=1.0, committed_tokens=6, elapsed=1.0)
    assert cost.hurdle == pytest.approx(1.92, abs=0.02)  # the running mean of 1 and twelve 2s
    seconds = cost.round_seconds(4, 6)
    assert seconds(1, 4, 0) == pytest.approx(plain_step)  # a plain step is not a bet: its price stays
    assert seconds(3, 12, 4) == pytest.approx(cost.hurdle * base.round_seconds(4, 6)(3, 12, 4))
    assert best_padded_allocation(predictions, seconds) == [0, 0, 0, 0]  # now a plain step wins
    fixed = synthetic_cost()
    fixed.observe_gain(12.0, 1.0, 1, 1.0)
    assert fixed.hurdle == 1.0  # adapt=False: the tests' fixed models never move


def test_the_engines_own_overhead_is_learnt_per_kind_of_round_and_can_make_a_round_plain():
    """RoundCost.observe(overhead=...) learns the engine's seconds beyond the forward and the drafter, one
    value for plain steps and one for speculative rounds, and round_seconds prices it in: a round whose
    drafting and verification pay only before that overhead is planned plain."""
    base, cost = synthetic_cost(), synthetic_cost()
    cost.adapt = True
    predictions = [[0.9, 0.8, 0.6]] * 4
    assert best_padded_allocation(predictions, base.round_seconds(4, 6)) != [0, 0, 0, 0]
    plain_step = base.round_seconds(4, 6)(1, 4, 0)
    for _ in range(12):
        cost.observe(4, 1, 4, 0, 0.0, base.verify_seconds(4, 1, 4), overhead=0.01)
        cost.observe(4, 3, 12, 4, base.drafter_seconds(4), base.verify_seconds(4, 3, 12), overhead=2.0)
    assert cost.overhead_seconds(1, 0) == pytest.approx(0.01) and cost.overhead_seconds(3, 4) == pytest.approx(2.0)
    seconds = cost.round_seconds(4, 6)
    assert seconds(1, 4, 0) == pytest.approx(plain_step + 0.01)
    assert seconds(3, 12, 4) == pytest.approx(base.round_seconds(4, 6)(3, 12, 4) + 2.0)
    assert best_padded_allocation(predictions, seconds) == [0, 0, 0, 0]
    base.observe(4, 1, 4, 0, 0.0, 1.0, overhead=5.0)
    assert base.overhead_seconds(1, 0) == 0.0  # adapt=False: the tests' fixed models never move


def test_a_plan_that_gives_an_ngram_row_nothing_makes_it_copy_nothing(qwen, qwen_drafter):
    """Under cost the n-gram copy is cut to the plan's count: a round where nothing pays is plain."""
    engine = BatchedSpeculativeGenerator(qwen, qwen_drafter, policy_config("cost", ngram_lookup_tokens=4),
                                         round_cost=synthetic_cost())
    engine.round_cost.overhead["speculative"] = 1e3  # no speculative round can pay
    prompts = repetitive_prompts()
    outputs = engine.generate(prompts, max_new_tokens=12)
    assert outputs == [plain(qwen, p, 12) for p in prompts]
    assert engine.stats["ngram_request_rounds"] == 0 and engine.stats["verified_draft_tokens"] == 0


def test_pending_features_grow_in_place_and_keep_every_row_in_order():
    generator = torch.Generator().manual_seed(0)
    pending = PendingFeatures.empty(3, 2, torch.float32, "cpu")
    expected = [[], [], []]
    for step in range(40):
        counts = torch.randint(0, 4, (3,), generator=generator)
        new = torch.randn(3, 4, 2, generator=generator)
        pending.append(new, counts)
        for row in range(3):
            expected[row] += new[row, : int(counts[row])].tolist()
        if step % 7 == 6:  # row 1 drafts now and then
            pending.consume(torch.tensor([1]))
            expected[1] = []
    assert pending.lengths.tolist() == [len(rows) for rows in expected]
    for row in range(3):
        assert pending.features[row, : len(expected[row])].tolist() == expected[row]


@pytest.mark.parametrize("target_name", ["qwen", "gemma"])
def test_padding_slots_skip_the_per_slot_layers_and_real_slots_keep_their_logits(request, target_name):
    target = request.getfixturevalue(target_name)
    modules = position_wise_modules(target)
    assert len(modules) == 5 * target.config.num_hidden_layers  # each layer's MLP and q/k/v/o projections
    ids = torch.randint(3, 90, (3, 6), generator=torch.Generator().manual_seed(0))
    real = torch.arange(6)[None, :] < torch.tensor([6, 2, 4])[:, None]  # right-padded rows
    with torch.no_grad():
        reference = target(input_ids=ids).logits[real]
        seen = []
        with real_slots_only(target.get_output_embeddings(), real, real, modules):
            spy = modules[0].register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[:2]))
            try:  # registered after the packing hook: sees what the MLP gets
                packed = target(input_ids=ids, logits_to_keep=0).logits[0]
            finally:
                spy.remove()
    assert seen == [torch.Size([1, int(real.sum())])]  # the MLP saw the 12 real slots, not 18
    torch.testing.assert_close(packed, reference, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # hooks are gone afterwards
        torch.testing.assert_close(target(input_ids=ids).logits[real], reference, rtol=0, atol=0)


def test_the_engine_skips_padding_by_default_and_both_ways_are_lossless(gemma, gemma_drafter):
    prompts = mixed_prompts(gemma, train_prompts())
    reference = [plain(gemma, p, 12) for p in prompts]
    for skip in (True, False):
        engine = BatchedSpeculativeGenerator(gemma, gemma_drafter, policy_config("full", ngram_lookup_tokens=3),
                                             max_batch_size=len(prompts), skip_padding=skip)
        assert bool(engine._position_wise) == skip
        assert engine.generate(prompts, max_new_tokens=12) == reference
        assert engine.stats["ragged_rounds"] > 0  # rows of different widths: padding was there to skip


def test_padding_discount_is_capped_by_the_profiles_token_cost():
    assert token_seconds(None) == float("inf")
    profile = synthetic_profile(max_batch=64, per_token=0.06)
    expected = (profile.table[64][8] - profile.table[64][1]) / (64 * 7)
    assert token_seconds(profile) == pytest.approx(expected)
    cost = RoundCost(profile, padding_discount=expected)
    assert cost.verify_seconds(4, 3, 6) == pytest.approx(profile.verify_seconds(3, batch_size=4) - 6 * expected)
