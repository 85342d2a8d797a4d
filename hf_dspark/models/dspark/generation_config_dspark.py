"""The settings of DSpark decoding in ``generate``: defaults and checks (:class:`DSparkGenerationConfig`),
where a saved latency table applies, the registry of latency sources, and the per-call statistics.

Ships as remote code beside drafter checkpoints (imports: torch, transformers and its siblings only);
:mod:`generation_dspark` re-exports every name.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from transformers import GenerationConfig

from .errors import DSparkConfigError
from .policies_dspark import DEPRECATED_POLICY_NAMES, GENERATE, VERIFICATION_POLICY_MAPPING, policy_names
from .scheduling_dspark import check_ngram_settings, latency_points

POLICIES = tuple(policy_names(GENERATE))  # the policies generate runs (every name: policies_dspark.policy_names())

DEFAULT_DSPARK_GENERATION = {
    "verification_policy": "auto",
    "confidence_threshold": 0.3,
    "min_draft_tokens": 1,
    "latency_table": None,  # {"1": seconds, "2": seconds, ...}: T_verify(n tokens) of the target
    "latency_profile_key": None,  # where latency_table was measured: "model|dtype|device|threads=..|..."
    "fast_verify_head": True,  # skinny-product layout for the target's LM head during verification (CPU fp32)
    "fast_warpers": True,  # top-k followed by top-p: sort only the k survivors (same result, far cheaper over a large vocabulary)
    "ngram_lookup_tokens": 0,  # > 0: copy up to this many tokens after an earlier n-gram match; "auto": lengths from the cost curve
    "ngram_max_size": 3,  # longest suffix n-gram searched for
    "ngram_min_size": 2,  # shortest suffix n-gram accepted as a match
}


def check_dspark_generation_setting(name: str, value: Any) -> None:
    """Raise ``ValueError`` naming ``name`` when ``value`` is not a valid DSpark decoding setting.

    ``None`` means "the default" for every setting.
    """
    if value is None or name not in DEFAULT_DSPARK_GENERATION:
        return

    def integer(minimum: int) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= minimum

    fix = None
    if name == "verification_policy" and (
        not isinstance(value, str) or (value not in VERIFICATION_POLICY_MAPPING and value not in DEPRECATED_POLICY_NAMES)
    ):
        fix = f"choose one of {policy_names()}"
    elif name == "confidence_threshold" and (
        isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0
    ):
        fix = "use a prefix-survival probability in [0, 1]"
    elif name == "ngram_lookup_tokens" and not (integer(0) or value == "auto"):
        fix = 'use an integer >= 0 (0 = off) or "auto" (copy lengths from the latency curve)'
    elif name == "min_draft_tokens" and not integer(0):
        fix = "use an integer >= 0"
    elif name in ("ngram_max_size", "ngram_min_size") and not integer(1):
        fix = "use an integer >= 1"
    elif name in ("fast_verify_head", "fast_warpers") and not isinstance(value, bool):
        fix = "use true or false"
    elif name == "latency_profile_key" and not isinstance(value, str):
        fix = 'use the key of the profile the table came from (LatencyProfile.key, "model|dtype|device|..."), or None'
    elif name == "latency_table":
        try:
            points = latency_points(value) if isinstance(value, dict) else None
        except (TypeError, ValueError):
            points = None
        if not points or any(n < 1 or not math.isfinite(t) or t < 0 for n, t in points):
            fix = ('use {"tokens": seconds, ...} with tokens >= 1 and finite seconds >= 0, as '
                   "hf_dspark.profile_latency(target) measures it, or None")
    if fix is not None:
        raise DSparkConfigError(f"generation_config.{name}={value!r} is invalid: {fix}")


class DSparkGenerationConfig(GenerationConfig):
    """``GenerationConfig`` of a DSpark drafter: the DSpark decoding settings (``DEFAULT_DSPARK_GENERATION``)
    are checked when they are set, when the config is built or loaded, and when it is saved."""

    def __setattr__(self, name: str, value: Any) -> None:
        check_dspark_generation_setting(name, value)
        super().__setattr__(name, value)

    def validate(self, *args, **kwargs) -> None:
        super().validate(*args, **kwargs)
        for name in DEFAULT_DSPARK_GENERATION:
            check_dspark_generation_setting(name, getattr(self, name, None))
        sizes = [getattr(self, name, None) for name in ("ngram_lookup_tokens", "ngram_max_size", "ngram_min_size")]
        if None not in sizes and sizes[0] != "auto":
            check_ngram_settings(*sizes)


def default_dspark_generation_config(**overrides) -> DSparkGenerationConfig:
    settings = dict(DEFAULT_DSPARK_GENERATION)
    settings.update(overrides)
    return DSparkGenerationConfig(**settings)


# ----------------------------------------------------------------------------- where a latency table applies
_WARNED: set[str] = set()
# Where a generation finds the target's cost curve when the drafter carries none for this device and dtype:
# callables ``target_model -> {tokens: seconds} | None``. hf-dspark registers its latency-profile cache.
LATENCY_SOURCES: list = []


def warn_once(message: str) -> None:
    """``warnings.warn(message)`` the first time this process sees ``message`` (pointed at the caller's caller)."""
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, stacklevel=3)


def key_place(key: str | None) -> str:
    """``device_type/dtype`` of a ``LatencyProfile.key`` ("model|dtype|device|threads=..|ctx=..")."""
    parts = (key or "").split("|")
    if len(parts) < 3:
        return "an unknown setup"
    return f"{parts[2].split(':')[0]}/{parts[1]}"


def target_place(target_model) -> str:
    """``device_type/dtype`` where ``target_model`` computes its logits (its LM head, else its first parameter)."""
    head = target_model.get_output_embeddings() if hasattr(target_model, "get_output_embeddings") else None
    weight = next(iter(head.parameters()), None) if head is not None else None
    weight = weight if weight is not None else next(target_model.parameters())
    device = getattr(target_model, "device", weight.device)
    return f"{torch.device(device).type}/{str(weight.dtype).removeprefix('torch.')}"


def latency_table_fits(key: str | None, target_model) -> bool:
    """A table without a key (set by hand, or saved before keys were kept) is trusted as before."""
    return key is None or key_place(key) == target_place(target_model)


# ----------------------------------------------------------------------------- statistics
class DSparkGenerationStats(dict):
    """Per-call statistics (``draft.last_generation_stats``), a plain dict for easy JSON dumps."""

    def __init__(self, block_size: int):
        super().__init__(
            rounds=0,
            accepted_lengths=[],
            submitted_lengths=[],
            mean_accepted_length=0.0,
            position_attempted=[0] * block_size,
            position_accepted=[0] * block_size,
            draft_seconds=0.0,
            verify_seconds=0.0,
            prefill_seconds=0.0,
            policy=None,
            ngram_rounds=0,
            ngram_submitted=0,
            ngram_accepted=0,
            plain_rounds=0,
            extended_rounds=0,
            extension_submitted=0,
            extension_accepted=0,
        )

    def record_round(self, submitted: int, matches: int, ngram: bool = False, extension: int = 0,
                     plain: bool = False) -> None:
        """One verified round. Per-position acceptance counts drafted tokens only (n-gram rounds are
        counted in ``ngram_*``, n-gram continuations of a drafted block in ``extension_*``);
        ``mean_accepted_length`` covers every round."""
        matches = min(matches, submitted)
        if extension:
            self["extended_rounds"] += 1
            self["extension_submitted"] += extension
            self["extension_accepted"] += max(0, matches - (submitted - extension))
        self["rounds"] += 1
        self["submitted_lengths"].append(submitted)
        self["accepted_lengths"].append(matches + 1)
        self["mean_accepted_length"] = sum(self["accepted_lengths"]) / self["rounds"]
        if plain:  # the drafter was skipped: the target decoded one token
            self["plain_rounds"] += 1
            return
        if ngram:
            self["ngram_rounds"] += 1
            self["ngram_submitted"] += submitted
            self["ngram_accepted"] += matches
            return
        drafted = submitted - extension
        for j in range(min(matches + 1, drafted)):
            self["position_attempted"][j] += 1
        for j in range(min(matches, drafted)):
            self["position_accepted"][j] += 1
