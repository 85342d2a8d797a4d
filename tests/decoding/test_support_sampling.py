"""Sampling on the warpers' support (hf_dspark/models/dspark/sampling_dspark.py) against transformers' processors."""

import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from _fixtures import chi_square_rejects

from hf_dspark.models.dspark.sampling_dspark import TIE_ROOM, ProposalLaw, SupportWarp, speculative_sample
from hf_dspark.models.dspark import warpers_dspark
from hf_dspark.models.dspark.warpers_dspark import fuse_top_k_top_p


def chain(temperature=None, top_k=None, top_p=None, keep=1):
    processors = LogitsProcessorList()
    if temperature is not None:
        processors.append(TemperatureLogitsWarper(temperature))
    if top_k is not None:
        processors.append(TopKLogitsWarper(top_k))
    if top_p is not None:
        processors.append(TopPLogitsWarper(top_p, min_tokens_to_keep=keep))
    return processors


def dense(ids, probs, vocab):
    out = torch.zeros(ids.shape[0], vocab, dtype=torch.float64)
    return out.scatter_add_(1, ids, probs.double())


@pytest.mark.parametrize("settings", [dict(top_k=5), dict(temperature=0.7, top_k=8, top_p=0.9),
                                      dict(top_k=3, top_p=0.5, keep=2), dict(temperature=1.3, top_k=64, top_p=0.95)])
@pytest.mark.parametrize("fused", [False, True])
def test_the_law_on_the_support_equals_the_processed_full_distribution(settings, fused):
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(6, 300, generator=gen) * 3
    scores[2, :40] = scores[2].max() + 1  # a row with many ties with the top score (more than TIE_ROOM past k)
    scores[3, 10:14] = scores[3].topk(settings["top_k"]).values[-1]  # ties at the k-th score
    processors = chain(**settings)
    expected = torch.stack([processors(None, row[None].clone())[0] for row in scores]).softmax(-1).double()
    if fused:
        fuse_top_k_top_p(processors)
    warp = SupportWarp.from_processors(processors)
    assert warp is not None
    ids, probs = warp.law(scores)
    got = dense(ids, probs, 300)
    # rows without ties: the same law token by token; rows 2 and 3 (ties): top-p may cut tied tokens in another
    # order than torch.sort's unspecified one (warpers_dspark.py), so the same probabilities, maybe on other ties
    untied = [0, 1, 4, 5]
    torch.testing.assert_close(got[untied], expected[untied], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got[2:4].sort(-1).values, expected[2:4].sort(-1).values, atol=1e-6, rtol=1e-5)
    assert ids.shape[1] >= min(settings["top_k"], 300)
    if settings["top_k"] + TIE_ROOM < 40:
        assert ids.shape[1] >= 40  # row 2's 40 ties with the top score were all fetched


@pytest.mark.parametrize("keep_ties", [True, False])
def test_the_law_on_long_rows_searched_in_two_stages(monkeypatch, keep_ties):
    # 20,000 bf16-rounded scores a row (ties at the k-th score), searched in two stages with chunks of 4
    monkeypatch.setattr(warpers_dspark, "TOP_SCORES_CHUNK", 4)
    scores = (torch.randn(6, 20000, generator=torch.Generator().manual_seed(1)) * 3).to(torch.bfloat16).float()
    processors = chain(temperature=0.8, top_k=64, top_p=0.95)
    assert (scores >= scores.topk(64).values[:, -1:]).sum(-1).gt(64).any(), "the rows must tie at the k-th score"
    expected = torch.stack([processors(None, row[None].clone())[0] for row in scores]).softmax(-1).double()
    ids, probs = SupportWarp.from_processors(processors).law(scores, keep_ties=keep_ties)
    got = dense(ids, probs, 20000)
    if keep_ties:  # the same probabilities (tied tokens may swap where top-p cuts between them)
        torch.testing.assert_close(got.sort(-1).values, expected.sort(-1).values, atol=1e-6, rtol=1e-5)
    else:  # exactly k tokens: the k largest scores, renormalised
        assert ids.shape[1] == 64 and torch.allclose(probs.sum(-1), torch.ones(6))
        kth = (scores / 0.8).topk(64).values
        assert torch.equal((scores / 0.8).gather(-1, ids).sort(-1, descending=True).values, kth)


def test_only_chains_with_a_finite_support_are_taken():
    assert SupportWarp.from_processors(chain(top_p=0.9)) is None  # no top-k: the support is not bounded
    assert SupportWarp.from_processors(chain(temperature=0.5)) is None
    assert SupportWarp.from_processors(LogitsProcessorList([TopKLogitsWarper(5), MinPLogitsWarper(0.1)])) is None
    # order matters: top-p before top-k is another chain
    assert SupportWarp.from_processors(LogitsProcessorList([TopPLogitsWarper(0.9), TopKLogitsWarper(5)])) is None
    assert SupportWarp.from_processors(LogitsProcessorList([TopKLogitsWarper(5, filter_value=-1e4)])) is None
    # a second top-k (alone or fused) after the first is another chain, not an update of k
    assert SupportWarp.from_processors(LogitsProcessorList([TopKLogitsWarper(3), TopKLogitsWarper(5)])) is None
    fused = chain(top_k=5, top_p=0.9)
    fuse_top_k_top_p(fused)
    assert SupportWarp.from_processors(LogitsProcessorList([TopKLogitsWarper(3), *fused])) is None
    assert SupportWarp.from_processors(LogitsProcessorList([TemperatureLogitsWarper(0.5), *fused])) is not None
    assert SupportWarp.from_processors(chain(temperature=0.5, top_k=7)) == SupportWarp(top_k=7, temperature=0.5)


def exact_round_law(proposal_q, target_p, n):
    """P(emitted tokens) of one speculative round by enumeration: proposals x_1..x_n drawn from q_j (which here
    do not depend on earlier tokens), target laws p_j independent of the prefix too (a toy with fixed laws)."""
    import itertools

    vocab = target_p.shape[1]
    law = {}
    for xs in itertools.product(range(vocab), repeat=n):
        weight = 1.0
        for j, x in enumerate(xs):
            weight *= proposal_q[j, x]
        if weight == 0:
            continue
        alive = weight
        for j, x in enumerate(xs):
            accept = min(1.0, target_p[j, x] / proposal_q[j, x])
            residual = (target_p[j] - proposal_q[j]).clamp(min=0)
            residual = residual / residual.sum() if residual.sum() > 0 else target_p[j]
            for y in range(vocab):  # rejected at j, replaced by y
                key = xs[:j] + (y,)
                law[key] = law.get(key, 0.0) + alive * (1 - accept) * float(residual[y])
            alive *= accept
        for y in range(vocab):  # all accepted: bonus from p_{n+1}
            key = xs + (y,)
            law[key] = law.get(key, 0.0) + alive * float(target_p[n, y])
    return law


def draw_counts(proposal, q, scores, warp, keys, runs):
    torch.manual_seed(0)
    counts = dict.fromkeys(keys, 0)
    for _ in range(runs):
        xs = torch.multinomial(q.float(), 1)[:, 0]
        tokens, accepted = speculative_sample(xs, proposal, scores, warp)
        assert accepted == tokens.shape[0] - 1
        key = tuple(tokens.tolist())
        counts[key] = counts.get(key, 0) + 1  # an impossible outcome adds a key of probability 0
    return counts


def test_speculative_sample_emits_the_exact_round_law():
    """The accept/reject draw on sparse laws against an enumeration of the rule (toy: fixed per-position laws),
    and a wrong proposal law (claims uniform) told apart by the same test."""
    vocab, n, runs = 5, 2, 6000
    gen = torch.Generator().manual_seed(3)
    scores = torch.randn(n + 1, vocab, generator=gen) * 2
    warp = SupportWarp(top_k=3)
    ids, probs = warp.law(scores)
    q = torch.tensor([[0.5, 0.3, 0.2, 0.0, 0.0], [0.1, 0.0, 0.6, 0.3, 0.0]], dtype=torch.float64)
    law = exact_round_law(q, dense(ids, probs, vocab), n)
    q_ids = torch.arange(vocab).expand(n, vocab)
    for proposal, wrong in ((ProposalLaw(q_ids, q.float()), False),
                            (ProposalLaw(q_ids, torch.full((n, vocab), 1.0 / vocab)), True)):
        counts = draw_counts(proposal, q, scores, warp, list(law), runs)
        keys = list(counts)
        observed = torch.tensor([counts[k] for k in keys])
        expected = torch.tensor([law.get(k, 0.0) for k in keys], dtype=torch.float64)
        assert chi_square_rejects(observed, expected)[0] == wrong


def test_one_hot_and_empty_proposals():
    scores = torch.tensor([[3.0, 2.0, 1.0, 0.0], [0.0, 5.0, 0.0, 0.0]])
    warp = SupportWarp(top_k=2)
    torch.manual_seed(0)
    tokens, accepted = speculative_sample(torch.tensor([], dtype=torch.long), ProposalLaw.one_hot(torch.tensor([], dtype=torch.long)),
                                          scores[:1], warp)
    assert accepted == 0 and tokens.shape == (1,) and int(tokens[0]) in (0, 1)
    # a copied token the target cannot emit (outside its top-2) is always rejected, and replaced from p itself
    for seed in range(20):
        torch.manual_seed(seed)
        tokens, accepted = speculative_sample(torch.tensor([3]), ProposalLaw.one_hot(torch.tensor([3])), scores, warp)
        assert accepted == 0 and int(tokens[0]) in (0, 1)
    mixed = ProposalLaw.concat([ProposalLaw(torch.tensor([[0, 1, 2]]), torch.tensor([[0.2, 0.5, 0.3]])),
                                ProposalLaw.one_hot(torch.tensor([1]))])
    assert mixed.ids.shape == (2, 3)
    assert mixed.at(torch.tensor([0, 1]), torch.tensor([[1], [1]]))[:, 0].tolist() == [0.5, 1.0]


def test_without_ties_the_law_keeps_exactly_k_tokens_and_stays_a_law():
    scores = torch.tensor([[1.0, 3.0, 3.0, 3.0, 0.5, 2.0]])
    warp = SupportWarp(top_k=2)
    ids, probs = warp.law(scores)  # the target's law: all three tied scores survive top-2
    assert sorted(ids[0][probs[0] > 0].tolist()) == [1, 2, 3]
    ids, probs = warp.law(scores, keep_ties=False)  # a proposal law: two of the tied tokens, split evenly
    assert ids.shape == (1, 2) and set(ids[0].tolist()) <= {1, 2, 3}
    torch.testing.assert_close(probs, torch.full((1, 2), 0.5))
