"""Targets with random weights built from a config file: timing a real-size model without its weights.

A forward pass costs the same whatever the weights are, so a machine without Hub access can time a
Qwen3-4B-sized target from its shapes alone. The package ships the published shapes of some targets
under ``hf_dspark/assets/target_configs/`` (``qwen3-4b``, ``qwen3-8b``); any ``config.json``-style
file (with ``model_type``) works too.

The model is built on the ``meta`` device (no memory, no initialisation), materialised empty in
the requested dtype on the requested device, and initialised there by transformers' own
``_init_weights`` (which also recomputes the rotary buffers): an 8B target in bf16 on a GPU never
exists as an fp32 copy on the host.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from hf_dspark.errors import DSparkConfigError

__all__ = ["SHIPPED_TARGET_CONFIGS", "target_config_path", "random_target_from_config"]

_CONFIG_DIR = Path(__file__).resolve().parent / "assets" / "target_configs"
SHIPPED_TARGET_CONFIGS = tuple(sorted(p.stem for p in _CONFIG_DIR.glob("*.json")))


def target_config_path(name_or_path: str | os.PathLike) -> Path:
    """A shipped config name (``qwen3-4b``) or a path to a JSON config file."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    shipped = _CONFIG_DIR / f"{name_or_path}.json"
    if shipped.is_file():
        return shipped
    raise DSparkConfigError(
        f"--target-config {str(name_or_path)!r} is neither a JSON file nor a shipped config; "
        f"use a path or one of {', '.join(SHIPPED_TARGET_CONFIGS)}"
    )


def random_target_from_config(name_or_path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                              device: str | torch.device = "cpu", seed: int = 0,
                              attn_implementation: str = "sdpa"):
    """A causal LM with random weights and the shapes of ``name_or_path`` (see :func:`target_config_path`),
    in ``dtype`` on ``device``, in eval mode. Keys starting with ``_`` (comments) are ignored."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = target_config_path(name_or_path)
    settings = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(settings, dict) or "model_type" not in settings:
        raise DSparkConfigError(f"--target-config {path}: expected a JSON object with a 'model_type' field")
    settings = {k: v for k, v in settings.items() if not k.startswith("_")}
    settings.pop("architectures", None)
    model_type = settings.pop("model_type")
    try:
        config = AutoConfig.for_model(model_type, **settings)
    except (ValueError, KeyError, TypeError) as error:
        raise DSparkConfigError(f"--target-config {path}: {error}") from error
    config.name_or_path = f"random:{path.stem}"
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    model.to_empty(device=device)
    torch.manual_seed(seed)
    with torch.no_grad():
        model.init_weights()  # transformers' _init_weights for every module (rotary buffers included), then ties
    model.eval()
    generation = model.generation_config
    generation.do_sample = False
    for name in ("temperature", "top_p", "top_k"):
        setattr(generation, name, None)
    return model
