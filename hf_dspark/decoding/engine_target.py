"""What the batched engine needs of its target: the whole model on one device, an attention
implementation that takes the engine's ragged 4-D masks, and attention layers only (full or sliding
window; recurrent layers cannot be rolled back per row)."""

from __future__ import annotations

from hf_dspark.errors import DevicePlacementError, DSparkConfigError

from hf_dspark.models.dspark.generate_hook_dspark import attention_implementation
from hf_dspark.models.dspark.policies_dspark import ENGINE, policy_names

SCHEDULERS = tuple(policy_names(ENGINE))  # deprecated: the registry (policies_dspark) is the one list of names
SUPPORTED_ATTENTION = ("sdpa", "eager")
SUPPORTED_LAYER_TYPES = ("full_attention", "sliding_attention")


def refuse_dispatched_target(target) -> None:
    """Raise ``DevicePlacementError`` for a target split over devices or offloaded by accelerate.

    The engine keeps per-row caches, masks and features on one device and builds them once per round;
    ``target.generate(assistant_model=draft)`` handles dispatched targets instead."""
    devices = {p.device for p in target.parameters()}
    if len(devices) > 1 or any(d.type == "meta" for d in devices):
        placement = getattr(target, "hf_device_map", None) or sorted(str(d) for d in devices)
        raise DevicePlacementError(
            f"the batched engine needs the whole target on one device, found {placement}; load it with "
            "device_map={'': 'cuda:0'} (or .to(device)), or use target.generate(assistant_model=draft), which "
            "supports split and offloaded targets"
        )


def attention_settings(target) -> tuple[bool, list[str] | None, int | None]:
    """``(boolean_mask, layer_types, sliding_window)`` of ``target`` for the engine's masks; raises
    ``DSparkConfigError`` naming the fix for an attention implementation or layer type it cannot serve."""
    text_config = target.config.get_text_config()
    implementation = attention_implementation(target.config) or "eager"
    if implementation not in SUPPORTED_ATTENTION:
        raise DSparkConfigError(
            f"the target uses attn_implementation={implementation!r}; the batched engine passes its own ragged "
            f"4-D masks, which need one of {SUPPORTED_ATTENTION}. Load the target with attn_implementation='sdpa'."
        )
    layer_types = getattr(text_config, "layer_types", None)
    layer_types = list(layer_types) if layer_types else None
    unknown = sorted(set(layer_types or ()) - set(SUPPORTED_LAYER_TYPES))
    if unknown:
        raise DSparkConfigError(
            f"the target has layer types {unknown}; the batched engine supports {SUPPORTED_LAYER_TYPES} only "
            "(use target.generate without a drafter for recurrent or linear-attention layers)"
        )
    window = getattr(text_config, "sliding_window", None)
    uses_window = "sliding_attention" in (layer_types or ()) or (layer_types is None and window)
    return implementation == "sdpa", layer_types, int(window) if uses_window and window else None


def check_engine_arguments(target, draft, max_batch_size: int) -> None:
    """Refuse, before anything is built, what ``BatchedSpeculativeGenerator`` cannot run; binds ``draft``
    (the decoding settings are checked by ``engine_config.engine_settings``)."""
    if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
        raise DSparkConfigError(f"max_batch_size={max_batch_size!r} must be an int >= 1")
    refuse_dispatched_target(target)
    draft.bind_target(target)
    device = next(target.parameters()).device
    draft_device = next(draft.parameters()).device
    if draft_device != device:
        raise DevicePlacementError(
            f"the drafter is on {draft_device} but the target is on {device}; move the drafter with "
            f"draft.to({str(device)!r})"
        )

