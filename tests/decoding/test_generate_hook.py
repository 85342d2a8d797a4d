"""The one runtime patch: the generate() hook (hf_dspark.models.dspark.generate_hook_dspark).

Fails loudly when the private transformers internals it wraps change signature, when the
``CandidateGenerator`` model-outputs protocol it relies on changes, or when the hook is installed
anywhere but importing ``hf_dspark`` (or the remote-code modeling file, outside the package).
"""

from __future__ import annotations

import inspect

import pytest
import transformers
from transformers.generation.candidate_generator import CandidateGenerator
from transformers.generation.utils import GenerationMixin

import hf_dspark
from hf_dspark.models.dspark import generate_hook_dspark, generation_dspark
from hf_dspark.errors import UnsupportedTransformersError
from hf_dspark.checkpoints.export import REMOTE_CODE_DIR


def test_importing_hf_dspark_installs_both_wrappers_over_the_expected_internals():
    for name, expected in (("_get_candidate_generator", generate_hook_dspark.HOOKED_INTERNAL_PARAMETERS),
                           ("_validate_generation_mode", generate_hook_dspark.CHECKED_INTERNAL_PARAMETERS)):
        installed = getattr(GenerationMixin, name)
        assert getattr(installed, "_dspark_hook", False), name
        generate_hook_dspark._check_internal_signature(installed._dspark_original, name, expected)
    assert hf_dspark.install_generate_hook() is True  # idempotent
    assert not hasattr(GenerationMixin._get_candidate_generator._dspark_original, "_dspark_hook")
    # and the speculative-sampling draw (sampling on the warpers' support), also once
    from transformers.generation import utils as generation_utils

    installed = generation_utils._speculative_sampling
    assert getattr(installed, "_dspark_hook", False)
    assert not hasattr(installed._dspark_original, "_dspark_hook")
    generate_hook_dspark._check_internal_signature(installed._dspark_original, generate_hook_dspark.SAMPLING_INTERNAL,
                                                   generate_hook_dspark.SAMPLING_INTERNAL_PARAMETERS)


def test_a_changed_internal_signature_is_refused():
    def changed(self, generation_config, input_ids, inputs_tensor, logits_processor, model_kwargs):
        return None

    with pytest.raises(RuntimeError, match="_get_candidate_generator but its signature changed"):
        generate_hook_dspark._check_internal_signature(changed)


def test_an_unsupported_transformers_is_refused_before_patching(monkeypatch):
    original = GenerationMixin._get_candidate_generator._dspark_original
    monkeypatch.setattr(GenerationMixin, "_get_candidate_generator", original)
    monkeypatch.setattr(generate_hook_dspark, "transformers_supported", lambda: False)
    with pytest.raises(UnsupportedTransformersError, match="supports transformers>="):
        generate_hook_dspark.install_generate_hook()
    assert GenerationMixin._get_candidate_generator is original


def test_the_candidate_generator_model_outputs_protocol_is_unchanged():
    # transformers' assisted loop hands the target's outputs to generators that ask for them,
    # and forwards their model_kwargs_overrides (output_hidden_states) to the target.
    assert "requires_model_outputs" in vars(CandidateGenerator)
    # what the installed release's assisted loop relies on (5.25 adds num_drafting_tokens): one list per
    # supported release, chosen by the release's features, so a change in either release fails here
    source = inspect.getsource(GenerationMixin._assisted_decoding)
    for needle in generate_hook_dspark.assisted_decoding_features().assisted_decoding_protocol:
        assert needle in source, f"transformers {transformers.__version__}' _assisted_decoding no longer has {needle}"
    parameters = inspect.signature(generation_dspark.DSparkCandidateGenerator.get_candidates).parameters
    assert {"model_kwargs", "model_outputs", "is_first_iteration", "n_last_matches"} <= set(parameters)


def test_the_hook_is_installed_in_two_documented_places_only():
    package = REMOTE_CODE_DIR.parents[1]  # hf_dspark/
    callers = {path.relative_to(package).as_posix() for path in package.rglob("*.py")
               if "install_generate_hook()" in path.read_text() and path.name != "generate_hook_dspark.py"}
    assert callers == {"__init__.py", "models/dspark/modeling_dspark.py"}, callers
    modeling = (REMOTE_CODE_DIR / "modeling_dspark.py").read_text()
    # inside the package, importing hf_dspark installs it; the file does so only as remote code
    assert 'if not __name__.startswith("hf_dspark."):\n' in modeling


def test_the_hook_names_stay_importable_from_generation_dspark():
    # the hook moved to generate_hook_dspark; code written against generation_dspark keeps working
    for name in generate_hook_dspark.__all__:
        assert getattr(generation_dspark, name) is getattr(generate_hook_dspark, name), name
    assert not hasattr(generation_dspark, "_check_internal_signature")  # private names stay in their module


def test_attention_implementation_reads_what_set_attn_implementation_sets():
    from _models import tiny_qwen3_target

    target = tiny_qwen3_target()
    target.set_attn_implementation("eager")
    assert generate_hook_dspark.attention_implementation(target.config) == "eager"
    target.set_attn_implementation("sdpa")
    assert generate_hook_dspark.attention_implementation(target.config) == "sdpa"
    assert generate_hook_dspark.attention_implementation(object()) is None  # unset: callers pick their default
