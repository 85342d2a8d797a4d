"""What the batched engine reads from its ``DSparkGenerationConfig``, and its deprecated arguments.

``BatchedSpeculativeGenerator(target, draft, generation_config=...)`` takes the decoding settings from one
:class:`~hf_dspark.models.dspark.generation_config_dspark.DSparkGenerationConfig`, the class that drives
``generate(assistant_model=drafter)`` through the drafter's ``generation_config``:

* sampling: ``do_sample``, ``temperature``, ``top_k``, ``top_p`` (unset: greedy, temperature 1, top-k and
  top-p off, as the engine's own defaults always were; ``generate`` fills unset fields with transformers'
  global defaults instead);
* ``verification_policy``: a name of the policy registry (:mod:`hf_dspark.models.dspark.policies_dspark`),
  ``auto`` by default (``cost`` with a confidence head, else ``full``);
* ``confidence_threshold``, ``min_draft_tokens`` (``threshold``), ``ngram_lookup_tokens``,
  ``ngram_max_size``, ``ngram_min_size``, ``fast_verify_head`` and ``fast_warpers``.

What only an engine has (``max_batch_size``, ``latency_profile``, ``round_cost``, ``skip_padding``, the
seed of its random generator) stays a constructor argument. The constructor arguments that used to carry
decoding settings (:data:`DEPRECATED_ENGINE_ARGUMENTS`) and ``set_sampling`` keep working for one release
with a ``FutureWarning``.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings

from transformers import GenerationConfig

from hf_dspark.decoding.batch_requests import SamplingSettings
from hf_dspark.errors import DSparkConfigError
from hf_dspark.models.dspark.generation_config_dspark import DEFAULT_DSPARK_GENERATION, DSparkGenerationConfig
from hf_dspark.models.dspark.policies_dspark import ENGINE, VerificationPolicy, verification_policy_class
from hf_dspark.models.dspark.scheduling_dspark import check_ngram_settings, fixed_ngram_tokens

__all__ = ["DEPRECATED_ENGINE_ARGUMENTS", "EngineSettings", "engine_generation_config", "engine_settings"]

# old constructor argument -> the DSparkGenerationConfig field that replaces it
DEPRECATED_ENGINE_ARGUMENTS = {
    "scheduler": "verification_policy",
    "confidence_threshold": "confidence_threshold",
    "fast_verify_head": "fast_verify_head",
    "ngram_lookup_tokens": "ngram_lookup_tokens",
    "ngram_max_size": "ngram_max_size",
    "ngram_min_size": "ngram_min_size",
}
SAMPLING_FIELDS = ("do_sample", "temperature", "top_k", "top_p")


def warn_deprecated(old: str, new: str, stacklevel: int = 3) -> None:
    warnings.warn(f"{old} is deprecated and will be removed in the next release; {new}", FutureWarning,
                  stacklevel=stacklevel + 1)


def engine_generation_config(generation_config: GenerationConfig | None, deprecated: dict) -> DSparkGenerationConfig:
    """The engine's own copy of ``generation_config`` (a default ``DSparkGenerationConfig`` when ``None``), with
    the deprecated constructor arguments in ``deprecated`` written into it (each with a ``FutureWarning``)."""
    if generation_config is None:
        config = DSparkGenerationConfig()
    elif isinstance(generation_config, DSparkGenerationConfig):
        config = copy.deepcopy(generation_config)
    elif isinstance(generation_config, GenerationConfig):  # e.g. target.generation_config: its sampling settings
        config = DSparkGenerationConfig(**{k: v for k, v in generation_config.to_diff_dict().items()
                                           if k != "transformers_version"})
    else:
        raise DSparkConfigError(
            f"generation_config={generation_config!r} is not a GenerationConfig; pass "
            "hf_dspark.DSparkGenerationConfig(verification_policy=..., do_sample=..., ...)"
        )
    for old, value in deprecated.items():
        field = DEPRECATED_ENGINE_ARGUMENTS.get(old)
        if field is None:
            raise TypeError(f"BatchedSpeculativeGenerator got an unexpected keyword argument {old!r}")
        warn_deprecated(f"BatchedSpeculativeGenerator({old}=...)",
                        f"pass generation_config=DSparkGenerationConfig({field}={value!r})", stacklevel=3)
        if old == "confidence_threshold" and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise DSparkConfigError(f"confidence_threshold={value!r} is invalid: use a value in [0, 1]")
        setattr(config, field, float(value) if old == "confidence_threshold" else value)
    return config


@dataclasses.dataclass
class EngineSettings:
    """The decoding settings the engine runs with, read once from its generation config."""

    policy: VerificationPolicy
    sampling: SamplingSettings
    ngram_lookup_tokens: int
    ngram_sizes: tuple[int, int]
    fast_verify_head: bool
    fast_warpers: bool


def setting(config: GenerationConfig, name: str):
    value = getattr(config, name, None)
    return DEFAULT_DSPARK_GENERATION[name] if value is None else value


def sampling_settings(config: GenerationConfig) -> SamplingSettings:
    """``do_sample``/``temperature``/``top_k``/``top_p`` of ``config``; unset fields are off (temperature 1)."""
    temperature = getattr(config, "temperature", None)
    return SamplingSettings(bool(getattr(config, "do_sample", None)), 1.0 if temperature is None else float(temperature),
                            getattr(config, "top_k", None), getattr(config, "top_p", None))


def engine_settings(config: GenerationConfig, draft, block_size: int) -> EngineSettings:
    """Resolve ``config`` for an engine serving ``draft``: the registry entry (``auto`` picks ``cost`` with a
    confidence head, ``full`` without), sampling, n-gram rounds (``"auto"``: up to one block, each copy as
    long as the plan gives it under ``cost``/``async``)."""
    has_head = getattr(draft, "confidence_head", None) is not None
    policy_class = verification_policy_class(setting(config, "verification_policy"), ENGINE)
    policy = policy_class(setting(config, "confidence_threshold"), setting(config, "min_draft_tokens"))
    policy = policy.resolve(ENGINE, cost_curve=False, confidence_head=has_head)
    if policy.needs_confidence_head and not has_head:
        raise DSparkConfigError(
            f"verification_policy={policy.name!r} needs a drafter with a confidence head "
            "(enable_confidence_head=True); use verification_policy='full' (or 'auto') with this drafter"
        )
    sizes = (int(setting(config, "ngram_max_size")), int(setting(config, "ngram_min_size")))
    lookup = fixed_ngram_tokens(setting(config, "ngram_lookup_tokens"), block_size)
    check_ngram_settings(lookup, *sizes)
    lookup = min(lookup, block_size) if policy.drafts else 0
    return EngineSettings(policy, sampling_settings(config), lookup, sizes, bool(setting(config, "fast_verify_head")),
                          bool(setting(config, "fast_warpers")))
