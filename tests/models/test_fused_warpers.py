"""The fused top-k + top-p warper returns exactly what transformers' two warpers return."""
import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from hf_dspark.models.dspark import warpers_dspark
from hf_dspark.models.dspark.warpers_dspark import FusedTopKTopPWarper, fuse_top_k_top_p, top_scores

from _models import tiny_drafter, tiny_qwen3_target

IDS = torch.zeros(1, 3, dtype=torch.long)


def pair(k, p, keep=1):
    return TopKLogitsWarper(k, min_tokens_to_keep=keep), TopPLogitsWarper(p, min_tokens_to_keep=keep)


def reference(k, p, scores, keep=1):
    top_k, top_p = pair(k, p, keep)
    return top_p(IDS, top_k(IDS, scores.clone()))


@pytest.mark.parametrize("k,p,keep", [(64, 0.95, 1), (8, 0.5, 1), (5, 0.999, 1), (20, 0.3, 3), (1, 0.9, 1),
                                      (10, 1.0, 1)])
def test_fused_equals_the_pair_on_random_rows(k, p, keep):
    gen = torch.Generator().manual_seed(k * 100 + keep)
    for scale in (0.5, 3.0, 10.0):
        scores = torch.randn(3, 5000, generator=gen) * scale
        scores[1, :100] = -float("inf")  # earlier processors may already have removed tokens
        fused = FusedTopKTopPWarper(*pair(k, p, keep))
        assert torch.equal(fused(IDS, scores.clone()), reference(k, p, scores, keep))


def test_fused_path_is_the_one_running_on_ordinary_rows(monkeypatch):
    fused = FusedTopKTopPWarper(*pair(16, 0.9))
    monkeypatch.setattr(FusedTopKTopPWarper, "_reference", lambda *a: pytest.fail("fell back to the pair"))
    out = fused(IDS, torch.randn(2, 1000))
    assert (torch.isfinite(out).sum(-1) <= 16).all()


def test_off_the_cpu_the_pair_runs_without_reading_on_the_host():
    # the meta device stands for an accelerator: reading a value there fails, as a host sync would cost
    fused = FusedTopKTopPWarper(*pair(4, 0.9))
    out = fused(IDS.to("meta"), torch.randn(2, 50).to("meta"))
    assert out.device.type == "meta" and out.shape == (2, 50)


@pytest.mark.parametrize("case", ["ties_at_kth", "fewer_finite_than_k", "k_not_below_vocab"])
def test_edge_cases_match_the_pair(case):
    if case == "ties_at_kth":
        scores = torch.tensor([[5.0, 4.0, 3.0, 3.0, 3.0, 1.0, 0.0, -1.0]])  # top-3 keeps five entries
        k = 3
    elif case == "fewer_finite_than_k":
        scores = torch.tensor([[2.0, 1.0, -float("inf"), -float("inf"), 0.5, -float("inf")]])
        k = 4
    else:
        scores = torch.randn(2, 6)
        k = 6
    fused = FusedTopKTopPWarper(*pair(k, 0.99))
    assert torch.equal(fused(IDS, scores.clone()), reference(k, 0.99, scores))


def test_fuse_replaces_only_adjacent_top_k_top_p_pairs():
    processors = LogitsProcessorList([TemperatureLogitsWarper(0.7), *pair(10, 0.9)])
    assert fuse_top_k_top_p(processors) == 1
    assert [type(p) for p in processors] == [TemperatureLogitsWarper, FusedTopKTopPWarper]

    reversed_order = LogitsProcessorList([TopPLogitsWarper(0.9), TopKLogitsWarper(10)])
    assert fuse_top_k_top_p(reversed_order) == 0  # top-p first is a different warper chain
    assert [type(p) for p in reversed_order] == [TopPLogitsWarper, TopKLogitsWarper]

    finite = LogitsProcessorList([TopKLogitsWarper(10, filter_value=-1e4), TopPLogitsWarper(0.9, filter_value=-1e4)])
    assert fuse_top_k_top_p(finite) == 0  # removed tokens keep some probability: not the same computation
    with pytest.raises(ValueError, match="filter_value"):
        FusedTopKTopPWarper(*finite)
    assert fuse_top_k_top_p(None) == 0


def test_generate_fuses_unless_switched_off():
    target = tiny_qwen3_target(seed=1)
    draft = tiny_drafter(target, seed=2)
    ids = torch.tensor([[1, 5, 9, 4]])
    kwargs = dict(max_new_tokens=6, do_sample=True, top_k=20, top_p=0.9, assistant_model=draft)
    target.generate(ids, **kwargs)
    assert draft.last_generation_stats["fused_warpers"] == 1
    draft.generation_config.fast_warpers = False
    target.generate(ids, **kwargs)
    assert draft.last_generation_stats["fused_warpers"] == 0
    target.generate(ids, max_new_tokens=6, do_sample=False, assistant_model=draft)
    assert draft.last_generation_stats["fused_warpers"] == 0


def tie_rule_reference(k, p, scores, keep=1):
    """The pair computed with a full-vocabulary sort whose order among equal scores is fixed: lower token ids
    are cut last (the fused warper's documented rule; torch.sort leaves that order unspecified)."""
    top_k_scores = TopKLogitsWarper(k, min_tokens_to_keep=keep)(IDS, scores.clone())
    flipped = top_k_scores.flip(-1)  # a stable ascending sort of the flipped row puts higher ids first among ties
    ascending, order = flipped.sort(dim=-1, stable=True)
    token_ids = scores.shape[-1] - 1 - order
    cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= (1 - p)
    remove[..., -keep:] = False
    out = top_k_scores.clone()
    return out.scatter_(-1, token_ids, ascending.masked_fill(remove, -float("inf")))


@pytest.mark.parametrize("chunk", [None, 4], ids=["one_top_k", "two_stage_top_k"])
@pytest.mark.parametrize("k,p,keep", [(64, 0.95, 1), (16, 0.5, 1), (40, 0.9, 3)])
def test_bf16_rounded_rows_with_ties_take_the_fused_path(monkeypatch, k, p, keep, chunk):
    if chunk is not None:  # 20,000 scores a row are searched in two stages with chunks of 4
        monkeypatch.setattr(warpers_dspark, "TOP_SCORES_CHUNK", chunk)
    gen = torch.Generator().manual_seed(k)
    scores = (torch.randn(6, 20000, generator=gen) * 3).to(torch.bfloat16).float()
    top_k_kept = (scores >= torch.topk(scores, k, dim=-1).values[..., -1:]).sum(-1)
    assert (top_k_kept > k).any(), "the rows must have ties at the k-th score for this test to mean anything"
    fused = FusedTopKTopPWarper(*pair(k, p, keep))
    monkeypatch.setattr(FusedTopKTopPWarper, "_reference", lambda *a: pytest.fail("fell back to the full sort"))
    out = fused(IDS, scores.clone())
    assert torch.equal(out, tie_rule_reference(k, p, scores, keep))
    # against transformers' pair: the same number of survivors with the same scores (only tied ids may swap)
    ref = reference(k, p, scores, keep)
    assert torch.equal(torch.isfinite(out).sum(-1), torch.isfinite(ref).sum(-1))
    assert torch.equal(out.sort(-1).values, ref.sort(-1).values)


def test_tie_at_the_top_p_boundary_cuts_the_higher_token_id_first():
    # top-k 4 keeps all four; top-p 0.6 must drop one of the two tied 1.0 scores (ids 1 and 3)
    scores = torch.tensor([[2.0, 1.0, -5.0, 1.0, 0.0, -4.0]])
    fused = FusedTopKTopPWarper(*pair(4, 0.6))
    out = fused(IDS, scores.clone())
    assert torch.isfinite(out[0]).tolist() == [True, True, False, False, False, False]
    assert torch.equal(out, tie_rule_reference(4, 0.6, scores))


def _counted_topk(monkeypatch) -> list:
    """The k of every torch.topk call from now on, the fused warper's and transformers' TopKLogitsWarper's alike."""
    calls, real = [], torch.topk

    def topk(input, k, *args, **kwargs):
        calls.append(k)
        return real(input, k, *args, **kwargs)

    monkeypatch.setattr(torch, "topk", topk)
    return calls


def test_the_fused_warper_sorts_no_more_than_the_class_states(monkeypatch):
    """One top-k of k; a second of the tied width only when scores tie with the k-th; where k covers the
    vocabulary, no top-k of its own: the pair runs alone, exactly as often as without the fused warper."""
    untied = torch.tensor([[5.0, 4.0, 3.0, 2.5, 2.0, 1.0, 0.0, -1.0]])
    tied = torch.tensor([[5.0, 4.0, 3.0, 3.0, 3.0, 1.0, 0.0, -1.0]])  # top-3 keeps five entries
    calls = _counted_topk(monkeypatch)
    FusedTopKTopPWarper(*pair(3, 0.9))(IDS, untied.clone())
    assert calls == [3]
    calls.clear()
    FusedTopKTopPWarper(*pair(3, 0.9))(IDS, tied.clone())
    assert calls == [3, 5]
    for k in (8, 9):  # k == vocab and k > vocab
        calls.clear()
        expected = reference(k, 0.9, untied)
        pair_calls = list(calls)
        calls.clear()
        out = FusedTopKTopPWarper(*pair(k, 0.9))(IDS, untied.clone())
        assert calls == pair_calls == [8] and torch.equal(out, expected)


def test_when_every_score_ties_with_the_kth_the_pair_runs(monkeypatch):
    # top-2 keeps all five tokens (four tie with the 2nd score): a fused sort would save nothing, so the pair runs
    # and its result comes back as is, its own order among the tied tokens included
    scores = torch.tensor([[2.0, 1.0, 1.0, 1.0, 1.0]])
    ran = []
    monkeypatch.setattr(FusedTopKTopPWarper, "_reference",
                        lambda self, ids, s: ran.append(1) or self.top_p_warper(ids, self.top_k_warper(ids, s)))
    out = FusedTopKTopPWarper(*pair(2, 0.6))(IDS, scores.clone())
    assert ran == [1] and torch.equal(out, reference(2, 0.6, scores))


def test_min_tokens_to_keep_above_k_stays_on_the_fused_path(monkeypatch):
    # top-p must keep 10 tokens but top-k left 4: every top-k survivor stays, which the fused path computes too
    scores = torch.randn(3, 2000, generator=torch.Generator().manual_seed(3)) * 3
    scores[1, :100] = -float("inf")
    top_k, top_p = TopKLogitsWarper(4), TopPLogitsWarper(0.3, min_tokens_to_keep=10)
    expected = top_p(IDS, top_k(IDS, scores.clone()))
    monkeypatch.setattr(FusedTopKTopPWarper, "_reference", lambda *a: pytest.fail("fell back to the pair"))
    out = FusedTopKTopPWarper(top_k, top_p)(IDS, scores.clone())
    assert torch.equal(out, expected) and torch.isfinite(out).sum(-1).tolist() == [4, 4, 4]


# ---------------------------------------------------------------------------------------- top_scores
def _top_scores_rows(case, vocab, width, gen):
    if case == "normal":
        return torch.randn(4, vocab, generator=gen) * 3
    if case == "integer_ties":  # a handful of distinct values: every boundary is a tie
        return torch.randint(0, 6, (4, vocab), generator=gen).float()
    if case == "bf16_rounded":
        return (torch.randn(4, vocab, generator=gen) * 3).to(torch.bfloat16).float()
    if case == "minus_inf":  # most of each row already removed, fewer finite scores than width in row 1
        rows = torch.full((4, vocab), -float("inf"))
        rows[0, ::7] = torch.randn(rows[0, ::7].shape, generator=gen)
        rows[1, 3:3 + width // 2] = 1.0
        rows[2:] = torch.randn(2, vocab, generator=gen)
        return rows
    if case == "one_chunk":  # the largest scores all in one chunk, and in the last partial chunk
        rows = torch.randn(4, vocab, generator=gen)
        rows[0, 40:40 + width] += 100
        rows[1, -(vocab % 8 or 8):] += 100
        return rows
    if case == "not_contiguous":
        return (torch.randn(vocab, 4, generator=gen) * 3).t()
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["normal", "integer_ties", "bf16_rounded", "minus_inf", "one_chunk", "not_contiguous"])
@pytest.mark.parametrize("width", [1, 9, 72])
def test_top_scores_gives_the_values_of_one_top_k(monkeypatch, case, width):
    monkeypatch.setattr(warpers_dspark, "TOP_SCORES_CHUNK", 8)
    vocab = 16 * 72 * 8 + 5  # searched in two stages at every width, with a partial last chunk
    scores = _top_scores_rows(case, vocab, width, torch.Generator().manual_seed(width))
    values, ids = top_scores(scores, width)
    expected = torch.topk(scores, width, dim=-1).values
    assert torch.equal(values, expected)
    assert torch.equal(scores.gather(-1, ids), values)  # each value is the score of its id
    assert all(row.unique().numel() == width for row in ids)  # no id taken twice


def test_top_scores_on_gemma_sized_rows_searches_one_sixteenth_at_a_time(monkeypatch):
    scores = torch.randn(8, 262144, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16).float()
    sizes, real = [], torch.topk

    def topk(input, k, *args, **kwargs):
        sizes.append(input.shape[-1])
        return real(input, k, *args, **kwargs)

    monkeypatch.setattr(torch, "topk", topk)
    values, ids = top_scores(scores, 72)
    monkeypatch.setattr(torch, "topk", real)
    assert torch.equal(values, torch.topk(scores, 72, dim=-1).values)
    assert torch.equal(scores.gather(-1, ids), values)
    assert len(sizes) == 2 and max(sizes) <= 262144 // 16  # two stages, neither over the whole row
    sizes.clear()
    monkeypatch.setattr(torch, "topk", topk)
    top_scores(scores[:, :5000], 72)  # a short row: one top-k
    assert sizes == [5000]
