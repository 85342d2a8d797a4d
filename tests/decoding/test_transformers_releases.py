"""What differs between the supported transformers releases (5.24, 5.25), and the generate() calls
around the hook that each release must handle: the whole ``output_hidden_states`` output, a reused cache,
and (where the release verifies them) stateful targets."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers
from _models import tiny_drafter, tiny_qwen3_target
from transformers import DynamicCache
from transformers.cache_utils import Cache
from transformers.generation.utils import GenerationMixin

import hf_dspark  # noqa: F401  (installs the hook)
from hf_dspark.errors import UnsupportedGenerationError, UnsupportedTransformersError
from hf_dspark.models.dspark import generate_hook_dspark, generation_dspark


@pytest.fixture(scope="module")
def qwen():
    return tiny_qwen3_target()


@pytest.fixture(scope="module")
def draft(qwen):
    return tiny_drafter(qwen)


def test_the_features_are_read_from_the_installed_release():
    features = generate_hook_dspark.assisted_decoding_features()
    assert features.recurrent_state_history == hasattr(Cache, "get_recurrent_states_to_keep")
    print(f"transformers {transformers.__version__}: {features}")


def test_the_pin_and_the_gate_agree():
    import pathlib
    import tomllib

    pyproject = tomllib.loads((pathlib.Path(__file__).parents[2] / "pyproject.toml").read_text())
    low, high = generate_hook_dspark.SUPPORTED_TRANSFORMERS
    pin = next(d for d in pyproject["project"]["dependencies"] if d.startswith("transformers"))
    assert pin == f"transformers>={low.rsplit('.', 1)[0]},<{high.rsplit('.', 1)[0]}", pin
    assert generate_hook_dspark.transformers_supported("5.24.0")
    assert generate_hook_dspark.transformers_supported("5.25.3")
    assert not generate_hook_dspark.transformers_supported("5.23.1")
    assert not generate_hook_dspark.transformers_supported("5.26.0")
    assert generate_hook_dspark.transformers_supported(transformers.__version__)


def test_a_later_release_gets_the_one_line_error_naming_the_range(monkeypatch):
    original = GenerationMixin._get_candidate_generator._dspark_original
    monkeypatch.setattr(GenerationMixin, "_get_candidate_generator", original)
    # the module generate_hook_dspark holds: transformers' lazy import machinery can swap sys.modules["transformers"]
    monkeypatch.setattr(generate_hook_dspark.transformers, "__version__", "5.26.0")
    with pytest.raises(UnsupportedTransformersError, match=r"transformers>=5\.24\.0,<5\.26\.0.*found 5\.26\.0"):
        generate_hook_dspark.install_generate_hook()
    assert GenerationMixin._get_candidate_generator is original


def test_the_generator_says_how_many_tokens_a_round_may_propose(qwen, draft):
    ids = torch.tensor([[5, 6, 7, 8]])
    draft.generation_config.ngram_lookup_tokens = 0
    seen = []
    original = generation_dspark.DSparkCandidateGenerator.get_candidates

    def spy(self, *args, **kwargs):
        seen.append(self.num_drafting_tokens)
        candidates, logits = original(self, *args, **kwargs)
        assert candidates.shape[1] - args[0].shape[1] <= self.num_drafting_tokens
        return candidates, logits

    generation_dspark.DSparkCandidateGenerator.get_candidates = spy
    try:
        qwen.generate(ids, max_new_tokens=12, do_sample=False, assistant_model=draft)
        draft.generation_config.ngram_lookup_tokens = 11
        qwen.generate(ids, max_new_tokens=12, do_sample=False, assistant_model=draft)
    finally:
        generation_dspark.DSparkCandidateGenerator.get_candidates = original
        draft.generation_config.ngram_lookup_tokens = 0
    assert set(seen) == {draft.config.block_size, max(draft.config.block_size, 11)}, seen


@pytest.mark.parametrize("do_sample", [False, True])
def test_output_hidden_states_returns_what_plain_generate_returns(qwen, draft, do_sample):
    ids = torch.tensor([[5, 9, 14, 3, 22]])
    kwargs = dict(max_new_tokens=9, do_sample=do_sample, return_dict_in_generate=True, output_hidden_states=True)
    torch.manual_seed(3)
    plain = qwen.generate(ids, **kwargs)
    torch.manual_seed(3)
    spec = qwen.generate(ids, assistant_model=draft, **kwargs)
    if not do_sample:
        assert torch.equal(plain.sequences, spec.sequences)
    steps = spec.sequences.shape[1] - ids.shape[1]
    assert len(spec.hidden_states) == steps
    layers = qwen.config.num_hidden_layers + 1
    assert all(len(step) == layers and all(h is not None for h in step) for step in spec.hidden_states)
    if not do_sample:
        # the prompt's states, then one position per new token, equal to plain generate's to rounding
        for mine, theirs in zip(spec.hidden_states, plain.hidden_states):
            for a, b in zip(mine, theirs):
                assert a.shape == b.shape
                torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_a_reused_cache_is_refused_with_the_fix(qwen, draft):
    ids = torch.tensor([[5, 9, 14, 3, 22]])
    first = qwen.generate(ids, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    cache = first.past_key_values
    assert cache.get_seq_length() > 0
    follow_up = torch.cat([first.sequences, torch.tensor([[7, 8]])], dim=1)
    with pytest.raises(UnsupportedGenerationError, match="without past_key_values"):
        qwen.generate(follow_up, cache=cache, max_new_tokens=4, do_sample=False, assistant_model=draft)
    # an empty cache passed in is a fresh one: allowed, and exact
    plain = qwen.generate(follow_up, max_new_tokens=6, do_sample=False)
    spec = qwen.generate(follow_up, cache=DynamicCache(), max_new_tokens=6, do_sample=False,
                         assistant_model=draft)
    assert torch.equal(plain, spec)


def tiny_hybrid_target():
    """A Qwen3.5-style target (linear-attention and attention layers), where the release has one."""
    config_class = getattr(transformers, "Qwen3_5TextConfig", None)
    if config_class is None:
        return None
    config = config_class(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, linear_num_value_heads=4,
                          linear_num_key_heads=2, linear_key_head_dim=16, linear_value_head_dim=16,
                          layer_types=["linear_attention", "full_attention"] * 2)
    torch.manual_seed(0)
    model = transformers.Qwen3_5ForCausalLM(config).eval()
    for parameter in model.parameters():
        torch.nn.init.normal_(parameter, std=0.3)
    return model


def test_stateful_targets_are_refused_on_every_release():
    target = tiny_hybrid_target()
    assert target is not None, "transformers >= 5.24 ships Qwen3.5"
    assert generate_hook_dspark.is_stateful_target(target)
    draft = tiny_drafter(target)
    ids = torch.tensor([[5, 9, 14, 3, 22, 40]])
    with pytest.raises(UnsupportedGenerationError, match="recurrent"):
        target.generate(ids, max_new_tokens=8, do_sample=False, assistant_model=draft)
    if generate_hook_dspark.assisted_decoding_features().recurrent_state_history:
        # why: where the release runs assisted decoding on such a target, its own prompt lookup is not exact
        plain = target.generate(ids, max_new_tokens=30, do_sample=False)
        lookup = target.generate(ids, max_new_tokens=30, do_sample=False, prompt_lookup_num_tokens=4)
        assert not torch.equal(plain, lookup), "transformers' assisted decoding became exact here: revisit the refusal"


def test_attention_only_targets_are_not_stateful(qwen):
    assert not generate_hook_dspark.is_stateful_target(qwen)


# ----------------------------------------------------------------------------- remote code across releases
LAST_COMMIT_BEFORE_5_25 = "505beefb8619bee173933d2331c97c55c329dec0"  # remote code gated to transformers <5.25


def _run_without_hf_dspark(script: str, root, modules) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(modules), PYTHONPATH="", OMP_NUM_THREADS="1")
    prelude = 'import sys\nsys.modules["hf_dspark"] = None  # any import of hf_dspark now fails\n'
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(script)], capture_output=True, text=True,
                          cwd=root, env=env)


GENERATE_SCRIPT = """
    import torch
    from transformers import AutoModel, AutoModelForCausalLM
    target = AutoModelForCausalLM.from_pretrained({target!r}).eval()
    draft = AutoModel.from_pretrained({draft!r}, trust_remote_code=True).eval()
    assert type(draft).__module__.startswith("transformers_modules"), type(draft).__module__
    ids = torch.tensor([[5, 9, 14, 3, 22, 40, 41]])
    plain = target.generate(ids, max_new_tokens=12, do_sample=False)
    spec = target.generate(ids, max_new_tokens=12, do_sample=False, assistant_model=draft)
    assert torch.equal(plain, spec), (plain, spec)
    print("EXACT", draft.last_generation_stats["rounds"])
"""


def test_drafters_exported_before_and_after_5_25_support_on_this_release(tmp_path, qwen, draft):
    """A new export drafts exactly with transformers alone; an export whose remote code predates 5.25 support
    does so on 5.24, refuses 5.25 with the one-line error naming the range, and drafts exactly once its code
    files are rewritten (``write_remote_code``: what ``hf-dspark export`` does) or through hf_dspark."""
    from hf_dspark.checkpoints.export import REMOTE_CODE_FILES, export_drafter, write_remote_code

    repository = Path(__file__).resolve().parents[2]
    qwen.save_pretrained(tmp_path / "target")
    draft.config.target_model_name = "tiny-qwen3"
    draft.save_pretrained(tmp_path / "draft")
    new = export_drafter(tmp_path / "draft", tmp_path / "new")
    old = tmp_path / "old"
    shutil.copytree(new, old)
    present = subprocess.run(["git", "cat-file", "-e", LAST_COMMIT_BEFORE_5_25], cwd=repository, capture_output=True)
    assert present.returncode == 0, "needs the repository history (not a shallow clone)"
    listed = subprocess.run(["git", "ls-tree", "--name-only", LAST_COMMIT_BEFORE_5_25, "hf_dspark/models/dspark/"],
                            cwd=repository, capture_output=True, text=True, check=True).stdout.split()
    for name in REMOTE_CODE_FILES:  # the old export: that commit's files, none of the ones added since
        (old / name).unlink()
        if f"hf_dspark/models/dspark/{name}" in listed:
            (old / name).write_bytes(subprocess.run(
                ["git", "show", f"{LAST_COMMIT_BEFORE_5_25}:hf_dspark/models/dspark/{name}"],
                cwd=repository, capture_output=True, check=True).stdout)

    script = GENERATE_SCRIPT.format(target=str(tmp_path / "target"), draft=str(new))
    done = _run_without_hf_dspark(script, tmp_path, tmp_path / "modules_new")
    assert done.returncode == 0 and "EXACT" in done.stdout, done.stderr[-3000:]

    script = GENERATE_SCRIPT.format(target=str(tmp_path / "target"), draft=str(old))
    done = _run_without_hf_dspark(script, tmp_path, tmp_path / "modules_old")
    if generate_hook_dspark._version_tuple(transformers.__version__) < (5, 25):
        assert done.returncode == 0 and "EXACT" in done.stdout, done.stderr[-3000:]
    else:
        assert done.returncode != 0
        assert "UnsupportedTransformersError" in done.stderr and "<5.25.0" in done.stderr, done.stderr[-2000:]
        write_remote_code(old)
        done = _run_without_hf_dspark(script, tmp_path, tmp_path / "modules_old_refreshed")
        assert done.returncode == 0 and "EXACT" in done.stdout, done.stderr[-3000:]

    # with hf_dspark installed, the package's code drafts from the old export on every supported release
    loaded = hf_dspark.load_drafter(old, target=qwen)
    ids = torch.tensor([[5, 9, 14, 3, 22, 40, 41]])
    assert torch.equal(qwen.generate(ids, max_new_tokens=12, do_sample=False),
                       qwen.generate(ids, max_new_tokens=12, do_sample=False, assistant_model=loaded))


# ----------------------------------------------------------------------------- latency tables follow their device
def test_a_latency_table_from_another_device_or_dtype_is_not_applied(qwen, draft):
    from hf_dspark.models.dspark.generation_dspark import latency_table_fits

    table = {"1": 0.010, "4": 0.012, "8": 0.020}
    ids = torch.tensor([[5, 9, 14, 3, 22]])
    draft.generation_config.verification_policy = "auto"
    draft.generation_config.latency_table = table
    try:
        draft.generation_config.latency_profile_key = "tiny|float32|cpu|threads=1|ctx=128"
        assert latency_table_fits(draft.generation_config.latency_profile_key, qwen)
        qwen.generate(ids, max_new_tokens=6, do_sample=False, assistant_model=draft)
        assert draft.last_generation_stats["policy"] == "cost"
        draft.generation_config.latency_profile_key = "tiny|bfloat16|cuda:0|threads=1|ctx=128"
        assert not latency_table_fits(draft.generation_config.latency_profile_key, qwen)
        with pytest.warns(UserWarning, match=r"measured on cuda/bfloat16, but the target runs on cpu/float32"):
            plain = qwen.generate(ids, max_new_tokens=6, do_sample=False)
            spec = qwen.generate(ids, max_new_tokens=6, do_sample=False, assistant_model=draft)
        assert torch.equal(plain, spec)
        assert draft.last_generation_stats["policy"] == "full"
        draft.generation_config.latency_profile_key = None  # a table without a key is trusted, as before
        qwen.generate(ids, max_new_tokens=6, do_sample=False, assistant_model=draft)
        assert draft.last_generation_stats["policy"] == "cost"
    finally:
        draft.generation_config.latency_table = None
        draft.generation_config.latency_profile_key = None


def test_the_profile_key_survives_save_and_load(tmp_path, qwen, draft):
    draft.generation_config.latency_table = {"1": 0.01, "8": 0.02}
    draft.generation_config.latency_profile_key = "tiny|float32|cpu|threads=2|ctx=128"
    try:
        draft.save_pretrained(tmp_path)
        loaded = hf_dspark.DSparkDraftModel.from_pretrained(tmp_path)
        assert loaded.generation_config.latency_profile_key == "tiny|float32|cpu|threads=2|ctx=128"
    finally:
        draft.generation_config.latency_table = None
        draft.generation_config.latency_profile_key = None
