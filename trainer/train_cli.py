"""``hf-dspark train``: train a DSpark drafter for a target, from a feature cache or online.

Usage::

    hf-dspark build-cache --target T --data DATA_DIR --output CACHE_DIR
    hf-dspark train --target T --cache CACHE_DIR --output DRAFT_DIR --max-steps 2000
    hf-dspark train --target T --data DATA_DIR --output DRAFT_DIR            # online: target runs in the step
    hf-dspark train --target T --cache CACHE_DIR --output DRAFT_DIR --lora --init-draft OLD_DRAFT_DIR
    accelerate launch --multi_gpu --num_processes 2 -m hf_dspark.cli train --target T --cache CACHE_DIR --output DRAFT_DIR

Several processes on a machine without GPUs train with CPU DDP (gloo): ``hf-dspark train`` turns on
``use_cpu`` itself when ``WORLD_SIZE > 1`` and no accelerator is present (accelerate's own ``--cpu``
launcher needs ``mpirun`` for more than one process).

Every field of :class:`~hf_dspark.trainer.training_args.DSparkTrainingArguments` (the DSpark
recipe plus all of ``transformers.TrainingArguments``) is a flag, spelled with underscores or
dashes (``--max_steps`` / ``--max-steps``). ``--output`` receives resumable checkpoints
(``checkpoint-N``), the final drafter (loadable with ``DSparkDraftModel.from_pretrained`` or
``AutoModel.from_pretrained(..., trust_remote_code=True)``) and ``training_summary.json``.
Rerunning with checkpoints present resumes from the latest one (``--resume auto``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import TrainerCallback

from hf_dspark.errors import CheckpointError, DataError, DraftTargetMismatchError, DSparkConfigError, HfDSparkError
from hf_dspark.commands.arguments import (
    OutputArguments, RuntimeArguments, TargetArguments, add_config_argument, add_dataclass_arguments, flag,
    record_arguments, resolve_target_dtype,
)
from hf_dspark.outputs import claim_output_folder
from .data import (
    CachedFeatureDataset,
    FeatureCaches,
    OnlineDataset,
    check_cache_matches,
    choose_draft_vocab,
    verify_cache,
)
from .dspark_trainer import BASE_DRAFTER_DIR, DSparkTrainer, trainable_parameter_count
from .feature_cache import data_chat_template, resolve_layer_ids
from .target_parts import load_target_parts
from .training_args import DSparkTrainingArguments, add_hf_dataclass_arguments

logger = logging.getLogger(__name__)

SUMMARY_NAME = "training_summary.json"
# What a run was started with; a resumed run must ask for the same (like prepare-data / build-cache).
SETTINGS_NAME = "train_settings.json"
# What a run writes at the top of --output (besides checkpoint-N): an input there would be replaced.
WRITTEN_FILES = ("config.json", "model.safetensors", "generation_config.json", "adapter_config.json",
                 "adapter_model.safetensors", SUMMARY_NAME, SETTINGS_NAME, BASE_DRAFTER_DIR)
# Flags that fix what is trained: the drafter's architecture, where it starts from, and the LoRA layout.
RESUME_FIELDS = ("num_draft_layers", "block_size", "markov_rank", "markov_head_type", "enable_confidence_head",
                 "confidence_head_with_markov", "draft_vocab_size", "target_layer_ids", "use_lora", "lora_r",
                 "lora_alpha", "lora_target_modules")
# Runs older than train_settings.json: the checkpoint's drafter config tells these (flag -> config field).
_CONFIG_FIELDS = {"num_draft_layers": "num_hidden_layers", "block_size": "block_size", "markov_rank": "markov_rank",
                  "markov_head_type": "markov_head_type", "enable_confidence_head": "enable_confidence_head",
                  "confidence_head_with_markov": "confidence_head_with_markov", "draft_vocab_size": "draft_vocab_size"}
# Fields that come from the dedicated flags below instead.
_SKIPPED_FIELDS = {"output_dir", "resume_from_checkpoint", "online"}


def resume_mode(text: str) -> str:
    """``--resume``: ``auto``, ``no`` (also ``false``, as YAML writes a bare ``no``) or a checkpoint folder."""
    lowered = text.strip().lower()
    if lowered in ("no", "false"):
        return "no"
    return "auto" if lowered == "auto" else text


@dataclass
class TrainArguments:
    """Models and data."""

    cache: list[str] | None = flag(
        nargs="+", metavar="CACHE_DIR",
        help="feature cache from `hf-dspark build-cache`; several caches of the same target features (e.g. newly "
             "regenerated answers next to older ones) train as one dataset")
    data: str | None = flag(metavar="DATA_DIR",
                            help="online training on `hf-dspark prepare-data` output (the target runs in every step)")
    init_draft: str | None = flag(metavar="DIR", help="start from this drafter (domain adaptation) instead of a fresh one")
    resume: str = flag("auto", type=resume_mode, metavar="auto|no|CHECKPOINT_DIR",
                       help="auto: continue from the latest checkpoint in --output if any (default); no: start over")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the ``train`` options on ``parser``."""
    parser.allow_abbrev = False  # ~140 TrainingArguments flags: prefixes would be ambiguous surprises
    add_dataclass_arguments(parser, TargetArguments, ("target", "dtype"), required=("target",))
    add_dataclass_arguments(parser, TrainArguments, exclusive=("cache", "data"), exclusive_required=True)
    add_dataclass_arguments(parser, OutputArguments, ("output",), required=("output",), overrides={
        "output": {"metavar": "DRAFT_DIR", "help": "checkpoints and the final drafter"}})
    add_dataclass_arguments(parser, RuntimeArguments, ("threads",))
    add_config_argument(parser)
    group = parser.add_argument_group(
        "training arguments (DSparkTrainingArguments: the DSpark recipe and every transformers.TrainingArguments field)"
    )
    # as transformers' own parser spells them: --max-steps / --max_steps, --no-X for switches that default to on
    record_arguments(parser, DSparkTrainingArguments,
                     add_hf_dataclass_arguments(group, DSparkTrainingArguments, skip=_SKIPPED_FIELDS))


def build_training_args(args: argparse.Namespace) -> DSparkTrainingArguments:
    values = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(DSparkTrainingArguments)
        if f.init and f.name not in _SKIPPED_FIELDS and hasattr(args, f.name)
    }
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.accelerator.is_available():
        # Launched as several processes (accelerate launch --multi_gpu / torchrun) on a machine without
        # accelerators: without use_cpu, accelerate would not set up gloo DDP and every process would train alone.
        values["use_cpu"] = True
    if (values.get("bf16") or values.get("fp16")) and not torch.accelerator.is_available():
        # transformers refuses bf16/fp16 without an accelerator unless use_cpu is set; on a CPU-only
        # machine that is the only device anyway, so --bf16 means CPU autocast.
        values["use_cpu"] = True
    try:
        return DSparkTrainingArguments(output_dir=args.output, online=args.data is not None, **values)
    except DSparkConfigError:
        raise
    except ValueError as error:  # transformers.TrainingArguments refusing a combination of flags
        raise DSparkConfigError(f"Invalid training arguments: {error}") from error


# ----------------------------------------------------------------------------- steps of a run
def _load_dataset(args, training_args: DSparkTrainingArguments, target):
    """Dataset and the target layer ids it implies."""
    num_layers = target.config.get_text_config().num_hidden_layers
    if args.cache is not None:
        if training_args.max_seq_len is not None:
            raise DataError(
                f"--max_seq_len {training_args.max_seq_len} only applies to online training (--data); a cache is "
                "truncated when it is built (`hf-dspark build-cache --max-seq-len`)."
            )
        dirs = [args.cache] if isinstance(args.cache, (str, os.PathLike)) else list(args.cache)
        if training_args.verify_cache:
            verify_caches_once(dirs, training_args)
        dataset = CachedFeatureDataset(dirs[0], verify=False) if len(dirs) == 1 else FeatureCaches(dirs, verify=False)
        for part in getattr(dataset, "parts", [dataset]):
            check_cache_matches(part.manifest, target.config, training_args.target_layer_ids,
                                where=f"--cache {part.cache_dir}")
            if part.manifest.get("split") != "train":
                logger.warning("--cache %s holds the %r split, not 'train'.", part.cache_dir, part.manifest.get("split"))
        return dataset, list(dataset.manifest["target_layer_ids"])
    dataset = OnlineDataset(args.data, "train", training_args.max_seq_len)
    return dataset, resolve_layer_ids(training_args.target_layer_ids, num_layers)


def verify_caches_once(cache_dirs, training_args) -> None:
    """Check every shard's sha256 on one process per machine, and give every rank its verdict.

    Hashing reads the whole cache; done by every rank it would multiply that read by the number of
    GPUs. The machine's first process (``local_process_index == 0``) hashes, the others wait for its
    verdict; a collective, so every rank must call it. A failed check raises the same error (its
    message names the shard and how to rebuild it) on every rank, so none of them trains.
    """
    shared = training_args.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()
    problem = None
    if training_args.local_process_index == 0 or not shared:  # without a process group, each rank checks itself
        try:
            for cache_dir in cache_dirs:
                verify_cache(cache_dir)
        except Exception as error:  # any failure must reach the collective below, or the other ranks wait forever
            problem = error
    if shared:
        verdicts = [None] * training_args.world_size
        torch.distributed.all_gather_object(verdicts, None if problem is None else (type(problem), str(problem)))
        found = next((verdict for verdict in verdicts if verdict is not None), None)
        if problem is None and found is not None:
            kind, message = found
            kind = kind if isinstance(kind, type) and issubclass(kind, HfDSparkError) else CheckpointError
            raise kind(f"{message} (found by the process that checked the cache for its machine)")
    if problem is not None:
        raise problem


def _prompt_chat_template(args, dataset) -> bool | None:
    """Whether the training prompts went through the chat template, as prepare-data recorded it (None: unknown)."""
    if args.cache is None:
        return data_chat_template(Path(args.data)) if args.data else None
    found = {}
    for part in getattr(dataset, "parts", [dataset]):
        manifest = part.manifest
        if manifest.get("chat_template") is not None:
            mode = bool(manifest["chat_template"])
        else:  # caches built before the manifest carried it: ask the data behind them
            data_dir = manifest.get("data")
            mode = data_chat_template(Path(data_dir)) if data_dir else None
        found[str(getattr(part, "cache_dir", manifest.get("data")))] = mode
    known = {mode for mode in found.values() if mode is not None}
    if len(known) > 1:
        raise DataError(
            "The caches disagree on how prompts were encoded (chat template: "
            + ", ".join(f"{name} {mode}" for name, mode in found.items())
            + "); a drafter is prompted one way, so train on caches of data prepared with the same --chat-template."
        )
    if None in found.values():  # one cache cannot tell: the drafter's prompt format stays unknown
        return None
    return known.pop()


def _check_anchor_config(training_args: DSparkTrainingArguments, dataset) -> None:
    longest = dataset.max_length()
    if training_args.block_size >= longest:
        raise DSparkConfigError(
            f"block_size={training_args.block_size} does not fit the training sequences (longest: {longest} tokens); "
            f"use --block_size < {longest} or longer data."
        )
    if training_args.num_anchors > longest:
        raise DSparkConfigError(
            f"num_anchors={training_args.num_anchors} exceeds the longest training sequence ({longest} tokens): at most "
            f"one anchor per token can be drawn; use --num_anchors {longest} or fewer."
        )


# Folders in which the Trainer saves weights that FSDP (``SHARDED_STATE_DICT``) or DeepSpeed keep as shards.
SHARDED_CHECKPOINT_LAYOUTS = ("pytorch_model_fsdp_*", "global_step*")


def checkpoint_problem(folder: Path) -> str | None:
    """Why ``folder`` is not a finished checkpoint, or None when it is.

    The Trainer writes ``trainer_state.json`` after the weights, optimizer, scheduler and RNG
    states, so a checkpoint whose save was interrupted lacks it (or holds a cut-off copy).
    """
    state = folder / "trainer_state.json"
    if not state.is_file():
        return "it has no trainer_state.json (its save was interrupted)"
    try:
        json.loads(state.read_text())
    except (OSError, ValueError):
        return "its trainer_state.json is cut off (its save was interrupted)"
    weights = ("model.safetensors", "adapter_model.safetensors", "model.safetensors.index.json",
               "pytorch_model.bin", "adapter_model.bin")
    sharded = [path for pattern in SHARDED_CHECKPOINT_LAYOUTS for path in folder.glob(pattern) if path.is_dir()]
    if not any((folder / name).is_file() for name in weights) and not sharded:
        return "it holds no model weights"
    return None


def _resolve_checkpoint(resume: str, output: Path) -> str | None:
    """The checkpoint to resume from: ``auto`` takes the latest finished ``checkpoint-N`` in
    ``output`` and skips (with a warning naming them) later ones whose save was interrupted."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    if resume == "no":
        return None
    if resume == "auto":
        if not output.is_dir():
            return None
        steps = sorted(
            (int(path.name.split("-")[-1]), path) for path in output.glob(f"{PREFIX_CHECKPOINT_DIR}-*")
            if path.is_dir() and path.name.split("-")[-1].isdigit()
        )
        for step, path in reversed(steps):
            problem = checkpoint_problem(path)
            if problem is None:
                return str(path)
            print(f"Warning: skipping {path}: it is incomplete, {problem}; it will be written again when training "
                  f"reaches step {step}.", file=sys.stderr, flush=True)
        return None
    path = Path(resume)
    if not path.is_dir():
        raise CheckpointError(f"--resume {resume!r}: no such checkpoint folder; use auto, no, or a checkpoint-N folder.")
    problem = checkpoint_problem(path)
    if problem is not None:
        raise CheckpointError(
            f"--resume {resume}: {path.name} is incomplete, {problem}. Pass --resume auto to take the latest "
            "finished checkpoint, or another checkpoint-N folder."
        )
    return resume


def resume_settings(args, training_args: DSparkTrainingArguments) -> dict:
    """The settings a run in ``--output`` was started with (see :data:`RESUME_FIELDS`)."""
    settings = {name: getattr(training_args, name) for name in RESUME_FIELDS}
    settings["init_draft"] = str(Path(args.init_draft).resolve()) if args.init_draft else None
    return settings


def _as_flag(name: str, value) -> str:
    if name == "init_draft":
        return f"--init-draft {value}" if value else "no --init-draft"
    if name == "use_lora":
        return "--lora" if value else "no --lora"
    if value is None:
        return f"no --{name}"
    return f"--{name} {' '.join(map(str, value)) if isinstance(value, list) else value}"


def _check_resume_settings(output: Path, checkpoint: str, settings: dict) -> None:
    """Refuse to resume ``checkpoint`` with other architecture / starting-point / LoRA flags than it was trained with."""
    path = output / SETTINGS_NAME
    if path.is_file():
        previous = json.loads(path.read_text())
    elif settings["init_draft"] is None and (Path(checkpoint) / "config.json").is_file():
        config = json.loads((Path(checkpoint) / "config.json").read_text())  # a run older than train_settings.json
        previous = {flag: config.get(field) for flag, field in _CONFIG_FIELDS.items()}
    else:
        return
    changed = [name for name in previous if name in settings and previous[name] != settings[name]]
    if changed:
        raise CheckpointError(
            f"{output} holds a run trained with other settings: "
            + ", ".join(f"{name}={previous[name]!r} (now {settings[name]!r})" for name in changed)
            + f". Rerun with the old values ({', '.join(_as_flag(name, previous[name]) for name in changed)}) to "
            f"resume it from {Path(checkpoint).name}, or pass a new --output to train with the new ones "
            "(--resume no starts this folder over)."
        )


def _float32_master_weights(draft, source):
    """The drafter to train, in float32. A drafter shipped in bf16 (as the Gemma 3 one is) would
    otherwise train bf16 weights: an update below half a weight's rounding step is lost, and on CPUs
    without native bf16 matrix products each step runs many times slower (docs/benchmarks.md). ``--bf16`` still gives mixed precision."""
    dtypes = {p.dtype for p in draft.parameters() if p.is_floating_point()}
    if dtypes and dtypes != {torch.float32}:
        logger.info("--init-draft %s holds %s weights; training them in float32", source,
                    "/".join(sorted(str(d).removeprefix("torch.") for d in dtypes)))
        draft = draft.to(torch.float32)
    return draft


def _build_drafter(args, training_args, target, tokenizer, dataset, layer_ids, target_name, checkpoint):
    from hf_dspark.models.dspark.modeling_dspark import DSparkDraftModel

    output = Path(args.output)
    if checkpoint is not None and training_args.use_lora:
        source = output / BASE_DRAFTER_DIR
        if not (source / "config.json").is_file():
            raise CheckpointError(
                f"Resuming LoRA training from {checkpoint} needs the base drafter in {source}, which is missing; "
                "start over with --resume no."
            )
    elif checkpoint is not None:
        source = Path(checkpoint)
    else:
        source = Path(args.init_draft) if args.init_draft else None
    if source is not None:
        try:
            if checkpoint is None:  # --init-draft: any drafter format (hf-dspark, DeepSpec, speculators)
                from hf_dspark.checkpoints.loading import load_drafter

                draft = load_drafter(source)
                draft = _float32_master_weights(draft, source)
            else:
                draft = DSparkDraftModel.from_pretrained(source)
        except (OSError, ValueError) as error:
            raise CheckpointError(f"Cannot load the drafter at {source}: {error}") from error
        try:
            draft.bind_target(target)
        except ValueError as error:  # the drafter's own check names what differs
            raise DraftTargetMismatchError(f"The drafter at {source} cannot be trained for this target: {error}") from error
        if list(draft.config.target_layer_ids) != list(layer_ids):
            raise CheckpointError(
                f"The drafter at {source} reads target layers {draft.config.target_layer_ids} but the training "
                f"features are layers {layer_ids}; build the cache with --target-layer-ids "
                f"{' '.join(map(str, draft.config.target_layer_ids))} (or pass matching --target_layer_ids)."
            )
        return draft
    tcfg = target.config.get_text_config()
    draft_token_ids = None
    if training_args.draft_vocab_size:
        eos = tcfg.eos_token_id if isinstance(tcfg.eos_token_id, list) else [tcfg.eos_token_id]
        mask_id = getattr(tokenizer, "mask_token_id", None) or tcfg.pad_token_id
        draft_token_ids = choose_draft_vocab(dataset, training_args.draft_vocab_size, tcfg.vocab_size,
                                             always_include=[*eos, mask_id])
    return DSparkDraftModel.from_target(
        target,
        tokenizer,
        num_hidden_layers=training_args.num_draft_layers,
        block_size=training_args.block_size,
        markov_rank=training_args.markov_rank,
        markov_head_type=training_args.markov_head_type,
        enable_confidence_head=training_args.enable_confidence_head,
        confidence_head_with_markov=training_args.confidence_head_with_markov,
        context_input_norm=training_args.context_input_norm,
        draft_vocab_size=training_args.draft_vocab_size,
        draft_token_ids=draft_token_ids,
        target_layer_ids=layer_ids,
        num_anchors=training_args.num_anchors,
        loss_decay_gamma=training_args.loss_decay_gamma,
        ce_loss_alpha=training_args.ce_loss_alpha,
        l1_loss_alpha=training_args.l1_loss_alpha,
        confidence_head_alpha=training_args.confidence_head_alpha,
        target_model_name=target_name,
    )


def _summary(trainer: DSparkTrainer, result, args, training_args, checkpoint, elapsed: float) -> dict:
    # Periodic training logs carry "loss"; the end-of-training log may carry only leftover metrics.
    history = [h for h in trainer.state.log_history if "loss" in h and "expected_tau" in h]
    history = history or [h for h in trainer.state.log_history if "expected_tau" in h]
    runtime = result.metrics.get("train_runtime", elapsed)
    tokens = trainer.state.num_input_tokens_seen - getattr(trainer, "_initial_num_input_tokens_seen", 0)
    draft = trainer.accelerator.unwrap_model(trainer.model)
    trainable, total = trainable_parameter_count(draft)
    return {
        "target": args.target,
        "mode": "online" if training_args.online else "cache",
        "source": args.data or (args.cache[0] if isinstance(args.cache, list) and len(args.cache) == 1 else args.cache),
        "output": str(Path(args.output).resolve()),
        "steps": trainer.state.global_step,
        "resumed_from": checkpoint,
        "train_runtime_s": round(runtime, 3),
        "tokens_trained_this_run": int(tokens),
        "tokens_per_second": round(tokens / runtime, 1) if runtime > 0 else None,
        "train_loss": result.metrics.get("train_loss"),
        "first_logged_metrics": history[0] if history else None,
        "final_metrics": history[-1] if history else None,
        "use_lora": training_args.use_lora,
        "trainable_parameters": trainable,
        "num_processes": trainer.accelerator.num_processes,
    }


class InterruptGuard(TrainerCallback):
    """Ctrl-C stops training even when the ``KeyboardInterrupt`` it raised was swallowed.

    Python raises ``KeyboardInterrupt`` in whatever the main thread runs when the signal arrives. If
    that is a finalizer (a ``__del__`` method or a weakref callback: the training loop frees many
    objects), Python prints "Exception ignored" and the loop goes on writing checkpoints. While the
    guard is installed (``with guard:``, main thread only) SIGINT is also recorded, and the guard
    raises ``KeyboardInterrupt`` again at the end of the step in which it arrived."""

    def __init__(self):
        self.interrupted = False
        self._previous = None

    def _handler(self, signum, frame):
        self.interrupted = True
        if callable(self._previous):
            self._previous(signum, frame)
        else:  # SIG_DFL: the process would end; end it the way Ctrl-C does
            raise KeyboardInterrupt

    def __enter__(self):
        # a process that ignores SIGINT (started in the background by a script) keeps ignoring it
        if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) != signal.SIG_IGN:
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None
        return False

    def on_step_end(self, args, state, control, **kwargs):
        if self.interrupted:
            raise KeyboardInterrupt("SIGINT arrived during this training step")

    on_save = on_step_end


def run(args: argparse.Namespace, callbacks=None) -> int:
    """Run ``train``; returns the process exit code. ``callbacks`` go to the Trainer (tests use them)."""
    from transformers import set_seed

    from hf_dspark import targets

    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.time()
    training_args = build_training_args(args)
    output = Path(args.output)
    if training_args.should_save:  # the main process claims --output; the others only write through it
        inputs = [("--target", args.target), ("--init-draft", args.init_draft), ("--data", args.data),
                  *[("--cache", cache) for cache in args.cache or []]]
        claim_output_folder(output, "train", inputs=inputs, written=WRITTEN_FILES,
                            legacy_files=(SETTINGS_NAME, SUMMARY_NAME, "checkpoint-*"))
    # --dtype auto: the device's default (the faster-dtype measurement is for decoding, not training)
    dtype = None if args.dtype == "auto" else args.dtype
    target_dtype = getattr(torch, resolve_target_dtype(dtype, training_args.device))
    if training_args.online:  # the target computes the features in every step
        target, tokenizer = targets.load_target(args.target, dtype=target_dtype)
    else:  # features come from the cache: only the borrowed embedding and LM head are loaded
        target, tokenizer = load_target_parts(args.target, dtype=target_dtype)
    target_name = targets.resolve_target_name(args.target)
    dataset, layer_ids = _load_dataset(args, training_args, target)
    _check_anchor_config(training_args, dataset)
    checkpoint = _resolve_checkpoint(args.resume, output)
    settings = resume_settings(args, training_args)
    if checkpoint is not None:
        _check_resume_settings(output, checkpoint, settings)
    elif training_args.should_save:
        output.mkdir(parents=True, exist_ok=True)
        (output / SETTINGS_NAME).write_text(json.dumps(settings, indent=2) + "\n")
    set_seed(training_args.seed)
    draft = _build_drafter(args, training_args, target, tokenizer, dataset, layer_ids, target_name, checkpoint)
    draft.config.target_model_name = target_name
    chat = _prompt_chat_template(args, dataset)
    if chat is not None:  # else keep what an --init-draft drafter recorded
        draft.config.prompt_chat_template = chat
    if training_args.use_lora and checkpoint is None and training_args.should_save:
        draft.save_pretrained(output / BASE_DRAFTER_DIR)  # the weights the adapters apply to (resume, no-merge)

    guard = InterruptGuard()
    trainer = DSparkTrainer(draft, target, training_args, train_dataset=dataset, callbacks=[*(callbacks or []), guard])
    if training_args.should_save:
        trainable, total = trainable_parameter_count(trainer.model)
        print(f"Training {'LoRA on ' if training_args.use_lora else ''}a {draft.config.num_hidden_layers}-layer drafter "
              f"({trainable} of {total} parameters trainable) on {len(dataset)} sequences "
              f"({'online' if training_args.online else 'cache'}), layers {layer_ids}"
              + (f", resuming from {checkpoint}" if checkpoint else "") + ".", flush=True)
    try:
        with guard:
            result = trainer.train(resume_from_checkpoint=checkpoint)
        trainer.save_drafter(output)
        if training_args.should_save:
            summary = _summary(trainer, result, args, training_args, checkpoint, time.time() - start)
            (output / SUMMARY_NAME).write_text(json.dumps(summary, indent=2) + "\n")
            final = summary["final_metrics"] or {}
            print(f"Saved the drafter to {output} after {summary['steps']} steps ({summary['tokens_per_second']} "
                  f"tokens/s); final loss {final.get('loss')}, expected tau {final.get('expected_tau')}.", flush=True)
    except BaseException:
        _close_process_group(trainer, wait=False)  # a barrier here could wait for ranks that will never come
        raise
    _close_process_group(trainer, wait=True)
    return 0


def _close_process_group(trainer: DSparkTrainer, wait: bool) -> None:
    """Tear down a DDP process group before the interpreter exits.

    Left to interpreter shutdown, gloo's worker threads can be destroyed while still joinable, and a
    rank then aborts ("terminate called without an active exception") after training already succeeded.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    if wait:
        trainer.accelerator.wait_for_everyone()
    torch.distributed.destroy_process_group()


__all__ = ["InterruptGuard", "add_arguments", "build_training_args", "run"]
