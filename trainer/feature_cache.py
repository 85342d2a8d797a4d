"""``hf-dspark build-cache``: run the frozen target once per sequence and store what training needs.

Usage::

    hf-dspark build-cache --target gemma-3-270m --data DATA_DIR --output CACHE_DIR --estimate
    hf-dspark build-cache --target gemma-3-270m --data DATA_DIR --output CACHE_DIR [--split holdout]

Cache layout (format version 1)::

    CACHE_DIR/manifest.json           settings, target geometry, one entry per finished shard
    CACHE_DIR/shard-00000.safetensors ...

A shard holds consecutive rows ``first_row .. first_row + num_rows - 1`` of the data split,
packed end to end without padding (``T`` tokens in all, ``m`` = number of target layers,
``H`` = target hidden size, ``k`` = ``--target-topk``):

====================  ===========  =========  ============================================
tensor                shape        dtype      meaning
====================  ===========  =========  ============================================
``hidden_states``     [T, m*H]     bfloat16   ``hidden_states[l + 1]`` for l in target_layer_ids, concatenated
``input_ids``         [T]          int32      token ids (prompt + answer)
``loss_mask``         [T]          uint8      1 on answer tokens
``topk_ids``          [T, k]       int32      top-k ids of the target's next-token distribution at each position
``topk_logprobs``     [T, k]       float16    their log-probabilities under the FULL-vocabulary softmax
``seq_offsets``       [rows + 1]   int64      row i is tokens ``seq_offsets[i]:seq_offsets[i+1]``
====================  ===========  =========  ============================================

Bytes per token: ``2*m*H + 4 + 1 + 6*k`` (+ 8 per sequence and a small header per shard):
for k = 64 the per-token overhead beyond the hidden states is 389 bytes, within the 1 KB budget.

Rerunning the same command resumes: shards listed in the manifest are checked (size and
sha256) and skipped; a shard file that is listed but corrupt raises :class:`CheckpointError`
(delete it to rebuild it). A cache folder built with other settings (target, layers, top-k,
length limit, data) is refused rather than mixed; ``--overwrite`` rebuilds it from scratch.

Data that ``prepare-data`` has not finished (``data_config.json`` status ``running`` or
``partial``) is refused unless ``--allow-partial``. When the data grew after its cache was built,
the new rows can be cached on their own (``--first-row N``, the number of rows already cached) and
trained on next to the first cache with ``hf-dspark train --cache OLD NEW``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hf_dspark.errors import CheckpointError, DataError
from hf_dspark.commands.arguments import (
    OutputArguments, PromptArguments, RuntimeArguments, TargetArguments, add_config_argument,
    add_dataclass_arguments, flag, non_negative_int, positive_int, resolve_target_dtype,
)
from hf_dspark.outputs import claim_output_folder
from .data import CACHE_FORMAT_VERSION, MANIFEST_NAME, load_cache_manifest, read_data_rows, sha256_file, verify_shard

DEFAULT_SHARD_TOKENS = 65536
DEFAULT_BATCH_TOKENS = 8192
# Logits are materialised for at most this many (position x vocabulary) entries at once.
LOGITS_CHUNK_ELEMENTS = 1 << 25
# Settings a resumed build must share with the manifest.
_RESUME_KEYS = ("format_version", "target", "target_config", "target_layer_ids", "topk", "max_seq_len", "split",
                "first_row", "shard_tokens", "data_fingerprint")
# prepare-data statuses of data it has not finished writing.
_UNFINISHED_DATA = ("running", "partial")


def bytes_per_token(num_layers: int, hidden_size: int, topk: int) -> int:
    """Bytes one cached token takes (see the layout table in the module docstring)."""
    return 2 * num_layers * hidden_size + 4 + 1 + 6 * topk


# ----------------------------------------------------------------------------- target features
@torch.no_grad()
def target_features(
    target, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, target_layer_ids, topk: int
) -> dict[str, torch.Tensor]:
    """One frozen target forward -> what the cache stores and online training uses.

    Returns ``hidden_states`` [b, L, m*H] bfloat16 and either ``topk_ids`` int32 /
    ``topk_logprobs`` float16 [b, L, k] (top-k of the full-vocabulary log-softmax of the
    next-token logits at each position) or, when ``topk == 0``, dense ``logits`` [b, L, V]
    float32. Logits are computed from the last hidden state in chunks so that a large vocabulary
    never needs [b, L, V] at once (the final logit soft-capping of Gemma-style configs is applied).
    """
    decoder = target.get_decoder() if hasattr(target, "get_decoder") else None
    head = target.get_output_embeddings()
    if decoder is None or decoder is target or head is None:
        out = target(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False)
        last, full_logits = None, out.logits
    else:
        out = decoder(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False)
        last, full_logits = out.last_hidden_state, None
    hidden = torch.cat([out.hidden_states[layer + 1] for layer in target_layer_ids], dim=-1).to(torch.bfloat16)
    result = {"hidden_states": hidden}
    bsz, seq_len = input_ids.shape
    softcap = getattr(target.config.get_text_config(), "final_logit_softcapping", None)

    def logits_of(rows: slice) -> torch.Tensor:
        if full_logits is not None:
            return full_logits.flatten(0, 1)[rows].float()
        logits = head(last.flatten(0, 1)[rows]).float()
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        return logits

    if topk == 0:
        if full_logits is not None:
            result["logits"] = full_logits.float()
        else:
            result["logits"] = logits_of(slice(None)).view(bsz, seq_len, -1)
        return result
    vocab = head.weight.shape[0] if head is not None else full_logits.shape[-1]
    chunk = max(1, LOGITS_CHUNK_ELEMENTS // vocab)
    ids, logprobs = [], []
    for start in range(0, bsz * seq_len, chunk):
        values, indices = logits_of(slice(start, start + chunk)).log_softmax(-1).topk(min(topk, vocab), dim=-1)
        ids.append(indices.to(torch.int32))
        logprobs.append(values.to(torch.float16))
    result["topk_ids"] = torch.cat(ids).view(bsz, seq_len, -1)
    result["topk_logprobs"] = torch.cat(logprobs).view(bsz, seq_len, -1)
    return result


# ----------------------------------------------------------------------------- planning
def plan_shards(rows: list[dict[str, Any]], shard_tokens: int) -> list[dict[str, Any]]:
    """Split rows, in order, into shards of at least ``shard_tokens`` tokens (the last may be smaller)."""
    shards, first, tokens = [], 0, 0
    for index, row in enumerate(rows):
        tokens += len(row["input_ids"])
        if tokens >= shard_tokens or index == len(rows) - 1:
            shards.append({"first_row": first, "num_rows": index + 1 - first, "num_tokens": tokens})
            first, tokens = index + 1, 0
    for number, shard in enumerate(shards):
        shard["file"] = f"shard-{number:05d}.safetensors"
        members = rows[shard["first_row"] : shard["first_row"] + shard["num_rows"]]
        shard["rows_sha256"] = _rows_digest(members)
    return shards


def _rows_digest(rows: list[dict[str, Any]]) -> str:
    digest = hashlib.sha256()
    for row in rows:
        digest.update(json.dumps([row["id"], row["input_ids"], row["loss_mask"]]).encode())
    return digest.hexdigest()


def _target_geometry(config) -> dict[str, Any]:
    tcfg = config.get_text_config()
    return {
        "model_type": tcfg.model_type,
        "hidden_size": tcfg.hidden_size,
        "num_hidden_layers": tcfg.num_hidden_layers,
        "vocab_size": tcfg.vocab_size,
    }


def resolve_layer_ids(layer_ids, num_layers: int) -> list[int]:
    from hf_dspark.models.dspark.modeling_dspark import default_target_layer_ids

    if layer_ids is None:
        return default_target_layer_ids(num_layers)
    ids = [int(i) for i in layer_ids]
    if ids != sorted(set(ids)) or ids[0] < -1 or ids[-1] >= num_layers:
        raise DataError(
            f"--target-layer-ids {ids} is invalid: give sorted, unique layer indices in [-1, {num_layers}) "
            f"for this {num_layers}-layer target (-1 is the embedding output)."
        )
    return ids


# ----------------------------------------------------------------------------- building
def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def data_chat_template(data_dir: Path) -> bool | None:
    """prepare-data's record of whether prompts went through the chat template (None if unknown)."""
    path = data_dir / "data_config.json"
    try:
        value = json.loads(path.read_text()).get("chat_template") if path.is_file() else None
    except (OSError, ValueError):
        return None
    return None if value is None else bool(value)


def data_status(data: str | os.PathLike, split: str) -> tuple[str | None, int | None]:
    """prepare-data's ``status`` of a data folder and the number of ``split`` prompts it planned (None: unknown)."""
    path = Path(data) / "data_config.json"
    try:
        config = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return None, None
    planned = config.get("num_prompts")
    return config.get("status"), planned.get(split) if isinstance(planned, dict) else None


def _check_data_finished(args: argparse.Namespace, num_rows: int) -> str | None:
    """Refuse data prepare-data is still writing (or left partial) unless --allow-partial; returns its status."""
    status, planned = data_status(args.data, args.split)
    if status in _UNFINISHED_DATA and not (args.allow_partial or args.estimate):
        count = f"{num_rows} of {planned}" if planned is not None else f"{num_rows}"
        raise DataError(
            f"--data {args.data} is unfinished (prepare-data status {status!r}: {count} {args.split} rows written). "
            "Rerun the same `hf-dspark prepare-data` command to finish it, or pass --allow-partial to cache the rows "
            "written so far (the new rows can be cached later with --first-row)."
        )
    return status


def _grown_data_message(previous: dict[str, Any], rows: list[dict[str, Any]], settings: dict[str, Any],
                        cache_dir: Path) -> str | None:
    """The way out when the data behind ``cache_dir`` only grew since it was built (None otherwise)."""
    cached = previous.get("num_sequences")
    if not isinstance(cached, int) or not 0 < cached < len(rows):
        return None
    if _rows_digest_of_plan(plan_shards(rows[:cached], settings["shard_tokens"])) != previous.get("data_fingerprint"):
        return None
    first = settings["first_row"] + cached
    return (
        f"{settings['data']} grew since {cache_dir} was built: the cache holds its first {cached} "
        f"{settings['split']} rows, the data now has {len(rows)}. Cache the {len(rows) - cached} new rows on their "
        f"own (the same build-cache command with --first-row {first} --output NEW_CACHE) and train on both "
        f"(hf-dspark train --cache {cache_dir} NEW_CACHE ...), or rebuild this cache over every row with --overwrite."
    )


def _clear_cache(cache_dir: Path) -> None:
    """--overwrite: delete what an earlier build wrote (the manifest and shard files), nothing else."""
    for path in [cache_dir / MANIFEST_NAME, *cache_dir.glob("shard-*.safetensors"), *cache_dir.glob("*.tmp")]:
        if path.is_file():
            path.unlink()


def _check_resume(manifest_path: Path, settings: dict[str, Any], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Finished shards of an earlier build with the same settings (verified); refuse other settings."""
    if not manifest_path.is_file():
        return []
    previous = {"first_row": 0, **load_cache_manifest(manifest_path.parent, require_complete=False)}
    changed = [key for key in _RESUME_KEYS if previous.get(key) != settings.get(key)]
    if changed == ["data_fingerprint"]:
        grown = _grown_data_message(previous, rows, settings, manifest_path.parent)
        if grown is not None:
            raise CheckpointError(grown)
    if changed:
        details = "; ".join(f"{key}: cache {previous.get(key)!r}, now {settings.get(key)!r}" for key in changed)
        raise CheckpointError(
            f"{manifest_path.parent} holds a cache built with other settings ({details}). Use a new --output "
            "folder, or pass --overwrite to rebuild this one."
        )
    finished = []
    for shard in previous.get("shards", []):
        if (manifest_path.parent / shard["file"]).exists():
            verify_shard(manifest_path.parent, shard)
            finished.append(shard)
    return finished


def _build_shard(target, rows, layer_ids, topk, batch_tokens, pad_id, device, progress) -> dict[str, torch.Tensor]:
    lengths = [len(r["input_ids"]) for r in rows]
    offsets = [0]
    for length in lengths:
        offsets.append(offsets[-1] + length)
    tcfg = target.config.get_text_config()
    total = offsets[-1]
    out = {
        "hidden_states": torch.empty(total, len(layer_ids) * tcfg.hidden_size, dtype=torch.bfloat16),
        "input_ids": torch.tensor([t for r in rows for t in r["input_ids"]], dtype=torch.int32),
        "loss_mask": torch.tensor([t for r in rows for t in r["loss_mask"]], dtype=torch.uint8),
        "topk_ids": torch.empty(total, topk, dtype=torch.int32),
        "topk_logprobs": torch.empty(total, topk, dtype=torch.float16),
        "seq_offsets": torch.tensor(offsets, dtype=torch.int64),
    }
    # Longest first so that each batch pads little; results go back to their row's slot.
    order = sorted(range(len(rows)), key=lambda i: -lengths[i])
    start = 0
    while start < len(order):
        width = lengths[order[start]]
        size = max(1, batch_tokens // width)
        members = order[start : start + size]
        ids = torch.full((len(members), width), pad_id, dtype=torch.long)
        mask = torch.zeros(len(members), width, dtype=torch.long)
        for slot, index in enumerate(members):
            ids[slot, : lengths[index]] = torch.tensor(rows[index]["input_ids"])
            mask[slot, : lengths[index]] = 1
        feats = target_features(target, ids.to(device), mask.to(device), layer_ids, topk)
        for slot, index in enumerate(members):
            a, b, n = offsets[index], offsets[index + 1], lengths[index]
            out["hidden_states"][a:b] = feats["hidden_states"][slot, :n].cpu()
            out["topk_ids"][a:b] = feats["topk_ids"][slot, :n].cpu()
            out["topk_logprobs"][a:b] = feats["topk_logprobs"][slot, :n].cpu()
        progress.update(sum(lengths[i] for i in members))
        start += size
    return out


@dataclass
class BuildCacheArguments:
    """What the cache stores."""

    data: str = flag(metavar="DATA_DIR", help="folder written by `hf-dspark prepare-data` (or one .jsonl file)")
    estimate: bool = flag(False, action="store_true", help="print the bytes needed and exit without building")
    target_layer_ids: list[int] | None = flag(
        type=non_negative_int, nargs="+",
        help="target layers to store (default: 5 spread over the depth, as DSparkDraftModel.from_target)")
    target_topk: int = flag(64, type=non_negative_int,
                            help="entries of the target's next-token distribution stored per token (default 64)")
    shard_tokens: int = flag(DEFAULT_SHARD_TOKENS, type=positive_int,
                             help=f"tokens per shard file, the unit of resumption (default {DEFAULT_SHARD_TOKENS})")
    batch_tokens: int = flag(DEFAULT_BATCH_TOKENS, type=positive_int,
                             help=f"padded tokens per target forward (default {DEFAULT_BATCH_TOKENS})")
    max_seq_len: int | None = flag(type=positive_int, help="truncate longer sequences to this many tokens")
    first_row: int = flag(0, type=non_negative_int, metavar="N",
                          help="cache rows N.. of the split only, e.g. rows added after an earlier cache of the "
                               "first N (train on both with `hf-dspark train --cache OLD NEW`)")
    allow_partial: bool = flag(False, action="store_true",
                               help="cache data that prepare-data has not finished (status running/partial)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the ``build-cache`` options on ``parser``."""
    add_dataclass_arguments(parser, TargetArguments, ("target", "dtype", "device"), required=("target",))
    add_dataclass_arguments(parser, BuildCacheArguments, required=("data",))
    add_dataclass_arguments(parser, PromptArguments, ("split",), defaults={"split": "train"}, overrides={
        "split": {"choices": ("train", "holdout"), "help": "data split to cache (default train)"}})
    add_dataclass_arguments(parser, OutputArguments, ("output", "overwrite"), required=("output",), overrides={
        "output": {"metavar": "CACHE_DIR", "help": "cache folder (resumed if present)"},
        "overwrite": {"help": "rebuild --output from scratch instead of resuming it (deletes its manifest and "
                              "shards)"}})
    add_dataclass_arguments(parser, RuntimeArguments, ("threads", "no_progress"))
    add_config_argument(parser)


def _validate_args(args: argparse.Namespace) -> None:
    if args.target_topk < 1:
        raise DataError(
            f"--target-topk {args.target_topk} is invalid for a cache: store at least 1 entry (64 is the default). "
            "Dense target distributions are only used by online training (`hf-dspark train --data ... "
            "--target_topk 0`)."
        )
    for option, value in (("--shard-tokens", args.shard_tokens), ("--batch-tokens", args.batch_tokens)):
        if value < 1:
            raise DataError(f"{option} {value} is invalid; use a positive number of tokens.")
    if args.max_seq_len is not None and args.max_seq_len < 2:
        raise DataError(f"--max-seq-len {args.max_seq_len} is invalid; use at least 2 (or omit it).")
    if args.first_row < 0:
        raise DataError(f"--first-row {args.first_row} is invalid; use 0 (every row) or a positive row number.")


def _format_bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if count < 1024 or unit == "TB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{int(count)} B"
        count /= 1024
    return f"{count:.1f} TB"


def run(args: argparse.Namespace) -> int:
    """Run ``build-cache``; returns the process exit code."""
    from transformers import AutoConfig
    from tqdm.auto import tqdm

    from hf_dspark import targets

    _validate_args(args)
    # before any work: a new or empty folder, or an earlier build-cache output
    claim_output_folder(Path(args.output), "build-cache", legacy_files=(MANIFEST_NAME,), create=False)
    if args.threads:
        torch.set_num_threads(args.threads)
    output = Path(args.output)
    rows = read_data_rows(args.data, args.split, args.max_seq_len)
    status = _check_data_finished(args, len(rows))
    if args.first_row >= len(rows):
        raise DataError(f"--first-row {args.first_row}: {args.data} has only {len(rows)} {args.split} rows.")
    rows = rows[args.first_row :]
    config = AutoConfig.from_pretrained(targets.resolve_target_source(args.target))
    geometry = _target_geometry(config)
    layer_ids = resolve_layer_ids(args.target_layer_ids, geometry["num_hidden_layers"])
    if args.target_topk > geometry["vocab_size"]:  # checked before the manifest records it
        raise DataError(
            f"--target-topk {args.target_topk} exceeds the target's vocabulary ({geometry['vocab_size']} tokens); "
            "use a smaller k (64 is the default)."
        )
    shards = plan_shards(rows, args.shard_tokens)
    total_tokens = sum(shard["num_tokens"] for shard in shards)
    per_token = bytes_per_token(len(layer_ids), geometry["hidden_size"], args.target_topk)
    budget = 2 * len(layer_ids) * geometry["hidden_size"] + 1024
    total_bytes = total_tokens * per_token + 8 * (len(rows) + len(shards))
    print(
        f"Cache estimate: {len(rows)} sequences, {total_tokens} tokens, {len(shards)} shard(s); {per_token} bytes/token "
        f"(hidden 2x{len(layer_ids)}x{geometry['hidden_size']} + ids/mask 5 + top-{args.target_topk} "
        f"{6 * args.target_topk}; budget {budget}) -> {_format_bytes(total_bytes)} in all.",
        flush=True,
    )
    if args.estimate:
        existing = next(p for p in (output.resolve(), *output.resolve().parents) if p.exists())
        print(f"Free disk space at {existing}: {_format_bytes(shutil.disk_usage(existing).free)}.", flush=True)
        return 0

    settings = {
        "format_version": CACHE_FORMAT_VERSION,
        "target": targets.resolve_target_name(args.target),
        "target_config": geometry,
        "target_layer_ids": layer_ids,
        "hidden_size": geometry["hidden_size"],
        "hidden_dtype": "bfloat16",
        "topk": args.target_topk,
        "max_seq_len": args.max_seq_len,
        "split": args.split,
        "first_row": args.first_row,
        "data": str(Path(args.data).resolve()),
        "data_status": status,
        "chat_template": data_chat_template(Path(args.data)),
        "shard_tokens": args.shard_tokens,
        "data_fingerprint": _rows_digest_of_plan(shards),
        "bytes_per_token": per_token,
        "num_sequences": len(rows),
        "num_tokens": total_tokens,
        "num_shards_planned": len(shards),
        "layout": {
            "hidden_states": ["num_tokens", len(layer_ids) * geometry["hidden_size"], "bfloat16"],
            "input_ids": ["num_tokens", "int32"],
            "loss_mask": ["num_tokens", "uint8"],
            "topk_ids": ["num_tokens", args.target_topk, "int32"],
            "topk_logprobs": ["num_tokens", args.target_topk, "float16"],
            "seq_offsets": ["num_rows + 1", "int64"],
        },
    }
    manifest_path = output / MANIFEST_NAME
    claim_output_folder(output, "build-cache", legacy_files=(MANIFEST_NAME,))
    if args.overwrite:
        _clear_cache(output)
    finished = {shard["file"]: shard for shard in _check_resume(manifest_path, settings, rows)}
    todo = [shard for shard in shards if shard["file"] not in finished]
    if finished:
        print(f"Resuming: {len(finished)} finished shard(s) verified and kept, {len(todo)} to build.", flush=True)

    def write_manifest(complete: bool) -> None:
        done = [finished[s["file"]] for s in shards if s["file"] in finished]
        _write_json_atomic(manifest_path, {**settings, "complete": complete, "shards": done})

    write_manifest(complete=not todo)
    if todo:
        start = time.time()
        device = targets.resolve_device(args.device)
        model, tokenizer = targets.load_target(args.target, dtype=resolve_target_dtype(args.dtype, device),
                                               device=device)
        print(f"Loaded target {args.target!r} in {time.time() - start:.1f} s.", flush=True)
        if _target_geometry(model.config) != geometry:
            raise CheckpointError(f"Target {args.target!r} config changed while building; rerun build-cache.")
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        built_tokens, start = 0, time.time()
        with tqdm(total=sum(s["num_tokens"] for s in todo), unit="tok", unit_scale=True, desc="build-cache",
                  disable=args.no_progress) as progress, torch.inference_mode():
            for shard in todo:
                members = rows[shard["first_row"] : shard["first_row"] + shard["num_rows"]]
                tensors = _build_shard(model, members, layer_ids, args.target_topk, args.batch_tokens, pad_id,
                                       device, progress)
                _save_shard(output / shard["file"], tensors)
                path = output / shard["file"]
                finished[shard["file"]] = {**shard, "bytes": path.stat().st_size, "sha256": sha256_file(path)}
                built_tokens += shard["num_tokens"]
                write_manifest(complete=len(finished) == len(shards))
        elapsed = max(time.time() - start, 1e-9)
        print(f"Built {len(todo)} shard(s), {built_tokens} tokens in {elapsed:.1f} s "
              f"({built_tokens / elapsed:.0f} tokens/s).", flush=True)
    on_disk = sum(s["bytes"] for s in finished.values())
    print(f"Cache complete at {output}: {total_tokens} tokens, {_format_bytes(on_disk)} "
          f"({on_disk / max(total_tokens, 1):.0f} bytes/token on disk)"
          + (f", over unfinished data (status {status!r})." if status in _UNFINISHED_DATA else "."), flush=True)
    return 0


def _rows_digest_of_plan(shards: list[dict[str, Any]]) -> str:
    return hashlib.sha256("".join(s["rows_sha256"] for s in shards).encode()).hexdigest()


def _save_shard(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, str(tmp),
              metadata={"format": "hf-dspark-cache", "format_version": str(CACHE_FORMAT_VERSION)})
    os.chmod(tmp, 0o644)  # safetensors writes owner-only files; caches are meant to be shared
    os.replace(tmp, path)


__all__ = ["add_arguments", "run", "target_features", "bytes_per_token", "plan_shards", "resolve_layer_ids", "data_chat_template"]
