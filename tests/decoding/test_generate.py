"""target.generate(..., assistant_model=dspark_drafter): lossless greedy, exact sampling, policies, errors."""

from __future__ import annotations

import types

import pytest
import torch
from _fixtures import POLICIES, chi_square_rejects, exact_joint, sample_counts, set_policy
from _models import briefly_trained_drafter, small_vocab_pair, tiny_drafter, tiny_gemma3_target, tiny_qwen3_target
from transformers.generation.streamers import BaseStreamer

import hf_dspark  # noqa: F401  (installs the hook)
from hf_dspark import DSparkDraftCache

VARIANTS = {
    "dflash": dict(markov_rank=0),
    "vanilla": dict(markov_head_type="vanilla"),
    "gated": dict(markov_head_type="gated"),
    "rnn": dict(markov_head_type="rnn"),
    "reduced_vocab": dict(draft_vocab_size=48, draft_token_ids=list(range(40, 88))),
}


def prompts(n, vocab=90, length=7, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (1, length), generator=gen) for _ in range(n)]


@pytest.fixture(scope="module")
def qwen():
    return tiny_qwen3_target()


@pytest.fixture(scope="module")
def gemma():
    return tiny_gemma3_target()


@pytest.fixture(scope="module")
def trained(qwen):
    return briefly_trained_drafter(qwen, prompts(3, seed=5), steps=30)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("target_name", ["qwen", "gemma"])
def test_greedy_equals_plain_generate_every_variant_and_policy(request, target_name, variant):
    target = request.getfixturevalue(target_name)
    draft = tiny_drafter(target, **VARIANTS[variant])
    for policy, settings in POLICIES.items():
        set_policy(draft, **settings)
        for ids in prompts(2, seed=hash(policy) % 1000):
            plain = target.generate(ids, max_new_tokens=23, do_sample=False)
            spec = target.generate(ids, max_new_tokens=23, do_sample=False, assistant_model=draft)
            assert torch.equal(plain, spec), f"{target_name}/{variant}/{policy}"
            stats = draft.last_generation_stats
            assert stats["policy"] == policy
            assert sum(stats["accepted_lengths"]) >= spec.shape[1] - ids.shape[1] - 1


def test_briefly_trained_drafter_is_lossless_and_accepts(qwen, trained):
    accepted = []
    for policy, settings in POLICIES.items():
        set_policy(trained, **settings)
        for ids in prompts(3, seed=5):
            plain = qwen.generate(ids, max_new_tokens=30, do_sample=False)
            spec = qwen.generate(ids, max_new_tokens=30, do_sample=False, assistant_model=trained)
            assert torch.equal(plain, spec), policy
            accepted.append(trained.last_generation_stats["mean_accepted_length"])
    assert max(accepted) > 3.0, "a drafter trained on these continuations should get long acceptances"


class Oracle:
    """Makes a drafter propose the target's true continuation, with one wrong token every few rounds,
    so verification exercises long acceptances, rejections, EOS and max length inside a block."""

    def __init__(self, draft, reference: torch.Tensor, vocab: int, corrupt_every: int = 3):
        self.draft, self.ref, self.vocab, self.every, self.round, self.pos = draft, reference[0], vocab, corrupt_every, 0, 0
        original_block = draft.draft_block

        def draft_block(this, anchor_ids, new_ctx, cache):
            out = original_block(anchor_ids, new_ctx, cache)
            self.pos = cache.get_seq_length()  # index of the anchor in the sequence
            return out

        original_sample = draft.sample_block

        def sample_block(this, base_logits, hidden, anchor_ids, choose=None, num_tokens=None):
            tokens, logits, conf = original_sample(base_logits, hidden, anchor_ids, choose, num_tokens)
            n = tokens.shape[1]
            truth = self.ref[self.pos + 1 : self.pos + 1 + n]
            fixed = tokens.clone()
            fixed[0, : truth.numel()] = truth
            self.round += 1
            if self.round % self.every == 0:
                k = self.round % n
                fixed[0, k] = (fixed[0, k] + 1) % self.vocab
            return fixed, logits, conf

        draft.draft_block = types.MethodType(draft_block, draft)
        draft.sample_block = types.MethodType(sample_block, draft)


@pytest.mark.parametrize("max_new_tokens", [13, 24])
def test_oracle_drafts_long_acceptance_and_max_new_tokens_mid_block(qwen, max_new_tokens):
    ids = prompts(1, seed=11)[0]
    plain = qwen.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    reference = qwen.generate(ids, max_new_tokens=60, do_sample=False)
    draft = set_policy(tiny_drafter(qwen, block_size=5), verification_policy="full")
    Oracle(draft, reference, qwen.config.vocab_size)
    spec = qwen.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, assistant_model=draft)
    assert torch.equal(plain, spec)
    assert max(draft.last_generation_stats["accepted_lengths"]) == 6  # a full block + bonus happened


def test_eos_inside_a_block_stops_exactly_like_plain_generate():
    target = tiny_qwen3_target(seed=3)
    ids = prompts(1, seed=12)[0]
    free = target.generate(ids, max_new_tokens=40, do_sample=False)
    eos = int(free[0, ids.shape[1] + 9])  # the 10th generated token becomes EOS
    target.generation_config.eos_token_id = eos
    plain = target.generate(ids, max_new_tokens=40, do_sample=False)
    assert plain.shape[1] <= ids.shape[1] + 10
    draft = set_policy(tiny_drafter(target, block_size=6), verification_policy="full")
    Oracle(draft, free, target.config.vocab_size, corrupt_every=100)
    spec = target.generate(ids, max_new_tokens=40, do_sample=False, assistant_model=draft)
    assert torch.equal(plain, spec)


class Collect(BaseStreamer):
    def __init__(self):
        self.chunks = []

    def put(self, value):
        self.chunks.append(value.reshape(-1))

    def end(self):
        self.ended = True


def test_streamer_receives_exactly_the_output(qwen, trained):
    set_policy(trained, verification_policy="full")
    ids = prompts(1, seed=4)[0]
    streamer = Collect()
    out = qwen.generate(ids, max_new_tokens=20, do_sample=False, assistant_model=trained, streamer=streamer)
    streamed = torch.cat(streamer.chunks)
    assert torch.equal(streamed, out[0]) and streamer.ended


def test_incremental_draft_cache_equals_drafting_from_scratch(qwen):
    draft = tiny_drafter(qwen, markov_head_type="gated")
    seq = torch.randint(3, 90, (1, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        hs = qwen(seq, output_hidden_states=True).hidden_states
        feats = torch.cat([hs[i + 1] for i in draft.config.target_layer_ids], dim=-1)
        cache = DSparkDraftCache(draft.config.num_hidden_layers)
        committed = 0
        for step in (9, 4, 1, 7):  # tokens committed per round
            out_inc = draft.draft_block(seq[:, committed + step], feats[:, committed : committed + step], cache)
            committed += step
            fresh = DSparkDraftCache(draft.config.num_hidden_layers)
            out_scratch = draft.draft_block(seq[:, committed], feats[:, :committed], fresh)
            torch.testing.assert_close(out_inc.hidden_states, out_scratch.hidden_states, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(out_inc.base_logits, out_scratch.base_logits, atol=1e-5, rtol=1e-5)
            assert cache.get_seq_length() == committed


# ------------------------------------------------------------------------- sampling exactness
# (exact_joint, sample_counts and chi_square_rejects live in tests/_fixtures.py, small_vocab_pair in tests/_models.py)
@pytest.fixture(scope="module")
def small_vocab():
    return small_vocab_pair()


@pytest.mark.parametrize(
    "warp",
    [dict(temperature=1.0, top_k=0, top_p=1.0), dict(temperature=0.7, top_k=4, top_p=0.9)],
    ids=["plain", "temp_topk_topp"],
)
def test_sampling_follows_the_target_distribution(small_vocab, warp):
    target, draft = small_vocab
    ids = torch.tensor([[1, 3, 2, 4]])
    exact = exact_joint(target, ids, warp)
    counts = sample_counts(target, draft, ids, warp, runs=1500)
    rejects, stat, crit = chi_square_rejects(counts, exact)
    assert not rejects, f"speculative samples deviate from the target: chi2={stat:.1f} > {crit:.1f}"
    assert draft.last_generation_stats["submitted_lengths"][0] == 2  # the draft really proposed tokens
    # top-k then top-p ran as one fused warper on both sides (hf_dspark.models.dspark.generation_dspark.FusedTopKTopPWarper)
    assert draft.last_generation_stats["fused_warpers"] == (1 if warp["top_k"] else 0)


@pytest.fixture(scope="module")
def small_vocab_reduced():
    """Like small_vocab, but the drafter only proposes 4 of the 6 tokens (reduced draft vocabulary)."""
    return small_vocab_pair(draft_vocab_size=4, draft_token_ids=[0, 2, 3, 4])


@pytest.mark.parametrize(
    "warp",
    [dict(temperature=1.0, top_k=0, top_p=1.0), dict(temperature=0.7, top_k=0, top_p=1.0),
     dict(temperature=0.7, top_k=3, top_p=0.9)],
    ids=["plain", "temperature", "temp_topk_topp"],
)
def test_sampling_with_reduced_draft_vocab_warps_in_draft_space_and_stays_exact(small_vocab_reduced, warp,
                                                                                 monkeypatch):
    from transformers.generation.logits_process import TemperatureLogitsWarper

    from hf_dspark.models.dspark.sampling_dspark import SupportWarp

    target, draft = small_vocab_reduced
    widths = []
    # with top-k every law is computed on its support (SupportWarp.law); otherwise the processors run
    spied, method = (SupportWarp, "law") if warp["top_k"] else (TemperatureLogitsWarper, "__call__")
    original = getattr(spied, method)

    def spy(self, *args, **kwargs):
        widths.append(args[-1].shape[-1])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(spied, method, spy)
    ids = torch.tensor([[1, 3, 2, 4]])
    exact = exact_joint(target, ids, warp)
    widths.clear()
    counts = sample_counts(target, draft, ids, warp, runs=1500)
    rejects, stat, crit = chi_square_rejects(counts, exact)
    assert not rejects, f"speculative samples deviate from the target: chi2={stat:.1f} > {crit:.1f}"
    assert draft.last_generation_stats["submitted_lengths"][0] == 2
    assert draft.last_generation_stats["fused_warpers"] == (1 if warp["top_k"] else 0)
    assert draft.last_generation_stats["support_sampling"] == bool(warp["top_k"])
    if warp["temperature"] != 1.0:  # the drafter warped 4-wide draft logits, the target 6-wide scores
        assert 4 in widths and 6 in widths


def claim_uniform_proposals(monkeypatch):
    """Break the generator: return logits that are not the ones it sampled from (claims q is uniform)."""
    original = hf_dspark.models.dspark.generation_dspark.DSparkCandidateGenerator.get_candidates

    def lying(self, *args, **kwargs):
        cands, logits = original(self, *args, **kwargs)
        return cands, None if logits is None else torch.zeros_like(logits)

    monkeypatch.setattr(hf_dspark.models.dspark.generation_dspark.DSparkCandidateGenerator, "get_candidates", lying)


def test_a_broken_acceptance_rule_is_caught(small_vocab, monkeypatch):
    """Negative control: returning logits that are not the ones sampled from must fail the test above."""
    target, draft = small_vocab
    warp = dict(temperature=1.0, top_k=0, top_p=1.0)
    ids = torch.tensor([[1, 3, 2, 4]])
    claim_uniform_proposals(monkeypatch)
    exact = exact_joint(target, ids, warp)
    counts = sample_counts(target, draft, ids, warp, runs=1500)
    assert chi_square_rejects(counts, exact)[0]


def test_a_broken_acceptance_rule_on_the_support_is_caught(small_vocab, monkeypatch):
    """Negative control of the support path: a proposal law that is not the one the tokens were drawn from
    (uniform over the drafted row's support) must fail the chi-square test."""
    from hf_dspark.models.dspark import generation_dspark, sampling_dspark

    target, draft = small_vocab
    warp = dict(temperature=0.7, top_k=4, top_p=0.9)
    original = sampling_dspark.begin_round

    def lying(proposal, support_warp, device):
        uniform = torch.where(proposal.probs > 0, 1.0, 0.0)
        return original(sampling_dspark.ProposalLaw(proposal.ids, uniform / uniform.sum(-1, keepdim=True)),
                        support_warp, device)

    monkeypatch.setattr(generation_dspark, "begin_round", lying)
    ids = torch.tensor([[1, 3, 2, 4]])
    counts = sample_counts(target, draft, ids, warp, runs=1500)
    assert draft.last_generation_stats["support_sampling"]
    assert chi_square_rejects(counts, exact_joint(target, ids, warp))[0]


# ------------------------------------------------------------------------- integration and errors
def test_pipeline_with_assistant_model(tiny_target_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    target = AutoModelForCausalLM.from_pretrained(tiny_target_dir)
    tok = AutoTokenizer.from_pretrained(tiny_target_dir)
    draft = tiny_drafter(target, target_layer_ids=[0, 1])
    pipe = pipeline("text-generation", model=target, tokenizer=tok)
    plain = pipe("what is the sum of two", max_new_tokens=12, do_sample=False)
    spec = pipe("what is the sum of two", max_new_tokens=12, do_sample=False, assistant_model=draft)
    assert plain[0]["generated_text"] == spec[0]["generated_text"]
    assert draft.last_generation_stats["rounds"] > 0


def test_statistics_are_complete(qwen, trained, monkeypatch):
    import hf_dspark.models.dspark.generation_dspark as generation

    set_policy(trained, verification_policy="full")
    prompt = prompts(1, seed=9)[0]
    # A scripted clock that moves only inside forward passes: 1 per target pass, 1/64 per drafter layer
    # call and 1/1024 per context projection (sums of these are exact in binary floating point).
    clock = types.SimpleNamespace(now=0.0, passes=[])
    monkeypatch.setattr(generation, "time", types.SimpleNamespace(perf_counter=lambda: clock.now))

    def costs(name, seconds):
        def advance(module, args):
            clock.now += seconds
            clock.passes.append(name)
        return advance

    hooks = [qwen.register_forward_pre_hook(costs("target", 1.0)),
             trained.layers[0].register_forward_pre_hook(costs("draft_layer", 1 / 64)),
             trained.fc.register_forward_pre_hook(costs("projection", 1 / 1024))]
    try:
        out = qwen.generate(prompt, max_new_tokens=25, do_sample=False, assistant_model=trained)
    finally:
        for hook in hooks:
            hook.remove()
    s = trained.last_generation_stats
    for key in ("rounds", "accepted_lengths", "mean_accepted_length", "position_attempted", "position_accepted",
                "submitted_lengths", "draft_seconds", "verify_seconds"):
        assert key in s
    assert s["rounds"] == len(s["accepted_lengths"]) == len(s["submitted_lengths"]) >= 2
    # the prefill commits one token, each round its accepted drafts plus the target's own token
    assert 1 + sum(s["accepted_lengths"]) == out.shape[1] - prompt.shape[1]
    assert s["mean_accepted_length"] == pytest.approx(sum(s["accepted_lengths"]) / s["rounds"])
    assert all(1 <= a <= n + 1 for a, n in zip(s["accepted_lengths"], s["submitted_lengths"]))
    assert s["position_attempted"][0] == s["rounds"]
    assert sum(s["position_accepted"]) == sum(s["accepted_lengths"]) - s["rounds"]  # drafts accepted
    assert all(a >= b for a, b in zip(s["position_attempted"], s["position_accepted"]))
    # each timed part holds its own passes: the prefill one target pass, verification one target pass per
    # round, drafting every drafter call
    assert clock.passes.count("target") == 1 + s["rounds"]
    assert s["prefill_seconds"] == 1.0 and s["verify_seconds"] == s["rounds"]
    assert s["draft_seconds"] == clock.passes.count("draft_layer") / 64 + clock.passes.count("projection") / 1024
    assert clock.passes.count("draft_layer") >= s["rounds"]


def test_batch_size_above_one_points_to_the_batched_engine(qwen):
    draft = tiny_drafter(qwen)
    ids = torch.cat(prompts(2, seed=1))
    with pytest.raises(ValueError, match="batched"):
        qwen.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, assistant_model=draft)


def test_drafter_for_another_target_is_refused_before_generation(qwen):
    other = tiny_qwen3_target(num_layers=6)
    draft = tiny_drafter(other)
    with pytest.raises(ValueError, match="number of layers: drafter expects 6, target has 4"):
        qwen.generate(prompts(1)[0], max_new_tokens=5, assistant_model=draft)


def test_cost_policy_without_latency_table_is_a_clear_error(qwen):
    draft = set_policy(tiny_drafter(qwen), verification_policy="cost", latency_table=None)
    with pytest.raises(ValueError, match="latency_table"):
        qwen.generate(prompts(1)[0], max_new_tokens=5, do_sample=False, assistant_model=draft)


# ------------------------------------------------------------------------- bfloat16
@pytest.fixture(scope="module")
def small_vocab_bf16():
    target, draft = small_vocab_pair()
    return target.to(torch.bfloat16), draft.to(torch.bfloat16)


@pytest.mark.parametrize("warp", [dict(temperature=1.0, top_k=0, top_p=1.0), dict(temperature=0.7, top_k=4, top_p=0.9)],
                         ids=["plain", "temp_topk_topp"])
def test_bf16_sampling_follows_the_target_distribution(small_vocab_bf16, warp):
    """In bf16 the exact distribution is the one of the target's bf16 logits; 1,500 draws cannot tell the
    verification pass's logits from the decode step's (they differ in the last bf16 bits), a wrong q can."""
    target, draft = small_vocab_bf16
    ids = torch.tensor([[1, 3, 2, 4]])
    exact = exact_joint(target, ids, warp)
    counts = sample_counts(target, draft, ids, warp, runs=1500)
    rejects, stat, crit = chi_square_rejects(counts, exact)
    assert not rejects, f"bf16 speculative samples deviate from the target: chi2={stat:.1f} > {crit:.1f}"
    assert draft.last_generation_stats["submitted_lengths"][0] == 2


def test_bf16_broken_acceptance_rule_is_caught(small_vocab_bf16, monkeypatch):
    """The negative control of the bf16 test above, on a fifth of its draws: a generator that misreports q
    moves the samples far from the target's law, so 300 draws reject it (as in the Gemma 4 control); the
    1,500 draws of the exactness test are there to have power against small deviations."""
    target, draft = small_vocab_bf16
    warp = dict(temperature=1.0, top_k=0, top_p=1.0)
    ids = torch.tensor([[1, 3, 2, 4]])
    claim_uniform_proposals(monkeypatch)
    counts = sample_counts(target, draft, ids, warp, runs=300)
    assert chi_square_rejects(counts, exact_joint(target, ids, warp))[0]


def test_bf16_greedy_output_differs_from_plain_only_at_numerical_near_ties():
    """The bf16 contract: verification scores several rows with other kernels than a one-row decode step,
    so greedy outputs may part where the target's two best logits are within bf16 rounding (<= 2 rounding
    steps apart); anywhere else they must agree token for token."""
    from hf_dspark.evaluation import greedy_divergence

    identical, divergences = 0, []
    for seed in range(4):
        target = tiny_qwen3_target(seed=seed).to(torch.bfloat16)
        draft = set_policy(tiny_drafter(target, seed=seed + 10).to(torch.bfloat16), verification_policy="full")
        for p in range(5):
            ids = torch.randint(3, 96, (1, 6), generator=torch.Generator().manual_seed(seed * 10 + p))
            plain = target.generate(ids, max_new_tokens=40, do_sample=False)
            spec = target.generate(ids, max_new_tokens=40, do_sample=False, assistant_model=draft)
            report = greedy_divergence(target, ids.shape[1], plain, spec)
            if report is None:
                identical += 1
            else:
                divergences.append(report)
    assert identical >= 10, f"only {identical} of 20 bf16 outputs identical to plain generate"
    for report in divergences:
        assert report["margin_ulps"] <= 2.0, f"a bf16 divergence away from a near-tie: {report}"


def test_greedy_divergence_measures_a_real_disagreement_as_far_from_a_tie():
    """Negative control for the contract test: a token that is not the target's argmax by a wide margin."""
    from hf_dspark.evaluation import greedy_divergence

    target = tiny_qwen3_target(seed=0)
    ids = torch.tensor([[4, 8, 15, 16, 23]])
    plain = target.generate(ids, max_new_tokens=6, do_sample=False)
    assert greedy_divergence(target, ids.shape[1], plain, plain.clone()) is None
    with torch.no_grad():
        logits = target(plain[:, :7]).logits[0, -1]
    wrong = plain.clone()
    wrong[0, 7] = int(logits.argmin())
    report = greedy_divergence(target, ids.shape[1], plain, wrong)
    assert report["position"] == 2 and report["token"] == int(logits.argmin())
    assert report["margin_ulps"] > 2.0 and report["logit_margin"] == pytest.approx(float(logits.max() - logits.min()))
