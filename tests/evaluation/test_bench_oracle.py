"""`hf-dspark bench-oracle` (issue 30 item 6): oracle proposals impose tau, the output stays plain's,
and a random-weight target built from a shipped JSON config has the published shapes."""

from __future__ import annotations

import json
import math

import pytest
import torch
from _models import tiny_drafter, tiny_qwen3_target

from hf_dspark.commands.bench_oracle import (
    RESULT_KEYS,
    OracleOutputMismatch,
    benchmark_oracle,
    check_outputs,
    oracle_engine,
    oracle_generate,
    plain_generate,
)
from hf_dspark.decoding.latency import profile_latency
from hf_dspark.decoding.oracle_proposals import (
    departure,
    greedy_continuation,
    oracle_block,
)
from hf_dspark.errors import DSparkConfigError

TINY_CONFIG = {"model_type": "qwen3", "hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 2,
               "num_key_value_heads": 1, "head_dim": 16, "intermediate_size": 64, "vocab_size": 128,
               "tie_word_embeddings": True, "rope_theta": 1000000, "max_position_embeddings": 512,
               "rms_norm_eps": 1e-6, "_comment": "ignored"}


def _prompts(n=4, length=6, vocab=96):
    return torch.randint(3, vocab, (n, length), generator=torch.Generator().manual_seed(1)).tolist()


def test_oracle_block_keeps_tau_minus_one_true_tokens_then_wrong_ones():
    reference = torch.tensor([[5, 6, 7, 8, -1, -1], [9, 10, 11, 12, 13, 14]])
    block = oracle_block(reference, torch.tensor([1, 2]), 4, tau=3, vocab_size=15)
    assert block.tolist() == [[6, 7, 9, 0],  # 8 + 1, then past the reference's end
                               [11, 12, 14, 0]]  # 13 + 1, then (14 + 1) mod 15


def test_every_mode_reaches_the_imposed_tau_with_plain_output(tmp_path):
    target = tiny_qwen3_target(seed=0)
    draft = tiny_drafter(target, seed=3, block_size=5)  # tau 6 = the whole block accepted plus one
    prompts = _prompts()
    profile = profile_latency(target, token_counts=[1, 6], batch_sizes=[1, 4], context_length=16, repeats=2,
                              cache_dir=tmp_path)
    out = benchmark_oracle(target, draft, prompts, 30, [2, 4, 6], batch_sizes=[1, 4], profile=profile,
                           progress=lambda line: None)
    rows = out["results"]
    assert {(r["mode"], r["batch_size"]) for r in rows} == {("generate", 1), ("engine", 1), ("engine", 4)}
    assert len(rows) == 9
    for row in rows:
        assert set(RESULT_KEYS) <= set(row), set(RESULT_KEYS) - set(row)
        # every round accepts tau - 1 drafts but the last of a prompt, which may have less room
        assert row["tau"] - 0.5 <= row["tau_measured"] <= row["tau"], row
        assert row["output_equals_plain"] is True
        for key in ("speedup", "ideal_speedup", "efficiency", "draft_ms", "verify_ms", "round_ms"):
            assert math.isfinite(row[key]) and row[key] > 0, (key, row)
        assert row["ideal_speedup"] == pytest.approx(
            row["tau"] * profile.verify_seconds(1, row["batch_size"]) / profile.verify_seconds(6, row["batch_size"]))
        assert row["round_ms"] == pytest.approx(row["draft_ms"] + row["verify_ms"] + row["oracle_ms"] + row["other_ms"])


def test_the_drafter_runs_every_round_and_its_policy_is_restored():
    target = tiny_qwen3_target(seed=0)
    draft = tiny_drafter(target, seed=3, block_size=5)
    draft.generation_config.verification_policy = "threshold"
    draft.generation_config.ngram_lookup_tokens = 5  # n-gram rounds would skip the drafter (repetitive output here)
    calls = []
    original = draft.sample_block

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    draft.sample_block = counting  # an instance attribute, removed below
    try:
        prompts = _prompts(2)
        references, _ = plain_generate(target, prompts, 20)
        run = oracle_generate(target, draft, prompts, references, 3, 20)
    finally:
        del draft.sample_block
    assert run["outputs"] == references
    assert len(calls) >= run["rounds"] > 0  # one drafted block per round (plus the warm-up's)
    assert draft.generation_config.verification_policy == "threshold"
    assert draft.generation_config.ngram_lookup_tokens == 5
    assert draft.candidate_generator_class is None


def test_departure_is_the_first_position_the_committed_tokens_leave_the_reference():
    assert departure([4, 5, 6], [4, 5, 6, 7]) is None
    assert departure([], [4]) is None
    assert departure([4, 9, 6], [4, 5, 6, 7]) == 1
    assert departure([4, 5, 6], [4, 5]) == 2  # ran past a reference that stopped


def _branched_references(target, prompts, references, at: int, vocab: int = 96):
    """What a bf16 near-tie does to the oracle: each reference takes another token at ``at`` and then
    follows the target's greedy continuation of that other prefix, which the run never commits."""
    branched = []
    for prompt, reference in zip(prompts, references):
        other = (reference[at] + 1) % vocab
        head = reference[:at] + [other]
        branched.append(head + greedy_continuation(target, prompt + head, len(reference) - len(head)))
    return branched


@pytest.mark.parametrize("mode", ["generate", "engine"])
def test_the_oracle_resynchronises_where_the_run_leaves_its_reference(mode):
    target = tiny_qwen3_target(seed=2)  # no EOS within 40 tokens of these prompts
    draft = tiny_drafter(target, seed=3, block_size=5)
    prompts = _prompts(2)
    references, _ = plain_generate(target, prompts, 40)
    assert all(len(r) == 40 for r in references)
    branched = _branched_references(target, prompts, references, at=6)
    # the branch is a different continuation from there on: without resynchronising tau would collapse
    assert all(sum(a == b for a, b in zip(r[7:], b[7:])) <= 10 for r, b in zip(references, branched))
    tau, memo = 4, {}
    if mode == "generate":
        run = oracle_generate(target, draft, prompts, branched, tau, 40, continuations=memo)
    else:
        run = oracle_engine(target, draft, prompts, branched, tau, 40, batch_size=2, continuations=memo)
    assert run["outputs"] == references  # verification keeps the target's own output (float32)
    # one short round per prompt at the branch (and possibly a short last one); otherwise tau - 1 drafts
    assert tau - 0.6 <= run["tau_measured"] <= tau, run["tau_measured"]
    assert run["resyncs"] == len(prompts)  # one departure per prompt, at the branch
    assert run["resync_seconds"] > 0
    # the memo holds each recomputed continuation: the plain continuation of the committed prefix
    for prompt, reference in zip(prompts, references):
        key = (tuple(prompt + reference[:7]), 40 - 7)
        assert memo[key] == reference[7:]


def test_without_a_departure_there_is_no_resync():
    target = tiny_qwen3_target(seed=0)
    draft = tiny_drafter(target, seed=3, block_size=5)
    prompts = _prompts(2)
    references, _ = plain_generate(target, prompts, 30)
    run = oracle_generate(target, draft, prompts, references, 4, 30)
    assert run["resyncs"] == 0 and run["resync_seconds"] == 0.0


def test_a_float32_output_that_differs_from_plain_fails_the_run():
    target = tiny_qwen3_target(seed=0)
    prompts = _prompts(1)
    references, _ = plain_generate(target, prompts, 8)
    wrong = [[(references[0][0] + 1) % 96] + references[0][1:]]
    with pytest.raises(OracleOutputMismatch, match="differs from plain generate"):
        check_outputs(target, prompts, references, wrong, "test")
    assert check_outputs(target, prompts, references, references, "test")["output_equals_plain"] is True


def test_tau_beyond_the_block_is_refused():
    target = tiny_qwen3_target(seed=0)
    draft = tiny_drafter(target, seed=3, block_size=3)
    with pytest.raises(DSparkConfigError, match="block_size"):
        benchmark_oracle(target, draft, _prompts(1), 8, [5], progress=lambda line: None)


def test_the_command_runs_on_a_random_target_from_a_json_config(tmp_path):
    from hf_dspark.cli import run_command

    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY_CONFIG))
    output = tmp_path / "oracle.json"
    assert run_command(["bench-oracle", "--target-config", str(config), "--draft-layers", "1", "--block-size", "4",
                        "--num-prompts", "2", "--prompt-length", "5", "--max-new-tokens", "12", "--tau", "2", "4",
                        "--batch-sizes", "1", "2", "--device", "cpu", "--profile-repeats", "1",
                        "--latency-cache-dir", str(tmp_path / "latency"), "--output", str(output)]) == 0
    data = json.loads(output.read_text())
    assert len(data["results"]) == 6
    assert all(set(RESULT_KEYS) <= set(row) and row["output_equals_plain"] for row in data["results"])
    assert {"cpu", "gpu", "torch", "transformers", "threads"} <= set(data["machine"])
    assert data["settings"]["target"] == "random:tiny" and data["settings"]["block_size"] == 4


def test_random_target_is_initialised_like_a_directly_built_one():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from hf_dspark.random_target import random_target_from_config

    model = random_target_from_config(_write(TINY_CONFIG), dtype=torch.bfloat16)
    settings = {k: v for k, v in TINY_CONFIG.items() if k not in ("model_type", "_comment")}
    direct = Qwen3ForCausalLM(Qwen3Config(**settings))
    assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in model.parameters())
    assert torch.equal(model.model.rotary_emb.inv_freq, direct.model.rotary_emb.inv_freq)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied, as configured
    assert 0.01 < model.model.layers[0].mlp.up_proj.weight.float().std().item() < 0.03  # initializer_range 0.02
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


@pytest.mark.parametrize("name, parameters, tied", [("qwen3-4b", 4.02e9, True), ("qwen3-8b", 8.19e9, False)])
def test_shipped_target_configs_have_the_published_shapes(name, parameters, tied):
    from transformers import AutoConfig, AutoModelForCausalLM

    from hf_dspark.random_target import target_config_path

    settings = json.loads(target_config_path(name).read_text())
    settings = {k: v for k, v in settings.items() if not k.startswith("_") and k != "architectures"}
    config = AutoConfig.for_model(settings.pop("model_type"), **settings)
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads, config.head_dim,
            config.vocab_size, config.tie_word_embeddings) == (36, 32, 8, 128, 151936, tied)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    count = sum(p.numel() for p in model.parameters())
    assert count == pytest.approx(parameters, rel=0.01)


def test_an_unknown_target_config_names_the_shipped_ones():
    from hf_dspark.random_target import target_config_path

    with pytest.raises(DSparkConfigError, match="qwen3-4b"):
        target_config_path("no-such-model")


def _write(settings) -> str:
    import tempfile

    handle = tempfile.NamedTemporaryFile("w", suffix=".json", delete=False)
    json.dump(settings, handle)
    handle.close()
    return handle.name
