"""The drafter as a transformers model: attention through transformers' attention interface (sdpa and
eager agree; grouped-query heads are not copied), gradient checkpointing, and a draft context cache
that grows in place."""

from __future__ import annotations

import pytest
import torch

from _models import tiny_drafter, tiny_qwen3_target
from hf_dspark import DSparkDraftCache


@pytest.fixture(scope="module")
def target():
    return tiny_qwen3_target(0)


def training_outputs(draft, target, seed: int = 0):
    ids = torch.randint(3, 90, (2, 24), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        out = target(ids, output_hidden_states=True)
    features = torch.cat([out.hidden_states[i + 1] for i in draft.config.target_layer_ids], dim=-1)
    return draft(ids, features, num_anchors=4, generator=torch.Generator().manual_seed(seed))


def test_sdpa_and_eager_attention_agree_and_grouped_heads_are_not_copied(target, monkeypatch):
    draft = tiny_drafter(target, num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    assert draft.config._attn_implementation == "sdpa"
    original = torch.Tensor.repeat_interleave

    def no_kv_copies(tensor, *args, **kwargs):
        if tensor.dim() == 4 and tensor.is_floating_point():  # [batch, kv_heads, seq, head_dim]
            pytest.fail("keys/values copied by repeat_interleave")
        return original(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "repeat_interleave", no_kv_copies)
    sdpa = training_outputs(draft, target)
    draft.set_attn_implementation("eager")
    eager = training_outputs(draft, target)
    torch.testing.assert_close(eager.draft_logits, sdpa.draft_logits, atol=1e-5, rtol=1e-5)
    # decoding (no mask): sdpa shares the key/value heads (enable_gqa)
    draft.set_attn_implementation("sdpa")
    anchors = torch.tensor([5, 9])
    features = torch.randn(2, 6, draft.config.context_size)
    sdpa_block = draft.draft_block(anchors, features, DSparkDraftCache(draft.config.num_hidden_layers))
    draft.set_attn_implementation("eager")
    eager_block = draft.draft_block(anchors, features, DSparkDraftCache(draft.config.num_hidden_layers))
    torch.testing.assert_close(eager_block.base_logits, sdpa_block.base_logits, atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients(target):
    draft = tiny_drafter(target, num_hidden_layers=2).train()
    assert draft.supports_gradient_checkpointing
    training_outputs(draft, target).draft_logits.square().mean().backward()
    plain = [p.grad.clone() for p in draft.parameters() if p.grad is not None]
    draft.zero_grad(set_to_none=True)
    draft.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    assert all(layer.gradient_checkpointing for layer in draft.layers)
    training_outputs(draft, target).draft_logits.square().mean().backward()
    checkpointed = [p.grad for p in draft.parameters() if p.grad is not None]
    assert len(checkpointed) == len(plain)
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(a, b)


def test_draft_cache_grows_in_place_and_matches_concatenation():
    cache = DSparkDraftCache(1)
    rows = [torch.randn(1, 2, n, 4) for n in (30, 1, 3, 40, 2)]
    buffers = []
    for chunk in rows:
        keys, values = cache.update(0, chunk, -chunk)
        buffers.append(cache._buffers[0][0].data_ptr())
    expected = torch.cat(rows, dim=2)
    assert torch.equal(keys, expected) and torch.equal(values, -expected)
    assert len(set(buffers)) == 2  # 64 rows, then doubled once: no reallocation per round
    cache.crop(10)
    keys, _ = cache.update(0, rows[1], -rows[1])
    assert torch.equal(keys, torch.cat([expected[:, :, :10], rows[1]], dim=2))
    # a list assigned from outside (the batched engine's row selection) is followed, not overwritten
    cache.keys[0], cache.values[0] = keys[:, :, 3:].clone(), keys[:, :, 3:].clone()
    keys, _ = cache.update(0, rows[2], rows[2])
    assert torch.equal(keys[:, :, -3:], rows[2]) and keys.shape[2] == 8 + 3
