"""``hf-dspark verify DIR``: check a drafter folder's weight files before trusting them.

Flipped bytes in the data part of a ``.safetensors`` file load without any error: the drafter
stays lossless (the target verifies every token) but its acceptance collapses and nothing says
why. So ``hf-dspark export`` records the sha256 of every weight file in ``dspark_card.json``
(``"weights_sha256": {"model.safetensors": "<hex>"}``), ``DSparkDraftModel.from_pretrained``
checks it whenever it is present, ``hf-dspark push`` refuses to upload a folder that fails it,
and this command checks a folder on demand::

    hf-dspark verify out/                 # exit 0: every recorded checksum matches
    hf-dspark verify runs/drafter         # no record (a training output): parse + finite checks only

Besides the checksums, every tensor must parse and hold finite values.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from hf_dspark.errors import CheckpointError, CorruptFileError
from hf_dspark.models.dspark.loading_dspark import CARD_FILE, check_recorded_sha256, check_weight_checksums, file_sha256


def weight_files(folder: str | os.PathLike) -> list[Path]:
    """The ``.safetensors`` weight files of a drafter folder (one file, or the shards of an index)."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError) as error:
            raise CorruptFileError(f"{index} cannot be read ({error}); export the drafter again.") from error
        return [folder / name for name in names]
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    raise CheckpointError(f"{folder} holds no model.safetensors (or model.safetensors.index.json); nothing to verify.")


# dspark_card.json key: sha256 of the exported config.json / generation_config.json. Kept apart from the
# weights' checksums, which from_pretrained checks on every load: calibrating a drafter in place rewrites
# its config.json, and such a folder must keep loading (verify and push report it).
CONFIG_CHECKSUMS_KEY = "config_sha256"
CONFIG_FILES = ("config.json", "generation_config.json")


def config_checksums(folder: str | os.PathLike) -> dict[str, str]:
    """``{file name: sha256}`` of the config files present in ``folder``."""
    folder = Path(folder)
    return {name: file_sha256(folder / name) for name in CONFIG_FILES if (folder / name).is_file()}


def weight_checksums(folder: str | os.PathLike) -> dict[str, str]:
    """``{file name: sha256}`` of every weight file, as ``export`` records them in ``dspark_card.json``."""
    folder = Path(folder)
    return {path.relative_to(folder).as_posix(): file_sha256(path) for path in weight_files(folder)}


def verify_checksums(folder: str | os.PathLike) -> dict[str, str]:
    """Check the recorded sha256 of each weight file and config file; returns what was checked (empty:
    nothing recorded).

    Raises :class:`CorruptFileError` naming the file whose bytes changed (or that is missing).
    """
    try:
        checked = check_weight_checksums(str(folder))
    except ValueError as error:
        raise CorruptFileError(str(error)) from error
    card = Path(folder) / CARD_FILE
    if card.is_file():
        recorded = json.loads(card.read_text(encoding="utf-8")).get(CONFIG_CHECKSUMS_KEY) or {}
        checked.update(check_recorded_sha256(
            folder, recorded, lambda name: Path(folder) / name if (Path(folder) / name).is_file() else None,
            "changed since the export", "edited by hand, calibrated in place, or corrupt",
            "Export the drafter again (`hf-dspark export --draft DIR --output NEW`) so its record matches."))
    return checked


def check_tensors(folder: str | os.PathLike) -> int:
    """Parse every weight file and check that every floating-point tensor is finite; returns the tensor count."""
    import torch
    from safetensors import SafetensorError, safe_open

    count = 0
    for path in weight_files(folder):
        try:
            with safe_open(str(path), framework="pt") as handle:
                for name in handle.keys():
                    tensor = handle.get_tensor(name)
                    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                        raise CorruptFileError(
                            f"{path}: tensor {name} holds inf or nan values; the file is corrupt or the drafter "
                            "diverged in training. Export it again from a good checkpoint."
                        )
                    count += 1
        except SafetensorError as error:
            raise CorruptFileError(f"{path} cannot be read as safetensors ({error}); it is truncated or corrupt. "
                                   "Download or export the drafter again.") from error
    return count


__all__ = ["weight_files", "weight_checksums", "verify_checksums", "check_tensors"]
