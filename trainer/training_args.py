"""Training arguments of DSpark drafters: ``transformers.TrainingArguments`` plus the DSpark recipe."""

from __future__ import annotations

import math
from collections.abc import Container
from dataclasses import dataclass, field

from transformers import HfArgumentParser, TrainingArguments

from hf_dspark.models.dspark.configuration_dspark import MARKOV_HEAD_TYPES
from hf_dspark.errors import DSparkConfigError

LORA_MODULE_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _error(name: str, value, fix: str) -> DSparkConfigError:
    return DSparkConfigError(f"DSparkTrainingArguments.{name}={value!r} is invalid: {fix}")


@dataclass
class DSparkTrainingArguments(TrainingArguments):
    r"""Arguments of [`DSparkTrainer`] (and ``hf-dspark train``).

    The DSpark fields describe the drafter built for a fresh run (architecture), the loss
    recipe (docs/training.md) and the data mode; every ``TrainingArguments`` field works as
    usual. Defaults differ from ``TrainingArguments`` where the DSpark recipe says so (learning
    rate 6e-4, 4% warmup, cosine schedule) or where a drafter needs it (columns are not pruned).
    """

    # ------------------------------------------------------------------ drafter architecture
    num_draft_layers: int = field(
        default=1, metadata={"help": "Decoder layers in the drafter backbone (paper: 5; 1-2 is enough for small targets)."}
    )
    block_size: int = field(
        default=7, metadata={"help": "Tokens drafted per round (gamma); the anchor position predicts the first one."}
    )
    markov_rank: int = field(default=256, metadata={"help": "Rank of the Markov transition head; 0 disables it (DFlash)."})
    markov_head_type: str = field(
        default="vanilla", metadata={"help": f"Markov head variant, one of {MARKOV_HEAD_TYPES}."}
    )
    enable_confidence_head: bool = field(
        default=True, metadata={"help": "Train the confidence head (per-position survival probabilities)."}
    )
    confidence_head_with_markov: bool = field(
        default=True, metadata={"help": "Feed the previous token's Markov embedding to the confidence head."}
    )
    context_input_norm: bool = field(
        default=True,
        metadata={"help": "RMS-normalize each target layer's features before fc (helps targets whose residual "
                  "scale grows with depth, e.g. Gemma 3). hf-dspark only: drafters trained with it export to the "
                  "Hub layout, not to the DeepSpec / vLLM / SGLang / speculators layouts; use false for those."},
    )
    draft_vocab_size: int | None = field(
        default=None,
        metadata={"help": "Reduced draft vocabulary size, chosen by token frequency in the training data; "
                  "unset = full target vocabulary."},
    )
    target_layer_ids: list[int] | None = field(
        default=None,
        metadata={"help": "Target layers whose hidden states feed the drafter (cache mode: taken from the cache "
                  "manifest; online default: 5 spread over the depth)."},
    )
    # ------------------------------------------------------------------ loss recipe
    num_anchors: int = field(
        default=64, metadata={"help": "Anchor blocks sampled per sequence per step (CPU default 64; paper 512)."}
    )
    loss_decay_gamma: float = field(
        default=4.0, metadata={"help": "Position weights w_k = exp(-k / loss_decay_gamma) over the block."}
    )
    ce_loss_alpha: float = field(default=0.1, metadata={"help": "Weight of the cross-entropy to the true next token."})
    l1_loss_alpha: float = field(
        default=0.9, metadata={"help": "Weight of the L1 distance between draft and target distributions."}
    )
    confidence_head_alpha: float = field(default=1.0, metadata={"help": "Weight of the confidence-head BCE loss."})
    # ------------------------------------------------------------------ data
    online: bool = field(
        default=False,
        metadata={"help": "Run the frozen target inside each step (data = token ids only) instead of reading a "
                  "feature cache. Set automatically by `hf-dspark train --data`."},
    )
    target_topk: int = field(
        default=64,
        metadata={"help": "Online mode: entries of the target distribution kept per position (as the cache "
                  "stores); 0 uses the dense logits (small vocabularies only)."},
    )
    max_seq_len: int | None = field(
        default=None, metadata={"help": "Online mode: truncate sequences to this many tokens (unset = no limit)."}
    )
    verify_cache: bool = field(
        default=True, metadata={"help": "Check every cache shard's sha256 before training (reads the cache once, on "
                                "the first process of each machine; the other ranks get its verdict)."}
    )
    # ------------------------------------------------------------------ LoRA
    use_lora: bool = field(
        default=False,
        metadata={"help": "Train LoRA adapters on the backbone linear layers instead of full weights; fc, "
                  "hidden_norm and the heads stay fully trainable.", "aliases": ["--lora"]},
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator (scale = lora_alpha / lora_r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: list(LORA_MODULE_NAMES),
        metadata={"help": f"Backbone linear layers (in `layers.*`) that get adapters, among {LORA_MODULE_NAMES}."},
    )
    merge_lora: bool = field(
        default=True,
        metadata={"help": "Merge the adapters into the drafter when saving the final model (else save the adapter "
                  "next to the base drafter).", "aliases": ["--merge"]},
    )
    # ------------------------------------------------------------------ changed TrainingArguments defaults
    learning_rate: float = field(default=6e-4, metadata={"help": "Peak AdamW learning rate (DSpark recipe: 6e-4)."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Learning-rate schedule after warmup."})
    warmup_steps: float = field(
        default=0.04, metadata={"help": "Warmup: an integer number of steps, or a float in [0, 1) = ratio of all steps."}
    )
    per_device_train_batch_size: int = field(default=4, metadata={"help": "Sequences per device per step."})
    logging_steps: float = field(default=10, metadata={"help": "Log the averaged metrics every this many steps."})
    save_steps: float = field(default=200, metadata={"help": "Save a resumable checkpoint every this many steps."})
    save_total_limit: int | None = field(default=2, metadata={"help": "Keep at most this many checkpoints."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Must stay False: the drafter's inputs are not its forward's arguments."}
    )
    prediction_loss_only: bool = field(default=True, metadata={"help": "Evaluation computes the loss and metrics only."})
    include_num_input_tokens_seen: str = field(
        default="non_padding", metadata={"help": "Count trained tokens ('non_padding', 'all' or 'no') for tokens/s."}
    )

    def __post_init__(self):
        super().__post_init__()
        self.validate_dspark()

    def validate_dspark(self) -> None:
        """Raise ``ValueError`` naming the field, the value and the fix."""
        if self.num_draft_layers < 1:
            raise _error("num_draft_layers", self.num_draft_layers, "use at least 1 decoder layer")
        if self.block_size < 2:
            raise _error("block_size", self.block_size, "use at least 2 (the anchor plus one mask token)")
        if self.num_anchors < 1:
            raise _error("num_anchors", self.num_anchors, "sample at least 1 anchor block per sequence")
        if self.markov_head_type not in MARKOV_HEAD_TYPES:
            raise _error("markov_head_type", self.markov_head_type, f"choose one of {MARKOV_HEAD_TYPES}")
        if self.markov_rank < 0:
            raise _error("markov_rank", self.markov_rank, "use 0 (no Markov head) or a positive rank")
        if self.draft_vocab_size is not None and self.draft_vocab_size < 1:
            raise _error("draft_vocab_size", self.draft_vocab_size, "use a positive size or leave it unset (full vocabulary)")
        if self.loss_decay_gamma <= 0:
            raise _error("loss_decay_gamma", self.loss_decay_gamma, "use a positive decay (DSpark: 4.0)")
        alphas = {"ce_loss_alpha": self.ce_loss_alpha, "l1_loss_alpha": self.l1_loss_alpha,
                  "confidence_head_alpha": self.confidence_head_alpha}
        for name, value in alphas.items():
            if value < 0:
                raise _error(name, value, "loss weights must be >= 0")
        if self.ce_loss_alpha == 0 and self.l1_loss_alpha == 0:
            raise _error("l1_loss_alpha", self.l1_loss_alpha, "ce_loss_alpha and l1_loss_alpha cannot both be 0")
        if self.target_topk < 0:
            raise _error("target_topk", self.target_topk, "use 0 (dense, online only) or a positive k (default 64)")
        if self.max_seq_len is not None and self.max_seq_len <= self.block_size:
            raise _error("max_seq_len", self.max_seq_len, f"must exceed block_size={self.block_size} (or leave it unset)")
        if self.target_layer_ids is not None and list(self.target_layer_ids) != sorted(set(self.target_layer_ids)):
            raise _error("target_layer_ids", self.target_layer_ids, "use sorted, unique layer indices")
        if self.use_lora:
            if self.lora_r < 1:
                raise _error("lora_r", self.lora_r, "use a positive LoRA rank")
            if not 0 <= self.lora_dropout < 1:
                raise _error("lora_dropout", self.lora_dropout, "use a dropout probability in [0, 1)")
            unknown = sorted(set(self.lora_target_modules) - set(LORA_MODULE_NAMES))
            if not self.lora_target_modules or unknown:
                raise _error("lora_target_modules", self.lora_target_modules,
                             f"choose a non-empty subset of {LORA_MODULE_NAMES}")
        # transformers.TrainingArguments checks none of these; they would fail in the first step (a
        # DataLoader with batch_size=0) or train silently backwards (a negative learning rate).
        if not math.isfinite(self.learning_rate) or self.learning_rate < 0:
            raise _error("learning_rate", self.learning_rate, "use a finite learning rate >= 0 (DSpark: 6e-4)")
        for name in ("per_device_train_batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise _error(name, getattr(self, name), "use an integer >= 1")
        if self.remove_unused_columns:
            raise _error("remove_unused_columns", True, "set it to False; the trainer needs every collated column")


__all__ = ["DSparkTrainingArguments", "LORA_MODULE_NAMES", "add_hf_dataclass_arguments"]


class _FlagRecorder(HfArgumentParser):
    """An ``HfArgumentParser`` that keeps the ``add_argument`` calls its constructor makes for a dataclass."""

    def __init__(self, dataclass_type) -> None:
        self.calls: list[tuple[tuple, dict]] = []
        super().__init__(dataclass_type, add_help=False)

    def add_argument(self, *args, **kwargs):
        self.calls.append((args, dict(kwargs)))
        return super().add_argument(*args, **kwargs)


def add_hf_dataclass_arguments(parser, dataclass_type, skip: Container[str] = ()) -> list:
    """Add the flags ``HfArgumentParser`` makes for the fields of ``dataclass_type`` to ``parser`` (an argparse
    parser or argument group), except those of the fields named in ``skip``; ``HfArgumentParser`` itself only
    fills a parser of its own. Each flag's dashed spelling comes first (``--max-steps``, then ``--max_steps``).
    Returns the argparse actions added."""
    actions = []
    for args, kwargs in _FlagRecorder(dataclass_type).calls:
        if kwargs.get("dest", args[0].lstrip("-").replace("-", "_")) not in skip:
            actions.append(parser.add_argument(*sorted(args, key=lambda spelling: "_" in spelling), **kwargs))
    return actions
