"""The drafter's inference products: packed bf16 weights on CPU change no value, follow every change of
the weights, and never serve a product that needs a gradient; the Markov loop hands float32 logits on."""

from __future__ import annotations

import pytest
import torch

import hf_dspark.models.dspark.modeling_dspark_layers as layers
from _models import tiny_drafter, tiny_qwen3_target
from hf_dspark import DSparkDraftCache
from hf_dspark.models.dspark.modeling_dspark_layers import packed_copies, packed_products_supported

needs_packing = pytest.mark.skipif(not packed_products_supported(),
                                   reason="this CPU's oneDNN has no bf16 kernels: the plain products serve every call")


@pytest.fixture(scope="module")
def target():
    return tiny_qwen3_target(0).to(torch.bfloat16)


def bf16_drafter(target, **overrides):
    settings = dict(num_hidden_layers=2, draft_token_ids=list(range(0, 96, 2)), markov_head_type="vanilla")
    settings.update(overrides)
    return tiny_drafter(target, **settings).to(torch.bfloat16)


def one_round(draft, seed: int = 0):
    """Two draft_block calls (prefill, then 3 new tokens) and the greedy Markov loop, without gradient."""
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(2, 9, draft.config.context_size, generator=gen).to(torch.bfloat16)
    anchors = torch.tensor([4, 10])
    with torch.no_grad():
        cache = DSparkDraftCache(draft.config.num_hidden_layers)
        draft.draft_block(anchors, features[:, :6], cache)
        block = draft.draft_block(anchors, features[:, 6:], cache)
        tokens, logits, confidence = draft.sample_block(block.base_logits, block.hidden_states, anchors)
    return block.hidden_states, block.base_logits, tokens, logits, confidence


def plain_products(monkeypatch):
    monkeypatch.setattr(layers, "_packed_supported", False)


@needs_packing
def test_packed_products_give_the_plain_products_bit_for_bit(target, monkeypatch):
    draft = bf16_drafter(target, markov_head_type="rnn", num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    packed = one_round(draft)
    assert "weight" in packed_copies(draft.layers[0].mlp.gate_proj) and "draft_head" in packed_copies(draft)
    plain_products(monkeypatch)
    plain = one_round(draft)
    for a, b in zip(packed, plain):
        assert torch.equal(a, b)


@needs_packing
def test_packed_copies_follow_in_place_changes_casts_and_a_new_draft_vocabulary(target, monkeypatch):
    draft = bf16_drafter(target)

    def packed_and_plain():
        packed = one_round(draft)
        with monkeypatch.context() as m:
            plain_products(m)
            return packed, one_round(draft)

    one_round(draft)
    with torch.no_grad():
        draft.layers[1].mlp.down_proj.weight.mul_(-2.0)  # in place: the version moves
        target.lm_head.weight.mul_(0.5)  # the borrowed head
    try:
        results = [packed_and_plain()]
        draft.set_draft_vocab(list(range(1, 96, 2)))
        results.append(packed_and_plain())
        draft.float().to(torch.bfloat16)  # new storage, possibly at the old addresses
        results.append(packed_and_plain())
    finally:
        with torch.no_grad():
            target.lm_head.weight.mul_(2.0)
    for packed, plain in results:
        for a, b in zip(packed, plain):
            assert torch.equal(a, b)


def test_a_drafter_with_packed_copies_deep_copies_and_pickles(target, tmp_path):
    import copy

    draft = bf16_drafter(target)
    reference = one_round(draft)
    twin = copy.deepcopy(draft)
    torch.save(draft, tmp_path / "draft.pt")
    twin.bind_target(target)
    for a, b in zip(one_round(twin), reference):
        assert torch.equal(a, b)


def test_products_with_a_gradient_are_the_module_calls(target):
    draft = bf16_drafter(target).train()
    ids = torch.randint(3, 90, (2, 16), generator=torch.Generator().manual_seed(0))
    features = torch.randn(2, 16, draft.config.context_size).to(torch.bfloat16)
    out = draft(ids, features, num_anchors=3, generator=torch.Generator().manual_seed(0))
    out.draft_logits.float().square().mean().backward()
    assert draft.layers[0].mlp.gate_proj.weight.grad is not None and draft.fc.weight.grad is not None
    assert not any(packed_copies(m) for m in draft.modules())


def test_the_markov_loop_hands_float32_logits_on_cpu_and_keeps_the_sum_in_the_drafter_dtype(target):
    draft = bf16_drafter(target)
    _, base, tokens, logits, confidence = one_round(draft)
    assert logits.dtype == torch.float32 and confidence.dtype == torch.bfloat16
    with torch.no_grad():
        t2d = draft.target_to_draft_table()
        prev = torch.cat([torch.tensor([[4], [10]]), tokens[:, :-1]], dim=1)
        bias = draft.markov_head.markov_w2(draft.markov_head.embed_previous(t2d[prev]))
    expected = (base + bias).float()  # rounded to bf16 once, as the teacher-forced heads do
    assert torch.equal(logits, expected)
    assert torch.equal(draft.draft_ids_to_target(logits.argmax(-1)), tokens)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_context_layers_are_normed_as_each_norm_on_its_own_slice(target, dtype):
    draft = bf16_drafter(target, target_layer_ids=[0, 1, 3]).to(dtype)
    with torch.no_grad():
        for i, norm in enumerate(draft.context_norms):
            norm.weight.copy_(torch.linspace(0.5, 1.5, norm.weight.numel()) * (i + 1))
    features = torch.randn(2, 5, draft.config.context_size, generator=torch.Generator().manual_seed(1)).to(dtype)
    chunks = features.split(draft.config.target_hidden_size, dim=-1)
    expected = torch.cat([norm(chunk) for norm, chunk in zip(draft.context_norms, chunks)], dim=-1)
    assert torch.equal(draft._norm_context_layers(features), expected)
