"""The hook into transformers' ``generate`` and the transformers releases it supports.

Ships as remote code next to drafter checkpoints, like :mod:`generation_dspark` (imports: torch,
transformers and its siblings only).

transformers has no public registry of candidate generators. This module owns the one place
where hf-dspark touches transformers' private internals:

    ``transformers.generation.utils.GenerationMixin._get_candidate_generator``

It is wrapped (once, idempotently) so that a DSpark drafter passed as ``assistant_model`` gets a
:class:`~generation_dspark.DSparkCandidateGenerator` (or the class the drafter names in
``candidate_generator_class``); every other assistant goes to the original method unchanged.
``GenerationMixin._validate_generation_mode`` (``CHECKED_INTERNAL``), which runs earlier, is
wrapped only to run the drafter's own target check first, so that a drafter built for another
target reports that (vocabulary, hidden size, layers) rather than transformers' advice about
different tokenizers; it then calls the original unchanged. The module function
``transformers.generation.utils._speculative_sampling`` (``SAMPLING_INTERNAL``) is wrapped so that the
rounds a DSpark generator prepared on the warpers' support (a placeholder as candidate logits,
:mod:`sampling_dspark`) are drawn there; every other call, DSpark's full-vocabulary rounds included,
goes to the original unchanged.
The wrappers are installed for the transformers range in ``SUPPORTED_TRANSFORMERS`` only and
refuses clearly otherwise; ``tests/decoding/test_generate_hook.py`` fails if an internal's signature
or the ``CandidateGenerator`` model-outputs protocol changes. What differs between the supported
releases is read from the installed release (:func:`assisted_decoding_features`), and any other read
of a transformers private attribute goes through a public function here
(:func:`attention_implementation`), so the rest of hf-dspark uses transformers' public API only.

Who installs the hook: importing ``hf_dspark`` (``hf_dspark/__init__.py`` calls
:func:`install_generate_hook`), or, for a drafter loaded with ``trust_remote_code=True`` where
hf_dspark is not installed, the remote-code ``modeling_dspark.py`` when it is imported. Nothing
else rebinds transformers functions.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import transformers
from transformers.generation.utils import GenerationMixin

from .errors import UnsupportedGenerationError, UnsupportedTransformersError

SUPPORTED_TRANSFORMERS = ("5.24.0", "5.26.0")  # [min, max) tested range: 5.24.x and 5.25.x
HOOKED_INTERNAL = "transformers.generation.utils.GenerationMixin._get_candidate_generator"
CHECKED_INTERNAL = "transformers.generation.utils.GenerationMixin._validate_generation_mode"
CHECKED_INTERNAL_PARAMETERS = ["self", "generation_mode", "generation_config", "generation_mode_kwargs"]
SAMPLING_INTERNAL = "transformers.generation.utils._speculative_sampling"
SAMPLING_INTERNAL_PARAMETERS = ["candidate_input_ids", "candidate_logits", "candidate_length", "new_logits",
                                "assistant_ensemble_weight"]


# ----------------------------------------------------------------------------- supported releases
# Every difference between the supported transformers releases that hf-dspark depends on is decided
# here, from what the installed release offers, never from its version string (the version only gates
# the hook as a whole, in ``transformers_supported``).
@dataclasses.dataclass(frozen=True)
class AssistedDecodingFeatures:
    """What the installed transformers' assisted decoding offers, read once when the hook is installed.

    ``recurrent_state_history``: caches keep the recurrent states of the last tokens a candidate
    generator may propose (``Cache.get_recurrent_states_to_keep``, 5.25). Then ``_assisted_decoding``
    sizes that history from ``candidate_generator.num_drafting_tokens`` and verifies stateful
    (linear-attention or hybrid) targets; without it transformers refuses those targets.
    """

    recurrent_state_history: bool

    @property
    def assisted_decoding_protocol(self) -> tuple[str, ...]:
        """Phrases of ``GenerationMixin._assisted_decoding`` the candidate generator relies on (tested)."""
        # the last three: sampling on the support empties the processor list and hands a placeholder as
        # candidate logits, so it needs the loop to skip an empty list and to call _speculative_sampling for it
        common = ("model_outputs=outputs", "is_first_iteration=", "n_last_matches=",
                  "candidate_generator.model_kwargs_overrides", "if len(logits_processor) > 0:",
                  "if do_sample and candidate_logits is not None:", "_speculative_sampling(")
        if self.recurrent_state_history:
            return common + ("candidate_generator.num_drafting_tokens",)
        return common + ("cache.activate_past_recording()",)


@functools.lru_cache(maxsize=1)
def assisted_decoding_features() -> AssistedDecodingFeatures:
    from transformers.cache_utils import Cache

    return AssistedDecodingFeatures(recurrent_state_history=hasattr(Cache, "get_recurrent_states_to_keep"))


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def transformers_supported(version: str | None = None) -> bool:
    v = _version_tuple(version or transformers.__version__)
    return _version_tuple(SUPPORTED_TRANSFORMERS[0]) <= v < _version_tuple(SUPPORTED_TRANSFORMERS[1])


def is_dspark_drafter(model: Any) -> bool:
    """Duck-typed so that drafters loaded from remote code (a different class object) qualify."""
    return bool(getattr(model, "is_dspark_drafter", False))


def attention_implementation(config) -> str | None:
    """The attention implementation a model's config names (``"sdpa"``, ``"eager"``, ...; ``None`` when unset).

    transformers has no public reader for it (its models read ``config._attn_implementation``); this is the
    one place hf-dspark reads it, so a rename in transformers is fixed here."""
    return getattr(config, "_attn_implementation", None)


# ----------------------------------------------------------------------------- the hook
HOOKED_INTERNAL_PARAMETERS = [
    "self",
    "generation_config",
    "input_ids",
    "inputs_tensor",
    "logits_processor",
    "model_kwargs",
    "assistant_model",
    "target_tokenizer",
    "assistant_tokenizer",
]


def _check_internal_signature(method, name: str = HOOKED_INTERNAL, expected=HOOKED_INTERNAL_PARAMETERS) -> None:
    import inspect

    found = list(inspect.signature(method).parameters)
    if found != expected:
        raise RuntimeError(
            f"hf-dspark hooks {name} but its signature changed: expected {expected}, found {found}. "
            f"Use transformers>={SUPPORTED_TRANSFORMERS[0]},<{SUPPORTED_TRANSFORMERS[1]}."
        )


def _install_target_check() -> None:
    """Wrap ``_validate_generation_mode`` so a DSpark drafter's own target check runs before it."""
    current = GenerationMixin._validate_generation_mode
    if getattr(current, "_dspark_hook", False):
        return
    _check_internal_signature(current, CHECKED_INTERNAL, CHECKED_INTERNAL_PARAMETERS)
    original = current

    @functools.wraps(original)
    def _validate_generation_mode(self, generation_mode, generation_config, generation_mode_kwargs):
        assistant = (generation_mode_kwargs or {}).get("assistant_model")
        if assistant is not None and is_dspark_drafter(assistant):
            assistant.check_target(self)
            refuse_stateful_target(self)
        return original(self, generation_mode, generation_config, generation_mode_kwargs)

    _validate_generation_mode._dspark_hook = True
    _validate_generation_mode._dspark_original = original
    GenerationMixin._validate_generation_mode = _validate_generation_mode


_STATEFUL_LAYER_TYPES = ("linear_attention", "mamba", "mamba2", "recurrent", "conv")


def is_stateful_target(model) -> bool:
    """A target whose cache holds recurrent (linear-attention, state-space) states besides keys and values."""
    if getattr(model, "_is_stateful", False):
        return True
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layer_types = getattr(text, "layer_types", None) or ()
    return any(str(kind) in _STATEFUL_LAYER_TYPES for kind in layer_types)


def refuse_stateful_target(model, where: str = "generate(assistant_model=<DSpark drafter>)") -> None:
    """Speculative decoding rolls a rejected suffix back, which a recurrent state cannot do exactly.

    transformers 5.25 lets assisted decoding run on such targets (keeping a history of recurrent
    states), but on them its own prompt lookup already departs from plain greedy ``generate``
    (``tests/decoding/test_transformers_releases.py`` keeps the evidence), so DSpark refuses them on every
    supported release rather than return other tokens than the target alone would.
    """
    if is_stateful_target(model):
        raise UnsupportedGenerationError(
            f"{where}: the target {type(model).__name__} has recurrent (linear-attention or state-space) layers, "
            "and speculative decoding cannot roll their state back exactly, so the output would differ from plain "
            "generate. Decode it without the drafter (plain generate), or use a target with attention layers only."
        )


def _refuse_reused_cache(model_kwargs: dict | None) -> None:
    """A cache carried over from an earlier ``generate`` (multi-turn chat) holds the target's keys and
    values but not the hidden states the drafter drafts from, and transformers' assisted decoding does
    not reproduce plain ``generate`` from a reused cache (prompt lookup differs the same way)."""
    kwargs = model_kwargs or {}
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is None or not hasattr(cache, "get_seq_length"):
        return
    cached = int(cache.get_seq_length())
    if cached > 0:
        raise UnsupportedGenerationError(
            f"generate(assistant_model=<DSpark drafter>) got a cache that already holds {cached} tokens (a "
            "past_key_values reused from an earlier call); speculative decoding from it would not reproduce plain "
            "generate. Pass the whole conversation as input_ids without past_key_values, or decode this turn "
            "without the drafter."
        )


def _install_support_sampling() -> None:
    """Route transformers' speculative-sampling draw to :func:`sampling_dspark.speculative_sample` for the rounds
    a DSpark generator prepared on the warpers' support (its placeholder candidate logits, see
    :mod:`sampling_dspark`); every other call, DSpark's full-vocabulary rounds included, goes to the original."""
    from transformers.generation import utils as generation_utils

    from .sampling_dspark import speculative_sample, take_round

    current = generation_utils._speculative_sampling
    if getattr(current, "_dspark_hook", False):
        return
    _check_internal_signature(current, SAMPLING_INTERNAL, SAMPLING_INTERNAL_PARAMETERS)
    original = current

    @functools.wraps(original)
    def _speculative_sampling(candidate_input_ids, candidate_logits, candidate_length, new_logits,
                              assistant_ensemble_weight=None):
        prepared = take_round(candidate_logits)
        if prepared is None:
            return original(candidate_input_ids, candidate_logits, candidate_length, new_logits,
                            assistant_ensemble_weight=assistant_ensemble_weight)
        proposed = candidate_input_ids[0, candidate_input_ids.shape[1] - candidate_length:]
        tokens, accepted = speculative_sample(proposed, prepared.proposal, new_logits[0], prepared.warp)
        return tokens[None].to(candidate_input_ids.device), accepted

    _speculative_sampling._dspark_hook = True
    _speculative_sampling._dspark_original = original
    generation_utils._speculative_sampling = _speculative_sampling


def install_generate_hook() -> bool:
    """Wrap ``GenerationMixin._get_candidate_generator`` once. Returns True when (already) installed.

    Raises ``UnsupportedTransformersError`` (a ``RuntimeError``) on an unsupported transformers
    version so that nothing half-works.
    """
    current = GenerationMixin._get_candidate_generator
    if getattr(current, "_dspark_hook", False):
        _install_target_check()
        _install_support_sampling()
        return True
    if not transformers_supported():
        raise UnsupportedTransformersError(
            f"hf-dspark's generate() integration supports transformers>={SUPPORTED_TRANSFORMERS[0]},"
            f"<{SUPPORTED_TRANSFORMERS[1]} (it hooks {HOOKED_INTERNAL}); found {transformers.__version__}. "
            f"Install a supported version: pip install 'transformers>={SUPPORTED_TRANSFORMERS[0]},<{SUPPORTED_TRANSFORMERS[1]}'"
        )
    _check_internal_signature(current)
    _install_target_check()
    _install_support_sampling()
    original = current

    @functools.wraps(original)
    def _get_candidate_generator(self, generation_config, input_ids, inputs_tensor, logits_processor, model_kwargs,
                                 assistant_model=None, target_tokenizer=None, assistant_tokenizer=None):
        if assistant_model is not None and is_dspark_drafter(assistant_model):
            _refuse_reused_cache(model_kwargs)
            # Public extension point: a drafter may name the generator class (a DSparkCandidateGenerator
            # subclass taking the same arguments), e.g. the measuring oracle of `hf-dspark bench-oracle`.
            generator_class = getattr(assistant_model, "candidate_generator_class", None)
            if generator_class is None:
                # imported here: generation_dspark imports (and re-exports) this module
                from .generation_dspark import DSparkCandidateGenerator as generator_class
            return generator_class(
                target_model=self,
                assistant_model=assistant_model,
                generation_config=generation_config,
                logits_processor=logits_processor,
                input_ids=input_ids,
            )
        return original(self, generation_config, input_ids, inputs_tensor, logits_processor, model_kwargs,
                        assistant_model, target_tokenizer, assistant_tokenizer)

    _get_candidate_generator._dspark_hook = True
    _get_candidate_generator._dspark_original = original
    GenerationMixin._get_candidate_generator = _get_candidate_generator
    return True


__all__ = [
    "AssistedDecodingFeatures",
    "assisted_decoding_features",
    "attention_implementation",
    "transformers_supported",
    "is_dspark_drafter",
    "is_stateful_target",
    "refuse_stateful_target",
    "install_generate_hook",
    "HOOKED_INTERNAL",
    "HOOKED_INTERNAL_PARAMETERS",
    "CHECKED_INTERNAL",
    "CHECKED_INTERNAL_PARAMETERS",
    "SUPPORTED_TRANSFORMERS",
]
