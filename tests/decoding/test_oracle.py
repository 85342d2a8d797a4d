"""The scheduling ceiling (hf_dspark.decoding.oracle): verifies exactly what the target accepts, stays
lossless whatever its references say, and bench-batch runs it beside plain generate."""

from __future__ import annotations

import json
from copy import deepcopy

import pytest
import torch
from _fixtures import mixed_prompts, plain, repetitive_prompts, train_prompts
from _models import briefly_trained_drafter, tiny_drafter, tiny_qwen3_target

from hf_dspark import DSparkGenerationConfig
from hf_dspark.decoding.batched import BatchedSpeculativeGenerator
from hf_dspark.decoding.oracle import OraclePolicy, OracleSchedule


def oracle_engine(target, draft, **settings):
    return BatchedSpeculativeGenerator(target, draft, DSparkGenerationConfig(verification_policy="oracle", **settings),
                                       max_batch_size=settings.pop("max_batch_size", 4))


@pytest.fixture(scope="module")
def qwen():
    return tiny_qwen3_target()


@pytest.fixture(scope="module")
def qwen_drafter(qwen):
    return briefly_trained_drafter(qwen, train_prompts(), steps=30)


def test_the_oracle_verifies_exactly_the_tokens_full_verification_accepts(qwen, qwen_drafter):
    prompts = mixed_prompts(qwen, train_prompts())
    reference = [plain(qwen, p, 24) for p in prompts]
    full = BatchedSpeculativeGenerator(qwen, qwen_drafter, DSparkGenerationConfig(verification_policy="full"),
                                       max_batch_size=4)
    assert full.generate(prompts, max_new_tokens=24) == reference
    oracle = oracle_engine(qwen, qwen_drafter)
    assert isinstance(oracle.policy, OraclePolicy) and type(oracle) is BatchedSpeculativeGenerator
    assert oracle.generate(prompts, 24, references=reference) == reference
    # the same drafts (same trajectory, every row drafts): the same tokens accepted, none verified in vain
    assert oracle.stats["accepted_draft_tokens"] == full.stats["accepted_draft_tokens"] > 0
    assert oracle.stats["verified_draft_tokens"] == oracle.stats["accepted_draft_tokens"]
    assert full.stats["verified_draft_tokens"] > oracle.stats["verified_draft_tokens"]
    assert oracle.stats["rounds"] == full.stats["rounds"]


def test_a_second_run_drafts_only_where_drafts_were_accepted_and_keeps_every_round(qwen, qwen_drafter):
    prompts = mixed_prompts(qwen, train_prompts())
    reference = [plain(qwen, p, 24) for p in prompts]
    first = oracle_engine(qwen, qwen_drafter)
    assert first.generate(prompts, 24, references=reference) == reference
    outcomes = first.policy.draft_outcomes
    assert len(outcomes) == first.stats["drafted_request_rounds"]
    assert 0 < sum(n > 0 for n in outcomes.values()) < len(outcomes)  # some drafted blocks were rejected outright
    second = oracle_engine(qwen, qwen_drafter)
    second.policy.known_outcomes = outcomes
    assert second.generate(prompts, 24, references=reference) == reference
    for key in ("rounds", "request_rounds", "accepted_draft_tokens", "verified_draft_tokens"):
        assert second.stats[key] == first.stats[key], key
    assert second.stats["drafted_request_rounds"] == sum(n > 0 for n in outcomes.values())
    assert second.policy.draft_outcomes == {k: n for k, n in outcomes.items() if n > 0}  # drafted rows, all accepted
    # the deprecated engine subclass: warns, and runs the same schedule
    with pytest.warns(FutureWarning, match="OracleSchedule is deprecated"):
        alias = OracleSchedule(qwen, qwen_drafter, max_batch_size=4, draft_outcomes=outcomes)
    assert alias.generate(prompts, 24, references=reference) == reference
    assert alias.draft_outcomes == second.policy.draft_outcomes
    assert {k: v for k, v in alias.stats.items() if "seconds" not in k} == {
        k: v for k, v in second.stats.items() if "seconds" not in k}


def test_wrong_references_cost_speed_not_exactness(qwen, qwen_drafter):
    prompts = mixed_prompts(qwen, train_prompts())[:4]
    reference = [plain(qwen, p, 16) for p in prompts]
    wrong = [[(t + 1) % qwen.config.vocab_size for t in ref] for ref in reference]
    oracle = oracle_engine(qwen, qwen_drafter)
    assert oracle.generate(prompts, 16, references=wrong) == reference
    assert oracle.stats["verified_draft_tokens"] == 0  # no drafted token matches a shifted reference


def test_rows_with_an_ngram_copy_skip_the_drafter(qwen, qwen_drafter):
    prompts = repetitive_prompts()
    reference = [plain(qwen, p, 20) for p in prompts]
    oracle = oracle_engine(qwen, qwen_drafter, max_batch_size=3, ngram_lookup_tokens=4)
    assert oracle.generate(prompts, 20, references=reference) == reference
    stats = oracle.stats
    assert stats["ngram_request_rounds"] > 0
    assert stats["drafted_request_rounds"] + stats["ngram_request_rounds"] <= stats["request_rounds"]
    assert stats["verified_draft_tokens"] == stats["accepted_draft_tokens"]


def test_the_oracle_refuses_what_it_cannot_know(qwen, qwen_drafter):
    oracle = oracle_engine(qwen, qwen_drafter)
    with pytest.raises(ValueError, match="only greedy decoding"):
        oracle.generate([[5, 6]], 4, do_sample=True, references=[[1]])
    with pytest.raises(ValueError, match="only greedy decoding"):
        oracle_engine(qwen, qwen_drafter, do_sample=True)
    with pytest.raises(ValueError, match="needs reference="):
        oracle.add_request([5, 6, 7], 4)
    with pytest.raises(ValueError, match="one per prompt"):
        oracle.generate([[5, 6], [7]], 4, references=[[1]])
    with pytest.raises(ValueError, match="runs in the batched engine only"):
        qwen.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=2, assistant_model=oracle_drafter(qwen_drafter))
    with pytest.warns(FutureWarning), pytest.raises(ValueError, match="only greedy decoding"):
        OracleSchedule(qwen, qwen_drafter).set_sampling(do_sample=True)
    with pytest.warns(FutureWarning), pytest.raises(ValueError, match="do not pass scheduler="):
        OracleSchedule(qwen, qwen_drafter, scheduler="algorithm1")


def oracle_drafter(draft):
    """A copy of ``draft`` whose generation config asks generate for the engine-only oracle."""
    copy = deepcopy(draft)
    copy.generation_config.verification_policy = "oracle"
    return copy


def test_bench_batch_measures_the_oracle_beside_plain(tiny_target_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from hf_dspark.cli import main

    target = AutoModelForCausalLM.from_pretrained(tiny_target_dir)
    tiny_drafter(target, target_layer_ids=[0, 1]).save_pretrained(tmp_path / "draft")
    out = tmp_path / "bench.json"
    common = ["bench-batch", "--target", str(tiny_target_dir), "--draft", str(tmp_path / "draft"), "--num-prompts", "3",
              "--max-new-tokens", "8", "--device", "cpu", "--latency-cache-dir", str(tmp_path / "latency"),
              "--profile-repeats", "1", "--concurrency", "2", "--output", str(out)]
    assert main(common + ["--methods", "plain", "full", "oracle", "--repeats", "2"]) == 0
    rows = {r["method"]: r for r in json.loads(out.read_text())["results"]}
    assert set(rows) == {"plain", "full", "oracle"}
    oracle, full = rows["oracle"], rows["full"]
    plain_tps = rows["plain"]["tokens_per_second"]
    assert oracle["greedy_agreement_with_plain"] == 1.0
    assert oracle["total_tokens"] == rows["plain"]["total_tokens"] == full["total_tokens"]  # same greedy outputs
    assert oracle["throughput_ratio_vs_plain"] == pytest.approx(oracle["tokens_per_second"] / plain_tps)
    assert oracle["mean_verified_draft_tokens"] == pytest.approx(oracle["mean_accepted_length"] - 1)
    assert oracle["mean_accepted_length"] == pytest.approx(full["mean_accepted_length"])
    assert oracle["oracle_draft_everywhere_ratio_vs_plain"] == pytest.approx(
        oracle["total_tokens"] / oracle["oracle_draft_everywhere_seconds"] / plain_tps)
    assert main(common + ["--methods", "full", "oracle"]) == 2  # the oracle reads plain's outputs
    assert main(common + ["--methods", "plain", "oracle", "--do-sample"]) == 2  # greedy only
