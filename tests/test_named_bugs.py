"""Direct tests of the small helpers that end-to-end decoding tests cannot check (issue 34).

Decoding stays lossless whatever these helpers compute (a wrong confidence only changes how many
tokens are submitted), so each is checked here against values computed by hand. Each test names
the bug it catches; ``docs/mutation.md`` lists the mutation run that checks they do.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import GenerationConfig
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from hf_dspark import load_drafter
from hf_dspark.checkpoints.export import export_drafter
from hf_dspark.decoding.verification import residual_distribution, verify_block
from hf_dspark.errors import CheckpointError
from hf_dspark.losses import dspark_loss, l1_to_dense_target, l1_to_topk_target
from hf_dspark.models.dspark.generation_dspark import (
    DSparkCandidateGenerator,
    cost_length,
    default_dspark_generation_config,
    interpolate_latency,
    latency_points,
    prefix_survival,
    threshold_length,
)
from hf_dspark.models.dspark.modeling_dspark import sample_anchor_positions
from hf_dspark.models.dspark.warpers_dspark import FusedTopKTopPWarper

from _models import tiny_drafter, tiny_qwen3_target

# per-position conditional survival c_k and its prefix products a_k = prod_{i<=k} c_i, by hand
CONFIDENCE = [0.9, 0.9, 0.5, 0.95, 0.95]
SURVIVAL = [0.9, 0.81, 0.405, 0.38475, 0.3655125]
# T_verify(n) = 1.0 + 0.3 (n - 1) seconds
LATENCY_TABLE = {str(n): 1.0 + 0.3 * (n - 1) for n in range(1, 7)}


@pytest.fixture(scope="module")
def target():
    return tiny_qwen3_target()


# ----------------------------------------------------------------------------- STS temperature
def test_sts_temperature_divides_the_confidence_logits(target):
    draft = tiny_drafter(target)
    draft.config.confidence_temperatures = [2.0, 2.0, 0.5, 1.0, 4.0]
    logits = torch.tensor([2.0, -1.0, 1.0, 0.3, 8.0])
    expected = [1 / (1 + math.exp(-z)) for z in (1.0, -0.5, 2.0, 0.3, 2.0)]  # sigmoid(logit / T)
    torch.testing.assert_close(draft.calibrated_confidence(logits), torch.tensor(expected))
    # fewer positions than temperatures (a block cut short): the first temperatures apply
    torch.testing.assert_close(draft.calibrated_confidence(logits[:2]), torch.tensor(expected[:2]))
    draft.config.confidence_temperatures = None
    torch.testing.assert_close(draft.calibrated_confidence(logits), torch.sigmoid(logits))


# ----------------------------------------------------------------------------- verification policies
def test_prefix_survival_is_the_running_product():
    torch.testing.assert_close(prefix_survival(torch.tensor(CONFIDENCE)), torch.tensor(SURVIVAL))


def test_threshold_length_cuts_strictly_below_the_threshold():
    # a_k equal to the threshold is kept; the first a_k below it ends the prefix (exact binary fractions)
    assert threshold_length([0.75, 0.5, 0.25], 0.5, min_tokens=0) == 2
    assert threshold_length([0.5, 0.25], 0.5, min_tokens=0) == 1
    assert threshold_length([0.25, 0.125], 0.5, min_tokens=0) == 0
    assert threshold_length([0.25, 0.125], 0.5, min_tokens=1) == 1  # at least min_tokens
    assert threshold_length([0.25], 0.5, min_tokens=3) == 1  # never more than drafted
    assert threshold_length([0.9, 0.8], 0.5, min_tokens=1) == 2


def test_cost_length_on_a_hand_computed_latency_table():
    verify = functools.partial(interpolate_latency, latency_points(LATENCY_TABLE))
    # round(L) = T_draft + T_verify(1 + L) = 0.5 + 1.0 + 0.3 L; tokens per second (1 + sum a) / round(L):
    # L=1: 1.9/1.8 = 1.056, L=2: 2.71/2.1 = 1.290, L=3: 3.115/2.4 = 1.298, L=4: 3.49975/2.7 = 1.296 -> 3
    assert cost_length(SURVIVAL, 0.5, verify) == 3
    # without the drafter's time, longer rounds look relatively dearer: L=2 2.71/1.6 > L=3 3.115/1.9 -> 2
    assert cost_length(SURVIVAL, 0.0, verify) == 2
    assert cost_length(SURVIVAL, 0.5, verify, min_tokens=4) == 4  # forced tokens, then L=5 does not improve
    assert cost_length([0.9, 0.0, 0.9], 100.0, verify) == 1  # a zero-survival token is never added


def generator_with(target, policy: str, **settings) -> DSparkCandidateGenerator:
    draft = tiny_drafter(target)
    draft.generation_config = default_dspark_generation_config(verification_policy=policy, **settings)
    return DSparkCandidateGenerator(target, draft, GenerationConfig(max_length=64), input_ids=torch.ones(1, 4, dtype=torch.long))


def confidence_logits(probabilities) -> torch.Tensor:
    return torch.logit(torch.tensor([probabilities], dtype=torch.float64)).float()


def test_threshold_policy_submits_up_to_the_first_low_prefix_survival(target):
    gen = generator_with(target, "threshold", confidence_threshold=0.45)
    # a = 0.9, 0.81, 0.405: the third token's survival is below 0.45 although its own c_3 = 0.5 is not
    assert gen._submit_length(confidence_logits(CONFIDENCE), 5) == 2
    assert gen._submit_length(confidence_logits(CONFIDENCE), 1) == 1
    assert gen._submit_length(confidence_logits([0.2, 0.9, 0.9, 0.9, 0.9]), 5) == 1  # min_draft_tokens = 1
    # calibrated: T = 0.25 sharpens c = 0.9 (logit 2.197) to sigmoid(8.79) = 0.99985, c = 0.95 to 0.99999
    # and leaves 0.5: a = 0.99985, 0.9997, 0.49985, 0.49985, 0.49984, all above 0.45
    gen.draft.config.confidence_temperatures = [0.25] * 5
    assert gen._submit_length(confidence_logits(CONFIDENCE), 5) == 5


def test_cost_policy_submits_the_best_expected_rate_prefix(target):
    gen = generator_with(target, "cost", latency_table=LATENCY_TABLE)
    assert gen.policy == "cost"
    assert gen._submit_length(confidence_logits(CONFIDENCE), 5) == 5  # no draft timing yet: the whole block
    gen.draft_time_ema = 0.5
    assert gen._submit_length(confidence_logits(CONFIDENCE), 5) == 3  # see test_cost_length_on_...
    assert gen._submit_length(confidence_logits(CONFIDENCE), 2) == 2
    gen.draft_time_ema = 0.0
    assert gen._submit_length(confidence_logits(CONFIDENCE), 5) == 2


def test_full_policy_submits_the_block(target):
    gen = generator_with(target, "full")
    assert gen._submit_length(confidence_logits([0.01] * 5), 5) == 5
    gen.draft_time_ema = 0.5  # timed rounds do not make the full policy weigh costs
    assert gen._submit_length(confidence_logits([0.01] * 5), 5) == 5


def test_threshold_policy_without_confidence_submits_the_block(target):
    # a drafter without a confidence head gives no confidence: nothing to cut on
    assert generator_with(target, "threshold", confidence_threshold=0.45)._submit_length(None, 4) == 4


# ----------------------------------------------------------------------------- verification
def test_residual_distribution_of_equal_laws_is_the_target_law():
    p = torch.tensor([[0.5, 0.25, 0.25], [0.5, 0.25, 0.25]], dtype=torch.float64)
    q = torch.tensor([[0.5, 0.25, 0.25], [0.25, 0.25, 0.5]], dtype=torch.float64)
    # row 0: p == q, nothing to reject, p itself; row 1: max(p - q, 0) = (0.25, 0, 0) normalized
    torch.testing.assert_close(residual_distribution(p, q), torch.tensor([[0.5, 0.25, 0.25], [1.0, 0.0, 0.0]],
                                                                         dtype=torch.float64))


def test_verify_block_never_accepts_a_token_the_target_cannot_produce(monkeypatch):
    # u ~ U[0, 1) can be exactly 0: a token with p(x) = 0 must still be rejected (u < 0 is false),
    # while one with p(x) = q(x) is accepted
    monkeypatch.setattr(torch, "rand", lambda n, **kw: torch.zeros(n, dtype=kw.get("dtype")))
    q = torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    p = torch.tensor([[0.5, 0.0, 0.5], [1 / 3, 1 / 3, 1 / 3], [1 / 3, 1 / 3, 1 / 3]], dtype=torch.float64)
    n_accepted, token = verify_block(torch.tensor([1, 1]), q, p, 2, torch.Generator().manual_seed(0))
    assert n_accepted == 0 and token in (0, 2)  # the replacement comes from max(p - q, 0): never token 1
    p[0] = torch.tensor([0.0, 1.0, 0.0])  # now p_1 = q_1: accepted; p_2(1) = 1/3 < 1 = q_2(1), u = 0 accepts
    assert verify_block(torch.tensor([1, 1]), q, p, 2, torch.Generator().manual_seed(0))[0] == 2


# ----------------------------------------------------------------------------- losses
def test_topk_l1_equals_the_dense_l1_when_k_is_the_vocabulary():
    gen = torch.Generator().manual_seed(0)
    draft = torch.randn(2, 3, 7, generator=gen)
    target_logits = torch.randn(2, 3, 7, generator=gen) * 2
    logprobs, ids = target_logits.log_softmax(-1).topk(7, dim=-1)
    torch.testing.assert_close(l1_to_topk_target(draft, ids, logprobs, None), l1_to_dense_target(draft, target_logits, None))


def test_topk_l1_counts_draft_mass_outside_the_target_topk():
    draft = torch.log(torch.tensor([0.1, 0.2, 0.3, 0.4]))
    ids = torch.tensor([0, 1])
    logprobs = torch.log(torch.tensor([0.5, 0.3]))  # the target's other 0.2 is unknown: counted as disjoint
    # |0.1 - 0.5| + |0.2 - 0.3| + draft mass off the top-k (0.3 + 0.4) + target mass off it (0.2) = 1.4
    torch.testing.assert_close(l1_to_topk_target(draft, ids, logprobs, None), torch.tensor(1.4))


def test_topk_l1_with_a_target_token_outside_the_draft_vocabulary():
    draft = torch.log(torch.tensor([0.1, 0.2, 0.3, 0.4]))  # draft vocabulary = target ids 0..3
    t2d = torch.tensor([0, 1, 2, 3, -1, -1])
    ids = torch.tensor([0, 4])
    logprobs = torch.log(torch.tensor([0.5, 0.3]))
    # |0.1 - 0.5| + draft mass elsewhere (0.9) + target mass on id 4 (0.3) + unknown target mass (0.2) = 1.8
    torch.testing.assert_close(l1_to_topk_target(draft, ids, logprobs, t2d), torch.tensor(1.8))


def test_dense_l1_with_a_reduced_draft_vocabulary():
    draft = torch.log(torch.tensor([0.25, 0.75]))
    target_logits = torch.log(torch.tensor([0.5, 0.25, 0.25]))
    d2t = torch.tensor([0, 2])  # target id 1 is outside the draft vocabulary
    # |0.25 - 0.5| + |0.75 - 0.25| + 0.25 outside = 1.0
    torch.testing.assert_close(l1_to_dense_target(draft, target_logits, d2t), torch.tensor(1.0))


def test_ce_averages_over_positions_whose_target_is_in_the_draft_vocabulary():
    t2d = torch.tensor([0, 1, 2, 3, -1, -1])
    draft_logits = torch.tensor([[[[0.0, 0.0, 0.0, 0.0], [5.0, 0.0, 0.0, 0.0], [0.0, 0.0, 3.0, 0.0]]]])
    target_ids = torch.tensor([[[1, 4, 2]]])  # position 1's target is outside the draft vocabulary
    eval_mask = torch.ones(1, 1, 3, dtype=torch.bool)
    out = dspark_loss(
        draft_logits, None, target_ids, eval_mask, torch.ones(1, 1, dtype=torch.bool),
        target_topk_ids=torch.tensor([[[[1], [4], [2]]]]), target_topk_logprobs=torch.zeros(1, 1, 3, 1),
        t2d=t2d, loss_decay_gamma=1.0,
    )
    ce0 = math.log(4.0)  # uniform over 4
    ce2 = -3.0 + math.log(math.exp(3.0) + 3.0)
    w0, w2 = 1.0, math.exp(-2.0)  # w_k = exp(-k / decay)
    torch.testing.assert_close(out.ce_loss, torch.tensor((w0 * ce0 + w2 * ce2) / (w0 + w2)))


def test_dspark_loss_metrics_by_hand():
    """Two blocks of two positions over a 2-token vocabulary, the last position unsupervised.

    p_draft / p_target: (0.5, 0.5) / (0.5, 0.5), (0.75, 0.25) / (0.25, 0.75), (0.5, 0.5) / (0.75, 0.25):
    L1 = 0, 1, 0.5 and accept = 1 - L1 / 2 = 1, 0.5, 0.75."""
    log = lambda *p: torch.log(torch.tensor(p))  # noqa: E731
    draft_logits = torch.stack([log(0.5, 0.5), log(0.75, 0.25), log(0.5, 0.5), log(0.5, 0.5)]).view(1, 2, 2, 2)
    target_logits = torch.stack([log(0.5, 0.5), log(0.25, 0.75), log(0.75, 0.25), log(0.5, 0.5)]).view(1, 2, 2, 2)
    eval_mask = torch.tensor([[[True, True], [True, False]]])
    # sigmoid 0.75, 0.5, 0.5 and 0.9 on the unsupervised position (accept 1 there: a gap it must not count)
    confidence_logits = torch.logit(torch.tensor([[[0.75, 0.5], [0.5, 0.9]]], dtype=torch.float64)).float()
    target_ids = torch.tensor([[[0, 1], [0, 1]]])  # token 0 is a target like any other
    out = dspark_loss(draft_logits, confidence_logits, target_ids, eval_mask, torch.ones(1, 2, dtype=torch.bool),
                      target_logits=target_logits, loss_decay_gamma=1.0)
    w1 = math.exp(-1.0)  # w_k = exp(-k / decay): 1, e^-1
    ln2, ln4 = math.log(2.0), math.log(4.0)
    torch.testing.assert_close(out.ce_loss, torch.tensor((ln2 + w1 * ln4 + ln2) / (2 + w1)))
    torch.testing.assert_close(out.l1_loss, torch.tensor((w1 * 1.0 + 0.5) / (2 + w1)))
    # mean |sigmoid - accept| over supervised positions: (0.25 + 0 + 0.25) / 3
    torch.testing.assert_close(out.confidence_error, torch.tensor(1 / 6))
    torch.testing.assert_close(out.acceptance, torch.tensor([(1.0 + 0.75) / 2, 0.5]))  # per position
    torch.testing.assert_close(out.position_counts, torch.tensor([2.0, 1.0]))
    # 1 + mean over blocks of sum_k prod_{i<=k} accept_i: blocks (1 + 0.5) and 0.75
    torch.testing.assert_close(out.expected_tau, torch.tensor(1 + (1.5 + 0.75) / 2))


# ----------------------------------------------------------------------------- anchors
def test_anchors_are_only_positions_whose_next_token_is_supervised():
    loss_mask = torch.tensor([[0, 1, 1, 0, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 1, 1], [1, 0, 1, 0, 1, 0, 0, 0]])
    allowed = [{1, 4, 5}, set(range(7)), set()]
    seen = [set(), set(), set()]
    for seed in range(30):
        anchors, keep = sample_anchor_positions(loss_mask, 2, torch.Generator().manual_seed(seed))
        for row in range(3):
            picked = anchors[row][keep[row]].tolist()
            assert set(picked) <= allowed[row] and len(picked) == min(2, len(allowed[row]))
            assert picked == sorted(picked) and len(set(picked)) == len(picked)
            seen[row] |= set(picked)
        assert anchors[2].tolist() == [0, 0]  # no valid position: dummy blocks
    assert seen == allowed  # every allowed anchor can be drawn
    anchors, keep = sample_anchor_positions(loss_mask, 10)  # more anchors than positions: all of them
    assert anchors[0][keep[0]].tolist() == [1, 4, 5] and keep.shape == (3, 10)


def test_anchors_are_decided_by_the_mask_not_by_the_draw(monkeypatch):
    # a valid position whose random score is exactly 0 (torch.rand draws from [0, 1)) is still a candidate
    monkeypatch.setattr(torch, "rand", lambda shape, **kw: torch.zeros(shape))
    anchors, keep = sample_anchor_positions(torch.tensor([[1, 1, 1, 0, 1, 1]]), 3)
    assert anchors[keep].tolist() == [0, 1, 4] and keep.tolist() == [[True, True, True]]


# ----------------------------------------------------------------------------- loading
def test_load_drafter_refuses_an_unexpected_tensor(tmp_path, target):
    tiny_drafter(target).save_pretrained(tmp_path)
    load_drafter(tmp_path)  # the untouched folder loads
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["extra_head.weight"] = torch.zeros(3)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"unexpected \['extra_head.weight'\], missing \[\]"):
        load_drafter(tmp_path)


def test_load_drafter_casts_to_dtype_without_a_device(tmp_path, target):
    tiny_drafter(target).save_pretrained(tmp_path)
    assert next(load_drafter(tmp_path).parameters()).dtype == torch.float32
    assert {p.dtype for p in load_drafter(tmp_path, dtype=torch.float64).parameters()} == {torch.float64}
    assert {p.dtype for p in load_drafter(tmp_path, dtype="bfloat16").parameters()} == {torch.bfloat16}


def test_load_drafter_records_the_folder_for_every_layout(tmp_path, target):
    # every layout loads under the folder's name, as from_pretrained records it for our own layout
    draft = tiny_drafter(target, target_model_name="tiny-org/tiny-target", context_input_norm=False)
    draft.config.prompt_chat_template = False
    draft.save_pretrained(tmp_path / "ours")
    folders = {"hf-dspark": tmp_path / "ours"}
    for fmt in ("deepspec", "speculators"):
        folders[fmt] = export_drafter(tmp_path / "ours", tmp_path / fmt, format=fmt)
    for fmt, folder in folders.items():
        loaded = load_drafter(folder)
        assert loaded.checkpoint_format == fmt, fmt
        assert loaded.name_or_path == loaded.config.name_or_path == str(folder), fmt


# ----------------------------------------------------------------------------- fused warper
def test_fused_warper_equals_the_pair_at_an_exact_top_p_boundary():
    # top-4 survivors have probabilities 1/2, 1/4, 1/8, 1/8 (exact in float32): ascending cumulative sums
    # 0.125, 0.25, 0.5, 1.0. With top_p = 0.75, 1 - top_p = 0.25 is reached exactly: top-p removes
    # cumulative <= 0.25, i.e. both 1/8 tokens, and keeps ids 2 and 0.
    scores = torch.log(torch.tensor([[0.25, 0.01, 0.5, 0.125, 0.02, 0.125]]))
    top_k, top_p = TopKLogitsWarper(4), TopPLogitsWarper(0.75)
    ids = torch.zeros(1, 1, dtype=torch.long)
    reference = top_p(ids, top_k(ids, scores.clone()))
    assert torch.isfinite(reference).nonzero()[:, 1].tolist() == [0, 2]
    assert torch.equal(FusedTopKTopPWarper(top_k, top_p)(ids, scores.clone()), reference)


# ----------------------------------------------------------------------------- Markov sampling loop
def test_markov_sampling_loop_follows_a_hand_built_transition_table(target):
    """Vanilla head with B(prev, next) = 10 on a hand table: 3 -> 7 -> 11 -> 5 -> 7; the confidence
    head reads the previous token's W1 row only, so c_k names the token x_{k-1}."""
    draft = tiny_drafter(target, markov_rank=4, markov_head_type="vanilla")
    head = draft.markov_head
    w1_scale = {3: 1.0, 7: 2.0, 11: 3.0, 5: 4.0}
    with torch.no_grad():
        head.markov_w1.weight.zero_()
        head.markov_w2.weight.zero_()
        for j, (token, scale) in enumerate(w1_scale.items()):
            head.markov_w1.weight[token, j] = scale
        table = {3: 7, 7: 11, 11: 5, 5: 7}
        for j, (prev, nxt) in enumerate(table.items()):
            head.markov_w2.weight[nxt, j] = 10.0 / w1_scale[prev]
        proj = draft.confidence_head.proj
        proj.weight.zero_()
        proj.weight[0, -4:] = 1.0  # sum of W1[x_{k-1}]
        proj.bias.fill_(0.5)
    base = torch.randn(1, 5, 96, generator=torch.Generator().manual_seed(0))  # |base| << 10
    hidden = torch.randn(1, 5, 32)
    tokens, logits, conf = draft.sample_block(base, hidden, torch.tensor([3]))
    assert tokens.tolist() == [[7, 11, 5, 7, 11]]
    prev = [3, 7, 11, 5, 7]
    expected = base.clone()
    for k, p in enumerate(prev):
        expected[0, k, table[p]] += 10.0
    torch.testing.assert_close(logits, expected)
    torch.testing.assert_close(conf, torch.tensor([[w1_scale[p] + 0.5 for p in prev]]))

    # a chooser's token (not the argmax) is what the next step conditions on; num_tokens cuts the block
    def choose(logits_k, k):
        ids = torch.tensor([5]) if k == 0 else logits_k.argmax(-1)
        return ids, logits_k * 2

    tokens, logits, conf = draft.sample_block(base, hidden, torch.tensor([3]), choose=choose, num_tokens=3)
    assert tokens.tolist() == [[5, 7, 11]]
    torch.testing.assert_close(logits[0, 1], 2 * (base[0, 1] + 10.0 * torch.nn.functional.one_hot(torch.tensor(7), 96)))
    torch.testing.assert_close(conf, torch.tensor([[1.5, 4.5, 2.5]]))


def test_markov_embed_previous_zeroes_only_tokens_outside_the_draft_vocabulary(target):
    head = tiny_drafter(target, markov_rank=4, markov_head_type="vanilla").markov_head
    w1 = head.markov_w1.weight.detach()
    rows = head.embed_previous(torch.tensor([[0, -1, 2]]))  # draft id 0 is a token like any other
    torch.testing.assert_close(rows, torch.stack([w1[0], torch.zeros(4), w1[2]])[None])


# ----------------------------------------------------------------------------- evaluation summaries
def _records():
    return [
        {"dspark": {"new_tokens": 10, "seconds": 2.0, "rounds": 4, "accepted_tokens": 10,
                    "position_attempted": [4, 3], "position_accepted": [3, 2], "matches_baseline": True},
         "baseline": {"new_tokens": 10, "seconds": 4.0}, "baseline_fused": {"new_tokens": 10, "seconds": 2.5}},
        {"dspark": {"new_tokens": 6, "seconds": 2.0, "rounds": 3, "accepted_tokens": 6,
                    "position_attempted": [3, 1, 1], "position_accepted": [1, 1, 0], "matches_baseline": False,
                    "divergence": {"position": 4, "margin_ulps": 2.0}},
         "baseline": {"new_tokens": 6, "seconds": 1.0}, "baseline_fused": {"new_tokens": 6, "seconds": 1.5}},
    ]


def test_prompt_set_summary_on_hand_records():
    from hf_dspark.evaluation.summary import summarize_prompt_set

    s = summarize_prompt_set(_records())
    # tokens per second pool tokens and seconds over prompts: 16 / 4 (dspark), 16 / 5 (plain), 16 / 4 (fused)
    assert s["tokens_per_second"] == 4.0 and s["baseline_tokens_per_second"] == 3.2
    assert s["baseline_fused_tokens_per_second"] == 4.0 and s["best_plain_tokens_per_second"] == 4.0
    assert s["speedup"] == pytest.approx(1.25) and s["speedup_vs_best_plain"] == pytest.approx(1.0)
    assert (s["new_tokens"], s["seconds"], s["rounds"], s["accepted_tokens"]) == (16, 4.0, 7, 16)
    assert s["mean_accepted_length"] == pytest.approx(16 / 7)
    # per position: accepted / attempted summed over prompts, rows of different lengths
    assert s["per_position_acceptance"] == pytest.approx([4 / 7, 3 / 4, 0.0])
    assert s["outputs_match_baseline"] is False and s["num_prompts"] == 2
    assert s["greedy_agreement"] == {"identical_share": 0.5, "first_divergence_positions": [4],
                                     "max_margin_ulps": 2.0, "all_divergences_near_ties": True}


def test_prompt_set_summary_edge_cases():
    from hf_dspark.evaluation.summary import summarize_prompt_set

    records = _records()
    records[0]["dspark"].update(matches_baseline=False, divergence={"position": 0})  # no margin measured
    s = summarize_prompt_set(records)
    assert s["greedy_agreement"] == {"identical_share": 0.0, "first_divergence_positions": [0, 4],
                                     "max_margin_ulps": 2.0, "all_divergences_near_ties": False}
    records[0]["dspark"]["divergence"]["margin_ulps"] = 2.5  # measured, and not a near tie
    assert summarize_prompt_set(records)["greedy_agreement"]["all_divergences_near_ties"] is False
    for r in records:
        r["dspark"]["seconds"] = 0.0
        del r["baseline_fused"]
    s = summarize_prompt_set(records)
    assert s["tokens_per_second"] is None and s["speedup"] is None and s["baseline_fused_tokens_per_second"] is None
    s = summarize_prompt_set([{"dspark": {**_records()[0]["dspark"], "rounds": 0, "accepted_tokens": 0}}])
    assert s["mean_accepted_length"] is None and "speedup" not in s


def test_prompt_lookup_agreement_is_measured_like_dsparks():
    from hf_dspark.evaluation.summary import summarize_prompt_set

    records = _records()
    records[0]["prompt_lookup"] = {"new_tokens": 10, "seconds": 1.0, "matches_baseline": True}
    records[1]["prompt_lookup"] = {"new_tokens": 6, "seconds": 1.0, "matches_baseline": False,
                                   "divergence": {"position": 7, "margin_ulps": 3.0}}
    s = summarize_prompt_set(records)
    assert s["prompt_lookup_greedy_agreement"] == {"identical_share": 0.5, "first_divergence_positions": [7],
                                                   "max_margin_ulps": 3.0, "all_divergences_near_ties": False}
    assert s["greedy_agreement"]["max_margin_ulps"] == 2.0  # DSpark's own stays its own
    del records[1]["prompt_lookup"]["divergence"]  # a file of earlier code: no divergence recorded
    assert "prompt_lookup_greedy_agreement" not in summarize_prompt_set(records)


def test_prompt_set_summary_short_runs_sampling_and_tau_interval():
    from hf_dspark.evaluation.summary import summarize_prompt_set

    records = _records()
    for r in records:  # a short run: 0.5 s in all is still a speed
        r["dspark"]["seconds"], r["baseline"]["seconds"] = 0.25, 0.5
        del r["dspark"]["matches_baseline"]  # sampling: no agreement to measure
    s = summarize_prompt_set(records)
    assert s["tokens_per_second"] == 32.0 and s["baseline_tokens_per_second"] == 16.0
    assert "greedy_agreement" not in s and s["outputs_match_baseline"] is None
    # tau per prompt: 10 / 4 = 2.5 and 6 / 3 = 2; the 90% bootstrap interval spans both
    assert s["mean_accepted_length_ci90"] == [2.0, 2.5]
