"""One decoding configuration (issue 32): DSparkGenerationConfig drives the batched engine as it drives
generate, policies and schedulers are entries of one registry, and every old spelling warns and decodes the
same."""

from __future__ import annotations

import pytest
from _fixtures import repetitive_prompts, synthetic_cost
from _models import tiny_drafter, tiny_qwen3_target

import hf_dspark
from hf_dspark import BatchedSpeculativeGenerator, DSparkGenerationConfig
from hf_dspark.errors import DSparkConfigError
from hf_dspark.models.dspark.policies_dspark import (
    VERIFICATION_POLICY_MAPPING,
    VerificationPolicy,
    policy_names,
    register_verification_policy,
    verification_policy_class,
)

PROMPTS = [[5, 6, 7, 5, 6, 7, 5, 6], [9, 3, 9, 3, 9], [40, 41]]


@pytest.fixture(scope="module")
def models():
    """A tiny Qwen3 target and an untrained drafter for it (greedy outputs are still the target's)."""
    target = tiny_qwen3_target()
    return target, tiny_drafter(target)


def decoding_stats(engine) -> dict:
    return {k: v for k, v in engine.stats.items() if "seconds" not in k}


def test_the_config_is_public_and_one_registry_holds_every_policy_and_schedule():
    assert hf_dspark.DSparkGenerationConfig is DSparkGenerationConfig
    assert "DSparkGenerationConfig" in hf_dspark.__all__
    assert set(policy_names("generate")) == {"auto", "full", "threshold", "cost"}
    assert set(policy_names("engine")) == {"auto", "full", "threshold", "cost", "async", "plain", "oracle"}
    for name, cls in VERIFICATION_POLICY_MAPPING.items():
        assert cls.name == name and issubclass(cls, VerificationPolicy)
    with pytest.raises(DSparkConfigError, match=r"'fastest' is not registered; choose one of \['auto', 'full'"):
        verification_policy_class("fastest")
    with pytest.raises(DSparkConfigError, match="runs in the batched engine only; generate supports"):
        verification_policy_class("async", "generate")
    with pytest.raises(DSparkConfigError, match=r"verification_policy='fastest' is invalid: choose one of"):
        DSparkGenerationConfig(verification_policy="fastest")


def test_a_registered_policy_is_usable_by_name(models):
    qwen, draft = models
    @register_verification_policy
    class FirstTokenPolicy(VerificationPolicy):
        name = "first_token_test"

        def verify_counts(self, planner, survival, limits, drafted_rows, do_sample, requests, proposed):
            return [min(1, limit) for limit in limits]

    try:
        engine = BatchedSpeculativeGenerator(qwen, draft, DSparkGenerationConfig(verification_policy="first_token_test"))
        full = BatchedSpeculativeGenerator(qwen, draft, DSparkGenerationConfig(verification_policy="full"))
        assert engine.generate(PROMPTS, 10) == full.generate(PROMPTS, 10)
        assert engine.stats["verified_draft_tokens"] == engine.stats["drafted_request_rounds"] > 0
    finally:
        del VERIFICATION_POLICY_MAPPING["first_token_test"]


def test_the_engine_reads_sampling_policy_and_ngram_settings_from_the_config(models):
    qwen, draft = models
    config = DSparkGenerationConfig(verification_policy="threshold", confidence_threshold=0.8, do_sample=True,
                                    temperature=0.7, top_k=5, ngram_lookup_tokens=3, ngram_max_size=2,
                                    ngram_min_size=1, fast_verify_head=False)
    engine = BatchedSpeculativeGenerator(qwen, draft, config, max_batch_size=2, seed=4)
    assert (engine.policy.name, engine.policy.confidence_threshold) == ("threshold", 0.8)
    assert (engine.sampling.do_sample, engine.sampling.temperature, engine.sampling.top_k) == (True, 0.7, 5)
    assert (engine.ngram_lookup_tokens, engine.ngram_sizes, engine.fast_verify_head) == (3, (2, 1), False)
    assert engine.generation_config is not config  # the engine keeps its own copy
    first = engine.generate(PROMPTS, 8)
    again = BatchedSpeculativeGenerator(qwen, draft, config, max_batch_size=2, seed=4).generate(PROMPTS, 8)
    assert first == again  # seeded threshold sampling is bit-reproducible
    auto = DSparkGenerationConfig(ngram_lookup_tokens="auto")  # the shipped drafters' setting: up to one block
    assert BatchedSpeculativeGenerator(qwen, draft, auto).ngram_lookup_tokens == draft.config.block_size
    assert BatchedSpeculativeGenerator(qwen, draft).policy.name == "cost"  # auto, with a confidence head
    headless = tiny_drafter(qwen, enable_confidence_head=False)
    assert BatchedSpeculativeGenerator(qwen, headless).policy.name == "full"  # auto, without one


@pytest.mark.parametrize("old, new", [
    (dict(scheduler="full"), dict(verification_policy="full")),
    (dict(scheduler="threshold", confidence_threshold=0.8), dict(verification_policy="threshold",
                                                                confidence_threshold=0.8)),
    (dict(scheduler="full", ngram_lookup_tokens=3, ngram_max_size=2, ngram_min_size=1),
     dict(verification_policy="full", ngram_lookup_tokens=3, ngram_max_size=2, ngram_min_size=1)),
    (dict(scheduler="full", fast_verify_head=False), dict(verification_policy="full", fast_verify_head=False)),
])
def test_each_deprecated_constructor_argument_warns_and_decodes_the_same(models, old, new):
    qwen, draft = models
    prompts = PROMPTS + repetitive_prompts()[:1]
    with pytest.warns(FutureWarning) as caught:
        before = BatchedSpeculativeGenerator(qwen, draft, max_batch_size=3, **old)
    warned = " ".join(str(w.message) for w in caught)
    assert all(f"BatchedSpeculativeGenerator({name}=...) is deprecated" in warned for name in old)
    after = BatchedSpeculativeGenerator(qwen, draft, DSparkGenerationConfig(**new), max_batch_size=3)
    assert before.fast_verify_head == after.fast_verify_head
    assert before.generate(prompts, 12) == after.generate(prompts, 12)
    assert decoding_stats(before) == decoding_stats(after)


def test_the_old_positional_scheduler_and_the_algorithm1_name_warn_and_run_cost(models):
    qwen, draft = models
    with pytest.warns(FutureWarning, match=r"scheduler=\.\.\.\) is deprecated"):
        positional = BatchedSpeculativeGenerator(qwen, draft, "full", None, 3)
    assert positional.policy.name == "full" and positional.max_batch_size == 3
    cost = BatchedSpeculativeGenerator(qwen, draft, DSparkGenerationConfig(verification_policy="cost"),
                                       round_cost=synthetic_cost())
    with pytest.warns(FutureWarning, match="'algorithm1' is deprecated"):
        old = BatchedSpeculativeGenerator(qwen, draft, DSparkGenerationConfig(verification_policy="algorithm1"),
                                          round_cost=synthetic_cost())
    assert old.policy.name == old.scheduler == "cost"
    assert old.generate(PROMPTS, 10) == cost.generate(PROMPTS, 10)
    assert decoding_stats(old) == decoding_stats(cost)


def test_set_sampling_warns_and_samples_as_the_config_does(models):
    qwen, draft = models
    before = BatchedSpeculativeGenerator(qwen, draft, DSparkGenerationConfig(verification_policy="full"))
    with pytest.warns(FutureWarning, match=r"set_sampling\(\) is deprecated"):
        before.set_sampling(do_sample=True, temperature=0.7, top_k=5, seed=3)
    assert (before.generation_config.do_sample, before.generation_config.top_k) == (True, 5)
    config = DSparkGenerationConfig(verification_policy="full", do_sample=True, temperature=0.7, top_k=5)
    after = BatchedSpeculativeGenerator(qwen, draft, config, seed=3)
    assert before.generate(PROMPTS, 10) == after.generate(PROMPTS, 10)
    # generate's sampling arguments set the engine's sampling, as set_sampling did; a seed re-seeds
    assert before.generate(PROMPTS, 10, do_sample=True, temperature=0.7, top_k=5, seed=8) == after.generate(
        PROMPTS, 10, seed=8)
    greedy = BatchedSpeculativeGenerator(qwen, draft, DSparkGenerationConfig(verification_policy="full"))
    assert before.generate(PROMPTS, 10, do_sample=False) == greedy.generate(PROMPTS, 10)
    with pytest.raises(RuntimeError, match="while no request is in flight"):
        greedy.add_request([5, 6], 3)
        greedy.generate(PROMPTS, 2, do_sample=True)


def test_a_plain_transformers_generation_config_gives_its_sampling_settings(models):
    qwen, draft = models
    from transformers import GenerationConfig

    engine = BatchedSpeculativeGenerator(qwen, draft, GenerationConfig(do_sample=True, top_p=0.9))
    assert (engine.sampling.do_sample, engine.sampling.top_p, engine.policy.name) == (True, 0.9, "cost")
    with pytest.raises(DSparkConfigError, match="is not a GenerationConfig"):
        BatchedSpeculativeGenerator(qwen, draft, {"do_sample": True})
    with pytest.raises(TypeError, match="unexpected keyword argument 'schedulr'"):
        BatchedSpeculativeGenerator(qwen, draft, schedulr="full")
