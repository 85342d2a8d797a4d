"""Layers of DSpark drafters (Qwen3-style backbone) and the Markov and confidence heads.

This file ships as remote code next to drafter checkpoints: it imports only torch,
transformers and its sibling files. ``modeling_dspark.py`` assembles these modules into
:class:`DSparkDraftModel`; the Gemma 4 backbone's layers are in ``modeling_dspark_gemma4.py``.
Each module takes only ``config`` (and ``layer_idx``); shapes are ``[batch, seq, hidden]`` unless
a docstring says otherwise.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .configuration_dspark import DSparkConfig
from .generate_hook_dspark import attention_implementation


# --------------------------------------------------------------------------------------
# building blocks
# --------------------------------------------------------------------------------------
# Products without gradient on a CPU whose oneDNN has bf16 kernels. ``F.linear`` on bf16 goes to oneDNN,
# which brings the weight into its blocked layout at every call: for the few rows of a drafting block
# that re-layout costs about as much as the product itself. Packing the weight once (oneDNN's own
# reorder) and calling oneDNN's linear on the packed copy skips that step and gives the same values
# (bit for bit where tested: tests/models/test_drafter_products.py compares them). The packed copies
# are kept outside the modules (an opaque oneDNN tensor can be neither copied nor pickled), keyed by the
# weight's storage and version; any other call (fp32, another device, a gradient, a hooked or replaced
# module) is the plain module call.
_PACKED_DTYPES = (torch.bfloat16,)
_packed_supported: bool | None = None


def packed_products_supported() -> bool:
    """Whether this torch and CPU run packed bf16 products: an x86 CPU with AVX-512 (where ``F.linear`` on
    bf16 is a oneDNN product too) and oneDNN with bf16 kernels. Other CPUs keep ``F.linear``."""
    global _packed_supported
    if _packed_supported is None:
        try:
            _packed_supported = bool(
                torch.backends.cpu.get_cpu_capability() == "AVX512"
                and torch.backends.mkldnn.is_available()
                and torch.ops.mkldnn._is_mkldnn_bf16_supported()
                and torch.ops.mkldnn._reorder_linear_weight is not None
                and torch.ops.mkldnn._linear_pointwise is not None
            )
        except (AttributeError, RuntimeError):
            _packed_supported = False
    return _packed_supported


def packed_product_applies(x: torch.Tensor, weight: torch.Tensor | None = None, *, device: torch.device | None = None,
                           dtype: torch.dtype | None = None) -> bool:
    """Whether ``x @ weight.T`` may run on a packed copy of ``weight`` (or of a detached weight on
    ``device`` in ``dtype``): CPU, bf16 on both sides, no gradient through it, eager mode, and a CPU with
    oneDNN bf16 kernels."""
    if weight is not None:
        device, dtype = weight.device, weight.dtype
    return (
        device.type == "cpu"
        and dtype in _PACKED_DTYPES
        and x.dtype == dtype
        and x.device.type == "cpu"
        and not (torch.is_grad_enabled() and (x.requires_grad or (weight is not None and weight.requires_grad)))
        and not torch.compiler.is_compiling()
        and packed_products_supported()
    )


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """A copy of ``weight`` [out, in] in oneDNN's layout for :func:`packed_linear` (same values)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach())


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` with ``packed = pack_weight(weight)``."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def weight_key(weight: torch.Tensor) -> tuple:
    """What identifies the values of ``weight`` for a cached copy: storage, version, dtype, shape, device."""
    try:
        version = weight._version
    except RuntimeError:  # an inference tensor has no version counter (and cannot change outside inference mode)
        version = None
    return weight.data_ptr(), version, weight.dtype, tuple(weight.shape), weight.device


_packed_copies: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # module -> {name: (key, packed)}


def packed_copies(module: nn.Module) -> dict:
    """The packed copies kept for ``module`` (``{name: (key, packed)}``; empty when none)."""
    return _packed_copies.get(module, {})


def packed_copy(owner: nn.Module, name: str, key, build) -> torch.Tensor:
    """The packed copy ``name`` of ``owner``, built by ``build()`` when missing or made under another ``key``."""
    copies = _packed_copies.setdefault(owner, {})
    entry = copies.get(name)
    if entry is None or entry[0] != key:
        copies.pop(name, None)  # free the old copy before building the new one
        entry = copies[name] = (key, build())
    return entry[1]


def drop_packed_copies(module: nn.Module) -> None:
    """Forget the packed copies of ``module`` and of every sub-module."""
    for sub in module.modules():
        _packed_copies.pop(sub, None)


def linear_product(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``linear(x)``, through a once-packed copy of the weight where :func:`packed_product_applies`
    (rebuilt when the weight changes; ``DSparkPreTrainedModel._apply`` drops the copies when the model is
    moved or cast)."""
    weight = linear.weight
    if (
        type(linear) is not nn.Linear
        or "forward" in linear.__dict__  # replaced by a hook (accelerate)
        or linear._forward_hooks
        or linear._forward_pre_hooks
        or not packed_product_applies(x, weight)
    ):
        return linear(x)
    packed = packed_copy(linear, "weight", weight_key(weight), lambda: pack_weight(weight))
    return packed_linear(x, packed, linear.bias)


class DSparkRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.normalize(hidden_states, self.weight, self.variance_epsilon)

    @staticmethod
    def normalize(hidden_states: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """RMS-normalize the last dimension in float32, cast back, scale by ``weight`` (broadcast)."""
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + eps)
        return weight * hidden_states.to(input_dtype)


class DSparkRotaryEmbedding(nn.Module):
    """RoPE returning cos/sin for given positions, in the rotate-half layout over the whole head.

    ``rope_type``: ``default``; ``linear`` (positions divided by ``factor``); ``proportional``
    (Gemma 4 full attention: only the first ``partial_rotary_factor * head_dim / 2`` frequency
    pairs rotate, with exponents over the WHOLE head dimension; the other pairs are the identity,
    so with head dim 64 and factor 0.25 dims 0-7 pair with 32-39 and the rest pass through).
    """

    def __init__(self, config: DSparkConfig):
        super().__init__()
        params = config.rope_parameters or {}
        rope_type = params.get("rope_type", "default")
        if rope_type not in ("default", "linear", "proportional"):
            raise ValueError(
                f"DSparkConfig.rope_parameters['rope_type']={rope_type!r} is not supported by the drafter "
                "backbone; use 'default', 'linear' or 'proportional'"
            )
        theta = params.get("rope_theta")
        if theta is None:
            raise ValueError(
                f"DSparkConfig.rope_parameters={params!r} has no rope_theta; give the RoPE base, e.g. "
                "{'rope_type': 'default', 'rope_theta': 10000.0}"
            )
        self.position_scale = 1.0 / float(params.get("factor", 1.0)) if rope_type == "linear" else 1.0
        self.dim = config.attention_head_dim
        self.rotated_pairs = self.dim // 2
        self.frequency_scale = 1.0
        if rope_type == "proportional":
            self.rotated_pairs = int(float(params.get("partial_rotary_factor", 1.0)) * self.dim // 2)
            self.frequency_scale = 1.0 / float(params.get("factor", 1.0))
        # Computed on the fly (not a buffer): transformers materialises modules on the meta device
        # when loading, and a tiny arange is cheaper than re-initialising buffers correctly.
        self.base = float(theta)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        exponents = torch.arange(0, 2 * self.rotated_pairs, 2, dtype=torch.float32, device=position_ids.device)
        inv_freq = self.frequency_scale / (self.base ** (exponents / self.dim))
        if self.rotated_pairs < self.dim // 2:
            inv_freq = torch.cat([inv_freq, inv_freq.new_zeros(self.dim // 2 - self.rotated_pairs)])
        freqs = (position_ids.float() * self.position_scale)[..., None] * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [batch, heads, seq, head_dim]; cos/sin: [batch, seq, head_dim]."""
    return x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1)


class DSparkMLP(nn.Module):
    def __init__(self, config: DSparkConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = linear_product(self.gate_proj, x), linear_product(self.up_proj, x)
        return linear_product(self.down_proj, self.act_fn(gate) * up)


def repeat_kv(hidden_states: torch.Tensor, groups: int) -> torch.Tensor:
    """[batch, kv_heads, seq, head_dim] -> [batch, kv_heads * groups, seq, head_dim]; head ``h`` reads
    key/value head ``h // groups`` (as transformers' ``repeat_kv``)."""
    if groups == 1:
        return hidden_states
    b, kv_heads, seq, head_dim = hidden_states.shape
    return hidden_states[:, :, None].expand(b, kv_heads, groups, seq, head_dim).reshape(b, kv_heads * groups, seq, head_dim)


def eager_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0, **kwargs):
    """Plain attention with the interface of transformers' attention functions; ``attention_mask`` is
    boolean (True = attend) or additive. Returns ``([batch, q_len, heads, head_dim], weights)``."""
    key = repeat_kv(key, module.num_key_value_groups)
    value = repeat_kv(value, module.num_key_value_groups)
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            weights = weights.masked_fill(~attention_mask, torch.finfo(weights.dtype).min)
        else:
            weights = weights + attention_mask
    weights = nn.functional.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


def attention_function(config):
    """The attention kernel the config names (``sdpa`` when unset), looked up at every
    call as transformers' models do, so ``model.set_attn_implementation`` takes effect at once. The
    drafter's masks are boolean and not causal (the block attends to itself both ways), so kernels that
    take no arbitrary mask (``flash_attention_2``) serve decoding (no mask) but not the training forward."""
    implementation = attention_implementation(config) or "sdpa"
    if implementation == "eager":
        return eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[implementation]


def block_attention(module: nn.Module, q, k, v, context_keys, context_values, attention_mask) -> torch.Tensor:
    """Attention of block queries ``q`` [batch, heads, q_len, head_dim] over ``[context ; block]`` keys and
    values ([batch, kv_heads, ., head_dim]; grouped-query heads are never copied here: the kernel shares
    them, e.g. sdpa's ``enable_gqa``). Returns [batch, q_len, heads * head_dim]."""
    if context_keys is not None:
        k = torch.cat([context_keys, k], dim=2)
        v = torch.cat([context_values, v], dim=2)
    out, _ = attention_function(module.config)(
        module, q, k, v, attention_mask, dropout=0.0, scaling=module.scaling, is_causal=False
    )
    return out.reshape(q.shape[0], q.shape[2], -1)


class DSparkAttention(nn.Module):
    """GQA attention whose keys/values are [injected context ; block tokens]; queries are block tokens only."""

    def __init__(self, config: DSparkConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.is_causal = False  # the block attends to itself both ways
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_kv_heads
        self.scaling = self.head_dim**-0.5
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)
        self.q_norm = DSparkRMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.k_norm = DSparkRMSNorm(self.head_dim, eps=config.rms_norm_eps)

    def key_values(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys (k-norm + RoPE) and values of ``x`` [batch, seq, hidden] -> 2 x [batch, kv_heads, seq, head_dim]."""
        b, s, _ = x.shape
        k = self.k_norm(linear_product(self.k_proj, x).view(b, s, self.num_kv_heads, self.head_dim)).transpose(1, 2)
        v = linear_product(self.v_proj, x).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return apply_rope(k, cos, sin), v

    def forward(
        self,
        hidden_states: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        context_keys: torch.Tensor | None,
        context_values: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """hidden_states: [batch, q_len, hidden]; context keys/values: [batch, kv_heads, ctx_len, head_dim];
        attention_mask: boolean [batch or 1, 1, q_len, ctx_len + q_len] (True = attend) or None (attend all)."""
        b, q_len, _ = hidden_states.shape
        q = self.q_norm(linear_product(self.q_proj, hidden_states).view(b, q_len, self.num_heads, self.head_dim))
        q = q.transpose(1, 2)
        q = apply_rope(q, cos, sin)
        k, v = self.key_values(hidden_states, cos, sin)
        return linear_product(self.o_proj, block_attention(self, q, k, v, context_keys, context_values, attention_mask))


class DSparkDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: DSparkConfig, layer_idx: int):
        super().__init__()
        self.self_attn = DSparkAttention(config, layer_idx)
        self.mlp = DSparkMLP(config)
        self.input_layernorm = DSparkRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = DSparkRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states, cos, sin, context_keys, context_values, attention_mask):
        residual = hidden_states
        hidden_states = self.self_attn(
            self.input_layernorm(hidden_states), cos, sin, context_keys, context_values, attention_mask
        )
        hidden_states = residual + hidden_states
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


# --------------------------------------------------------------------------------------
# heads
# --------------------------------------------------------------------------------------
class DSparkMarkovHead(nn.Module):
    """Low-rank transition bias from the previous token: ``B(x_prev, .) = W1[x_prev] @ W2^T``.

    ``vanilla``: the W1 row is used as is. ``gated``: it is scaled by
    ``sigmoid(gate_proj([h_k ; W1[x_prev]]))``. ``rnn``: a gated recurrent state
    over ``z = [s_{k-1} ; W1[x_prev] ; h_k]``: one joint linear (with bias) split, in this order,
    into ``gate``, ``candidate`` and ``output``;
    ``s_k = sigmoid(gate) * s_{k-1} + (1 - sigmoid(gate)) * tanh(candidate)`` (the sigmoid keeps
    the OLD state, DeepSpec's convention) and the bias is ``W2 tanh(output)``, computed from ``z``
    (the old state). The state is zero at the start of every block.
    """

    def __init__(self, config: DSparkConfig):
        super().__init__()
        rank, hidden = config.markov_rank, config.hidden_size
        self.head_type = config.markov_head_type
        self.rank = rank
        self.markov_w1 = nn.Embedding(config.effective_draft_vocab_size, rank)
        self.markov_w2 = nn.Linear(rank, config.effective_draft_vocab_size, bias=False)
        if self.head_type == "gated":
            self.gate_proj = nn.Linear(hidden + rank, rank)
        elif self.head_type == "rnn":
            self.joint_proj = nn.Linear(2 * rank + hidden, 3 * rank)

    def embed_previous(self, prev_draft_ids: torch.Tensor) -> torch.Tensor:
        """W1 rows of previous tokens given as DRAFT ids; ``-1`` (outside the draft vocabulary) gives zeros."""
        known = prev_draft_ids >= 0
        rows = self.markov_w1(prev_draft_ids.clamp(min=0))
        return rows * known.unsqueeze(-1).to(rows.dtype)

    def step(
        self, hidden: torch.Tensor, prev_embedding: torch.Tensor, state: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One position: hidden [..., H], prev_embedding [..., r] -> (bias [..., Vd], new state)."""
        if self.head_type == "vanilla":
            return linear_product(self.markov_w2, prev_embedding), None
        if self.head_type == "gated":
            gate = torch.sigmoid(self.gate_proj(torch.cat([hidden, prev_embedding], dim=-1)))
            return linear_product(self.markov_w2, gate * prev_embedding), None
        if state is None:
            state = prev_embedding.new_zeros(prev_embedding.shape)
        gate, candidate, output = self.joint_proj(torch.cat([state, prev_embedding, hidden], dim=-1)).split(
            self.rank, dim=-1
        )
        gate = torch.sigmoid(gate)
        new_state = gate * state + (1 - gate) * torch.tanh(candidate)
        return linear_product(self.markov_w2, torch.tanh(output)), new_state

    def teacher_forced_bias(self, hidden: torch.Tensor, prev_embedding: torch.Tensor) -> torch.Tensor:
        """Biases for all positions at once given the true previous tokens: [..., block, H] -> [..., block, Vd]."""
        if self.head_type != "rnn":
            return self.step(hidden, prev_embedding, None)[0]
        state, biases = None, []
        for k in range(hidden.shape[-2]):
            bias, state = self.step(hidden[..., k, :], prev_embedding[..., k, :], state)
            biases.append(bias)
        return torch.stack(biases, dim=-2)


class DSparkConfidenceHead(nn.Module):
    """c_k = sigmoid(proj([h_k ; W1[x_{k-1}]])): survival of draft token k given that 1..k-1 survived."""

    def __init__(self, config: DSparkConfig):
        super().__init__()
        self.with_markov = config.confidence_head_with_markov and config.markov_rank > 0
        extra = config.markov_rank if self.with_markov else 0
        self.proj = nn.Linear(config.hidden_size + extra, 1)

    def forward(self, hidden: torch.Tensor, prev_embedding: torch.Tensor | None) -> torch.Tensor:
        features = torch.cat([hidden, prev_embedding], dim=-1) if self.with_markov else hidden
        return self.proj(features).squeeze(-1)


__all__ = [
    "apply_rope",
    "attention_function",
    "drop_packed_copies",
    "block_attention",
    "eager_attention_forward",
    "linear_product",
    "pack_weight",
    "packed_copies",
    "packed_copy",
    "packed_linear",
    "packed_product_applies",
    "packed_products_supported",
    "repeat_kv",
    "rotate_half",
    "weight_key",
    "DSparkRMSNorm",
    "DSparkRotaryEmbedding",
    "DSparkMLP",
    "DSparkAttention",
    "DSparkDecoderLayer",
    "DSparkMarkovHead",
    "DSparkConfidenceHead",
]
