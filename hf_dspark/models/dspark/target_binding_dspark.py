"""A drafter and its target: the drafter's configuration derived from the target, the compatibility
check, and where a (possibly dispatched) target computes.

This file ships as remote code next to drafter checkpoints: it imports only torch, transformers and
its sibling files. :class:`DSparkDraftModel` (``modeling_dspark.py``) calls these from
``from_target``, ``check_target`` and ``bind_target``.
"""

from __future__ import annotations

import torch
from torch import nn

from .configuration_dspark import DSparkConfig
from .errors import DraftTargetMismatchError
from .modeling_dspark_gemma4 import gemma4_target_fields


def default_target_layer_ids(num_target_layers: int, num_layers: int = 5) -> list[int]:
    """Layers spread over the target's depth, skipping the first and the last two when possible."""
    if num_target_layers <= num_layers:
        return list(range(num_target_layers))
    start, end = 1, max(1, num_target_layers - 3)
    ids = sorted({round(start + i * (end - start) / (num_layers - 1)) for i in range(num_layers)})
    return ids


def target_rope_parameters(text_config) -> dict:
    """The drafter's ``rope_parameters`` from a target's text config: its RoPE base (the full-attention
    one when the target has one per layer type), default RoPE type."""
    rope = getattr(text_config, "rope_parameters", None)
    if isinstance(rope, dict):
        if "rope_theta" in rope:
            return {"rope_type": rope.get("rope_type", "default"), "rope_theta": float(rope["rope_theta"])}
        # per-layer-type dicts (e.g. Gemma 3): prefer full attention
        for key in ("full_attention", "sliding_attention"):
            if isinstance(rope.get(key), dict) and "rope_theta" in rope[key]:
                return {"rope_type": "default", "rope_theta": float(rope[key]["rope_theta"])}
    return {"rope_type": "default", "rope_theta": float(getattr(text_config, "rope_theta", 10000.0) or 10000.0)}


def drafter_config_from_target(target_model, tokenizer=None, **overrides) -> tuple[DSparkConfig, list[int] | None]:
    """The configuration of a fresh drafter for ``target_model`` and its draft vocabulary (target ids, or
    ``None`` for the whole vocabulary): hidden size, vocabulary, number of layers and attention geometry
    come from the target; ``overrides`` (any ``DSparkConfig`` field, or ``draft_token_ids``) win."""
    if getattr(target_model.config, "is_encoder_decoder", False):  # else generate() refuses it, misleadingly
        raise DraftTargetMismatchError(
            f"{type(target_model).__name__} is an encoder-decoder model; DSpark drafters are built for "
            "decoder-only causal language models (AutoModelForCausalLM targets such as Qwen3, Llama or Gemma).")
    tcfg = target_model.config.get_text_config()
    n_layers = tcfg.num_hidden_layers
    num_heads = getattr(tcfg, "num_attention_heads", 8)
    gemma4 = gemma4_target_fields(tcfg)
    if gemma4:  # per-layer geometry: reading tcfg.head_dim would raise
        head_dim, num_kv_heads = gemma4["head_dim"], gemma4["num_key_value_heads"]
    else:
        head_dim = getattr(tcfg, "head_dim", None) or tcfg.hidden_size // num_heads
        num_kv_heads = getattr(tcfg, "num_key_value_heads", num_heads) or num_heads
    mask_token_id = None
    if tokenizer is not None and getattr(tokenizer, "mask_token_id", None) is not None:
        mask_token_id = tokenizer.mask_token_id
    elif getattr(tcfg, "pad_token_id", None) is not None:
        mask_token_id = tcfg.pad_token_id
    if isinstance(mask_token_id, list):
        mask_token_id = mask_token_id[0]
    defaults = dict(
        vocab_size=tcfg.vocab_size,
        hidden_size=tcfg.hidden_size,
        target_hidden_size=tcfg.hidden_size,
        intermediate_size=getattr(tcfg, "intermediate_size", 4 * tcfg.hidden_size),
        num_hidden_layers=1,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        rms_norm_eps=getattr(tcfg, "rms_norm_eps", 1e-6),
        rope_parameters=target_rope_parameters(tcfg),
        max_position_embeddings=getattr(tcfg, "max_position_embeddings", 32768),
        target_layer_ids=default_target_layer_ids(n_layers),
        num_target_layers=n_layers,
        block_size=7,
        mask_token_id=mask_token_id if mask_token_id is not None else tcfg.vocab_size - 1,
        embeddings_from_target=True,
        context_input_norm=True,
        target_model_name=getattr(target_model.config, "name_or_path", None) or None,
        eos_token_id=getattr(tcfg, "eos_token_id", None),
        bos_token_id=getattr(tcfg, "bos_token_id", None),
        pad_token_id=getattr(tcfg, "pad_token_id", None),
    )
    if gemma4 and overrides.get("backbone_type", "gemma4") == "gemma4":
        # A Gemma 4 target gets DeepSpec's Gemma 4 drafter layers unless asked otherwise.
        defaults.update(gemma4)
    defaults.update(overrides)
    draft_token_ids = defaults.pop("draft_token_ids", None)
    if draft_token_ids is not None and not defaults.get("draft_vocab_size"):
        defaults["draft_vocab_size"] = len(draft_token_ids)
    return DSparkConfig(**defaults), draft_token_ids


def check_target_matches(config: DSparkConfig, target_model) -> None:
    """Raise ``DraftTargetMismatchError`` (a ``ValueError``) naming both sides when a drafter of ``config``
    was built for another target than ``target_model``."""
    tcfg = target_model.config.get_text_config()
    problems = []
    if tcfg.hidden_size != config.target_hidden_size:
        problems.append(f"hidden size: drafter expects {config.target_hidden_size}, target has {tcfg.hidden_size}")
    if tcfg.num_hidden_layers != config.num_target_layers:
        problems.append(
            f"number of layers: drafter expects {config.num_target_layers}, target has {tcfg.num_hidden_layers}"
        )
    if tcfg.vocab_size != config.vocab_size:
        problems.append(f"vocabulary: drafter expects {config.vocab_size}, target has {tcfg.vocab_size}")
    if not 0 <= config.mask_token_id < tcfg.vocab_size:
        problems.append(f"mask token {config.mask_token_id} is outside the target vocabulary ({tcfg.vocab_size})")
    if config.embeddings_from_target and tcfg.hidden_size != config.hidden_size:
        problems.append("the drafter borrows the target's embeddings, so its hidden size must equal the target's")
    if problems:
        name = config.target_model_name or "an unnamed target"
        raise DraftTargetMismatchError(
            f"This DSpark drafter (built for {name}) does not match the target "
            f"{getattr(target_model.config, 'name_or_path', '') or type(target_model).__name__}: "
            + "; ".join(problems)
            + ". Use a drafter trained for this target, or build one with DSparkDraftModel.from_target(target)."
        )


def execution_device(module: nn.Module | None) -> torch.device | None:
    """Where ``module`` computes: the execution device of the accelerate hook that dispatched it (its
    weights may then sit on ``meta`` or CPU until the forward), else the device of its first weight
    (``None`` for a module without weights)."""
    if module is None:
        return None
    hook = getattr(module, "_hf_hook", None)
    for candidate in [hook, *getattr(hook, "hooks", [])]:  # accelerate's SequentialHook holds several
        device = getattr(candidate, "execution_device", None)
        if device is not None:
            return torch.device(f"cuda:{device}" if isinstance(device, int) else device)
    weight = next(module.parameters(), None)
    return None if weight is None else weight.device


def on_meta_without_loader(module: nn.Module) -> bool:
    """Some weights on the meta device and no accelerate hook on their module that would load them for a forward."""
    return any(
        getattr(m, "_hf_hook", None) is None and any(p.is_meta for p in m.parameters(recurse=False))
        for m in module.modules()
    )


__all__ = [
    "check_target_matches",
    "default_target_layer_ids",
    "drafter_config_from_target",
    "execution_device",
    "on_meta_without_loader",
    "target_rope_parameters",
]
