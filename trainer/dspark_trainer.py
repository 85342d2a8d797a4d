"""``DSparkTrainer``: a ``transformers.Trainer`` that trains a DSpark drafter against a frozen target.

The target is kept frozen, in eval mode, outside the optimizer and outside checkpoints; the
drafter borrows its embedding table and LM head. Batches come either from a feature cache
(target hidden states + top-k distribution already stored) or, with ``args.online``, as token
ids only: then the target runs inside the step under ``no_grad`` through the very function the
cache builder uses, so both modes see the same features and give the same loss for the same
batch and anchors. From a cache, the target never runs: only its embedding and LM head
(:class:`~hf_dspark.trainer.target_parts.TargetParts`) go to the training device.

Anchors are drawn from a generator seeded by (seed, global step, process, micro-batch), so
a run resumed from a checkpoint draws the same anchors as an uninterrupted one.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

import torch
from accelerate.utils import send_to_device
from transformers import Trainer

from hf_dspark.losses import dspark_loss
from hf_dspark.models.dspark.modeling_dspark import DSparkDraftModel
from .data import DSparkDataCollator
from .feature_cache import target_features
from .target_parts import TargetParts
from .training_args import DSparkTrainingArguments

# Modules that stay fully trainable (and are saved with the adapter) in LoRA mode.
LORA_FULLY_TRAINED = ("fc", "hidden_norm", "markov_head", "confidence_head")
BASE_DRAFTER_DIR = "base_drafter"
ADAPTER_DIR = "adapter"


def apply_lora(draft: DSparkDraftModel, args: DSparkTrainingArguments):
    """Wrap ``draft`` in a PEFT model with LoRA on the backbone linears of ``layers.*``."""
    from peft import LoraConfig, get_peft_model

    names = "|".join(args.lora_target_modules)
    config = LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        # A regex so that the Markov head's own gate_proj (gated variant) is not adapted.
        target_modules=rf"layers\.\d+\.(self_attn|mlp)\.({names})",
        modules_to_save=[name for name in LORA_FULLY_TRAINED if getattr(draft, name, None) is not None],
    )
    return get_peft_model(draft, config)


def is_sharded(model) -> bool:
    """True when FSDP (1 or 2) holds the model's parameters as shards spread over the ranks."""
    from torch.distributed.tensor import DTensor

    if any(type(module).__name__ == "FullyShardedDataParallel" for module in model.modules()):
        return True
    return any(isinstance(parameter, DTensor) for parameter in model.parameters())


def full_state_dict(model) -> dict[str, torch.Tensor]:
    """Whole, CPU copies of every tensor of an FSDP-sharded ``model``, on rank 0 (other ranks get ``{}``).

    A collective: every rank must call it (the main process alone would wait forever). Keys are the
    unwrapped module's own names, as ``save_pretrained`` and ``from_pretrained`` expect them.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def unwrap_drafter(model) -> DSparkDraftModel:
    """The ``DSparkDraftModel`` inside DDP / PEFT wrappers."""
    while hasattr(model, "module") and not isinstance(model, DSparkDraftModel):
        model = model.module
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def gather_positions(values: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """values [b, L, ...], positions [b, A, K] -> [b, A, K, ...] (positions clamped to the sequence)."""
    bsz, num_blocks, block = positions.shape
    flat = positions.clamp(max=values.shape[1] - 1).view(bsz, -1)
    index = flat.view(bsz, -1, *([1] * (values.dim() - 2))).expand(-1, -1, *values.shape[2:])
    return torch.gather(values, 1, index).view(bsz, num_blocks, block, *values.shape[2:])


class DSparkTrainer(Trainer):
    """Trains ``draft_model`` on features of the frozen ``target_model``.

    Args:
        draft_model: a drafter built with ``DSparkDraftModel.from_target`` (or loaded and bound).
        target_model: the target; frozen here, never saved. Online, it is moved to the training device;
            from a cache only its input embedding and LM head are (a :class:`TargetParts` is enough there).
        args: [`DSparkTrainingArguments`]; ``args.use_lora`` wraps the drafter with PEFT.
        Other arguments are passed to ``transformers.Trainer``; the default collator is
        [`DSparkDataCollator`] padding with the target's pad token.
    """

    # compute_loss returns a per-batch mean: let the Trainer divide by the accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(self, draft_model: DSparkDraftModel, target_model, args: DSparkTrainingArguments, data_collator=None,
                 **kwargs):
        target_model.eval().requires_grad_(False)
        draft_model.bind_target(target_model)
        model = apply_lora(draft_model, args) if args.use_lora else draft_model
        if data_collator is None:
            pad = getattr(target_model.config.get_text_config(), "pad_token_id", None)
            data_collator = DSparkDataCollator(pad_token_id=pad if isinstance(pad, int) else 0)
        super().__init__(model=model, args=args, data_collator=data_collator, **kwargs)
        if not args.online and not isinstance(target_model, TargetParts):
            # the decoder layers never run on cached features: leave them where they are
            target_model = TargetParts(target_model.config, target_model.get_input_embeddings(),
                                       target_model.get_output_embeddings())
        self.target_model = target_model.to(self.args.device)
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._anchor_calls: dict = {}

    # ------------------------------------------------------------------ loss
    def _anchor_generator(self) -> torch.Generator:
        # One stream per (step, train/eval): evaluation never shifts the anchors of training micro-batches.
        step, training = self.state.global_step, bool(self.model.training)
        if self._anchor_calls.get("step") != step:
            self._anchor_calls = {"step": step}
        calls = self._anchor_calls.get(training, -1) + 1
        self._anchor_calls[training] = calls
        seed = ((self.args.seed * 1_000_003 + step) * 1_009 + self.args.process_index) * 10_007 + calls
        seed = seed * 2 + (0 if training else 1)
        return torch.Generator().manual_seed(seed % (2**63))

    def _target_inputs(self, draft: DSparkDraftModel, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Hidden states and target distribution of the batch: from the cache or from the target now."""
        if "target_hidden_states" in inputs:
            return {
                "hidden_states": inputs["target_hidden_states"],
                "topk_ids": inputs["target_topk_ids"],
                "topk_logprobs": inputs["target_topk_logprobs"],
            }
        if not self.args.online:
            raise ValueError(
                "DSparkTrainer got a batch without cached target features while args.online=False; train from a "
                "feature cache (hf-dspark build-cache) or set online=True."
            )
        return target_features(
            self.target_model, inputs["input_ids"], inputs.get("attention_mask"), draft.config.target_layer_ids,
            self.args.target_topk,
        )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        draft = unwrap_drafter(model)
        features = self._target_inputs(draft, inputs)
        outputs = model(
            input_ids=inputs["input_ids"],
            target_hidden_states=features["hidden_states"],
            loss_mask=inputs["loss_mask"],
            num_anchors=self.args.num_anchors,
            generator=self._anchor_generator(),
        )
        # Block position k of anchor p is scored against the target's next-token distribution at p + k.
        positions = outputs.anchor_positions.unsqueeze(-1) + torch.arange(
            outputs.target_ids.shape[-1], device=outputs.target_ids.device
        )
        if "logits" in features:
            target = {"target_logits": gather_positions(features["logits"], positions)}
        else:
            target = {
                "target_topk_ids": gather_positions(features["topk_ids"], positions),
                "target_topk_logprobs": gather_positions(features["topk_logprobs"], positions),
            }
        losses = dspark_loss(
            outputs.draft_logits,
            outputs.confidence_logits,
            outputs.target_ids,
            outputs.eval_mask,
            outputs.block_keep_mask,
            d2t=draft.draft_to_target,
            t2d=draft.target_to_draft_table(),
            loss_decay_gamma=self.args.loss_decay_gamma,
            ce_loss_alpha=self.args.ce_loss_alpha,
            l1_loss_alpha=self.args.l1_loss_alpha,
            confidence_head_alpha=self.args.confidence_head_alpha,
            **target,
        )
        self._record(losses)
        return (losses.loss, outputs) if return_outputs else losses.loss

    def _record(self, losses) -> None:
        metrics = self._metrics["train" if self.model.training else "eval"]
        for name in ("ce_loss", "l1_loss", "confidence_loss", "expected_tau", "confidence_error"):
            metrics[name].append(float(getattr(losses, name)))
        for k, value in enumerate(losses.acceptance.tolist(), start=1):
            metrics[f"acceptance_{k}"].append(value)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        # The drafter returns no loss by itself; evaluation reuses compute_loss (metrics land in "eval").
        inputs = send_to_device(inputs, self.args.device)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    # ------------------------------------------------------------------ logging
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        collected = self._metrics[mode]
        if collected:
            names = sorted(collected)
            means = torch.tensor([sum(collected[n]) / len(collected[n]) for n in names], dtype=torch.float64)
            if self.accelerator.num_processes > 1:
                means = self.accelerator.reduce(means.to(self.args.device), reduction="mean").cpu()
            prefix = "eval_" if mode == "eval" else ""
            # In place, so that evaluate() also returns the eval_ metrics it logs.
            logs.update({prefix + n: round(float(v), 6) for n, v in zip(names, means)})
            collected.clear()
        super().log(logs, start_time)

    # ------------------------------------------------------------------ saving
    def save_drafter(self, output_dir: str | os.PathLike, merge_lora: bool | None = None) -> Path:
        """Write the final drafter to ``output_dir`` (main process only).

        Full training: ``save_pretrained`` of the drafter (config, weights, remote-code files).
        LoRA with ``merge_lora`` (default ``args.merge_lora``): the adapters are merged and the
        result saved the same way. LoRA without merging: the adapter goes to
        ``output_dir/adapter`` and the base drafter must be in ``output_dir/base_drafter``
        (``hf-dspark train`` writes it before training); load with :func:`load_trained_drafter`.
        """
        output_dir = Path(output_dir)
        merge_lora = self.args.merge_lora if merge_lora is None else merge_lora
        model = self.accelerator.unwrap_model(self.model)
        # FSDP and DeepSpeed ZeRO-3 leave each rank a shard of every tensor: gather whole tensors first, on
        # every rank (a collective), or the main process would write its shard (or nothing) as the drafter.
        state_dict = None
        if getattr(self, "is_deepspeed_enabled", False):
            engine = self.model_wrapped
            if engine.zero_optimization_partition_weights() and not engine.zero_gather_16bit_weights_on_model_save():
                # accelerate's get_state_dict refuses ZeRO-3 unless stage3_gather_16bit_weights_on_model_save is
                # set (DeepSpeed's default is off); a drafter is small enough to gather whole in any case
                state_dict = engine._zero3_consolidated_16bit_state_dict()
            else:
                state_dict = self.accelerator.get_state_dict(engine)
        elif getattr(self, "is_fsdp_enabled", False) or is_sharded(self.model_wrapped):
            state_dict = full_state_dict(self.model_wrapped)
        if hasattr(model, "get_base_model") and (not merge_lora or state_dict is not None):
            # sharded LoRA weights cannot be merged in place; load_trained_drafter merges the saved adapter
            if self.args.should_save:
                model.save_pretrained(output_dir / ADAPTER_DIR, state_dict=state_dict)
            return output_dir
        if hasattr(model, "merge_and_unload"):
            model = model.merge_and_unload()
            self.model = self.model_wrapped = model
        if self.args.should_save:
            model.save_pretrained(output_dir, state_dict=state_dict)
        return output_dir


def load_trained_drafter(path: str | os.PathLike, target_model) -> DSparkDraftModel:
    """Load what :meth:`DSparkTrainer.save_drafter` wrote (a drafter, or base drafter + LoRA adapter), bound to the target."""
    path = Path(path)
    if (path / ADAPTER_DIR).is_dir():
        from peft import PeftModel

        base = DSparkDraftModel.from_pretrained(path / BASE_DRAFTER_DIR).bind_target(target_model)
        draft = PeftModel.from_pretrained(base, path / ADAPTER_DIR).merge_and_unload()
    else:
        draft = DSparkDraftModel.from_pretrained(path)
    return draft.bind_target(target_model).eval()


def trainable_parameter_count(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


__all__ = [
    "DSparkTrainer",
    "apply_lora",
    "gather_positions",
    "load_trained_drafter",
    "trainable_parameter_count",
    "unwrap_drafter",
]
