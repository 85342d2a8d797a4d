"""vLLM speculators' DSpark checkpoint format, both ways.

speculators (``pip install speculators``, checked against 0.9.0) saves a DSpark drafter as a
``DSparkSpeculatorConfig`` (``speculators_model_type: "dspark"``) plus the state dict of its
``DSparkDraftModel``; vLLM serves that format. How it maps to hf-dspark:

Config
    * ``transformer_layer_config``: a Qwen3 decoder config of the draft layers (``hidden_size``,
      ``num_hidden_layers`` = draft layers, heads, ``head_dim``, ``rope_parameters``...;
      ``vocab_size`` is the target vocabulary). Only the Qwen3-style backbone exists there.
    * ``aux_hidden_state_layer_ids`` = ``[l + 1 for l in target_layer_ids]``: speculators indexes
      the hidden-state list directly (index 0 is the embedding output), hf-dspark and DeepSpec name
      the layer whose OUTPUT is read (``hidden_states[l + 1]``). This is the off-by-one.
    * ``sample_from_anchor: true``: the anchor position predicts the first draft token (DSpark's
      convention, and hf-dspark's); ``speculative_tokens = block_size``.
    * ``draft_vocab_size`` (the target vocabulary when there is no reduced vocabulary),
      ``block_size``, ``mask_token_id``, ``markov_rank``, ``markov_head_type``,
      ``enable_confidence_head``, ``confidence_head_with_markov``, ``target_hidden_size``.
    * ``speculators_config.verifier.name_or_path`` = ``target_model_name`` (speculators reloads
      the embedding table, LM head and final norm from there).
    * hf-dspark settings speculators has no field for (``num_target_layers``, STS temperatures,
      prompt encoding, training recipe) ride along under ``"hf_dspark"`` (speculators keeps unknown
      keys) so that a round trip restores them.

Tensors
    * names of the backbone and heads are the same (``fc``, ``hidden_norm``, ``layers.N.*``,
      ``norm``, ``markov_head.*``, ``confidence_head.proj``);
    * ``embed_tokens`` / ``lm_head`` / ``verifier_*`` are not stored (speculators takes them from
      the verifier), except that a reduced vocabulary stores ``lm_head.weight`` = the target's
      LM-head rows of the draft vocabulary;
    * reduced vocabulary: ``d2t`` as offsets (``target_id - draft_id``), ``t2d`` a boolean mask over
      the target vocabulary, draft ids in ascending target-id order (speculators selects LM-head rows
      with ``t2d``), and ``markov_w1`` indexed by target ids (zero rows outside the draft vocabulary,
      which is what hf-dspark uses for such previous tokens).

Not representable (refused by name): the Gemma 4 backbone, ``context_input_norm`` (speculators
feeds raw target features to ``fc``), ``target_hidden_size != hidden_size`` (speculators sizes
``fc`` from the draft hidden size), layer ``-1`` (refused as for the other engine formats).
Converting back refuses ``sample_from_anchor: false`` checkpoints (a different block layout),
sliding-window draft layers, and a ``markov_w1`` with trained rows outside the draft vocabulary.
"""

from __future__ import annotations

import torch

from hf_dspark.errors import CheckpointError, DSparkConfigError

SPECULATORS_VERSION = "0.9.0"
# hf-dspark settings stored under "hf_dspark" in a speculators config.json.
_EXTRA_FIELDS = (
    "num_target_layers", "target_model_name", "confidence_temperatures", "prompt_chat_template", "num_anchors",
    "loss_decay_gamma", "ce_loss_alpha", "l1_loss_alpha", "confidence_head_alpha",
)
# Decoder fields copied into transformer_layer_config (a Qwen3 config).
_LAYER_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps", "max_position_embeddings", "attention_bias",
    "attention_dropout", "initializer_range", "bos_token_id", "eos_token_id", "pad_token_id",
)


def _error(field: str, value, fix: str) -> DSparkConfigError:
    return DSparkConfigError(f"DSparkConfig.{field}={value!r} cannot be exported in speculators' DSpark format: {fix}")


def check_speculators_support(config) -> None:
    """Refuse drafters speculators' ``DSparkDraftModel`` cannot represent."""
    if config.backbone_type != "qwen3":
        raise _error("backbone_type", config.backbone_type,
                     "speculators' DSpark model has Qwen3-style draft layers only; use --format hub or deepspec")
    if config.context_input_norm:
        raise _error("context_input_norm", True,
                     "speculators feeds the raw target features to fc (no per-layer RMSNorm); train with "
                     "context_input_norm=False to export there")
    if config.target_hidden_size != config.hidden_size:
        raise _error("target_hidden_size", config.target_hidden_size,
                     f"speculators sizes fc from the draft hidden size ({config.hidden_size})")
    if min(config.target_layer_ids) < 0:
        raise _error("target_layer_ids", config.target_layer_ids,
                     "layer -1 (the embedding output) is not exported to serving formats")


def speculators_config(config, verifier_architectures: list[str] | None = None) -> dict:
    """``config.json`` of the speculators DSpark format for a DSparkConfig."""
    check_speculators_support(config)
    layer = {name: getattr(config, name) for name in _LAYER_FIELDS}
    layer.update(
        model_type="qwen3",
        rope_parameters=dict(config.rope_parameters),
        layer_types=["full_attention"] * config.num_hidden_layers,
        sliding_window=None,
        use_sliding_window=False,
        tie_word_embeddings=False,
    )
    with_markov = bool(config.enable_confidence_head and config.confidence_head_with_markov and config.markov_rank > 0)
    return {
        "architectures": ["DSparkSpeculator"],
        "speculators_model_type": "dspark",
        "speculators_version": SPECULATORS_VERSION,
        "speculators_config": {
            "algorithm": "dspark",
            "default_proposal_method": "greedy",
            "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": config.block_size,
                                  "verifier_accept_k": 1, "accept_tolerance": 0.0}],
            "verifier": {"name_or_path": config.target_model_name, "architectures": list(verifier_architectures or [])},
        },
        "transformer_layer_config": layer,
        "draft_vocab_size": config.effective_draft_vocab_size,
        "block_size": config.block_size,
        "target_hidden_size": config.target_hidden_size,
        "aux_hidden_state_layer_ids": [i + 1 for i in config.target_layer_ids],
        "mask_token_id": config.mask_token_id,
        "sliding_window_non_causal": False,
        "sample_from_anchor": True,
        "markov_rank": config.markov_rank,
        "markov_head_type": config.markov_head_type,
        "enable_confidence_head": config.enable_confidence_head,
        "confidence_head_with_markov": with_markov,
        "hf_dspark": {name: getattr(config, name) for name in _EXTRA_FIELDS},
    }


def speculators_state_dict(model, target_output_embedding: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Tensors of the speculators DSpark format (see the module docstring)."""
    config = model.config
    check_speculators_support(config)
    tensors = {name: t.detach().cpu().clone() for name, t in model.state_dict().items()}
    tensors.pop("embed_tokens.weight", None)
    own_head = tensors.pop("lm_head.weight", None)
    d2t = tensors.pop("d2t", None)
    if d2t is None:
        return tensors
    # Draft ids in ascending target-id order: speculators picks the LM-head rows with the t2d mask.
    order = d2t.argsort()
    d2t = d2t[order]
    w1_key, w2_key = "markov_head.markov_w1.weight", "markov_head.markov_w2.weight"
    if w2_key in tensors:
        w1 = tensors[w1_key][order]
        tensors[w1_key] = w1.new_zeros((config.vocab_size, w1.shape[1]))
        tensors[w1_key][d2t] = w1
        tensors[w2_key] = tensors[w2_key][order]
    head = own_head if own_head is not None else target_output_embedding
    if head is None:
        raise DSparkConfigError(
            f"DSparkConfig.draft_vocab_size={config.draft_vocab_size}: speculators needs the LM-head rows of the draft "
            "vocabulary in the checkpoint, and this drafter borrows the target's LM head; pass --target <target folder "
            "or Hub id> so they can be read from the target's weights"
        )
    tensors["lm_head.weight"] = head[d2t].to(next(iter(tensors.values())).dtype).clone()
    tensors["d2t"] = d2t - torch.arange(d2t.numel(), dtype=d2t.dtype)
    t2d = torch.zeros(config.vocab_size, dtype=torch.bool)
    t2d[d2t] = True
    tensors["t2d"] = t2d
    return tensors


def _refuse(where: str, field: str, value, why: str) -> CheckpointError:
    return CheckpointError(f"{where}: speculators config {field}={value!r} cannot be loaded by hf-dspark: {why}")


def dspark_from_speculators(config: dict, tensors: dict[str, torch.Tensor], where: str = "the checkpoint"
                            ) -> tuple[dict, dict[str, torch.Tensor]]:
    """A DSparkConfig dict and our state dict from a speculators DSpark ``config.json`` dict and tensors."""
    layer = dict(config.get("transformer_layer_config") or {})
    if layer.get("model_type", "qwen3") != "qwen3":
        raise _refuse(where, "transformer_layer_config.model_type", layer.get("model_type"),
                      "speculators' DSpark draft layers are Qwen3 layers")
    if not config.get("sample_from_anchor", True):
        raise _refuse(where, "sample_from_anchor", False,
                      "hf-dspark drafters predict the first draft token at the anchor position (sample_from_anchor true)")
    layer_types = layer.get("layer_types") or []
    if any(t != "full_attention" for t in layer_types):
        raise _refuse(where, "transformer_layer_config.layer_types", layer_types, "sliding-window draft layers")
    # speculators serializes transformer_layer_config as a diff against Qwen3Config's defaults
    from transformers import Qwen3Config

    defaults = Qwen3Config().to_dict()
    layer = {**{k: defaults.get(k) for k in _LAYER_FIELDS + ("rope_parameters",)}, **layer}
    aux = config.get("aux_hidden_state_layer_ids")
    if not aux:
        raise _refuse(where, "aux_hidden_state_layer_ids", aux, "the target layers the drafter reads are not recorded")
    extras = dict(config.get("hf_dspark") or {})
    verifier = (config.get("speculators_config") or {}).get("verifier") or {}
    vocab = layer["vocab_size"]
    draft_vocab = config.get("draft_vocab_size") or vocab
    out = {name: layer[name] for name in _LAYER_FIELDS}
    out.update(
        rope_parameters=layer.get("rope_parameters"),
        target_layer_ids=[int(a) - 1 for a in aux],
        target_hidden_size=config.get("target_hidden_size") or layer["hidden_size"],
        block_size=config["block_size"],
        mask_token_id=config.get("mask_token_id"),
        markov_rank=config.get("markov_rank", 256),
        markov_head_type=config.get("markov_head_type", "vanilla"),
        enable_confidence_head=config.get("enable_confidence_head", True),
        confidence_head_with_markov=config.get("confidence_head_with_markov", True),
        draft_vocab_size=draft_vocab if draft_vocab != vocab else None,
        embeddings_from_target=True,
        backbone_type="qwen3",
        target_model_name=verifier.get("name_or_path"),
    )
    out.update({k: v for k, v in extras.items() if k in _EXTRA_FIELDS and v is not None})
    if out["mask_token_id"] is None:
        raise _refuse(where, "mask_token_id", None, "the drafter's mask token is not recorded")

    tensors = {k: v for k, v in tensors.items()
               if not k.startswith(("embed_tokens.", "verifier_lm_head.", "verifier_norm."))}
    t2d = tensors.pop("t2d", None)
    d2t = tensors.pop("d2t", None)
    if draft_vocab == vocab:
        tensors.pop("lm_head.weight", None)  # the verifier's own head, when a checkpoint stores it
    else:
        if d2t is None:
            raise _refuse(where, "draft_vocab_size", draft_vocab, "the checkpoint has no d2t vocabulary map")
        draft_to_target = d2t.long() + torch.arange(d2t.numel())
        if t2d is not None and not torch.equal(t2d.bool().nonzero().flatten(), draft_to_target.sort().values):
            raise CheckpointError(f"{where}: t2d and d2t disagree on the draft vocabulary")
        from hf_dspark.checkpoints.loading import draft_rows_of_w1

        w1_key = "markov_head.markov_w1.weight"
        if w1_key in tensors:
            tensors[w1_key] = draft_rows_of_w1(tensors[w1_key], draft_to_target)
        tensors["d2t"] = draft_to_target
        tensors.pop("lm_head.weight", None)  # the target's rows; hf-dspark slices the target's head itself
    return out, tensors


__all__ = ["check_speculators_support", "speculators_config", "speculators_state_dict", "dspark_from_speculators"]
