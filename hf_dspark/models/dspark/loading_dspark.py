"""Loading a drafter folder or Hub repo: weight checksums, the load-time shape check, and the drafter's
decoding settings (``generation_config.json``).

This file ships as remote code next to drafter checkpoints: it imports only transformers and its
sibling files. :meth:`DSparkDraftModel.from_pretrained` (``modeling_dspark.py``) runs all three;
``hf_dspark.checkpoints`` (``load_drafter``, ``hf-dspark verify``, ``hf-dspark export``) uses them too.
"""

from __future__ import annotations

import hashlib
import json

from .errors import CheckpointError, CorruptFileError, DSparkConfigError
from .generation_config_dspark import DEFAULT_DSPARK_GENERATION, default_dspark_generation_config

# `hf-dspark export` records the sha256 of every weight file under this key of CARD_FILE; flipped
# bytes in a weight file load without any error otherwise (and quietly ruin acceptance).
CARD_FILE = "dspark_card.json"
CHECKSUMS_KEY = "weights_sha256"
HUB_KWARGS = ("cache_dir", "revision", "token", "local_files_only", "subfolder")


def hub_kwargs(kwargs: dict) -> dict:
    """The entries of ``from_pretrained`` keyword arguments that say where a file comes from (cache folder,
    revision, token, offline, subfolder), for ``cached_file`` and ``GenerationConfig.from_pretrained``."""
    return {k: kwargs[k] for k in HUB_KWARGS if k in kwargs}


def file_sha256(path, chunk_bytes: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def check_weight_checksums(name_or_path, **download_kwargs) -> dict[str, str]:
    """Compare each weight file of a drafter folder (or Hub repo) with the sha256 recorded in its
    ``dspark_card.json``; returns ``{file: sha256}`` of the files checked (empty when nothing is
    recorded). Raises ``CorruptFileError`` (a ``ValueError``) naming the file when one is missing or differs."""
    from transformers.utils import cached_file

    def locate(filename: str):
        return cached_file(name_or_path, filename, _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False, **download_kwargs)

    card = locate(CARD_FILE)
    if card is None:
        return {}
    try:
        with open(card, encoding="utf-8") as handle:
            recorded = json.load(handle).get(CHECKSUMS_KEY) or {}
    except (OSError, ValueError, AttributeError) as error:
        raise CorruptFileError(f"{name_or_path}: {CARD_FILE} cannot be read ({error}); export the drafter again") from error
    return check_recorded_sha256(name_or_path, recorded, locate, "is corrupt", "flipped or truncated bytes",
                                 "Download or export the drafter again; `hf-dspark verify DIR` checks a folder")


def check_recorded_sha256(name_or_path, recorded: dict[str, str], locate, changed: str, cause: str, fix: str) -> dict[str, str]:
    """Compare the files of ``recorded`` (``{file: sha256}`` from ``dspark_card.json``), found by ``locate(file)``
    (a path, or ``None`` when absent), with their record; returns ``recorded`` in name order. Raises
    ``CorruptFileError`` naming the first file missing or different: "``file`` ``changed``: its sha256 is ...
    (``cause``). ``fix``"."""
    for filename, expected in sorted(recorded.items()):
        path = locate(filename)
        if path is None:
            raise CorruptFileError(f"{name_or_path}: {filename} is missing, but {CARD_FILE} records its sha256. {fix}")
        found = file_sha256(path)
        if found != expected:
            raise CorruptFileError(f"{name_or_path}: {filename} {changed}: its sha256 is {found[:16]}..., but {CARD_FILE} "
                                   f"records {expected[:16]}... for it ({cause}). {fix}")
    return dict(sorted(recorded.items()))


def check_loading_info(name_or_path, info: dict) -> None:
    """Raise ``CheckpointError`` when ``from_pretrained``'s loading info lists missing tensors (other than
    private buffers) or mismatched shapes: transformers would re-initialise those weights silently."""
    missing = sorted(k for k in info.get("missing_keys", []) if not k.startswith("_"))
    mismatched = info.get("mismatched_keys", [])
    if missing or mismatched:
        raise CheckpointError(
            f"The checkpoint at {name_or_path} does not match its config: "
            f"missing tensors {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"mismatched shapes {list(mismatched)[:8]}. Check config.json (markov_rank, markov_head_type, "
            "draft_vocab_size, num_hidden_layers, embeddings_from_target) against model.safetensors."
        )


def load_dspark_generation_config(name_or_path, kwargs: dict | None = None):
    """The drafter's decoding settings from its ``generation_config.json`` (the defaults when there is
    none); ``kwargs``: the ``from_pretrained`` keyword arguments (only the Hub ones are used). Raises
    ``DSparkConfigError`` naming the folder for a file with an invalid setting."""
    from transformers import GenerationConfig

    try:
        loaded = GenerationConfig.from_pretrained(name_or_path, **hub_kwargs(kwargs or {}))
    except (OSError, ValueError):
        return default_dspark_generation_config()
    settings = {k: getattr(loaded, k) for k in DEFAULT_DSPARK_GENERATION if hasattr(loaded, k)}
    try:
        return default_dspark_generation_config(**settings)
    except ValueError as error:  # a hand-edited or foreign file: say which one
        raise DSparkConfigError(f"{name_or_path}: generation_config.json holds an invalid setting: {error}") from error


__all__ = [
    "CARD_FILE",
    "CHECKSUMS_KEY",
    "check_loading_info",
    "check_recorded_sha256",
    "check_weight_checksums",
    "file_sha256",
    "hub_kwargs",
    "load_dspark_generation_config",
]
