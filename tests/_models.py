"""Tiny random targets and drafters built in code for modeling / decoding tests."""

from __future__ import annotations

import torch

from hf_dspark import DSparkDraftModel


def tiny_qwen3_target(seed: int = 0, vocab_size: int = 96, num_layers: int = 4, eos_token_id: int = 2):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        intermediate_size=64,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=eos_token_id,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    model = Qwen3ForCausalLM(config).eval()
    model.generation_config.eos_token_id = eos_token_id
    model.generation_config.pad_token_id = 0
    model.generation_config.do_sample = False
    return model


def tiny_gemma3_target(seed: int = 0, vocab_size: int = 96):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    config = Gemma3TextConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        intermediate_size=64,
        max_position_embeddings=512,
        sliding_window=8,
        bos_token_id=2,
        eos_token_id=1,
        pad_token_id=0,
    )
    model = Gemma3ForCausalLM(config).eval()
    model.generation_config.eos_token_id = 1
    model.generation_config.pad_token_id = 0
    model.generation_config.do_sample = False
    return model


def randomize_(module: torch.nn.Module, seed: int = 0, scale: float = 0.5) -> torch.nn.Module:
    """Give a fresh drafter non-trivial weights (post_init zero-initialises the Markov W2)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                fan_in = p.shape[-1] if p.dim() > 1 else 1
                p.copy_(torch.randn(p.shape, generator=gen) * scale / fan_in**0.5)
    return module


def tiny_drafter(target, seed: int = 0, **overrides) -> DSparkDraftModel:
    torch.manual_seed(seed)
    settings = dict(num_hidden_layers=1, block_size=5, markov_rank=8, target_layer_ids=[0, 2])
    settings.update(overrides)
    return randomize_(DSparkDraftModel.from_target(target, **settings), seed).eval()


def target_features(target, input_ids: torch.Tensor, layer_ids) -> torch.Tensor:
    with torch.no_grad():
        out = target(input_ids=input_ids, output_hidden_states=True)
    return torch.cat([out.hidden_states[i + 1] for i in layer_ids], dim=-1)
