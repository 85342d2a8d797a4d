"""`hf-dspark export` and `hf-dspark push`: ship a trained drafter.

Formats
-------
* ``hub`` (default): a folder that *is* a Hub model repository: ``config.json`` (``model_type``
  ``dspark``, ``auto_map``, all DSpark fields, STS temperatures), ``model.safetensors``, the
  remote-code files (``REMOTE_CODE_FILES``: ``configuration_dspark.py``, ``modeling_dspark.py`` and the
  sibling files they import, written from the installed package, their one source), ``generation_config.json`` (verification policy, threshold,
  latency table) and a ``README.md`` model card, plus ``dspark_card.json`` (the card's inputs, so
  that re-exporting the folder reproduces it). A user with only ``transformers`` installed runs
  ``AutoModel.from_pretrained(repo, trust_remote_code=True)`` and
  ``target.generate(..., assistant_model=draft)``.
* ``deepspec``: DeepSpec's own ``save_pretrained`` layout (``architectures:
  ["Qwen3DSparkModel"]`` / ``["Gemma4DSparkModel"]``, ``model_type`` ``qwen3`` / ``gemma4_text``,
  DSpark fields at the top level), any Markov head; ``--target`` stores the target's embedding
  table and LM head, which DeepSpec's classes load from the checkpoint.
* ``vllm`` / ``sglang``: the DeepSpec Qwen3 layout as those engines' native DSpark loaders read
  it (engine-specific tensors and restrictions).
* ``speculators``: vLLM speculators' DSpark format (``speculators_model_type: "dspark"``), see
  :mod:`hf_dspark.checkpoints.speculators_format`.
  The field mapping, its sources and what is assumed are in ``docs/formats.md``.

Every export first loads the drafter with ``DSparkDraftModel.from_pretrained`` and refuses
(:class:`~hf_dspark.errors.CheckpointError`) a checkpoint without ``target_model_name`` or whose
stored tensors do not match its config (missing, mis-shaped or unexpected tensors). All JSON is
written with sorted keys and safetensors with fixed metadata, so export -> load -> export gives
byte-identical files.

Usage::

    hf-dspark export --draft runs/drafter --output out/ --eval-json eval.json \\
        --recipe "hf-dspark train --target Qwen/Qwen3-4B --cache cache/ --output runs/drafter"
    hf-dspark export --draft out/ --output out-vllm/ --format vllm
    hf-dspark push --draft out/ --repo my-org/Qwen3-4B-DSpark --dry-run
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
from pathlib import Path

import torch

from hf_dspark.models.dspark.configuration_dspark import DSparkConfig
from hf_dspark.errors import CheckpointError, DSparkConfigError, HfDSparkError, HubError, OutputFolderError
from hf_dspark.checkpoints.loading import resolve_checkpoint
from hf_dspark.checkpoints.model_card import DEFAULT_LICENSE, render_engine_card, render_model_card

EXPORT_FORMATS = ("hub", "deepspec", "vllm", "sglang", "speculators")
# formats written in DeepSpec's save_pretrained layout
DEEPSPEC_LAYOUT_FORMATS = ("deepspec", "vllm", "sglang")
# The remote code of a hub export: these package files, written from the package at export time
# (the package is their one source; tests/checkpoints/test_remote_code.py keeps every shipped copy equal to it).
REMOTE_CODE_FILES = ("configuration_dspark.py", "modeling_dspark.py", "modeling_dspark_layers.py", "modeling_dspark_gemma4.py",
                     "cache_dspark.py", "loading_dspark.py", "target_binding_dspark.py", "training_dspark.py",
                     "generation_dspark.py", "generate_hook_dspark.py", "sampling_dspark.py", "generation_config_dspark.py", "policies_dspark.py", "scheduling_dspark.py",
                     "verify_head_dspark.py",
                     "warpers_dspark.py",
                     "errors.py")
REMOTE_CODE_DIR = Path(__file__).resolve().parents[1] / "models" / "dspark"  # the one source of the remote code
CARD_INPUTS_FILE = "dspark_card.json"
EXPORT_COMMAND = "export"  # the command named in the output marker (convert exports through export_drafter)
ENGINE_ARCHITECTURE = "Qwen3DSparkModel"
GEMMA4_ENGINE_ARCHITECTURE = "Gemma4DSparkModel"
# Targets whose input embedding multiplies the table by sqrt(hidden): a Qwen3-style DeepSpec drafter
# would embed their raw table unscaled, unlike the borrowed target module hf-dspark uses.
_SCALED_EMBEDDING_MODEL_TYPES = ("gemma", "gemma2", "gemma3", "gemma3_text", "gemma4", "gemma4_text")
SAFETENSORS_METADATA = {"format": "pt"}
# Never uploaded: hidden files/folders (.git, .cache, editor files) and Python caches.
PUSH_IGNORE_PATTERNS = (".*", "*/.*", "__pycache__", "*/__pycache__", "*/__pycache__/*", "__pycache__/*", "*.pyc")


# ----------------------------------------------------------------------------- I/O helpers
def _write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def _normalize_json_file(path: Path) -> None:
    if path.is_file():
        _write_json(path, json.loads(path.read_text()))


def _save_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    ordered = {name: tensors[name].detach().cpu().contiguous() for name in sorted(tensors)}
    save_file(ordered, str(path), metadata=dict(SAFETENSORS_METADATA))


def _prepare_output(output_dir: Path, draft_dir: Path, overwrite: bool, target=None, delete: bool = True) -> None:
    """Refuse an ``output_dir`` holding an input; with ``overwrite``, delete only what an earlier export wrote
    (``delete=False``: only the checks, run before the drafter loads).

    A ``config.json`` is no proof of an earlier export: a training run's folder (with the checkpoint being
    exported inside it) or a target's folder has one too, and both were deleted by an earlier version.
    """
    from hf_dspark.outputs import check_inputs_outside, clear_recorded_files

    # export replaces the whole folder, so no input may lie anywhere inside it
    check_inputs_outside(output_dir, [("--draft", draft_dir), ("--target", target)], written=None)
    if output_dir.exists() and not output_dir.is_dir():
        raise OutputFolderError(f"--output {output_dir} is a file, not a folder; pass a folder path")
    if output_dir.exists() and any(output_dir.iterdir()):
        if not overwrite:
            raise OutputFolderError(
                f"--output {output_dir} exists and is not empty; choose a new folder or pass --overwrite"
            )
        clear_recorded_files(output_dir, EXPORT_COMMAND, delete=delete)
    if delete:
        output_dir.mkdir(parents=True, exist_ok=True)


def _check_finite(model, draft_dir: Path) -> None:
    """Refuse a drafter with inf/nan weights: it would load everywhere and accept nothing."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(
                f"--draft {draft_dir}: tensor {name} holds inf or nan values (training diverged, or the file is "
                "corrupt); export an earlier checkpoint, or train again with a lower learning rate"
            )


# ----------------------------------------------------------------------------- loading
def load_checked_drafter(draft_dir: str | os.PathLike, target_model_name: str | None = None):
    """Load a drafter folder (any format :func:`hf_dspark.checkpoints.loading.load_drafter` reads), refusing
    checkpoints that cannot be shipped.

    Raises :class:`CheckpointError` when ``config.json`` is missing or invalid, when
    ``target_model_name`` is unset (and not given), or when the stored tensors and the config
    disagree (missing, mis-shaped or unexpected tensors).
    """
    from hf_dspark.checkpoints.loading import load_drafter

    path = Path(draft_dir)
    model = load_drafter(path)
    if target_model_name:
        model.config.target_model_name = target_model_name
    if not model.config.target_model_name:
        raise CheckpointError(
            f"--draft {path}: config.target_model_name is not set, so the export cannot say which target it "
            "serves (model card base_model, engine configs). Pass --target-name (e.g. Qwen/Qwen3-4B), or set it and "
            "save again: draft.config.target_model_name = 'Qwen/Qwen3-4B'; draft.save_pretrained(dir)"
        )
    return model.eval()


def _card_inputs(draft_dir: Path, eval_json, recipe, license, serving_json=None
                 ) -> tuple[list[dict], str | None, str, list[dict]]:
    """Card inputs: explicit arguments win, else those recorded by a previous export of ``draft_dir``."""
    from hf_dspark.checkpoints.model_card import load_eval_results, load_serving_results

    recorded = {}
    if (draft_dir / CARD_INPUTS_FILE).is_file():
        recorded = json.loads((draft_dir / CARD_INPUTS_FILE).read_text())
    if isinstance(eval_json, (str, os.PathLike)):
        eval_json = [eval_json]
    evals = load_eval_results(eval_json) if eval_json else list(recorded.get("eval_results", []))
    if isinstance(serving_json, (str, os.PathLike)):
        serving_json = [serving_json]
    serving = load_serving_results(serving_json) if serving_json else list(recorded.get("serving", []))
    return (evals, recipe if recipe is not None else recorded.get("recipe"),
            license or recorded.get("license") or DEFAULT_LICENSE, serving)


# ----------------------------------------------------------------------------- hub format
def write_remote_code(folder: str | os.PathLike) -> list[Path]:
    """Write the remote-code files into ``folder`` from this package (whatever ``save_pretrained``
    copied, e.g. the code of a drafter loaded with ``trust_remote_code``, is replaced)."""
    written = []
    for name in REMOTE_CODE_FILES:
        source = REMOTE_CODE_DIR / name
        if not source.is_file():
            raise HfDSparkError(f"the installed hf_dspark package lacks {source}; reinstall hf-dspark")
        shutil.copyfile(source, Path(folder) / name)
        written.append(Path(folder) / name)
    return written


def _export_hub(model, draft_dir: Path, output_dir: Path, eval_json, recipe, license, repo_id, serving_json=None) -> None:
    evals, recipe, license, serving = _card_inputs(draft_dir, eval_json, recipe, license, serving_json)
    model.save_pretrained(output_dir)
    write_remote_code(output_dir)
    # Re-write what save_pretrained produced so the bytes depend only on the drafter.
    weights = output_dir / "model.safetensors"
    if weights.is_file():
        _save_safetensors(model.state_dict(), weights)
    for name in ("config.json", "generation_config.json", "model.safetensors.index.json"):
        _normalize_json_file(output_dir / name)
    generation = json.loads((output_dir / "generation_config.json").read_text())
    card = render_model_card(model.config, generation, evals, recipe=recipe, license=license, repo_id=repo_id,
                             serving=serving)
    (output_dir / "README.md").write_text(card)
    from hf_dspark.checkpoints.verify import CONFIG_CHECKSUMS_KEY, config_checksums, weight_checksums

    # The sha256 of each weight file, checked by from_pretrained, `hf-dspark verify` and `hf-dspark push`.
    inputs = {"eval_results": evals, "license": license, "recipe": recipe, "weights_sha256": weight_checksums(output_dir),
              # checked by `hf-dspark verify` and `push` only: calibrate --draft DIR rewrites config.json in place,
              # and from_pretrained must keep loading such a folder
              CONFIG_CHECKSUMS_KEY: config_checksums(output_dir)}
    if serving:
        inputs["serving"] = serving
    _write_json(output_dir / CARD_INPUTS_FILE, inputs)


# ----------------------------------------------------------------------------- engine formats
def _engine_error(field: str, value, engine: str, fix: str) -> DSparkConfigError:
    return DSparkConfigError(f"DSparkConfig.{field}={value!r} cannot be exported for {engine}: {fix}")


def check_engine_support(config: DSparkConfig, engine: str, expand_draft_vocab: bool = False) -> None:
    """Refuse drafters the engine's DSpark loader (as documented in docs/formats.md) cannot represent."""
    if engine == "speculators":
        from hf_dspark.checkpoints.speculators_format import check_speculators_support

        check_speculators_support(config)
        return
    if config.context_input_norm:
        raise _engine_error("context_input_norm", True, engine,
                            "the per-layer RMSNorm of the target features before fc exists only in hf-dspark; "
                            "DeepSpec-layout drafters feed the raw features to fc. Train with "
                            "context_input_norm=False to export in this layout, or use --format hub")
    if engine == "deepspec":
        if config.draft_vocab_size is not None:
            raise _engine_error("draft_vocab_size", config.draft_vocab_size, engine,
                                "DeepSpec drafters predict over the full vocabulary; export a reduced-vocabulary "
                                "drafter with --format vllm or --format speculators")
        return
    if config.backbone_type != "qwen3":
        raise _engine_error("backbone_type", config.backbone_type, engine,
                            f"{engine}'s DSpark loader read for docs/formats.md builds Qwen3DSparkModel drafters only; "
                            "use --format deepspec for DeepSpec's Gemma4DSparkModel layout")
    if config.markov_rank <= 0:
        raise _engine_error("markov_rank", config.markov_rank, engine,
                            "its DSpark loader requires a Markov head; a rank-0 drafter is a DFlash drafter")
    if min(config.target_layer_ids) < 0:
        raise _engine_error("target_layer_ids", config.target_layer_ids, engine,
                            "layer -1 (the embedding output) is not a layer id the engine can capture")
    if engine == "vllm" and config.markov_head_type != "vanilla":
        raise _engine_error("markov_head_type", config.markov_head_type, engine,
                            "vLLM's Qwen3 DSpark model has only the vanilla Markov head; export for sglang "
                            "(which has gated and rnn heads) or train a vanilla head")
    if engine == "sglang":
        if config.target_hidden_size != config.hidden_size:
            raise _engine_error("target_hidden_size", config.target_hidden_size, engine,
                                f"SGLang's drafter projects len(target_layer_ids) x hidden_size={config.hidden_size} features")
        if config.draft_vocab_size is not None and not expand_draft_vocab:
            raise _engine_error(
                "draft_vocab_size", config.draft_vocab_size, engine,
                "SGLang's DSpark drafter drafts over the target's full vocabulary with the target's LM head. "
                "Pass --expand-draft-vocab to export the Markov head over the full vocabulary (still lossless, "
                "but the drafted distribution then differs from the one measured with hf-dspark)")


def engine_config(config: DSparkConfig, engine: str, stores_tables: bool | None = None) -> dict:
    """``config.json`` in DeepSpec's layout (``deepspec`` / ``vllm`` / ``sglang``): that of DeepSpec's
    ``Qwen3DSparkModel`` checkpoints (``model_type`` ``qwen3``, top-level DSpark fields), which both
    engines' DSpark loaders read, or of ``Gemma4DSparkModel`` (``model_type`` ``gemma4_text``).
    ``stores_tables``: whether the export holds ``embed_tokens`` / ``lm_head`` (default: the drafter's own)."""
    rope = dict(config.rope_parameters or {})
    layer_ids = list(config.target_layer_ids)
    data = {
        "architectures": [ENGINE_ARCHITECTURE],
        "model_type": "qwen3",
        # backbone (a Qwen3 decoder stack)
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "hidden_act": config.hidden_act,
        "rms_norm_eps": config.rms_norm_eps,
        "max_position_embeddings": config.max_position_embeddings,
        "attention_bias": config.attention_bias,
        "attention_dropout": config.attention_dropout,
        "rope_parameters": rope,
        "rope_theta": float(rope.get("rope_theta", 10000.0)),
        "tie_word_embeddings": False,
        "dtype": str(getattr(config, "dtype", None) or "float32").replace("torch.", ""),
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        # DSpark
        "block_size": config.block_size,
        "mask_token_id": config.mask_token_id,
        "target_layer_ids": layer_ids,
        "num_target_layers": config.num_target_layers,
        "target_hidden_size": config.target_hidden_size,
        "markov_rank": config.markov_rank,
        "markov_head_type": config.markov_head_type,
        "enable_confidence_head": config.enable_confidence_head,
        "confidence_head_with_markov": bool(config.confidence_head_with_markov and config.enable_confidence_head),
        # every draft layer attends bidirectionally inside the block (no sliding window)
        "layer_types": ["full_attention"] * config.num_hidden_layers,
        # provenance / hf-dspark-only (ignored by the engines)
        "target_model_name": config.target_model_name,
        "confidence_temperatures": config.confidence_temperatures,
        "prompt_chat_template": config.prompt_chat_template,
        # false when the folder holds the embedding table and LM head (as DeepSpec's do)
        "embeddings_from_target": not (stores_tables if stores_tables is not None else not config.embeddings_from_target),
        # training recipe (DeepSpec's names)
        "num_anchors": config.num_anchors,
        "loss_decay_gamma": config.loss_decay_gamma,
        "ce_loss_alpha": config.ce_loss_alpha,
        "l1_loss_alpha": config.l1_loss_alpha,
        "confidence_head_alpha": config.confidence_head_alpha,
        "initializer_range": config.initializer_range,
    }
    for name in ("target_model_type", "target_text_model_type"):  # DeepSpec provenance, when loaded from there
        if getattr(config, name, None) is not None:
            data[name] = getattr(config, name)
    if config.backbone_type == "gemma4":
        data.pop("hidden_act")
        data.pop("rope_theta")
        data.update(
            architectures=[GEMMA4_ENGINE_ARCHITECTURE],
            model_type="gemma4_text",
            hidden_activation=config.hidden_act,
            global_head_dim=config.attention_head_dim,
            num_global_key_value_heads=config.num_global_key_value_heads or config.attention_key_value_heads,
            attention_k_eq_v=config.attention_k_eq_v,
            final_logit_softcapping=config.final_logit_softcapping,
            rope_parameters={"full_attention": rope},
            # Gemma 4 features the draft layers do not use
            enable_moe_block=False,
            hidden_size_per_layer_input=0,
            num_kv_shared_layers=0,
            use_double_wide_mlp=False,
        )
    if engine == "vllm":
        # vLLM's aux-hidden-state ids count layer inputs: output of layer l == input of layer l + 1.
        data["eagle_aux_hidden_state_layer_ids"] = [i + 1 for i in layer_ids]
        if config.draft_vocab_size is not None:
            data["draft_vocab_size"] = config.draft_vocab_size
    return data


def read_target_output_embedding(target: str | os.PathLike, config: DSparkConfig) -> torch.Tensor:
    """The target's LM head matrix [vocab_size, hidden] read straight from its safetensors files.

    ``target`` is a local folder or a Hub id (downloaded: only ``*.json`` and ``*.safetensors``).
    Falls back to the input embedding when the target ties its LM head to it.
    """
    from safetensors import safe_open

    path = Path(target)
    if not path.is_dir():
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(str(target), allow_patterns=["*.json", "*.safetensors"]))
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"--target {target}: no *.safetensors files to read the LM head from")
    located: dict[str, Path] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                if key.endswith("lm_head.weight") or key.endswith("embed_tokens.weight"):
                    located.setdefault(key, file)
    head = [k for k in located if k.endswith("lm_head.weight")] or [k for k in located if k.endswith("embed_tokens.weight")]
    if not head:
        raise CheckpointError(f"--target {target}: found neither an lm_head.weight nor an embed_tokens.weight tensor")
    key = sorted(head, key=len)[0]
    with safe_open(str(located[key]), framework="pt") as handle:
        weight = handle.get_tensor(key)
    if tuple(weight.shape) != (config.vocab_size, config.hidden_size):
        raise CheckpointError(
            f"--target {target}: {key} has shape {tuple(weight.shape)}, the drafter expects "
            f"({config.vocab_size}, {config.hidden_size}); is this the drafter's target?"
        )
    return weight


def read_target_input_embedding(target: str | os.PathLike, config: DSparkConfig) -> torch.Tensor:
    """The target's (unscaled) embedding table [vocab_size, hidden] read straight from its safetensors files."""
    weight = _read_target_tensor(target, ("embed_tokens.weight",))
    if tuple(weight.shape) != (config.vocab_size, config.hidden_size):
        raise CheckpointError(
            f"--target {target}: embed_tokens.weight has shape {tuple(weight.shape)}, the drafter expects "
            f"({config.vocab_size}, {config.hidden_size}); is this the drafter's target?"
        )
    return weight


def _read_target_tensor(target: str | os.PathLike, suffixes: tuple[str, ...]) -> torch.Tensor:
    from safetensors import safe_open

    path = Path(target)
    if not path.is_dir():
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(str(target), allow_patterns=["*.json", "*.safetensors"]))
    for suffix in suffixes:
        for file in sorted(path.glob("*.safetensors")):
            with safe_open(str(file), framework="pt") as handle:
                keys = sorted((k for k in handle.keys() if k.endswith(suffix)), key=len)
                if keys:
                    return handle.get_tensor(keys[0])
    raise CheckpointError(f"--target {target}: no tensor named *{' or *'.join(suffixes)} in its safetensors files")


def _target_model_type(target: str | os.PathLike) -> str | None:
    config_file = Path(target) / "config.json"
    if not config_file.is_file():
        return None
    data = json.loads(config_file.read_text())
    return (data.get("text_config") or {}).get("model_type") or data.get("model_type")


def engine_state_dict(model, engine: str, target_output_embedding: torch.Tensor | None = None,
                      expand_draft_vocab: bool = False) -> dict[str, torch.Tensor]:
    """Tensors of the vLLM / SGLang layout (names as in the hf-dspark state dict unless noted).

    * reduced draft vocabulary, vLLM: ``d2t`` becomes EAGLE-3-style offsets (target id - draft id),
      ``t2d`` a boolean [vocab] mask, ``lm_head.weight`` the target's LM-head rows of the draft
      vocabulary, and ``markov_w1`` is indexed by target ids (zero rows outside the draft vocabulary,
      which is what hf-dspark uses for such previous tokens);
    * reduced draft vocabulary, SGLang (``expand_draft_vocab``): both Markov matrices over the full
      vocabulary, zero outside the draft vocabulary;
    * ``rnn`` Markov head: hf-dspark, DeepSpec and SGLang share one cell
      (``sigmoid(gate) * state + (1 - sigmoid(gate)) * tanh(candidate)``), so ``joint_proj`` is copied as is;
    * own ``embed_tokens`` / ``lm_head`` (DeepSpec-style checkpoints): kept for vLLM (which then uses
      them) and DeepSpec, dropped for SGLang (which always shares the target's).
    """
    config = model.config
    check_engine_support(config, engine, expand_draft_vocab)
    tensors = {name: t.detach().cpu().clone() for name, t in model.state_dict().items()}
    d2t = tensors.pop("d2t", None)
    own_embed = tensors.pop("embed_tokens.weight", None)
    own_head = tensors.pop("lm_head.weight", None)
    vocab = config.vocab_size
    w1_key, w2_key = "markov_head.markov_w1.weight", "markov_head.markov_w2.weight"

    def full_vocab_rows(rows: torch.Tensor) -> torch.Tensor:
        full = rows.new_zeros((vocab, rows.shape[1]))
        full[d2t] = rows
        return full

    if d2t is not None:
        tensors[w1_key] = full_vocab_rows(tensors[w1_key])
        if engine == "vllm":
            tensors["d2t"] = d2t - torch.arange(d2t.numel(), dtype=d2t.dtype)
            t2d = torch.zeros(vocab, dtype=torch.bool)
            t2d[d2t] = True
            tensors["t2d"] = t2d
            head = own_head if own_head is not None else target_output_embedding
            if head is None:
                raise DSparkConfigError(
                    f"DSparkConfig.draft_vocab_size={config.draft_vocab_size}: vLLM needs the LM-head rows of the "
                    "draft vocabulary in the checkpoint, and this drafter borrows the target's LM head; pass "
                    "--target <target folder or Hub id> so they can be read from the target's weights"
                )
            tensors["lm_head.weight"] = head[d2t].to(tensors[w2_key].dtype).clone()
        else:
            tensors[w2_key] = full_vocab_rows(tensors[w2_key])
    elif engine == "vllm" and own_head is not None:
        tensors["lm_head.weight"] = own_head
    if engine in ("vllm", "deepspec") and own_embed is not None:
        tensors["embed_tokens.weight"] = own_embed
    if engine == "deepspec" and own_head is not None:
        tensors["lm_head.weight"] = own_head
    return tensors


def _export_engine(model, output_dir: Path, engine: str, target, expand_draft_vocab: bool, license) -> None:
    config = model.config
    check_engine_support(config, engine, expand_draft_vocab)
    head = None
    needs_head = config.draft_vocab_size is not None and config.embeddings_from_target
    if target is None and needs_head and Path(str(config.target_model_name)).is_dir():
        target = config.target_model_name
    if engine in ("vllm", "speculators") and needs_head and target is not None:
        head = read_target_output_embedding(target, config)
    if engine == "speculators":
        from hf_dspark.checkpoints.speculators_format import speculators_config, speculators_state_dict

        tensors = speculators_state_dict(model, head)
        data = speculators_config(config, _target_architectures(target))
    else:
        tensors = engine_state_dict(model, engine, head, expand_draft_vocab)
        if engine == "deepspec" and config.embeddings_from_target and target is not None:
            # DeepSpec's classes load frozen copies of the target's tables from the checkpoint.
            if config.backbone_type == "qwen3" and _target_model_type(target) in _SCALED_EMBEDDING_MODEL_TYPES:
                raise DSparkConfigError(
                    f"DSparkConfig.backbone_type='qwen3' cannot be exported for deepspec with the tables of "
                    f"{_target_model_type(target)} target {target}: its input embedding scales the table by "
                    "sqrt(hidden_size) and DeepSpec's Qwen3 drafter would not; export without --target (tables "
                    "borrowed at load time) or use --format hub"
                )
            tensors["embed_tokens.weight"] = read_target_input_embedding(target, config).to(tensors["fc.weight"].dtype)
            tensors["lm_head.weight"] = read_target_output_embedding(target, config).to(tensors["fc.weight"].dtype)
        data = engine_config(config, engine, stores_tables="embed_tokens.weight" in tensors)
    _save_safetensors(tensors, output_dir / "model.safetensors")
    _write_json(output_dir / "config.json", data)
    (output_dir / "README.md").write_text(render_engine_card(config, engine, license or DEFAULT_LICENSE))


def _target_architectures(target) -> list[str]:
    if target is None or not (Path(str(target)) / "config.json").is_file():
        return []
    return list(json.loads((Path(str(target)) / "config.json").read_text()).get("architectures") or [])


# ----------------------------------------------------------------------------- public API
def export_drafter(
    draft_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    format: str = "hub",
    eval_json=None,
    recipe: str | None = None,
    license: str | None = None,
    repo_id: str | None = None,
    target: str | os.PathLike | None = None,
    expand_draft_vocab: bool = False,
    overwrite: bool = False,
    ngram_lookup_tokens: int | None = None,
    target_model_name: str | None = None,
    serving_json=None,
) -> Path:
    """Export the drafter saved in ``draft_dir`` (any format :func:`hf_dspark.checkpoints.loading.load_drafter`
    reads: ours, DeepSpec, speculators) to ``output_dir`` and return ``output_dir``.

    Args:
        format: ``"hub"`` (transformers / Hub repository), ``"deepspec"``, ``"vllm"``, ``"sglang"``
            or ``"speculators"``.
        eval_json: path(s) of ``hf-dspark eval`` JSON files whose numbers fill the card (hub);
            defaults to those recorded by a previous export of ``draft_dir``.
        recipe: the training command shown on the card (hub).
        license: Hub license id for the card metadata (default ``apache-2.0``; match your target's).
        repo_id: the Hub id the card's usage snippet loads (default ``YOUR_ORG/<target>-DSpark``).
        target: target folder / Hub id, read for a vLLM / speculators export of a reduced-vocabulary
            drafter that borrows the target's LM head (those rows must be in the checkpoint), and for a
            DeepSpec export, which then stores the target's embedding table and LM head.
        expand_draft_vocab: allow an SGLang export of a reduced-vocabulary drafter (see docs/formats.md).
        overwrite: replace an existing export in ``output_dir``.
        ngram_lookup_tokens: hub format: store this ``ngram_lookup_tokens`` in the exported
            ``generation_config.json`` (n-gram rounds, see :mod:`hf_dspark.models.dspark.generation_dspark`;
            0 turns them off); ``None`` keeps the drafter's setting.
        target_model_name: the target's Hub id, for checkpoints that do not record it (DeepSpec's).
        serving_json: path(s) of ``hf-dspark bench-batch`` / ``bench-serve`` JSON files summarized in
            the card's batched-serving section (hub); defaults to those recorded by a previous export.
    """
    if format not in EXPORT_FORMATS:
        raise DSparkConfigError(f"format={format!r} is not supported; choose one of {EXPORT_FORMATS}")
    draft_dir, output_dir = resolve_checkpoint(draft_dir), Path(output_dir)
    _prepare_output(output_dir, draft_dir, overwrite, target, delete=False)  # refuse before loading anything
    model = load_checked_drafter(draft_dir, target_model_name)
    if ngram_lookup_tokens is not None:
        if format != "hub":
            raise DSparkConfigError("ngram_lookup_tokens is a transformers generate() setting; set it for the hub format only")
        if int(ngram_lookup_tokens) < 0:
            raise DSparkConfigError(f"ngram_lookup_tokens must be >= 0 (0 = off), got {ngram_lookup_tokens}")
        model.generation_config.ngram_lookup_tokens = int(ngram_lookup_tokens)
    if format != "hub":
        check_engine_support(model.config, format, expand_draft_vocab)  # refuse before touching output_dir
    _check_finite(model, draft_dir)
    _prepare_output(output_dir, draft_dir, overwrite, target)
    if format == "hub":
        _export_hub(model, draft_dir, output_dir, eval_json, recipe, license, repo_id, serving_json)
    else:
        _export_engine(model, output_dir, format, target, expand_draft_vocab, license)
    from hf_dspark.outputs import files_in, write_marker

    # what a later --overwrite may delete: exactly these files
    write_marker(output_dir, EXPORT_COMMAND, format=format, files=files_in(output_dir))
    return output_dir


# ----------------------------------------------------------------------------- push
def _ignored(relative: str) -> bool:
    return any(fnmatch.fnmatch(relative, pattern) for pattern in PUSH_IGNORE_PATTERNS)


def upload_plan(folder: str | os.PathLike) -> list[tuple[str, int]]:
    """``(relative path, bytes)`` of every file ``push`` would upload; refuses non-export folders."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"--draft {folder} is not a folder; export one first with `hf-dspark export`")
    missing = [name for name in ("config.json", "README.md") if not (folder / name).is_file()]
    if missing:
        raise CheckpointError(
            f"--draft {folder} is not an exported drafter (missing {', '.join(missing)}); create it with "
            f"`hf-dspark export --draft <trained drafter> --output {folder}`"
        )
    try:
        config = json.loads((folder / "config.json").read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"--draft {folder}: config.json is not valid JSON ({exc})") from exc
    if config.get("model_type") == "dspark":
        absent = [name for name in REMOTE_CODE_FILES if not (folder / name).is_file()]
        if "auto_map" not in config or absent:
            raise CheckpointError(
                f"--draft {folder} is a DSpark checkpoint but not a hub export (auto_map or remote-code files "
                f"{absent} missing); run `hf-dspark export --format hub` on it first"
            )
    elif not (config.get("speculators_model_type") == "dspark"
              or config.get("architectures") in ([ENGINE_ARCHITECTURE], [GEMMA4_ENGINE_ARCHITECTURE])):
        raise CheckpointError(f"--draft {folder}: config.json does not describe a DSpark drafter export")
    files = []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder).as_posix()
        if path.is_file() and not _ignored(relative):
            files.append((relative, path.stat().st_size))
    if not any(name.endswith(".safetensors") for name, _ in files):
        raise CheckpointError(f"--draft {folder} holds no *.safetensors weights")
    from hf_dspark.checkpoints.verify import verify_checksums

    verify_checksums(folder)  # weights whose bytes changed since the export are not uploaded
    return files


def push_drafter(folder, repo_id: str, private: bool = False, dry_run: bool = False,
                 commit_message: str | None = None) -> list[tuple[str, int]] | str:
    """Upload an exported folder to ``repo_id`` (created if needed); with ``dry_run`` return the plan
    without any network access. The token comes from huggingface_hub's usual places (``HF_TOKEN``,
    ``hf auth login``) and is never printed."""
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise DSparkConfigError(f"--repo {repo_id!r}: use the form org_or_user/name")
    plan = upload_plan(folder)
    if dry_run:
        return plan
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        commit = api.upload_folder(
            folder_path=str(folder),
            repo_id=repo_id,
            repo_type="model",
            commit_message=commit_message or "Upload DSpark drafter (hf-dspark export)",
            ignore_patterns=list(PUSH_IGNORE_PATTERNS),
        )
    except Exception as error:  # noqa: BLE001 - httpx, requests and huggingface_hub errors share no base class
        # Only Hub calls run in this block, so whatever they raise is the network's or the Hub's answer.
        first_line = (str(error).strip().splitlines() or [""])[0]
        raise HubError(f"uploading {folder} to {repo_id} failed: {type(error).__name__}: {first_line} (check the "
                       "network connection and your token, `hf auth login`, then rerun push)") from error
    return str(getattr(commit, "commit_url", commit))


def human_size(num_bytes: int) -> str:
    """A byte count for people: ``512 B``, ``1.5 KB``, ``3.2 MB``, ``1.1 GB`` (GB is the largest unit)."""
    size = float(num_bytes)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"


__all__ = [
    "EXPORT_FORMATS",
    "export_drafter",
    "load_checked_drafter",
    "engine_config",
    "engine_state_dict",
    "check_engine_support",
    "read_target_output_embedding",
    "upload_plan",
    "push_drafter"]
