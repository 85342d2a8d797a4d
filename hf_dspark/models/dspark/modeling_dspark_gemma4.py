"""Gemma 4 decoder layers for DSpark drafters (DeepSpec's ``Gemma4DSparkModel`` backbone).

This file ships as remote code next to drafter checkpoints: it imports only torch,
transformers and its sibling files. ``modeling_dspark.py`` builds these layers when ``config.backbone_type`` is
``"gemma4"``; they keep the interface of its Qwen3-style layers (``self_attn.key_values`` for
the injected context, ``self_attn.layer_idx``, and ``layer(hidden, cos, sin, context_keys,
context_values, attention_mask)``), so the drafter's training forward, cache and decoding loop
are shared by both backbones.

How a Gemma 4 draft layer differs from a Qwen3 one:

* RMSNorm is computed in float32 and multiplies by the weight itself (``x * rms^-1 * w``);
  q/k norms have a weight, the v norm has none;
* attention heads have ``config.global_head_dim`` dimensions (the target's full-attention head
  size), the softmax scale is 1.0 (q/k are normalized), and with ``attention_k_eq_v`` there is
  no ``v_proj``: values are the raw ``k_proj`` output (before k-norm and RoPE) through the v norm,
  with ``num_global_key_value_heads`` heads;
* sandwich norms around attention and the MLP (input, post-attention, pre-feedforward,
  post-feedforward), then the whole hidden state is multiplied by the ``layer_scalar`` buffer;
* the MLP is ``down(act(gate(x)) * up(x))`` with the configured (gelu-tanh) activation.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN

from .modeling_dspark_layers import GradientCheckpointingLayer, apply_rope, block_attention


class DSparkGemma4RMSNorm(nn.Module):
    """``x * (mean(x^2) + eps)^-0.5 [* weight]`` in float32, cast back to the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-6, with_scale: bool = True):
        super().__init__()
        self.eps = eps
        self.with_scale = with_scale
        if with_scale:
            self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x = hidden_states.float()
        x = x * torch.pow(x.pow(2).mean(-1, keepdim=True) + self.eps, -0.5)
        if self.with_scale:
            x = x * self.weight.float()
        return x.type_as(hidden_states)


class DSparkGemma4MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class DSparkGemma4Attention(nn.Module):
    """Gemma 4 full attention whose keys/values are [injected context ; block tokens]."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.is_causal = False  # the block attends to itself both ways
        self.head_dim = config.attention_head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.attention_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_kv_heads
        self.k_eq_v = config.attention_k_eq_v
        self.scaling = 1.0
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        if not self.k_eq_v:
            self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)
        self.q_norm = DSparkGemma4RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.k_norm = DSparkGemma4RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.v_norm = DSparkGemma4RMSNorm(self.head_dim, eps=config.rms_norm_eps, with_scale=False)

    def key_values(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys (k-norm + RoPE) and values (v-norm, never rotated) of ``x`` [batch, seq, hidden]
        -> 2 x [batch, kv_heads, seq, head_dim]."""
        b, s, _ = x.shape
        raw_k = self.k_proj(x).view(b, s, self.num_kv_heads, self.head_dim)
        raw_v = raw_k if self.k_eq_v else self.v_proj(x).view(b, s, self.num_kv_heads, self.head_dim)
        k = apply_rope(self.k_norm(raw_k).transpose(1, 2), cos, sin)
        return k, self.v_norm(raw_v).transpose(1, 2)

    def forward(
        self,
        hidden_states: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        context_keys: torch.Tensor | None,
        context_values: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """Same contract as ``DSparkAttention.forward`` in ``modeling_dspark_layers.py``."""
        b, q_len, _ = hidden_states.shape
        q = self.q_norm(self.q_proj(hidden_states).view(b, q_len, self.num_heads, self.head_dim)).transpose(1, 2)
        q = apply_rope(q, cos, sin)
        k, v = self.key_values(hidden_states, cos, sin)
        return self.o_proj(block_attention(self, q, k, v, context_keys, context_values, attention_mask))


class DSparkGemma4DecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        eps = config.rms_norm_eps
        self.self_attn = DSparkGemma4Attention(config, layer_idx)
        self.mlp = DSparkGemma4MLP(config)
        self.input_layernorm = DSparkGemma4RMSNorm(config.hidden_size, eps=eps)
        self.post_attention_layernorm = DSparkGemma4RMSNorm(config.hidden_size, eps=eps)
        self.pre_feedforward_layernorm = DSparkGemma4RMSNorm(config.hidden_size, eps=eps)
        self.post_feedforward_layernorm = DSparkGemma4RMSNorm(config.hidden_size, eps=eps)
        self.register_buffer("layer_scalar", torch.ones(1), persistent=True)

    def forward(self, hidden_states, cos, sin, context_keys, context_values, attention_mask):
        attn = self.self_attn(self.input_layernorm(hidden_states), cos, sin, context_keys, context_values, attention_mask)
        hidden_states = hidden_states + self.post_attention_layernorm(attn)
        mlp = self.mlp(self.pre_feedforward_layernorm(hidden_states))
        hidden_states = hidden_states + self.post_feedforward_layernorm(mlp)
        return hidden_states * self.layer_scalar


def gemma4_target_fields(text_config) -> dict | None:
    """DSparkConfig fields of a Gemma 4 drafter for a Gemma 4 text config (``None`` for other targets).

    Gemma 4 configs keep per-layer-type geometry in ``per_layer_config``: the drafter's layers are
    full-attention layers, so they take the target's full-attention head size and key/value heads
    and its full-attention RoPE."""
    if getattr(text_config, "model_type", None) != "gemma4_text":
        return None
    layer_types = list(text_config.layer_types)
    full = layer_types.index("full_attention")
    sliding = layer_types.index("sliding_attention") if "sliding_attention" in layer_types else full
    full_layer, sliding_layer = text_config.per_layer_config[full], text_config.per_layer_config[sliding]
    rope = text_config.rope_parameters
    rope = dict(rope["full_attention"] if isinstance(rope.get("full_attention"), dict) else rope)
    k_eq_v = bool(getattr(text_config, "attention_k_eq_v", False))
    return dict(
        backbone_type="gemma4",
        head_dim=sliding_layer.head_dim,
        global_head_dim=full_layer.head_dim,
        num_key_value_heads=sliding_layer.num_key_value_heads,
        num_global_key_value_heads=full_layer.num_key_value_heads if k_eq_v else None,
        attention_k_eq_v=k_eq_v,
        final_logit_softcapping=getattr(text_config, "final_logit_softcapping", None),
        hidden_act=getattr(text_config, "hidden_activation", "gelu_pytorch_tanh"),
        rope_parameters=rope,
    )


__all__ = ["DSparkGemma4RMSNorm", "DSparkGemma4Attention", "DSparkGemma4DecoderLayer", "gemma4_target_fields"]
