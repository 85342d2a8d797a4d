"""One loader for every DSpark drafter checkpoint a user may arrive with.

:func:`load_drafter` takes a local folder or a Hub id and recognises, from ``config.json``:

* ``hf-dspark``: our layout (``model_type: "dspark"``), written by ``save_pretrained`` or
  ``hf-dspark export --format hub``;
* ``deepspec``: DeepSpec's ``save_pretrained`` layout (``model_type: "qwen3"`` /
  ``"gemma4_text"``, ``architectures: ["Qwen3DSparkModel"]`` / ``["Gemma4DSparkModel"]``, DSpark
  fields at the top level), as in DeepSeek's released drafters and in our ``--format
  deepspec|vllm|sglang`` exports (including vLLM's reduced-vocabulary tensors);
* ``speculators``: vLLM speculators' DSpark format (``speculators_model_type: "dspark"``),
  converted with :mod:`hf_dspark.checkpoints.speculators_format`.

Every ``--draft`` of the command line goes through it, so ``eval``, ``calibrate``,
``bench-batch``, ``demo``, ``export``, ``convert`` and ``train --init-draft`` accept the same
folders. Checkpoints whose tensors do not match their config (missing, mis-shaped or unexpected
tensors) are refused with :class:`~hf_dspark.errors.CheckpointError`.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch

from hf_dspark.errors import CheckpointError, CorruptFileError, DevicePlacementError, DraftTargetMismatchError

CHECKPOINT_FORMATS = ("hf-dspark", "deepspec", "speculators")
DEEPSPEC_ARCHITECTURES = ("Qwen3DSparkModel", "Gemma4DSparkModel")
DEEPSPEC_MODEL_TYPES = ("qwen3", "gemma4_text")
# Fields every DSpark config carries; a qwen3 / gemma4_text config with them is a DeepSpec drafter.
_DSPARK_FIELDS = ("block_size", "target_layer_ids", "markov_rank")


def resolve_checkpoint(source: str | os.PathLike) -> Path:
    """A local folder, or a Hub id (``org/name``) downloaded to the local cache."""
    path = Path(source).expanduser()
    if path.exists():
        return path
    if str(source).count("/") != 1 or str(source).startswith((".", "/", "~")):
        raise CheckpointError(f"--draft {source}: no such folder, and not a Hub id (Hub ids look like org/name)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(source)))
    except Exception as exc:  # offline, not found, gated...: all mean "cannot use this --draft"
        raise CheckpointError(
            f"--draft {source}: not a local folder, and downloading it as a Hub repository failed ({exc})"
        ) from exc


def read_config_dict(folder: Path) -> dict:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise CheckpointError(
            f"--draft {folder}: no config.json; point it at a drafter folder (hf-dspark save_pretrained / export, "
            "a DeepSpec checkpoint, or a speculators DSpark checkpoint)"
        )
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"--draft {folder}: config.json is not valid JSON ({exc})") from exc


def detect_checkpoint_format(config: dict, where: str = "the checkpoint") -> str:
    """``"hf-dspark"``, ``"deepspec"`` or ``"speculators"`` for a ``config.json`` dict; raises
    :class:`CheckpointError` saying what the folder is when it is no DSpark drafter."""
    if "speculators_model_type" in config:
        kind = config["speculators_model_type"]
        if kind != "dspark":
            raise CheckpointError(
                f"{where} is a speculators {kind!r} checkpoint, not a DSpark drafter (speculators_model_type 'dspark')"
            )
        return "speculators"
    model_type = config.get("model_type")
    if model_type == "dspark":
        return "hf-dspark"
    architectures = config.get("architectures") or []
    if model_type in DEEPSPEC_MODEL_TYPES and (
        any(a in DEEPSPEC_ARCHITECTURES for a in architectures) or all(f in config for f in _DSPARK_FIELDS)
    ):
        return "deepspec"
    raise CheckpointError(
        f"{where} is a {model_type!r} model ({', '.join(architectures) or 'no architectures'}), not a DSpark drafter: "
        "expected an hf-dspark folder (model_type 'dspark'), a DeepSpec checkpoint (Qwen3DSparkModel / "
        "Gemma4DSparkModel) or a speculators DSpark checkpoint"
    )


def stored_tensor_names(folder: Path) -> set[str]:
    """Names of the tensors stored in a checkpoint folder (single file or sharded safetensors)."""
    from safetensors import safe_open

    files = _safetensors_files(folder)
    names: set[str] = set()
    for file in files:
        with _readable(file):
            with safe_open(str(file), framework="pt") as handle:
                names.update(handle.keys())
    return names


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for file in _safetensors_files(folder):
        with _readable(file):
            tensors.update(load_file(str(file)))
    return tensors


@contextlib.contextmanager
def _readable(file: Path):
    """safetensors' own error names no file: say which one is truncated or corrupt."""
    from safetensors import SafetensorError

    try:
        yield
    except SafetensorError as exc:
        raise CorruptFileError(
            f"{file} cannot be read as safetensors ({exc}); it is truncated or corrupt. Download, export or save "
            "the drafter again."
        ) from exc


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return [folder / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    raise CheckpointError(
        f"{folder} holds no model.safetensors (or sharded model.safetensors.index.json); save the drafter with "
        "save_pretrained (safetensors)"
    )


# ----------------------------------------------------------------------------- DeepSpec layout
def deepspec_layout_to_dspark(config: dict, tensors: dict[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor]]:
    """Undo what an engine export changed, so a DeepSpec-layout folder becomes a DSparkConfig dict
    and our state dict. A DeepSeek checkpoint passes through unchanged; our ``--format vllm``
    exports of reduced-vocabulary drafters carry EAGLE-3 offsets in ``d2t``, a ``t2d`` mask, a
    ``markov_w1`` widened to the target vocabulary and the target's LM-head rows."""
    config, tensors = dict(config), dict(tensors)
    if "embeddings_from_target" not in config:
        # DeepSeek's checkpoints store frozen copies of the target's tables; exports of drafters
        # that borrow them (and SGLang exports, which drop them) do not.
        config["embeddings_from_target"] = "embed_tokens.weight" not in tensors
    if "t2d" in tensors:
        mask = tensors.pop("t2d").bool()
        draft_to_target = tensors["d2t"] + torch.arange(tensors["d2t"].numel(), dtype=tensors["d2t"].dtype)
        if not torch.equal(mask.nonzero().flatten().sort().values, draft_to_target.sort().values):
            raise CheckpointError("t2d and d2t disagree on the draft vocabulary; the checkpoint is inconsistent")
        tensors["d2t"] = draft_to_target
        config.setdefault("draft_vocab_size", draft_to_target.numel())
        tensors["markov_head.markov_w1.weight"] = draft_rows_of_w1(tensors["markov_head.markov_w1.weight"], draft_to_target)
        if config["embeddings_from_target"]:
            tensors.pop("lm_head.weight", None)  # the target's LM-head rows, written for vLLM
    config.pop("eagle_aux_hidden_state_layer_ids", None)  # vLLM's copy of target_layer_ids + 1
    return config, tensors


def draft_rows_of_w1(w1: torch.Tensor, draft_to_target: torch.Tensor) -> torch.Tensor:
    """hf-dspark keeps W1 rows for draft-vocabulary tokens only (other previous tokens get a zero
    embedding); a W1 over the target vocabulary converts exactly only when its other rows are zero."""
    outside = torch.ones(w1.shape[0], dtype=torch.bool)
    outside[draft_to_target] = False
    if w1[outside].any():
        raise CheckpointError(
            "markov_w1 has non-zero rows for tokens outside the draft vocabulary; hf-dspark's Markov head embeds "
            "only draft-vocabulary tokens (others get a zero row), so converting would change the drafter"
        )
    return w1[draft_to_target].clone()


# ----------------------------------------------------------------------------- loader
def drafter_from_tensors(config_dict: dict, tensors: dict[str, torch.Tensor], where: str = "the checkpoint"):
    """Build a :class:`DSparkDraftModel` from a DSparkConfig dict and a complete state dict (strict)."""
    from hf_dspark.models.dspark.configuration_dspark import DSparkConfig
    from hf_dspark.models.dspark.generation_dspark import default_dspark_generation_config
    from hf_dspark.models.dspark.modeling_dspark import DSparkDraftModel

    try:
        config = DSparkConfig(**{k: v for k, v in config_dict.items() if k not in ("model_type",)})
    except ValueError as exc:
        raise CheckpointError(f"{where}: config is not a valid DSpark config: {exc}") from exc
    with torch.device("meta"):
        model = DSparkDraftModel(config)
    _check_tensor_names(set(tensors), set(model.state_dict()), where)
    try:
        model.load_state_dict(tensors, strict=True, assign=True)
    except RuntimeError as exc:  # shape mismatches
        raise CheckpointError(f"{where}: the weights do not match the config: {exc}") from exc
    model.generation_config = default_dspark_generation_config()
    return model


def _check_tensor_names(stored: set[str], expected: set[str], where: str) -> None:
    unexpected, missing = sorted(stored - expected), sorted(expected - stored)
    if unexpected or missing:
        raise CheckpointError(
            f"{where}: the stored tensors do not match config.json: unexpected {unexpected[:8]}"
            f"{'...' if len(unexpected) > 8 else ''}, missing {missing[:8]}{'...' if len(missing) > 8 else ''}. "
            "Check markov_rank, markov_head_type, enable_confidence_head, draft_vocab_size, num_hidden_layers, "
            "backbone (model_type) and embeddings_from_target against model.safetensors."
        )


def load_drafter(
    source: str | os.PathLike,
    *,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    target=None,
):
    """Load a DSpark drafter from any supported checkpoint format (see the module docstring).

    Args:
        source: local folder or Hub id.
        dtype: cast the drafter to this dtype (default: the stored dtype).
        device: move the drafter there (with ``target``, binding moves it again, to the device of the
            target's input embedding).
        target: bind the drafter to this target model (checks it matches, places the drafter where the
            target's input embedding computes, and borrows its tables).

    Returns the drafter in eval mode. Raises :class:`CheckpointError` for folders that are no
    DSpark drafter or whose tensors do not match their config (:class:`CorruptFileError` for weight
    files that cannot be read or whose sha256 differs from the one ``hf-dspark export`` recorded),
    :class:`DraftTargetMismatchError` for a drafter built for another ``target``, and
    :class:`DevicePlacementError` for a ``target`` whose tables are on the meta device.
    """
    from hf_dspark.models.dspark.loading_dspark import load_dspark_generation_config
    from hf_dspark.models.dspark.modeling_dspark import DSparkDraftModel

    folder = resolve_checkpoint(source)
    where = f"--draft {source}"
    config_dict = read_config_dict(folder)
    fmt = detect_checkpoint_format(config_dict, where)
    from hf_dspark.checkpoints.verify import verify_checksums

    verify_checksums(folder)  # the sha256 hf-dspark export recorded for each weight file, if any
    stored = stored_tensor_names(folder)  # also names a truncated or corrupt weight file (CorruptFileError)
    if fmt != "hf-dspark":
        # other layouts become our config and state dict first (a DeepSeek checkpoint passes through unchanged)
        if fmt == "speculators":
            from hf_dspark.checkpoints.speculators_format import dspark_from_speculators

            config_dict, tensors = dspark_from_speculators(config_dict, read_tensors(folder), where)
        else:
            config_dict, tensors = deepspec_layout_to_dspark(config_dict, read_tensors(folder))
        model = drafter_from_tensors(config_dict, tensors, where)
        model.generation_config = load_dspark_generation_config(folder)
        model.name_or_path = model.config.name_or_path = str(folder)  # as from_pretrained records it
    else:
        from hf_dspark.models.dspark.configuration_dspark import DSparkConfig

        try:
            # built here, so that an invalid config is refused as a CheckpointError that names the folder
            config = DSparkConfig(**config_dict)
        except ValueError as exc:
            raise CheckpointError(f"{where}: config.json is not a valid DSpark config: {exc}") from exc
        try:
            model = DSparkDraftModel.from_pretrained(folder, config=config, dtype="auto", check_checksums=False)
        except (OSError, ValueError, RuntimeError) as exc:  # transformers raises RuntimeError on shape mismatches
            raise CheckpointError(f"{where}: the weights do not match config.json: {exc}") from exc
        _check_tensor_names(stored, set(model.state_dict()), where)
    model.checkpoint_format = fmt
    if dtype is not None or device is not None:
        model = model.to(device=device, dtype=getattr(torch, dtype) if isinstance(dtype, str) else dtype)
    if target is not None:
        try:
            model.bind_target(target)  # also moves the drafter to the device of the target's input embedding
        except DevicePlacementError:
            raise
        except ValueError as exc:  # the drafter's own check (DraftTargetMismatchError); add which --draft
            raise DraftTargetMismatchError(f"{where}: {exc}") from exc
    return model.eval()


__all__ = [
    "CHECKPOINT_FORMATS",
    "load_drafter",
    "detect_checkpoint_format",
    "resolve_checkpoint",
    "read_config_dict",
    "read_tensors",
    "stored_tensor_names",
    "deepspec_layout_to_dspark",
    "drafter_from_tensors",
]
