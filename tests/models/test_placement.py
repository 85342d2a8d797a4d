"""Where the drafter and the target live: targets dispatched by accelerate (offloaded to CPU or disk,
split into parts), targets on the meta device, and the drafter following the target's embedding.

A dispatched target keeps offloaded weights on the ``meta`` device until accelerate's hook loads them
for a forward, so the drafter must run the target's modules instead of reading their weights. Each
decoding test compares against the same target held in memory: greedy output equals plain
``generate``, seeded sampling draws the same tokens, and the drafter accepts as much (tau > 1).
"""

from __future__ import annotations

import types

import pytest
import torch

from _models import briefly_trained_drafter, tiny_qwen3_target
from hf_dspark import BatchedSpeculativeGenerator, DevicePlacementError, DSparkGenerationConfig

accelerate = pytest.importorskip("accelerate")

PROMPTS = [torch.tensor([[1, 5 + i, 9, 17, 33, 40 + i]]) for i in range(3)]
NEW_TOKENS = 24

HEAD_ON_DISK = {"model": "cpu", "lm_head": "disk"}  # the case issue 30 reproduced: tau 1.00 before the fix
EMBEDDING_ON_DISK = {"model.embed_tokens": "disk", "model.layers": "cpu", "model.norm": "cpu",
                     "model.rotary_emb": "cpu", "lm_head": "cpu"}
LAYERS_SPLIT = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "cpu",
                "model.layers.2": "disk", "model.layers.3": "disk", "model.norm": "disk",
                "model.rotary_emb": "cpu", "lm_head": "disk"}


@pytest.fixture(scope="module")
def in_memory():
    target = tiny_qwen3_target(0)
    return target, briefly_trained_drafter(target, PROMPTS, steps=40)


def dispatched(device_map, folder):
    return accelerate.dispatch_model(tiny_qwen3_target(0), device_map=device_map, offload_dir=str(folder))


def run(target, draft, do_sample: bool):
    outputs, taus = [], []
    for prompt in PROMPTS:
        torch.manual_seed(123)
        out = target.generate(prompt, assistant_model=draft, max_new_tokens=NEW_TOKENS, do_sample=do_sample, top_k=0)
        outputs.append(out[0].tolist())
        taus.append(draft.last_generation_stats["mean_accepted_length"])
    return outputs, sum(taus) / len(taus)


@pytest.mark.parametrize("device_map", [HEAD_ON_DISK, LAYERS_SPLIT], ids=["head-on-disk", "layers-cpu-and-disk"])
def test_dispatched_target_decodes_as_the_target_in_memory(in_memory, device_map, tmp_path):
    target, draft = in_memory
    offloaded = dispatched(device_map, tmp_path)
    assert any(p.is_meta for p in offloaded.parameters())  # really offloaded: weights arrive in the forward
    plain = [target.generate(p, max_new_tokens=NEW_TOKENS, do_sample=False)[0].tolist() for p in PROMPTS]

    greedy_memory, tau_greedy_memory = run(target, draft, do_sample=False)
    greedy_offloaded, tau_greedy_offloaded = run(offloaded, draft, do_sample=False)
    assert greedy_memory == plain and greedy_offloaded == plain
    assert tau_greedy_offloaded == pytest.approx(tau_greedy_memory) and tau_greedy_offloaded > 1.2

    sampled_memory, tau_memory = run(target, draft, do_sample=True)
    sampled_offloaded, tau_offloaded = run(offloaded, draft, do_sample=True)
    assert sampled_offloaded == sampled_memory  # the same seed draws the same tokens
    assert tau_offloaded == pytest.approx(tau_memory) and tau_offloaded > 1.2


def test_offloaded_embedding_is_run_as_a_module(in_memory, tmp_path):
    """The drafter's block embeddings through an input embedding on disk equal those of the target in
    memory. (``generate`` itself cannot run such a target: the embedding is its first parameter, so
    ``target.device`` is ``meta`` and transformers' assisted decoding moves every candidate there.)"""
    target, draft = in_memory
    offloaded = dispatched(EMBEDDING_ON_DISK, tmp_path)
    assert offloaded.get_input_embeddings().weight.is_meta
    block = draft.block_input_ids(torch.tensor([5, 7]))
    expected = draft.embed(block)
    draft.bind_target(offloaded)
    try:
        assert torch.equal(draft.embed(block), expected)
        hidden = torch.randn(2, block.shape[1], draft.config.hidden_size)
        assert torch.allclose(draft.compute_logits(hidden), target.lm_head(hidden), atol=1e-6)
    finally:
        draft.bind_target(target)


def test_meta_target_is_refused_with_the_fix(in_memory, tmp_path):
    _, draft = in_memory
    with torch.device("meta"):
        meta_target = tiny_qwen3_target(0)
    with pytest.raises(DevicePlacementError, match="meta device.*from_pretrained"):
        draft.bind_target(meta_target)

    from hf_dspark import load_drafter

    draft.save_pretrained(tmp_path / "draft")
    with pytest.raises(DevicePlacementError, match="meta device"):
        load_drafter(tmp_path / "draft", target=meta_target)


def test_drafter_follows_the_execution_device_of_the_target_embedding(in_memory):
    """On CPU there is one real device; a hook announcing ``meta`` as the embedding's execution device
    shows that binding moves the drafter there (on a GPU: from the CPU to the target's ``cuda:N``)."""
    target, draft = in_memory
    other = tiny_qwen3_target(0)
    other.get_input_embeddings()._hf_hook = types.SimpleNamespace(execution_device="meta")
    moved = briefly_trained_drafter(target, PROMPTS, steps=0)
    moved.bind_target(other)
    assert moved.fc.weight.is_meta
    draft.bind_target(target)
    assert draft.fc.weight.device.type == "cpu"


def test_batched_engine_refuses_dispatched_targets(in_memory, tmp_path):
    _, draft = in_memory
    offloaded = dispatched(HEAD_ON_DISK, tmp_path)
    with pytest.raises(DevicePlacementError, match="one device.*generate"):
        BatchedSpeculativeGenerator(offloaded, draft, generation_config=DSparkGenerationConfig(verification_policy="full"))
