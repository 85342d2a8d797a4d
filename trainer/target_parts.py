"""The parts of a target that cache-mode training uses: its config, input embedding and LM head.

With features read from a cache, the drafter only borrows the target's embedding table and LM head
(``DSparkDraftModel.bind_target``); the decoder layers never run. Loading the whole target on every
rank and moving it to the rank's GPU would cost the full model per GPU (an 8B target in fp32:
about 32 GB) for two matrices. :func:`load_target_parts` builds the target on the ``meta`` device
(no memory; buffers such as Gemma's embedding scale are still computed), reads only the embedding
and LM head tensors from the checkpoint's safetensors files, and returns them in a
:class:`TargetParts` module, which the trainer moves to the device.

When the checkpoint cannot be read that way (no safetensors files, or tensor names that differ
from the module names, as in multimodal checkpoints whose language model is renamed on load), the
target is loaded whole on the CPU, its two modules are kept and the rest is freed before anything
reaches the accelerator.
"""

from __future__ import annotations

import json
import logging

import torch
from torch import nn

from hf_dspark.errors import TargetLoadError

logger = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class TargetParts(nn.Module):
    """A target reduced to what a drafter borrows: ``config``, the input embedding and the LM head.

    It answers ``get_input_embeddings()`` / ``get_output_embeddings()`` like the full model, so
    ``DSparkDraftModel.from_target`` / ``bind_target`` and ``DSparkTrainer`` take it in place of the
    target. It cannot compute features: calling it raises, since cache-mode training never should.
    """

    def __init__(self, config, embed_tokens: nn.Module, lm_head: nn.Module):
        super().__init__()
        self.config = config
        self.embed_tokens = embed_tokens
        self.lm_head = lm_head

    def get_input_embeddings(self) -> nn.Module:
        return self.embed_tokens

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def forward(self, *args, **kwargs):
        raise TypeError(
            "TargetParts holds only the target's embedding and LM head (cache-mode training reads the target's "
            "features from the cache); load the whole target, e.g. with hf_dspark.targets.load_target, to run it."
        )


def _checkpoint_files(source: str) -> dict[str, str] | None:
    """Tensor name -> safetensors file path of a checkpoint (local folder or Hub id), or None without safetensors."""
    from transformers.utils import cached_file

    index = cached_file(source, INDEX_FILE, _raise_exceptions_for_missing_entries=False)
    if index is not None:
        with open(index, encoding="utf-8") as handle:
            return dict(json.load(handle)["weight_map"])  # shards are fetched when read: only the needed ones
    single = cached_file(source, SINGLE_FILE, _raise_exceptions_for_missing_entries=False)
    if single is None:
        return None
    from safetensors import safe_open

    with safe_open(single, framework="pt") as handle:
        return {key: SINGLE_FILE for key in handle.keys()}


def _read_tensors(source: str, files: dict[str, str], names: list[str]) -> dict[str, torch.Tensor]:
    from safetensors import safe_open
    from transformers.utils import cached_file

    by_file: dict[str, list[str]] = {}
    for name in names:
        by_file.setdefault(files[name], []).append(name)
    tensors = {}
    for file_name, keys in by_file.items():
        path = cached_file(source, file_name)
        with safe_open(path, framework="pt") as handle:
            tensors.update({key: handle.get_tensor(key) for key in keys})
    return tensors


def _module_names(model: nn.Module) -> dict[int, str]:
    return {id(module): name for name, module in model.named_modules()}


def _parts_from_checkpoint(source: str, config, dtype: torch.dtype) -> TargetParts | None:
    """Embedding and head read alone from the safetensors files; None when the checkpoint does not allow it."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():  # from_config would partition the skeleton over the ranks
        return None
    files = _checkpoint_files(source)
    if files is None:
        return None
    # Parameters on meta, buffers real: non-persistent buffers (Gemma's embed_scale) are not in the checkpoint.
    try:
        with init_empty_weights(include_buffers=False):
            skeleton = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except ValueError:  # not a causal LM: the full load raises the error that says so
        return None
    embedding, head = skeleton.get_input_embeddings(), skeleton.get_output_embeddings()
    if embedding is None or head is None:
        return None
    names = _module_names(skeleton)
    wanted = {}  # checkpoint key -> (module, parameter name)
    for module in (embedding, head):
        prefix = names[id(module)]
        for name, _ in module.named_parameters(recurse=True):
            wanted[f"{prefix}.{name}"] = (module, name)
    # A tied head is absent from the checkpoint: it shares the embedding's tensor.
    tied = bool(getattr(config.get_text_config(), "tie_word_embeddings", False)
                or getattr(config, "tie_word_embeddings", False))
    present = [key for key in wanted if key in files]
    missing = [key for key in wanted if key not in files]
    head_key = f"{names[id(head)]}.weight"
    if missing and not (tied and missing == [head_key]):
        logger.info("The checkpoint of %s names its tensors differently from the model (%s not found); loading "
                    "the whole target on the CPU to take its embedding and LM head.", source, ", ".join(missing))
        return None
    tensors = _read_tensors(source, files, present)
    for key in present:
        module, name = wanted[key]
        owner = module.get_submodule(name.rpartition(".")[0]) if "." in name else module
        owner._parameters[name.rpartition(".")[2]] = nn.Parameter(tensors[key].to(dtype), requires_grad=False)
    if tied and head_key not in present:
        head.weight = embedding.weight
    if any(p.is_meta for module in (embedding, head) for p in module.parameters()):
        return None  # a parameter the checkpoint does not hold under its module name
    return TargetParts(skeleton.config, embedding, head)


def load_target_parts(name_or_path: str, dtype: torch.dtype = torch.float32):
    """``(TargetParts, tokenizer)`` of a target: its config, input embedding and LM head, on the CPU in ``dtype``.

    Args:
        name_or_path: what ``hf_dspark.targets.load_target`` accepts (Hub id, local folder, built-in alias).
        dtype: dtype of the embedding and LM head.
    """
    from transformers import AutoConfig

    from hf_dspark import targets

    source = targets.resolve_target_source(str(name_or_path))
    parts = None
    try:
        config = AutoConfig.from_pretrained(source)
        parts = _parts_from_checkpoint(source, config, dtype)
        if parts is not None:
            tokenizer = targets.load_target_tokenizer(name_or_path)
    except OSError as error:  # the same message as a full load: missing folder, offline Hub, ...
        raise TargetLoadError(
            f"Could not load target {name_or_path!r}: {error}. Check the Hub id or folder (offline? pre-download "
            "it with `huggingface-cli download`)."
        ) from error
    if parts is None:
        model, tokenizer = targets.load_target(name_or_path, dtype=dtype)
        parts = TargetParts(model.config, model.get_input_embeddings(), model.get_output_embeddings())
        del model  # the decoder layers go with it
    parts.eval().requires_grad_(False)
    return parts, tokenizer


__all__ = ["TargetParts", "load_target_parts"]
