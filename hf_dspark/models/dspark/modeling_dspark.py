"""DSpark drafter: parallel block backbone fed with target features, Markov head, confidence head.

This file ships as remote code next to drafter checkpoints: it imports only torch,
transformers and its sibling files.

Layout of one drafting round (see docs/design.md, "The drafter"):

* context features: the target's hidden states of ``config.target_layer_ids`` for every
  committed token, concatenated, projected by ``fc`` and normalized by ``hidden_norm``;
  they are injected as extra keys/values in every draft attention layer;
* block input: the anchor (last committed token) followed by ``block_size - 1`` mask tokens;
  position ``k`` of the block predicts draft token ``k + 1``; attention inside the block is
  bidirectional and the block sees all context strictly before its anchor;
* base logits come from the target's frozen LM head (restricted to the draft vocabulary when
  one is configured); the Markov head adds a bias from the previously drafted token; the
  confidence head predicts the probability that each draft token survives verification given
  that the earlier ones did.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from .cache_dspark import DSparkDraftCache
from .configuration_dspark import DSparkConfig
from .errors import DevicePlacementError
from .generation_config_dspark import default_dspark_generation_config
from .generate_hook_dspark import install_generate_hook
from .loading_dspark import (  # noqa: F401  (CARD_FILE, CHECKSUMS_KEY, file_sha256: re-exported)
    CARD_FILE,
    CHECKSUMS_KEY,
    check_loading_info,
    check_weight_checksums,
    file_sha256,
    hub_kwargs,
    load_dspark_generation_config,
)
from .modeling_dspark_gemma4 import DSparkGemma4DecoderLayer, DSparkGemma4RMSNorm
from .modeling_dspark_layers import (
    DSparkConfidenceHead,
    DSparkDecoderLayer,
    DSparkMarkovHead,
    DSparkRMSNorm,
    DSparkRotaryEmbedding,
    drop_packed_copies,
    linear_product,
    pack_weight,
    packed_copies,
    packed_copy,
    packed_linear,
    packed_product_applies,
    weight_key,
)
from .target_binding_dspark import (  # noqa: F401  (default_target_layer_ids: re-exported)
    check_target_matches,
    default_target_layer_ids,
    drafter_config_from_target,
    execution_device,
    on_meta_without_loader,
)
from .training_dspark import DSparkTrainingOutput, anchor_blocks, sample_anchor_positions
from .verify_head_dspark import skinny_linear, use_skinny


# --------------------------------------------------------------------------------------
# output of one inference block (the training output is in training_dspark, the cache in cache_dspark)
# --------------------------------------------------------------------------------------
@dataclass
class DSparkBlockOutput(ModelOutput):
    """Output of one inference block. ``hidden_states`` [batch, K, H], ``base_logits`` [batch, K, Vd]."""

    hidden_states: torch.Tensor | None = None
    base_logits: torch.Tensor | None = None


# --------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------
class DSparkPreTrainedModel(PreTrainedModel):
    config_class = DSparkConfig
    base_model_prefix = "dspark"
    supports_gradient_checkpointing = True  # the decoder layers are GradientCheckpointingLayers
    _no_split_modules = ["DSparkDecoderLayer", "DSparkGemma4DecoderLayer"]
    # Attention goes through transformers' ALL_ATTENTION_FUNCTIONS (modeling_dspark_layers.attention_function).
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    @torch.no_grad()
    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            module.weight.normal_(mean=0.0, std=std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(mean=0.0, std=std)
        elif isinstance(module, DSparkRMSNorm) or (isinstance(module, DSparkGemma4RMSNorm) and module.with_scale):
            module.weight.fill_(1.0)
        elif isinstance(module, DSparkGemma4DecoderLayer):
            module.layer_scalar.fill_(1.0)
        if isinstance(module, DSparkMarkovHead):
            # Start as "no transition bias" so a fresh drafter equals its parallel backbone.
            module.markov_w2.weight.zero_()

    def _apply(self, fn, recurse=True):
        # ``to``, ``half``, ``cuda``... give the weights new storage: drop the copies made from the old one
        drop_packed_copies(self)
        if isinstance(self, DSparkDraftModel):
            self._head_cache = None
        return super()._apply(fn, recurse)


class DSparkDraftModel(DSparkPreTrainedModel):
    """The DSpark drafter. See the module docstring for the architecture.

    Pass it as ``assistant_model`` to ``target.generate``; decoding settings (verification
    policy, confidence threshold, latency table) live in ``draft.generation_config`` and are
    saved to ``generation_config.json`` next to the weights.
    """

    is_dspark_drafter = True

    def __init__(self, config: DSparkConfig):
        super().__init__(config)
        self.generation_config = default_dspark_generation_config()
        self.last_generation_stats = None
        if config.context_input_norm:
            self.context_norms = nn.ModuleList(
                [DSparkRMSNorm(config.target_hidden_size, eps=config.rms_norm_eps) for _ in config.target_layer_ids]
            )
        gemma4 = config.backbone_type == "gemma4"
        layer_class = DSparkGemma4DecoderLayer if gemma4 else DSparkDecoderLayer
        norm_class = DSparkGemma4RMSNorm if gemma4 else DSparkRMSNorm
        self.fc = nn.Linear(config.context_size, config.hidden_size, bias=False)
        self.hidden_norm = norm_class(config.hidden_size, eps=config.rms_norm_eps)
        self.layers = nn.ModuleList([layer_class(config, i) for i in range(config.num_hidden_layers)])
        self.norm = norm_class(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = DSparkRotaryEmbedding(config)
        if not config.embeddings_from_target:
            self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.markov_head = DSparkMarkovHead(config) if config.markov_rank > 0 else None
        self.confidence_head = DSparkConfidenceHead(config) if config.enable_confidence_head else None
        if config.draft_vocab_size is not None:
            # d2t[i] = target id of draft token i (absolute ids).
            self.register_buffer("d2t", torch.arange(config.draft_vocab_size, dtype=torch.long), persistent=True)
        self._borrowed: dict[str, nn.Module] = {}
        self._head_cache: tuple | None = None
        self.post_init()

    # ---------------------------------------------------------------- target binding
    @classmethod
    def from_target(cls, target_model, tokenizer=None, **overrides) -> "DSparkDraftModel":
        """Build a fresh drafter for ``target_model`` (any ``AutoModelForCausalLM``).

        Reads hidden size, vocabulary, number of layers and attention geometry from the
        target; ``overrides`` (any ``DSparkConfig`` field) win. The embedding table and LM head
        are borrowed from the target (not duplicated).
        """
        config, draft_token_ids = drafter_config_from_target(target_model, tokenizer, **overrides)
        param = next(target_model.parameters())
        model = cls(config).to(device=param.device)
        if draft_token_ids is not None:
            model.set_draft_vocab(draft_token_ids)
        model.bind_target(target_model)
        return model

    def check_target(self, target_model) -> None:
        """Raise ``DraftTargetMismatchError`` (a ``ValueError``) naming both sides when this drafter was
        built for another target."""
        check_target_matches(self.config, target_model)

    def bind_target(self, target_model) -> "DSparkDraftModel":
        """Check compatibility, move the drafter to the device of the target's input embedding, and
        borrow the target's (frozen) embedding table and LM head.

        The borrowed modules are not registered as sub-modules: they are neither saved with
        the drafter nor returned by ``parameters()``. They are always called as modules, never read
        as raw weights when their weights are not in memory: a target dispatched by accelerate (split
        over devices, offloaded to CPU or disk) keeps them on the ``meta`` device until its hooks load
        them for a forward. Raises ``DevicePlacementError`` for a target whose tables are on ``meta``
        with nothing to load them.
        """
        self.check_target(target_model)
        embedding, head = target_model.get_input_embeddings(), target_model.get_output_embeddings()
        for what, module in (("input embedding", embedding), ("LM head", head)):
            if module is not None and on_meta_without_loader(module):
                raise DevicePlacementError(
                    f"the target's {what} is on the meta device with no accelerate hook to load it (weights never "
                    "loaded); load the target with from_pretrained (any device_map) before binding a drafter"
                )
        device = execution_device(embedding)
        if device is not None and not any(p.is_meta for p in self.parameters()) and self.fc.weight.device != device:
            self.to(device)
        if self.config.embeddings_from_target:
            self._borrowed = {"embed_tokens": embedding, "lm_head": head}
            self._forget_head_copies()
        return self

    @property
    def is_bound(self) -> bool:
        return not self.config.embeddings_from_target or bool(self._borrowed)

    def _module(self, name: str) -> nn.Module:
        if not self.config.embeddings_from_target:
            return getattr(self, name)
        if name not in self._borrowed:
            raise RuntimeError(
                "This DSpark drafter borrows the target's embedding table and LM head; call "
                "draft.bind_target(target_model) first (generate(assistant_model=draft) does it for you)."
            )
        return self._borrowed[name]

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        embeds = self._module("embed_tokens")(input_ids)
        if self.config.backbone_type == "gemma4" and not self.config.embeddings_from_target:
            # Gemma 4 scales token embeddings by sqrt(hidden_size). A borrowed Gemma 4 target
            # embedding already does; an own table (DeepSpec's frozen copy of the target's) does not.
            embeds = embeds * torch.tensor(self.config.hidden_size**0.5, dtype=embeds.dtype)
        # a borrowed embedding of a split or offloaded target may compute on another device
        return embeds.to(device=self.fc.weight.device, dtype=self.fc.weight.dtype)

    # ---------------------------------------------------------------- draft vocabulary
    def set_draft_vocab(self, target_token_ids) -> None:
        """Set the reduced draft vocabulary (list of target ids; order defines draft ids)."""
        ids = torch.as_tensor(list(target_token_ids), dtype=torch.long)
        if self.config.draft_vocab_size is None or ids.numel() != self.config.draft_vocab_size:
            raise ValueError(
                f"set_draft_vocab got {ids.numel()} token ids but config.draft_vocab_size="
                f"{self.config.draft_vocab_size}; build the drafter with draft_vocab_size={ids.numel()}"
            )
        if ids.unique().numel() != ids.numel() or ids.min() < 0 or ids.max() >= self.config.vocab_size:
            raise ValueError("draft vocabulary ids must be unique target ids in [0, vocab_size)")
        self.d2t.copy_(ids.to(self.d2t.device))
        self._forget_head_copies()

    @property
    def draft_to_target(self) -> torch.Tensor | None:
        return getattr(self, "d2t", None)

    def target_to_draft_table(self) -> torch.Tensor | None:
        """[vocab_size] table mapping target ids to draft ids (-1 outside the draft vocabulary)."""
        d2t = self.draft_to_target
        if d2t is None:
            return None
        key = (d2t.data_ptr(), d2t._version, d2t.device)
        if getattr(self, "_t2d_cache", None) is None or self._t2d_cache[0] != key:
            table = torch.full((self.config.vocab_size,), -1, dtype=torch.long, device=d2t.device)
            table[d2t] = torch.arange(d2t.numel(), device=d2t.device)
            self._t2d_cache = (key, table)
        return self._t2d_cache[1]

    def target_to_draft(self, target_ids: torch.Tensor) -> torch.Tensor:
        """Map target ids to draft ids; ids outside the draft vocabulary map to -1."""
        table = self.target_to_draft_table()
        return target_ids if table is None else table[target_ids]

    def draft_ids_to_target(self, draft_ids: torch.Tensor) -> torch.Tensor:
        d2t = self.draft_to_target
        return draft_ids if d2t is None else d2t[draft_ids]

    def _forget_head_copies(self) -> None:
        self._head_cache = None
        packed_copies(self).pop("draft_head", None)

    def _draft_head_key(self, weight: torch.Tensor) -> tuple:
        d2t = self.draft_to_target
        return weight_key(weight), d2t.data_ptr(), d2t._version, self.fc.weight.dtype

    def _draft_head_weight(self) -> torch.Tensor:
        weight = self._module("lm_head").weight
        d2t = self.draft_to_target
        if d2t is None:
            return weight
        key = self._draft_head_key(weight)
        if self._head_cache is None or self._head_cache[0] != key:
            # The sliced head is cached in the drafter's dtype: a bf16 drafter then reads half the bytes.
            self._head_cache = (key, weight.detach()[d2t.to(weight.device)].to(self.fc.weight.dtype))
        return self._head_cache[1]

    def _packed_draft_head(self, x: torch.Tensor) -> torch.Tensor | None:
        """The sliced draft head packed for ``packed_linear`` when ``packed_product_applies`` to ``x`` (then
        no unpacked copy is kept), else ``None``. Only with a draft vocabulary: the whole head is the
        target's largest matrix and is not copied."""
        weight = self._module("lm_head").weight
        if self.draft_to_target is None or not packed_product_applies(x, device=weight.device, dtype=self.fc.weight.dtype):
            return None
        self._head_cache = None

        def build():
            return pack_weight(weight.detach()[self.draft_to_target.to(weight.device)].to(self.fc.weight.dtype))

        return packed_copy(self, "draft_head", self._draft_head_key(weight), build)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Base draft logits over the draft vocabulary from the target's frozen LM head."""
        head = self._module("lm_head")
        if head.weight.is_meta or head.weight.device != hidden_states.device:
            # offloaded (weights loaded by accelerate's hook in the forward) or on another device of a split target
            logits = self._logits_through_head_module(head, hidden_states)
        else:
            x = hidden_states.to(self.fc.weight.dtype)
            packed = self._packed_draft_head(x)
            if packed is not None:
                logits = packed_linear(x, packed)
            else:
                weight = self._draft_head_weight()
                x = hidden_states.to(weight.dtype)
                # One block is a few rows: on CPU fp32 the untransposed product is cheaper (see verify_head_dspark).
                logits = skinny_linear(x, weight) if use_skinny(x, weight) else F.linear(x, weight)
        cap = self.config.final_logit_softcapping
        if cap:
            # Gemma 4: soft-capped like the target's logits, before any Markov bias is added.
            logits = torch.tanh(logits / cap) * cap
        return logits

    def _logits_through_head_module(self, head: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
        """The head of a target dispatched by accelerate: offloaded, its weights exist only inside its
        forward (the hook loads them from CPU or disk and moves the input to the execution device); on
        another device of a split target, copying it to the drafter's would duplicate the largest matrix.
        So run the module where it lives and bring the logits back to the drafter."""
        logits = head(hidden_states.to(head.weight.dtype)).to(hidden_states.device)
        d2t = self.draft_to_target
        return logits if d2t is None else logits.index_select(-1, d2t.to(logits.device)).to(self.fc.weight.dtype)

    # ---------------------------------------------------------------- backbone
    def project_context(self, target_hidden_states: torch.Tensor) -> torch.Tensor:
        """[batch, ctx, len(target_layer_ids) * H_target] -> [batch, ctx, H]."""
        if target_hidden_states.shape[-1] != self.config.context_size:
            raise ValueError(
                f"target_hidden_states has width {target_hidden_states.shape[-1]} but the drafter expects "
                f"{self.config.context_size} = {len(self.config.target_layer_ids)} layers x {self.config.target_hidden_size}"
            )
        if self.config.context_input_norm:
            target_hidden_states = self._norm_context_layers(target_hidden_states)
        return self.hidden_norm(linear_product(self.fc, target_hidden_states.to(self.fc.weight.dtype)))

    def _norm_context_layers(self, features: torch.Tensor) -> torch.Tensor:
        """Each target layer's slice of ``features`` through its own ``context_norms`` entry: as one RMSNorm
        over [..., layers, H_target] with the norms' weights stacked (the same operations per slice as
        calling each norm on its slice, in one pass instead of one per layer)."""
        norms = self.context_norms
        if not all(type(norm) is DSparkRMSNorm and norm.variance_epsilon == norms[0].variance_epsilon for norm in norms):
            chunks = features.split(self.config.target_hidden_size, dim=-1)
            return torch.cat([norm(chunk) for norm, chunk in zip(norms, chunks)], dim=-1)
        layered = features.unflatten(-1, (len(norms), self.config.target_hidden_size))
        weight = torch.stack([norm.weight for norm in norms])
        return DSparkRMSNorm.normalize(layered, weight, norms[0].variance_epsilon).flatten(-2)

    def backbone(
        self,
        block_embeds: torch.Tensor,
        block_positions: torch.Tensor,
        context: torch.Tensor | None,
        context_positions: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        cache: DSparkDraftCache | None = None,
    ) -> torch.Tensor:
        """The drafter layers over block tokens ``block_embeds`` [batch, q_len, H] at ``block_positions``
        [batch, q_len], attending to the projected ``context`` [batch, ctx, H] at ``context_positions``
        (appended to ``cache`` first when one is given; ``None`` or empty: the cache's context alone) under
        ``attention_mask`` (boolean, True = attend; ``None``: attend to all). Returns normed hidden states
        [batch, q_len, H]. ``draft_block``, the training ``forward`` and the batched engine call it."""
        dtype = block_embeds.dtype
        if context is not None and context.shape[1] > 0:
            # one RoPE evaluation for the context and the block positions together
            n_ctx = context_positions.shape[-1]
            positions = torch.cat([context_positions.expand(*block_positions.shape[:-1], -1), block_positions], -1)
            cos, sin = self.rotary_emb(positions, dtype)
            ctx_cos, ctx_sin, cos, sin = cos[..., :n_ctx, :], sin[..., :n_ctx, :], cos[..., n_ctx:, :], sin[..., n_ctx:, :]
        else:
            cos, sin = self.rotary_emb(block_positions, dtype)
            context = None
        hidden = block_embeds
        for layer in self.layers:
            keys = values = None
            if context is not None:
                keys, values = layer.self_attn.key_values(context, ctx_cos, ctx_sin)
            if cache is not None:
                if keys is not None:
                    keys, values = cache.update(layer.self_attn.layer_idx, keys, values)
                else:
                    keys, values = cache.keys[layer.self_attn.layer_idx], cache.values[layer.self_attn.layer_idx]
            hidden = layer(hidden, cos, sin, keys, values, attention_mask)
        return self.norm(hidden)

    def draft_block(
        self,
        anchor_ids: torch.Tensor,
        new_target_hidden_states: torch.Tensor | None,
        cache: DSparkDraftCache,
    ) -> DSparkBlockOutput:
        """Inference: one block per row after appending the context of newly committed tokens.

        Args:
            anchor_ids: [batch] last committed token (target id) of each row; it sits at position
                ``cache length`` after the append.
            new_target_hidden_states: [batch, n_new, context width] raw target features of the
                tokens committed since the previous call (only these are projected).
            cache: the drafter's context cache (updated in place).
        """
        past = cache.get_seq_length()
        context = context_positions = None
        device = anchor_ids.device
        if new_target_hidden_states is not None and new_target_hidden_states.shape[1] > 0:
            n_new = new_target_hidden_states.shape[1]
            context = self.project_context(new_target_hidden_states)
            context_positions = torch.arange(past, past + n_new, device=device).expand(anchor_ids.shape[0], -1)
            past += n_new
        block = self.block_input_ids(anchor_ids)
        positions = torch.arange(past, past + self.config.block_size, device=device).expand(anchor_ids.shape[0], -1)
        hidden = self.backbone(self.embed(block), positions, context, context_positions, None, cache)
        return DSparkBlockOutput(hidden_states=hidden, base_logits=self.compute_logits(hidden))

    def block_input_ids(self, anchor_ids: torch.Tensor) -> torch.Tensor:
        """[batch] -> [batch, block_size]: anchor followed by mask tokens."""
        block = anchor_ids.new_full((anchor_ids.shape[0], self.config.block_size), self.config.mask_token_id)
        block[:, 0] = anchor_ids
        return block

    # ---------------------------------------------------------------- training forward
    def forward(
        self,
        input_ids: torch.Tensor,
        target_hidden_states: torch.Tensor,
        loss_mask: torch.Tensor | None = None,
        anchor_positions: torch.Tensor | None = None,
        block_keep_mask: torch.Tensor | None = None,
        num_anchors: int | None = None,
        generator: torch.Generator | None = None,
        **kwargs,
    ) -> DSparkTrainingOutput:
        """Training forward over many anchor blocks of each sequence at once (teacher forced).

        Args:
            input_ids: [batch, seq] token ids (target ids).
            target_hidden_states: [batch, seq, context width] target features of every token.
            loss_mask: [batch, seq] 1 where a token is supervised (answer tokens); defaults to all ones.
            anchor_positions / block_keep_mask: [batch, A] given anchors (sampled when omitted).
            num_anchors: anchors to sample per sequence when none are given (``config.num_anchors``).

        Block ``a`` holds ``[input_ids[p], mask...]`` at positions ``p .. p + K - 1`` for anchor ``p``;
        it attends to the context rows ``< p`` and bidirectionally to itself; position ``k``
        predicts ``input_ids[p + k + 1]`` (the layout: ``training_dspark.anchor_blocks``).
        """
        if loss_mask is None:
            loss_mask = torch.ones_like(input_ids)
        if anchor_positions is None:
            anchor_positions, block_keep_mask = sample_anchor_positions(
                loss_mask, num_anchors or self.config.num_anchors, generator=generator
            )
        blocks = anchor_blocks(input_ids, anchor_positions, block_keep_mask, loss_mask, self.config.block_size,
                               self.config.mask_token_id)
        bsz, seq_len = input_ids.shape
        num_blocks = blocks.anchor_positions.shape[1]
        block_embeds = self.embed(blocks.input_ids.view(bsz, -1))
        context = self.project_context(target_hidden_states)
        context_positions = torch.arange(seq_len, device=input_ids.device).expand(bsz, -1)
        hidden = self.backbone(
            block_embeds, blocks.positions.view(bsz, -1), context, context_positions, blocks.attention_mask
        ).view(bsz, num_blocks, self.config.block_size, -1)

        base_logits = self.compute_logits(hidden)
        draft_logits, confidence_logits = self.apply_heads_teacher_forced(base_logits, hidden, blocks.previous_ids)
        return DSparkTrainingOutput(
            draft_logits=draft_logits,
            confidence_logits=confidence_logits,
            target_ids=blocks.target_ids,
            eval_mask=blocks.eval_mask,
            anchor_positions=blocks.anchor_positions,
            block_keep_mask=blocks.block_keep_mask,
            hidden_states=hidden,
        )

    # ---------------------------------------------------------------- heads (shared by training & decoding)
    def previous_token_embedding(self, prev_target_ids: torch.Tensor) -> torch.Tensor | None:
        if self.markov_head is None:
            return None
        return self.markov_head.embed_previous(self.target_to_draft(prev_target_ids))

    def apply_heads_teacher_forced(
        self, base_logits: torch.Tensor, hidden: torch.Tensor, prev_target_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Markov-corrected logits and confidence logits given the previous tokens of each position."""
        prev = self.previous_token_embedding(prev_target_ids)
        logits = base_logits
        if self.markov_head is not None:
            logits = base_logits + self.markov_head.teacher_forced_bias(hidden, prev).to(base_logits.dtype)
        confidence = self.confidence_logits(hidden, prev)
        return logits, confidence

    def confidence_logits(self, hidden: torch.Tensor, prev_embedding: torch.Tensor | None) -> torch.Tensor | None:
        """Raw (uncalibrated) confidence logits."""
        if self.confidence_head is None:
            return None
        return self.confidence_head(hidden, prev_embedding)

    def calibrated_confidence(self, confidence_logits: torch.Tensor) -> torch.Tensor:
        """sigmoid(logit / T_k) with the per-position STS temperatures from the config (1 when absent)."""
        temps = self.config.confidence_temperatures
        if temps is not None:
            t = torch.tensor(temps[: confidence_logits.shape[-1]], dtype=confidence_logits.dtype, device=confidence_logits.device)
            confidence_logits = confidence_logits / t
        return torch.sigmoid(confidence_logits)

    def sample_block(
        self,
        base_logits: torch.Tensor,
        hidden: torch.Tensor,
        anchor_ids: torch.Tensor,
        choose: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
        num_tokens: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Markov sampling loop over one block.

        ``logits_k = U_k + B(x_{k-1})`` (summed in the drafter's dtype; on CPU handed on in float32), then
        ``choose(logits_k, k)`` returns ``(draft_ids, processed_logits)`` (default: greedy argmax, logits
        unchanged); the chosen token feeds the next step. Returns target ids [batch, n], the processed
        logits each token was drawn from [batch, n, Vd], and raw confidence logits [batch, n] (None
        without a confidence head).
        """
        n = num_tokens or base_logits.shape[1]
        # The loop follows draft ids: the anchor is mapped once, the tokens go back to target ids once at the end.
        prev_draft = self.target_to_draft(anchor_ids)
        state = None
        tokens, logits_out, prev_rows = [], [], []
        for k in range(n):
            logits_k = base_logits[:, k]
            prev_emb = None
            if self.markov_head is not None:
                prev_emb = self.markov_head.embed_previous(prev_draft)
                prev_rows.append(prev_emb)
                bias, state = self.markov_head.step(hidden[:, k], prev_emb, state)
                logits_k = logits_k + bias.to(logits_k.dtype)
            if logits_k.device.type == "cpu":
                # on CPU the cast and a float32 argmax (or softmax, warpers) cost less than a bf16 argmax
                logits_k = logits_k.float()
            if choose is None:
                draft_ids = logits_k.argmax(-1)
            else:
                draft_ids, logits_k = choose(logits_k, k)
            prev_draft = draft_ids
            tokens.append(draft_ids)
            logits_out.append(logits_k)
        # the confidence of position k reads h_k and the W1 row of token k - 1: all known now, one product
        prev = torch.stack(prev_rows, dim=1) if prev_rows else None
        confidence = self.confidence_logits(hidden[:, :n], prev)
        return self.draft_ids_to_target(torch.stack(tokens, dim=1)), torch.stack(logits_out, dim=1), confidence

    # ---------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """As ``PreTrainedModel.from_pretrained``, but a checkpoint whose tensors do not cover the
        model (missing or unexpected weights) raises instead of silently re-initialising, and a
        weight file whose sha256 differs from the one ``hf-dspark export`` recorded in
        ``dspark_card.json`` raises ``CorruptFileError`` naming the file (``check_checksums=False`` skips
        that check, for callers that have just made it)."""
        want_info = kwargs.pop("output_loading_info", False)
        if kwargs.pop("check_checksums", True):
            check_weight_checksums(pretrained_model_name_or_path, **hub_kwargs(kwargs))
        model, info = super().from_pretrained(pretrained_model_name_or_path, *model_args, output_loading_info=True, **kwargs)
        check_loading_info(pretrained_model_name_or_path, info)
        model._borrowed = {}
        model._forget_head_copies()
        model.generation_config = load_dspark_generation_config(pretrained_model_name_or_path, kwargs)
        return (model, info) if want_info else model

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save config, weights, remote-code files and ``generation_config.json`` (decoding settings)."""
        super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True) and self.generation_config is not None:
            self.generation_config.save_pretrained(save_directory)

    def can_generate(self) -> bool:  # a drafter is driven by the target's generate(), never on its own
        return False


DSparkConfig.register_for_auto_class()
DSparkDraftModel.register_for_auto_class("AutoModel")
if not __name__.startswith("hf_dspark."):
    # Loaded as remote code (trust_remote_code=True, hf_dspark not installed): install the generate
    # hook here. Inside the package, importing hf_dspark installs it (hf_dspark/__init__.py); see
    # generate_hook_dspark.py, "Who installs the hook".
    install_generate_hook()

__all__ = [
    "DSparkDraftModel",
    "DSparkPreTrainedModel",
    "DSparkDraftCache",
    "DSparkTrainingOutput",
    "DSparkBlockOutput",
    "sample_anchor_positions",
    "default_target_layer_ids",
    "check_weight_checksums",
    "execution_device",
    "file_sha256",
]
