"""Training data for DSpark drafters: regenerated rows, feature-cache shards, collator, draft vocabulary.

Two sources feed :class:`~hf_dspark.trainer.dspark_trainer.DSparkTrainer`:

* :class:`CachedFeatureDataset` reads the shards written by ``hf-dspark build-cache``
  (memory-mapped with ``safetensors.safe_open``; one index entry per sequence). Each item
  carries the token ids, the loss mask, the target's hidden states of the selected layers and
  the target's top-k next-token distribution.
* :class:`OnlineDataset` reads the JSON Lines written by ``hf-dspark prepare-data``
  (``DATA_DIR/train.jsonl``: ``{"id", "input_ids", "loss_mask", ...}``) and carries token ids
  only; the trainer runs the frozen target inside each step to get the same features.

:class:`DSparkDataCollator` right-pads either kind into a batch; :func:`choose_draft_vocab`
picks a reduced draft vocabulary from token frequencies. The cache format itself (file names,
manifest, checksums) is read here and written by :mod:`hf_dspark.trainer.feature_cache`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

from hf_dspark.errors import CheckpointError, CorruptFileError, DataError

logger = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
# Tensor names inside every shard (see the layout in feature_cache's docstring).
SHARD_TENSORS = ("hidden_states", "input_ids", "loss_mask", "topk_ids", "topk_logprobs", "seq_offsets")


# ----------------------------------------------------------------------------- regenerated rows
def data_file(data: str | os.PathLike, split: str = "train") -> Path:
    """``DATA_DIR/<split>.jsonl``, or ``data`` itself when it is a ``.jsonl`` file."""
    path = Path(data)
    if path.is_file():
        return path
    candidate = path / f"{split}.jsonl"
    if not candidate.is_file():
        raise DataError(
            f"--data {data!r}: no {split}.jsonl found. Point --data at a folder written by "
            "`hf-dspark prepare-data` (it holds train.jsonl and holdout.jsonl) or at a .jsonl file."
        )
    return candidate


def read_data_rows(data: str | os.PathLike, split: str = "train", max_seq_len: int | None = None) -> list[dict[str, Any]]:
    """Rows ``{"id", "input_ids", "loss_mask"}`` of a prepare-data split, truncated to ``max_seq_len``.

    A cut-off last line (an interrupted ``prepare-data``) is ignored; any other malformed line
    raises :class:`DataError` naming the file and line.
    """
    path = data_file(data, split)
    lines = path.read_text(encoding="utf-8").split("\n")
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as error:
            if number == len(lines):  # no trailing newline: a write that was cut off
                logger.warning("%s: ignoring the incomplete last line %d", path, number)
                continue
            raise DataError(f"{path}, line {number}: not valid JSON ({error}); fix or delete that line.") from error
        ids, mask = raw.get("input_ids"), raw.get("loss_mask")
        if not isinstance(ids, list) or not isinstance(mask, list) or len(ids) != len(mask) or not ids:
            raise DataError(
                f"{path}, line {number}: each row needs non-empty 'input_ids' and 'loss_mask' lists of equal "
                "length (the format written by `hf-dspark prepare-data`)."
            )
        if max_seq_len is not None:
            ids, mask = ids[:max_seq_len], mask[:max_seq_len]
        rows.append({"id": str(raw.get("id", number)), "input_ids": ids, "loss_mask": mask})
    if not rows:
        raise DataError(f"{path} has no rows; run `hf-dspark prepare-data` first (or check --split).")
    return rows


class OnlineDataset(torch.utils.data.Dataset):
    """Token ids and loss masks of regenerated rows; target features are computed in the training step."""

    def __init__(self, data: str | os.PathLike, split: str = "train", max_seq_len: int | None = None):
        self.rows = read_data_rows(data, split, max_seq_len)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        row = self.rows[index]
        return {
            "input_ids": torch.tensor(row["input_ids"], dtype=torch.long),
            "loss_mask": torch.tensor(row["loss_mask"], dtype=torch.bool),
        }

    def token_rows(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for row in self.rows:
            yield torch.tensor(row["input_ids"], dtype=torch.long), torch.tensor(row["loss_mask"], dtype=torch.bool)

    def max_length(self) -> int:
        return max(len(row["input_ids"]) for row in self.rows)


# ----------------------------------------------------------------------------- cache reading
def sha256_file(path: str | os.PathLike, chunk_bytes: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def load_cache_manifest(cache_dir: str | os.PathLike, require_complete: bool = True) -> dict[str, Any]:
    """Read ``CACHE_DIR/manifest.json``; raise :class:`CheckpointError` if absent, unknown or unfinished."""
    path = Path(cache_dir) / MANIFEST_NAME
    if not path.is_file():
        raise CheckpointError(
            f"--cache {cache_dir}: no {MANIFEST_NAME}. Build the cache first with "
            f"`hf-dspark build-cache --target T --data DATA_DIR --output {cache_dir}`."
        )
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path} is not valid JSON ({error}); delete the cache folder and rebuild it.") from error
    if manifest.get("format_version") != CACHE_FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: cache format_version={manifest.get('format_version')!r}, this hf-dspark reads version "
            f"{CACHE_FORMAT_VERSION}; rebuild the cache with this version of `hf-dspark build-cache`."
        )
    if require_complete and not manifest.get("complete"):
        done, planned = len(manifest.get("shards", [])), manifest.get("num_shards_planned", "?")
        raise CheckpointError(
            f"--cache {cache_dir} is unfinished ({done}/{planned} shards); rerun the same "
            "`hf-dspark build-cache` command to finish it (finished shards are kept)."
        )
    return manifest


def verify_shard(cache_dir: str | os.PathLike, shard: dict[str, Any]) -> None:
    """Raise :class:`CorruptFileError` if a shard file is missing, truncated or fails its sha256 checksum."""
    path = Path(cache_dir) / shard["file"]
    fix = f"delete {path} and rerun the same `hf-dspark build-cache` command to rebuild just that shard."
    if not path.is_file():
        raise CorruptFileError(f"Cache shard {path} listed in the manifest is missing; {fix}")
    size = path.stat().st_size
    if size != shard["bytes"]:
        raise CorruptFileError(f"Cache shard {path} has {size} bytes, the manifest says {shard['bytes']}; {fix}")
    digest = sha256_file(path)
    if digest != shard["sha256"]:
        raise CorruptFileError(
            f"Cache shard {path} is corrupt: sha256 {digest[:16]}... does not match the manifest's "
            f"{shard['sha256'][:16]}...; {fix}"
        )


def verify_cache(cache_dir: str | os.PathLike) -> None:
    """Check every shard of a finished cache against its manifest (size and sha256); see :func:`verify_shard`."""
    for shard in load_cache_manifest(cache_dir)["shards"]:
        verify_shard(cache_dir, shard)


def check_cache_matches(manifest: dict[str, Any], target_config, target_layer_ids=None, where: str = "--cache") -> None:
    """Raise :class:`CheckpointError` if the cache was built for another target geometry or layer set."""
    tcfg = target_config.get_text_config() if hasattr(target_config, "get_text_config") else target_config
    built = manifest["target_config"]
    problems = []
    for field in ("hidden_size", "num_hidden_layers", "vocab_size"):
        if built.get(field) != getattr(tcfg, field, None):
            problems.append(f"{field}: cache {built.get(field)}, target {getattr(tcfg, field, None)}")
    if target_layer_ids is not None and list(target_layer_ids) != list(manifest["target_layer_ids"]):
        problems.append(f"target_layer_ids: cache {manifest['target_layer_ids']}, requested {list(target_layer_ids)}")
    if problems:
        raise CheckpointError(
            f"{where} was built for target {manifest.get('target')!r} with layers {manifest['target_layer_ids']} and "
            f"does not match this run: {'; '.join(problems)}. Rebuild the cache for this target/layer set "
            "(`hf-dspark build-cache ... --target-layer-ids ...` into a new folder) or drop the conflicting flag."
        )


class CachedFeatureDataset(torch.utils.data.Dataset):
    """Sequences of a feature cache; tensors are sliced lazily from memory-mapped shards.

    Args:
        cache_dir: folder written by ``hf-dspark build-cache``.
        verify: check every shard's sha256 against the manifest first (reads the whole cache once).
    """

    def __init__(self, cache_dir: str | os.PathLike, verify: bool = True):
        self.cache_dir = Path(cache_dir)
        self.manifest = load_cache_manifest(cache_dir)
        self.shards = self.manifest["shards"]
        self.index: list[tuple[int, int]] = []
        self.offsets: list[list[int]] = []
        for shard_number, shard in enumerate(self.shards):
            if verify:
                verify_shard(cache_dir, shard)
            offsets = self._read_offsets(shard)
            self.offsets.append(offsets)
            self.index.extend((shard_number, row) for row in range(len(offsets) - 1))
        self._handles: dict[int, Any] = {}
        self._pid = os.getpid()

    def _read_offsets(self, shard: dict[str, Any]) -> list[int]:
        from safetensors import safe_open

        path = self.cache_dir / shard["file"]
        try:
            with safe_open(str(path), framework="pt") as handle:
                missing = [name for name in SHARD_TENSORS if name not in handle.keys()]
                offsets = handle.get_tensor("seq_offsets").tolist() if not missing else []
        except Exception as error:  # safetensors raises its own error types for unreadable headers
            raise CorruptFileError(
                f"Cache shard {path} cannot be read ({error}); delete it and rerun `hf-dspark build-cache`."
            ) from error
        if missing or len(offsets) != shard["num_rows"] + 1 or offsets[-1] != shard["num_tokens"]:
            raise CheckpointError(
                f"Cache shard {path} does not match the manifest (missing tensors {missing} or wrong row/token "
                "counts); delete it and rerun `hf-dspark build-cache`."
            )
        return offsets

    def _handle(self, shard_number: int):
        from safetensors import safe_open

        if self._pid != os.getpid():  # a DataLoader worker: mmaps are not shared across fork
            self._handles, self._pid = {}, os.getpid()
        if shard_number not in self._handles:
            path = self.cache_dir / self.shards[shard_number]["file"]
            self._handles[shard_number] = safe_open(str(path), framework="pt")
        return self._handles[shard_number]

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state

    def __len__(self) -> int:
        return len(self.index)

    def _slice(self, index: int, names: Iterable[str]) -> dict[str, torch.Tensor]:
        shard_number, row = self.index[index]
        start, end = self.offsets[shard_number][row], self.offsets[shard_number][row + 1]
        handle = self._handle(shard_number)
        return {name: handle.get_slice(name)[start:end] for name in names}

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = self._slice(index, ("input_ids", "loss_mask", "hidden_states", "topk_ids", "topk_logprobs"))
        return {
            "input_ids": item["input_ids"].long(),
            "loss_mask": item["loss_mask"].bool(),
            "target_hidden_states": item["hidden_states"],
            "target_topk_ids": item["topk_ids"],
            "target_topk_logprobs": item["topk_logprobs"],
        }

    def token_rows(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for index in range(len(self)):
            item = self._slice(index, ("input_ids", "loss_mask"))
            yield item["input_ids"].long(), item["loss_mask"].bool()

    def max_length(self) -> int:
        return max(o[i + 1] - o[i] for o in self.offsets for i in range(len(o) - 1))


# Manifest fields that must agree before several caches can be trained on as one dataset.
_CACHE_GEOMETRY = ("target_config", "target_layer_ids", "hidden_size", "hidden_dtype", "topk")


class FeatureCaches(torch.utils.data.ConcatDataset):
    """Several feature caches trained on as one dataset, e.g. a cache of newly regenerated answers next
    to an older one, so that more data never means rebuilding what is already cached.

    The caches must describe the same target features (target geometry, layers, hidden dtype, top-k);
    otherwise :class:`DataError` names the field and both folders. ``manifest`` is the first cache's
    (for the geometry checks); ``parts`` holds each :class:`CachedFeatureDataset`.
    """

    def __init__(self, cache_dirs: Iterable[str | os.PathLike], verify: bool = True):
        cache_dirs = [Path(d) for d in cache_dirs]
        if not cache_dirs:
            raise DataError("FeatureCaches needs at least one cache folder.")
        if len({d.resolve() for d in cache_dirs}) != len(cache_dirs):
            raise DataError(f"--cache lists a folder twice ({', '.join(map(str, cache_dirs))}); give each cache once.")
        self.parts = [CachedFeatureDataset(d, verify=verify) for d in cache_dirs]
        first = self.parts[0]
        for part in self.parts[1:]:
            for field in _CACHE_GEOMETRY:
                if part.manifest.get(field) != first.manifest.get(field):
                    raise DataError(
                        f"--cache {part.cache_dir} has {field}={part.manifest.get(field)!r} but --cache "
                        f"{first.cache_dir} has {first.manifest.get(field)!r}; caches trained together must hold "
                        "the same target features. Rebuild one with the other's `hf-dspark build-cache` settings."
                    )
        super().__init__(self.parts)
        self.manifest = first.manifest

    def token_rows(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for part in self.parts:
            yield from part.token_rows()

    def max_length(self) -> int:
        return max(part.max_length() for part in self.parts)


# ----------------------------------------------------------------------------- batching
@dataclass
class DSparkDataCollator:
    """Right-pads items of either dataset into a batch.

    Produces ``input_ids`` / ``loss_mask`` / ``attention_mask`` [batch, L] and, for cached
    items, ``target_hidden_states`` [batch, L, width], ``target_topk_ids`` /
    ``target_topk_logprobs`` [batch, L, k]. Padded positions have ``loss_mask`` 0, so no anchor
    or target ever lands on them, and anchors only see context before themselves.
    """

    pad_token_id: int = 0

    def __call__(self, features: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        lengths = [f["input_ids"].shape[0] for f in features]
        bsz, max_len = len(features), max(lengths)
        batch = {
            "input_ids": torch.full((bsz, max_len), self.pad_token_id, dtype=torch.long),
            "loss_mask": torch.zeros(bsz, max_len, dtype=torch.bool),
            "attention_mask": torch.zeros(bsz, max_len, dtype=torch.long),
        }
        for name in ("target_hidden_states", "target_topk_ids", "target_topk_logprobs"):
            if name in features[0]:
                sample = features[0][name]
                batch[name] = sample.new_zeros((bsz, max_len, *sample.shape[1:]))
        for row, (feature, length) in enumerate(zip(features, lengths)):
            batch["attention_mask"][row, :length] = 1
            for name, value in feature.items():
                batch[name][row, :length] = value
        return batch


# ----------------------------------------------------------------------------- draft vocabulary
def token_frequencies(data, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Counts of every token id among answer tokens (loss mask 1) and among prompt tokens.

    ``data`` is a dataset with ``token_rows()`` or an iterable of ``{"input_ids", "loss_mask"}`` rows.
    """
    rows = data.token_rows() if hasattr(data, "token_rows") else (
        (torch.as_tensor(r["input_ids"]), torch.as_tensor(r["loss_mask"]).bool()) for r in data
    )
    answer = torch.zeros(vocab_size, dtype=torch.long)
    prompt = torch.zeros(vocab_size, dtype=torch.long)
    for ids, mask in rows:
        if int(ids.max()) >= vocab_size or int(ids.min()) < 0:
            raise DataError(
                f"Token id {int(ids.max())} is outside the target vocabulary (size {vocab_size}); the data was "
                "tokenized for another target. Rerun `hf-dspark prepare-data` with this target."
            )
        answer += torch.bincount(ids[mask], minlength=vocab_size)
        prompt += torch.bincount(ids[~mask], minlength=vocab_size)
    return answer, prompt


def choose_draft_vocab(data, size: int, vocab_size: int, always_include: Iterable[int] = ()) -> list[int]:
    """Target ids of a reduced draft vocabulary of ``size`` tokens, sorted ascending.

    ``always_include`` (e.g. EOS) come first; the rest are the most frequent answer tokens
    (what the drafter must predict), ties and leftover slots going to frequent prompt tokens,
    then to the lowest ids.
    """
    if not 0 < size <= vocab_size:
        raise DataError(
            f"draft_vocab_size={size} is invalid: use 1..{vocab_size} (the target vocabulary) or leave it unset "
            "to draft over the full vocabulary."
        )
    forced = sorted({int(i) for i in always_include if i is not None and 0 <= int(i) < vocab_size})
    if len(forced) > size:
        raise DataError(f"draft_vocab_size={size} is smaller than the {len(forced)} tokens that must be included {forced}.")
    answer, prompt = token_frequencies(data, vocab_size)
    # Lexicographic ranking by (answer count desc, prompt count desc, id asc) via stable sorts.
    order = torch.arange(vocab_size)
    for counts in (prompt, answer):
        order = order[torch.sort(counts[order], descending=True, stable=True).indices]
    forced_set = set(forced)
    chosen = forced + [i for i in order.tolist() if i not in forced_set][: size - len(forced)]
    return sorted(int(i) for i in chosen)


__all__ = [
    "CACHE_FORMAT_VERSION",
    "MANIFEST_NAME",
    "CachedFeatureDataset",
    "DSparkDataCollator",
    "FeatureCaches",
    "OnlineDataset",
    "check_cache_matches",
    "choose_draft_vocab",
    "data_file",
    "load_cache_manifest",
    "read_data_rows",
    "sha256_file",
    "token_frequencies",
    "verify_cache",
    "verify_shard",
]
