"""The drafter's inference products: packed bf16 weights on CPU change no value, follow every change of
the weights, and never serve a product that needs a gradient; the Markov loop hands float32 logits on."""

from __future__ import annotations

import pytest
import torch

import hf_dspark.models.dspark.modeling_dspark_layers as layers
from _models import tiny_drafter, tiny_qwen3_target
from hf_dspark import DSparkDraftCache
from hf_dspark.models.dspark.modeling_dspark_layers import PACKED_ATTRIBUTE, packed_products_supported

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
    assert PACKED_ATTRIBUTE in draft.layers[0].mlp.gate_proj.__dict__ and draft._packed_head is not None
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


def test_products_with_a_gradient_are_the_module_calls(target):
    draft = bf16_drafter(target).train()
    ids = torch.randint(3, 90, (2, 16), generator=torch.Generator().manual_seed(0))
    features = torch.randn(2, 16, draft.config.context_size).to(torch.bfloat16)
    out = draft(ids, features, num_anchors=3, generator=torch.Generator().manual_seed(0))
    out.draft_logits.float().square().mean().backward()
    assert draft.layers[0].mlp.gate_proj.weight.grad is not None and draft.fc.weight.grad is not None
    assert not any(PACKED_ATTRIBUTE in m.__dict__ for m in draft.modules())


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
