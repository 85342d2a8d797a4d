"""Configuration of DSpark drafters.

This file ships as remote code next to drafter checkpoints: it imports only torch,
transformers and its sibling files.

Field names follow the DeepSpec checkpoints (``target_layer_ids``, ``block_size``,
``mask_token_id``, ``markov_rank``, ``markov_head_type``, ``enable_confidence_head``,
``confidence_head_with_markov``, ``num_target_layers``...) so that one ``config.json`` is
understood by hf-dspark, DeepSpec and serving engines. ``vocab_size`` is always the
TARGET's vocabulary (transformers' assisted decoding compares it with the target's); a
reduced draft vocabulary lives in ``draft_vocab_size`` plus a stored draft-to-target map.
"""

from __future__ import annotations

from transformers import PretrainedConfig

from .errors import CheckpointError, DSparkConfigError

MARKOV_HEAD_TYPES = ("vanilla", "gated", "rnn")
BACKBONE_TYPES = ("qwen3", "gemma4")
# DeepSpec writes the drafter's backbone as the config's model_type / architecture.
_GEMMA4_SOURCE_TYPES = ("gemma4", "gemma4_text")
# Gemma 4 features the DSpark drafter backbone does not implement: field -> value that means "off".
_UNSUPPORTED_GEMMA4_FIELDS = {
    "enable_moe_block": "a mixture-of-experts block",
    "hidden_size_per_layer_input": "per-layer inputs",
    "num_kv_shared_layers": "KV sharing across layers",
}
VERIFICATION_POLICIES = ("full", "threshold", "cost")


def _config_error(field: str, value, fix: str) -> DSparkConfigError:
    # errors.py ships next to this file as remote code, so stand-alone loading raises the same classes.
    return DSparkConfigError(f"DSparkConfig.{field}={value!r} is invalid: {fix}")


# Integer fields and their smallest valid value (a float or a string here used to fail much later,
# inside generate or the model's constructor); the optional ones may also be None.
_INTEGER_FIELDS = {
    "vocab_size": 1, "hidden_size": 2, "intermediate_size": 1, "num_hidden_layers": 1, "num_attention_heads": 1,
    "num_key_value_heads": 1, "head_dim": 2, "max_position_embeddings": 1, "num_target_layers": 1,
    "target_hidden_size": 1, "block_size": 2, "mask_token_id": 0, "markov_rank": 0, "num_anchors": 1,
}
_OPTIONAL_INTEGER_FIELDS = {"draft_vocab_size": 1, "global_head_dim": 2, "num_global_key_value_heads": 1}
_INTEGER_NOTES = {
    "block_size": " (the anchor plus at least one mask token)",
    "markov_rank": " (0 disables the Markov head)",
    "num_hidden_layers": " (the drafter needs a decoder layer)",
    "draft_vocab_size": "; use None (not 0) for the full target vocabulary",
}


def _check_integer(field: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _config_error(field, value, f"use an integer >= {minimum}{_INTEGER_NOTES.get(field, '')}")


class DSparkConfig(PretrainedConfig):
    r"""Configuration of a [`DSparkDraftModel`].

    Backbone fields (``hidden_size``, ``num_hidden_layers``, ``num_attention_heads``,
    ``num_key_value_heads``, ``head_dim``, ``intermediate_size``, ``hidden_act``,
    ``rms_norm_eps``, ``rope_parameters``, ``max_position_embeddings``,
    ``attention_bias``) describe the drafter's own decoder layers. ``hidden_size`` must equal
    the target's hidden size because the target's embedding table and LM head are reused.

    Backbone:
        backbone_type (`str`): ``"qwen3"`` (RMSNorm, GQA attention with RoPE and q/k-norm, SwiGLU
            MLP; DeepSpec's ``Qwen3DSparkModel``) or ``"gemma4"`` (DeepSpec's
            ``Gemma4DSparkModel``: token embedding scaled by sqrt(hidden_size), sandwich norms,
            q/k norms with scale and a v norm without, attention scale 1.0, gelu-tanh MLP,
            ``layer_scalar``, the target's full-attention RoPE, soft-capped logits). Read from
            ``model_type`` (``qwen3`` / ``gemma4_text``) when loading a DeepSpec ``config.json``.
        global_head_dim (`int`, *optional*): Gemma 4: head dimension of the drafter's attention
            (the target's full-attention head dimension); ``head_dim`` is then informative only.
        num_global_key_value_heads (`int`, *optional*): Gemma 4 with ``attention_k_eq_v``: number
            of key/value heads.
        attention_k_eq_v (`bool`): Gemma 4: no ``v_proj``; values are the raw ``k_proj`` output
            (before k-norm and RoPE) through the scale-free v-norm.
        final_logit_softcapping (`float`, *optional*): Gemma 4: base logits become
            ``c * tanh(z / c)`` before the Markov bias is added.

    DSpark fields:
        target_layer_ids (`list[int]`): target layers whose hidden states feed the drafter
            (layer ``l`` is ``hidden_states[l + 1]`` of a transformers forward; ``-1`` is the
            embedding output). Sorted, unique, in ``[-1, num_target_layers)``.
        num_target_layers (`int`): number of decoder layers of the target.
        block_size (`int`): tokens drafted per round (anchor position predicts the first one).
        mask_token_id (`int`): target token id used to fill the block after the anchor.
        markov_rank (`int`): rank of the Markov transition head; ``0`` disables it (DFlash).
        markov_head_type (`str`): ``"vanilla"``, ``"gated"`` or ``"rnn"``.
        enable_confidence_head (`bool`): predict per-position survival probabilities.
        confidence_head_with_markov (`bool`): feed the Markov embedding of the previous
            token to the confidence head as well as the hidden state.
        draft_vocab_size (`int`, *optional*): size of the reduced draft vocabulary; ``None``
            means the drafter predicts over the full target vocabulary.
        embeddings_from_target (`bool`): the embedding table and LM head are borrowed from the
            target at run time and not stored in the checkpoint.
        target_model_name (`str`, *optional*): Hub id / name of the target the drafter serves.
        target_hidden_size (`int`, *optional*): hidden size of the target (defaults to
            ``hidden_size``).
        context_input_norm (`bool`): RMS-normalize each target layer's hidden states (learned
            per-layer weight) before ``fc``. Targets such as Gemma 3 have residual streams whose
            scale grows by orders of magnitude with depth and carries huge outlier dimensions;
            without this the deepest layer dominates the projection. Off in DeepSpec checkpoints.
        confidence_temperatures (`list[float]`, *optional*): per-position temperatures fitted
            by Sequential Temperature Scaling, applied to the confidence logits.
        prompt_chat_template (`bool`, *optional*): whether the training prompts were wrapped in
            the target's chat template (``False``: raw prompt text, as for base models). Tools
            that encode prompts for this drafter follow it by default; ``None`` means unknown.
        num_anchors, loss_decay_gamma, ce_loss_alpha, l1_loss_alpha, confidence_head_alpha:
            training recipe defaults (anchors per sequence, position-weight decay, loss weights).
    """

    model_type = "dspark"

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 1024,
        intermediate_size: int = 3072,
        num_hidden_layers: int = 1,
        num_attention_heads: int = 8,
        num_key_value_heads: int = 2,
        head_dim: int | None = None,
        hidden_act: str = "silu",
        rms_norm_eps: float = 1e-6,
        max_position_embeddings: int = 32768,
        rope_parameters: dict | None = None,
        attention_bias: bool = False,
        attention_dropout: float = 0.0,
        initializer_range: float = 0.02,
        target_layer_ids: list[int] | None = None,
        num_target_layers: int | None = None,
        target_hidden_size: int | None = None,
        context_input_norm: bool = False,
        block_size: int = 7,
        mask_token_id: int | None = None,
        markov_rank: int = 256,
        markov_head_type: str = "vanilla",
        enable_confidence_head: bool = True,
        confidence_head_with_markov: bool = True,
        draft_vocab_size: int | None = None,
        embeddings_from_target: bool = False,
        target_model_name: str | None = None,
        confidence_temperatures: list[float] | None = None,
        prompt_chat_template: bool | None = None,
        num_anchors: int = 512,
        loss_decay_gamma: float = 4.0,
        ce_loss_alpha: float = 0.1,
        l1_loss_alpha: float = 0.9,
        confidence_head_alpha: float = 1.0,
        tie_word_embeddings: bool = False,
        backbone_type: str | None = None,
        global_head_dim: int | None = None,
        num_global_key_value_heads: int | None = None,
        attention_k_eq_v: bool = False,
        final_logit_softcapping: float | None = None,
        **kwargs,
    ):
        if "speculators_model_type" in kwargs:
            raise CheckpointError(
                "This config.json is in vLLM speculators' format (speculators_model_type="
                f"{kwargs['speculators_model_type']!r}), not a DSpark/DeepSpec config; load the folder with "
                "hf_dspark.load_drafter(dir) or convert it once with `hf-dspark convert --from speculators DIR --output OUT`"
            )
        source_model_type = kwargs.pop("model_type", None)
        kwargs.pop("eagle_aux_hidden_state_layer_ids", None)  # vLLM's copy of target_layer_ids + 1 (engine exports)
        if backbone_type is None:
            is_gemma4 = source_model_type in _GEMMA4_SOURCE_TYPES or "Gemma4DSparkModel" in (kwargs.get("architectures") or [])
            backbone_type = "gemma4" if is_gemma4 else "qwen3"
        # Gemma 4 configs name the MLP activation hidden_activation.
        hidden_act = kwargs.pop("hidden_activation", None) or hidden_act
        unsupported = {field: kwargs.pop(field, None) for field in _UNSUPPORTED_GEMMA4_FIELDS}
        # DeepSpec / older configs carry rope_theta at top level.
        rope_theta = kwargs.pop("rope_theta", None)
        if rope_parameters is None:
            rope_parameters = {"rope_type": "default", "rope_theta": float(rope_theta or 10000.0)}
        elif isinstance(rope_parameters.get("full_attention"), dict):
            # Per-layer-type RoPE (Gemma 4 targets): every drafter layer is a full-attention layer.
            rope_parameters = rope_parameters["full_attention"]
        # Checked before head_dim, mask_token_id and num_target_layers are derived from them.
        for field, value in (("vocab_size", vocab_size), ("hidden_size", hidden_size),
                             ("num_attention_heads", num_attention_heads)):
            _check_integer(field, value, _INTEGER_FIELDS[field])
        if any(isinstance(i, bool) or not isinstance(i, int) for i in target_layer_ids or []):
            raise _config_error("target_layer_ids", target_layer_ids, "use sorted, unique integer layer indices")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim if head_dim is not None else hidden_size // num_attention_heads
        self.hidden_act = hidden_act
        self.rms_norm_eps = rms_norm_eps
        self.max_position_embeddings = max_position_embeddings
        self.rope_parameters = dict(rope_parameters)
        self.attention_bias = attention_bias
        self.attention_dropout = attention_dropout
        self.initializer_range = initializer_range
        self.target_layer_ids = list(target_layer_ids) if target_layer_ids is not None else [0]
        self.num_target_layers = num_target_layers if num_target_layers is not None else max(self.target_layer_ids) + 1
        self.target_hidden_size = target_hidden_size if target_hidden_size is not None else hidden_size
        self.context_input_norm = context_input_norm
        self.block_size = block_size
        self.mask_token_id = mask_token_id if mask_token_id is not None else vocab_size - 1
        self.markov_rank = markov_rank
        self.markov_head_type = markov_head_type
        self.enable_confidence_head = enable_confidence_head
        self.confidence_head_with_markov = confidence_head_with_markov
        self.draft_vocab_size = draft_vocab_size
        self.embeddings_from_target = embeddings_from_target
        self.target_model_name = target_model_name
        self.confidence_temperatures = list(confidence_temperatures) if confidence_temperatures else None
        self.prompt_chat_template = None if prompt_chat_template is None else bool(prompt_chat_template)
        self.num_anchors = num_anchors
        self.loss_decay_gamma = loss_decay_gamma
        self.ce_loss_alpha = ce_loss_alpha
        self.l1_loss_alpha = l1_loss_alpha
        self.confidence_head_alpha = confidence_head_alpha
        self.backbone_type = backbone_type
        self.global_head_dim = global_head_dim
        self.num_global_key_value_heads = num_global_key_value_heads
        self.attention_k_eq_v = bool(attention_k_eq_v)
        self.final_logit_softcapping = float(final_logit_softcapping) if final_logit_softcapping else None
        # DeepSpec writes layer_types; every layer of a DSpark drafter is a (bidirectional-in-block)
        # full-attention layer, so anything else cannot be represented.
        layer_types = kwargs.pop("layer_types", None)
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
        for field, value in unsupported.items():
            if value:
                raise _config_error(
                    field, value, f"{_UNSUPPORTED_GEMMA4_FIELDS[field]} is not supported by the DSpark drafter "
                    "backbone; only dense Gemma 4 drafter layers (value 0 / false) can be loaded"
                )
        if layer_types is not None and any(t != "full_attention" for t in layer_types):
            raise _config_error(
                "layer_types", layer_types, "DSpark drafter layers are full-attention layers only "
                "(sliding-window draft layers are not supported)"
            )
        self.validate_dspark()

    @property
    def attention_head_dim(self) -> int:
        """Head dimension of the drafter's attention (Gemma 4: ``global_head_dim``)."""
        if self.backbone_type == "gemma4" and self.global_head_dim:
            return self.global_head_dim
        return self.head_dim

    @property
    def attention_key_value_heads(self) -> int:
        """Number of key/value heads (Gemma 4 with ``attention_k_eq_v``: ``num_global_key_value_heads``)."""
        if self.backbone_type == "gemma4" and self.attention_k_eq_v and self.num_global_key_value_heads:
            return self.num_global_key_value_heads
        return self.num_key_value_heads

    @property
    def context_size(self) -> int:
        """Width of the concatenated target features fed to ``fc``."""
        return len(self.target_layer_ids) * self.target_hidden_size

    @property
    def effective_draft_vocab_size(self) -> int:
        return self.draft_vocab_size or self.vocab_size

    def save_pretrained(self, save_directory, *args, **kwargs):
        self.validate_dspark()  # a value changed after construction is refused before it is written
        return super().save_pretrained(save_directory, *args, **kwargs)

    def validate_dspark(self) -> None:
        """Raise ``ValueError`` naming the field, the value and the fix for inconsistent settings."""
        for field, minimum in _INTEGER_FIELDS.items():
            _check_integer(field, getattr(self, field), minimum)
        for field, minimum in _OPTIONAL_INTEGER_FIELDS.items():
            if getattr(self, field) is not None:
                _check_integer(field, getattr(self, field), minimum)
        ids = self.target_layer_ids
        if not ids:
            raise _config_error("target_layer_ids", ids, "give at least one target layer index")
        if any(not isinstance(i, int) for i in ids) or list(ids) != sorted(set(ids)):
            raise _config_error("target_layer_ids", ids, "use sorted, unique integer layer indices")
        if ids[0] < -1 or ids[-1] >= self.num_target_layers:
            raise _config_error(
                "target_layer_ids",
                ids,
                f"indices must lie in [-1, num_target_layers) = [-1, {self.num_target_layers}); "
                "-1 is the embedding output",
            )
        if self.markov_head_type not in MARKOV_HEAD_TYPES:
            raise _config_error("markov_head_type", self.markov_head_type, f"choose one of {MARKOV_HEAD_TYPES}")
        if not 0 <= self.mask_token_id < self.vocab_size:
            raise _config_error(
                "mask_token_id", self.mask_token_id, f"pick a target token id in [0, vocab_size={self.vocab_size})"
            )
        if self.draft_vocab_size is not None and not 0 < self.draft_vocab_size <= self.vocab_size:
            raise _config_error(
                "draft_vocab_size",
                self.draft_vocab_size,
                f"must be positive and at most the target vocabulary ({self.vocab_size}); use None for the full vocabulary",
            )
        if self.backbone_type not in BACKBONE_TYPES:
            raise _config_error("backbone_type", self.backbone_type, f"choose one of {BACKBONE_TYPES}")
        if self.backbone_type != "gemma4" and (self.attention_k_eq_v or self.final_logit_softcapping):
            raise _config_error(
                "backbone_type", self.backbone_type,
                "attention_k_eq_v and final_logit_softcapping are Gemma 4 settings; set backbone_type='gemma4'",
            )
        if self.hidden_size % 2 or self.attention_head_dim % 2:
            field = "global_head_dim" if self.attention_head_dim != self.head_dim else "head_dim"
            raise _config_error(field, self.attention_head_dim, "RoPE needs an even head dimension")
        kv_field = "num_global_key_value_heads" if self.attention_key_value_heads != self.num_key_value_heads else "num_key_value_heads"
        if self.num_attention_heads % self.attention_key_value_heads:
            raise _config_error(
                kv_field,
                self.attention_key_value_heads,
                f"must divide num_attention_heads={self.num_attention_heads}",
            )
        temps = self.confidence_temperatures
        if temps is not None:
            if len(temps) != self.block_size or any(t <= 0 for t in temps):
                raise _config_error(
                    "confidence_temperatures",
                    temps,
                    f"give {self.block_size} positive temperatures (one per block position) or None",
                )


__all__ = ["DSparkConfig"]
