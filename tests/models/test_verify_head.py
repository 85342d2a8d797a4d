"""The skinny-product LM head used while a DSpark generation verifies drafts (CPU fp32)."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from _models import tiny_drafter, tiny_gemma3_target, tiny_qwen3_target

import hf_dspark  # noqa: F401  (installs the hook)
from hf_dspark.models.dspark.generation_dspark import FAST_HEAD_MAX_ROWS, activate_verify_head, skinny_linear


@pytest.mark.parametrize("rows", [1, 2, 5, 8, 13])
@pytest.mark.parametrize("bias", [False, True])
def test_skinny_linear_matches_linear(rows, bias):
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(1, rows, 48, generator=gen)
    w = torch.randn(300, 48, generator=gen)
    b = torch.randn(300, generator=gen) if bias else None
    out = skinny_linear(x, w, b)
    assert out.shape == (1, rows, 300) and out.is_contiguous()
    torch.testing.assert_close(out, torch.nn.functional.linear(x, w, b), rtol=1e-5, atol=1e-5)


class _RowRecorder:
    """Forward pre-hook on the LM head: rows per call and whether the skinny layout was active."""

    def __init__(self, head):
        self.calls = []
        self.handle = head.register_forward_pre_hook(self)

    def __call__(self, module, args):
        x = args[0]
        self.calls.append((x.numel() // x.shape[-1], "_dspark_verify_head" in module.__dict__))


@pytest.mark.parametrize("make_target", [tiny_qwen3_target, tiny_gemma3_target])
def test_active_during_generation_restored_after_and_lossless(make_target):
    target = make_target()
    draft = tiny_drafter(target)
    head = target.get_output_embeddings()
    prompt = torch.randint(3, 90, (1, 7), generator=torch.Generator().manual_seed(1))
    plain = target.generate(prompt, max_new_tokens=24, do_sample=False)

    recorder = _RowRecorder(head)
    spec = target.generate(prompt, max_new_tokens=24, do_sample=False, assistant_model=draft)
    recorder.handle.remove()
    gc.collect()

    assert torch.equal(spec, plain)
    assert draft.last_generation_stats["rounds"] > 0
    # Verification passes (2..8 rows) ran while the layout was active ...
    assert any(active and 2 <= rows <= FAST_HEAD_MAX_ROWS for rows, active in recorder.calls)
    # ... and once generate() returned the module is exactly an nn.Linear again.
    assert "forward" not in head.__dict__ and "_dspark_verify_head" not in head.__dict__
    x = torch.randn(1, 4, head.in_features)
    assert torch.equal(head(x), torch.nn.functional.linear(x, head.weight, head.bias))


def test_switch_off_and_non_fp32_leave_the_head_alone():
    target = tiny_qwen3_target()
    draft = tiny_drafter(target)
    draft.generation_config.fast_verify_head = False
    recorder = _RowRecorder(target.get_output_embeddings())
    target.generate(torch.tensor([[5, 6, 7, 8]]), max_new_tokens=12, do_sample=False, assistant_model=draft)
    recorder.handle.remove()
    assert recorder.calls and not any(active for _, active in recorder.calls)

    bf16 = tiny_qwen3_target().to(torch.bfloat16)
    owner = type("Owner", (), {})()
    assert activate_verify_head(bf16, owner) is None
    assert "forward" not in bf16.get_output_embeddings().__dict__


def test_nested_owners_release_in_any_order():
    target = tiny_qwen3_target()
    head = target.get_output_embeddings()
    first, second = type("Owner", (), {})(), type("Owner", (), {})()
    first_handle = activate_verify_head(target, first)
    state = head.__dict__["_dspark_verify_head"]
    assert isinstance(first_handle, weakref.finalize) and first_handle.alive and state.owners == 1
    second_handle = activate_verify_head(target, second)
    # one shared layout with two owners, each with its own release handle
    assert head.__dict__["_dspark_verify_head"] is state and state.owners == 2
    assert second_handle.alive and second_handle is not first_handle
    x = torch.randn(1, 3, head.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # 3 rows, CPU fp32: the skinny product runs
        assert torch.equal(head(x), skinny_linear(x, head.weight, head.bias))
    del first
    gc.collect()
    assert not first_handle.alive and second_handle.alive and state.owners == 1
    assert head.__dict__.get("_dspark_verify_head") is state  # the second generation still runs
    del second
    gc.collect()
    assert not second_handle.alive and state.owners == 0
    assert "forward" not in head.__dict__ and "_dspark_verify_head" not in head.__dict__


def test_batched_engine_close_releases_the_head_and_profile_records_it(tmp_path):
    from hf_dspark import BatchedSpeculativeGenerator, DSparkGenerationConfig
    from hf_dspark.decoding.latency import LatencyProfile, profile_latency

    target = tiny_qwen3_target()
    head = target.get_output_embeddings()
    engine = BatchedSpeculativeGenerator(target, tiny_drafter(target), generation_config=DSparkGenerationConfig(verification_policy="full"))
    assert engine.fast_verify_head and "_dspark_verify_head" in head.__dict__
    engine.close()
    engine.close()  # idempotent
    assert "forward" not in head.__dict__ and not engine.fast_verify_head

    with_head = profile_latency(target, token_counts=[1, 3], context_length=8, warmup=0, repeats=1, cache_dir=tmp_path)
    without = profile_latency(target, token_counts=[1, 3], context_length=8, warmup=0, repeats=1,
                              cache_dir=tmp_path, verify_head=False)
    assert with_head.verify_head and not without.verify_head and with_head.key != without.key
    assert "forward" not in head.__dict__
    reloaded = LatencyProfile.from_json(tmp_path / with_head.file_name)
    assert reloaded.verify_head and reloaded.key == with_head.key


def test_a_deep_copy_of_an_active_head_runs_its_own_weights():
    """Copying a target while a generation holds its head (then casting the copy) must not call the original."""
    import copy

    target = tiny_qwen3_target()
    owner = type("Owner", (), {})()
    handle = activate_verify_head(target, owner)
    assert isinstance(handle, weakref.finalize) and handle.alive
    assert target.get_output_embeddings().__dict__["_dspark_verify_head"].owners == 1
    clone = copy.deepcopy(target).to(torch.bfloat16)
    head = clone.get_output_embeddings()
    x = torch.randn(1, 3, head.in_features, dtype=torch.bfloat16)
    out = head(x)  # before the fix: "expected m1 and m2 to have the same dtype" (the fp32 original ran)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, torch.nn.functional.linear(x, head.weight))
    assert "_dspark_verify_head" in target.get_output_embeddings().__dict__  # the original is still active
    assert clone.get_output_embeddings().__dict__["_dspark_verify_head"].owners == 0  # the copy's own, inactive
    del owner
    gc.collect()
    assert not handle.alive and "forward" not in target.get_output_embeddings().__dict__
