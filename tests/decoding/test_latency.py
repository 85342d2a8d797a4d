"""Tests of the target latency profiler (tiny random Qwen3; no timing assertions)."""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import types

import pytest
import torch
import transformers

from hf_dspark.commands.profile import add_arguments, run
from hf_dspark.decoding.latency import LatencyProfile, LatencyProfileError, format_table, profile_latency
from hf_dspark.decoding import latency


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    config = transformers.Qwen3Config(
        vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, intermediate_size=64,
    )
    model = transformers.Qwen3ForCausalLM(config)
    model.config._name_or_path = "tiny/qwen3-random"
    return model


def count_forwards(model):
    calls = []
    handle = model.register_forward_pre_hook(lambda module, args: calls.append(1))
    return calls, handle


def make_profile(table, **overrides):
    fields = dict(model_name="m", dtype="float32", device="cpu", num_threads=2, context_length=8, table=table)
    fields.update(overrides)
    return LatencyProfile(**fields)


class ScriptedPassClock:
    """Stands in for ``latency.time``: the clock moves only inside a forward pass of ``model`` (or of a copy of
    it), by ``cost(dtype, batch, tokens, index)``, ``index`` counting the earlier passes of that dtype and shape."""

    def __init__(self, model, monkeypatch, cost=None):
        self.now, self.seen = 0.0, {}
        self.cost = cost or (lambda dtype, batch, tokens, index: 1e-3 * batch * tokens * (1 + index))

        def advance(module, args, kwargs):  # a closure, not a bound method: a deepcopy of the model shares it
            ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
            key = (next(module.parameters()).dtype, *ids.shape)
            index = self.seen.get(key, 0)
            self.seen[key] = index + 1
            self.now += self.cost(*key, index)

        self.handle = model.register_forward_pre_hook(advance, with_kwargs=True)
        monkeypatch.setattr(latency, "time", self)

    def perf_counter(self) -> float:
        return self.now

    def __getattr__(self, name):
        return getattr(time, name)

    def remove(self):
        self.handle.remove()


def test_profile_runs_and_caches(tiny_model, tmp_path, monkeypatch):
    # a row measured while other jobs run may be judged implausible and measured again (tested below, with a
    # scripted timer); here every row is taken as measured, so the count of passes is exact
    monkeypatch.setattr(latency, "implausible_row", lambda row, noisy=(): [])
    clock = ScriptedPassClock(tiny_model, monkeypatch)
    calls, handle = count_forwards(tiny_model)
    try:
        profile = profile_latency(
            tiny_model, token_counts=[1, 2, 4], batch_sizes=(1, 2), context_length=8,
            warmup=1, repeats=2, cache_dir=tmp_path,
        )
        # per batch size: one prefill + 3 token counts x (1 warmup + 2 timed)
        assert len(calls) == 2 * (1 + 3 * 3)
        assert profile.model_name == "tiny/qwen3-random"
        assert profile.dtype == "float32" and profile.device == "cpu"
        assert profile.num_threads == torch.get_num_threads() and profile.context_length == 8
        assert sorted(profile.table) == [1, 2]
        assert all(sorted(row) == [1, 2, 4] for row in profile.table.values())
        # each entry is the median of its own timed passes (the 2nd and 3rd: the 1st is the warmup)
        dtype = next(tiny_model.parameters()).dtype
        expected = {b: {n: statistics.median([clock.cost(dtype, b, n, 1), clock.cost(dtype, b, n, 2)])
                        for n in (1, 2, 4)} for b in (1, 2)}
        assert profile.table.keys() == expected.keys()
        for b, row in expected.items():
            assert profile.table[b] == pytest.approx(row, rel=1e-9), b
        files = list(tmp_path.glob("*.json"))
        assert [f.name for f in files] == [profile.file_name]

        # second call: served from the cache, no forward pass at all
        calls.clear()
        again = profile_latency(tiny_model, token_counts=[1, 4], batch_sizes=(2,), context_length=8, cache_dir=tmp_path)
        assert calls == [] and again.table == profile.table

        # a missing point is measured, the rest kept
        again = profile_latency(
            tiny_model, token_counts=[1, 3], batch_sizes=(1,), context_length=8, warmup=0, repeats=1, cache_dir=tmp_path
        )
        assert len(calls) == 1 + 1  # prefill + one timed pass for n=3
        assert sorted(again.table[1]) == [1, 2, 3, 4] and again.table[1][1] == profile.table[1][1]

        # force re-measures everything asked for
        calls.clear()
        profile_latency(tiny_model, token_counts=[1], context_length=8, warmup=0, repeats=1, cache_dir=tmp_path, force=True)
        assert len(calls) == 2

        # another context length is another key, another file
        calls.clear()
        profile_latency(tiny_model, token_counts=[1], context_length=4, warmup=0, repeats=1, cache_dir=tmp_path)
        assert len(calls) == 2 and len(list(tmp_path.glob("*.json"))) == 2
    finally:
        handle.remove()
        clock.remove()
    assert tiny_model.training  # mode restored (a freshly built model is in training mode)


def test_cache_is_restored_between_passes(tiny_model, tmp_path, monkeypatch):
    """Every timed pass sees exactly `context_length` cached tokens, on the crop and the copy path."""
    seen = []
    original = tiny_model.forward

    def spy(*args, **kwargs):
        cache = kwargs.get("cache")
        seen.append(None if cache is None else cache.get_seq_length())
        return original(*args, **kwargs)

    monkeypatch.setattr(tiny_model, "forward", spy)
    profile_latency(tiny_model, token_counts=[2, 3], context_length=5, warmup=1, repeats=1, cache_dir=tmp_path)
    assert seen == [None, 5, 5, 5, 5]

    # a cache that refuses to crop: falls back to copies of a pristine prefill
    seen.clear()
    monkeypatch.setattr(transformers.DynamicCache, "crop", lambda self, n: (_ for _ in ()).throw(RuntimeError("no")))
    profile_latency(tiny_model, token_counts=[2, 3], context_length=5, warmup=1, repeats=1, cache_dir=tmp_path, force=True)
    assert seen == [None, 5, None, 5, 5, 5]


def test_json_round_trip(tmp_path):
    profile = make_profile({1: {1: 0.01, 2: 0.012}, 4: {1: 0.02}}, warmup=2, repeats=5)
    path = profile.to_json(tmp_path / "sub" / "p.json")
    loaded = LatencyProfile.from_json(path)
    assert loaded == profile
    assert loaded.key == profile.key


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "is not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"format": "other"}', "'format' must be"),
    ],
)
def test_malformed_json_names_the_path(tmp_path, content, message):
    path = tmp_path / "broken.json"
    path.write_text(content)
    with pytest.raises(LatencyProfileError, match=message) as info:
        LatencyProfile.from_json(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, ValueError)


def test_malformed_fields_and_table(tmp_path):
    good = make_profile({1: {1: 0.01}}).to_dict()
    cases = [
        ({**good, "num_threads": "2"}, "field 'num_threads' must be a int"),
        ({**good, "table": {"x": {}}}, "batch size key 'x'"),
        ({**good, "table": {"1": {"1": -0.5}}}, r"table\['1'\]\['1'\] must be a positive number"),
        ({**good, "version": 99}, "unsupported 'version'"),
    ]
    for data, message in cases:
        path = tmp_path / "bad.json"
        path.write_text(json.dumps(data))
        with pytest.raises(LatencyProfileError, match=message):
            LatencyProfile.from_json(path)


def test_unreadable_cache_is_replaced_with_a_warning(tiny_model, tmp_path):
    probe = profile_latency(tiny_model, token_counts=[1], context_length=3, warmup=0, repeats=1, cache_dir=tmp_path)
    (tmp_path / probe.file_name).write_text("garbage")
    with pytest.warns(UserWarning, match="ignoring unreadable latency cache"):
        again = profile_latency(tiny_model, token_counts=[1], context_length=3, warmup=0, repeats=1, cache_dir=tmp_path)
    assert LatencyProfile.from_json(tmp_path / probe.file_name) == again


def test_interpolation_and_extrapolation():
    profile = make_profile({1: {1: 1.0, 2: 1.5, 4: 2.5}, 4: {1: 2.0, 2: 3.0, 4: 5.0}})
    assert profile.verify_seconds(2) == 1.5
    assert profile.verify_seconds(3) == pytest.approx(2.0)  # between 2 and 4
    assert profile.verify_seconds(1.5) == pytest.approx(1.25)
    assert profile.verify_seconds(6) == pytest.approx(3.5)  # slope of the last two points: 0.5 / token
    assert profile.verify_seconds(8, batch_size=4) == pytest.approx(9.0)  # slope 1.0 / token
    assert profile.verify_seconds(0.5) == pytest.approx(0.75)  # below the range: first two points
    # unprofiled batch size: linear across the profiled ones (B=1 -> 1.0, B=4 -> 2.0 at n=1)
    assert profile.verify_seconds(1, batch_size=2) == pytest.approx(1.0 + 1.0 / 3)
    assert profile.verify_seconds(1, batch_size=7) == pytest.approx(3.0)
    # never zero or negative
    steep = make_profile({1: {2: 1.0, 3: 5.0}})
    assert steep.verify_seconds(1) == pytest.approx(1e-9)
    # single point: constant
    assert make_profile({1: {4: 2.0}}).verify_seconds(10) == 2.0


def test_steps_per_second_mapping():
    profile = make_profile({1: {1: 1.0, 2: 1.5, 4: 2.5}, 4: {1: 2.0, 2: 3.0, 4: 5.0}})
    assert profile.steps_per_second(2) == pytest.approx(1 / 1.5)
    # 8 tokens over 4 padded rows -> 2 tokens each at B=4
    assert profile.steps_per_second(8, batch_size=4) == pytest.approx(1 / 3.0)
    # 5 tokens over 4 rows -> rows padded to 2 tokens
    assert profile.steps_per_second(5, batch_size=4) == pytest.approx(1 / 3.0)
    with pytest.raises(LatencyProfileError, match="n_tokens must be > 0"):
        profile.verify_seconds(0)
    with pytest.raises(LatencyProfileError, match="no measurements"):
        make_profile({}).verify_seconds(1)


def test_profile_feeds_the_scheduler():
    from hf_dspark.decoding.scheduling import cost_policy_length, prefix_schedule

    profile = make_profile({1: {n: 1.0 + 0.05 * n for n in range(1, 9)}})
    survival = [0.95, 0.9, 0.6, 0.2, 0.05]
    length = cost_policy_length(survival, profile.verify_seconds)
    assert length == prefix_schedule([survival], profile.steps_per_second)[0]
    assert 1 <= length <= 4


def test_bad_arguments(tiny_model, tmp_path):
    with pytest.raises(ValueError, match="token_counts"):
        profile_latency(tiny_model, token_counts=[], cache_dir=tmp_path)
    with pytest.raises(ValueError, match="batch_sizes"):
        profile_latency(tiny_model, batch_sizes=[0], cache_dir=tmp_path)
    with pytest.raises(ValueError, match="context_length"):
        profile_latency(tiny_model, context_length=0, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="repeats"):
        profile_latency(tiny_model, repeats=0, cache_dir=tmp_path)


def test_cli(tiny_model, tmp_path, monkeypatch, capsys):
    loaded = {}

    def load_target(name_or_path, dtype=torch.float32, device="cpu"):
        loaded.update(name=name_or_path, dtype=dtype, device=device)
        return tiny_model, None

    monkeypatch.setitem(sys.modules, "hf_dspark.targets", types.SimpleNamespace(load_target=load_target))
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    out = tmp_path / "profile.json"
    args = parser.parse_args([
        "--target", "tiny/qwen3-random", "--max-tokens", "3", "--batch-sizes", "1", "2",
        "--context-length", "4", "--warmup", "0", "--repeats", "1", "--cache-dir", str(tmp_path / "c"),
        "--output", str(out),
    ])
    assert run(args) == 0
    # --dtype unset: float32 on the CPU ("auto" device resolves there on this machine)
    assert loaded == {"name": "tiny/qwen3-random", "dtype": "float32", "device": "auto"}
    text = capsys.readouterr().out
    assert "B=1 ms" in text and "B=2 ms" in text and "tiny/qwen3-random" in text
    profile = LatencyProfile.from_json(out)
    assert sorted(profile.table) == [1, 2] and sorted(profile.table[2]) == [1, 2, 3]
    assert format_table(profile).splitlines()[0].startswith("# tiny/qwen3-random")


def test_choose_dtype_keeps_the_dtype_with_the_cheaper_verification_pass(monkeypatch, tmp_path):
    from types import SimpleNamespace

    import hf_dspark.decoding.latency as latency
    from _models import tiny_qwen3_target

    target = tiny_qwen3_target(seed=0)
    fake = {"float32": {1: 0.010, 8: 0.030}, "bfloat16": {1: 0.006, 8: 0.050}}  # bf16 decodes faster, verifies slower
    seen = []

    def profile(model, **kwargs):
        name = str(next(model.parameters()).dtype).removeprefix("torch.")
        seen.append((name, model is target, sorted(kwargs["token_counts"])))
        return SimpleNamespace(table={1: fake[name]})

    monkeypatch.setattr(latency, "profile_latency", profile)
    best, measured = latency.choose_dtype(target, cache_dir=tmp_path)
    assert best == "float32" and measured == fake
    assert seen == [("float32", True, [1, 8]), ("bfloat16", False, [1, 8])]  # other dtypes run on a copy
    assert next(target.parameters()).dtype == torch.float32
    fake["bfloat16"][8] = 0.020
    assert latency.choose_dtype(target, cache_dir=tmp_path)[0] == "bfloat16"
    with pytest.raises(ValueError, match="candidates"):
        latency.choose_dtype(target, candidates=("int8",))


def test_choose_dtype_measures_both_dtypes_on_a_tiny_model(tmp_path, monkeypatch):
    from hf_dspark.decoding.latency import choose_dtype
    from _models import tiny_qwen3_target

    # scripted pass times: bf16 is slower for one token but faster for the 8-token pass a round is made of
    per_pass = {(torch.float32, 1): 1e-3, (torch.float32, 8): 4e-3, (torch.bfloat16, 1): 2e-3, (torch.bfloat16, 8): 3e-3}
    model = tiny_qwen3_target(seed=0)
    clock = ScriptedPassClock(model, monkeypatch, cost=lambda dtype, batch, tokens, index: per_pass.get((dtype, tokens), 0.0))
    try:
        best, measured = choose_dtype(model, cache_dir=tmp_path, repeats=1, context_length=8)
    finally:
        clock.remove()
    assert measured.keys() == {"float32", "bfloat16"}  # each dtype's table holds its own passes
    assert measured["float32"] == pytest.approx({1: 1e-3, 8: 4e-3}, rel=1e-9)
    assert measured["bfloat16"] == pytest.approx({1: 2e-3, 8: 3e-3}, rel=1e-9)
    assert best == "bfloat16"  # chosen by the 8-token pass
    assert next(model.parameters()).dtype == torch.float32  # the model itself is not converted


def test_queries_read_a_non_decreasing_fit_of_noisy_medians():
    from hf_dspark.models.dspark.generation_dspark import cost_length, latency_points, nondecreasing_fit

    rising = [(1, 0.10), (2, 0.11), (4, 0.13)]
    assert nondecreasing_fit(rising) == rising  # already rising: unchanged
    # medians measured on a busy 2-core CPU (bf16 Gemma 3 270M, ms): dips at 2 tokens and 7 tokens
    noisy = {1: 0.0999, 2: 0.0774, 3: 0.1071, 4: 0.1014, 5: 0.1005, 6: 0.1265, 7: 0.1046, 8: 0.1165}
    fitted = nondecreasing_fit(sorted(noisy.items()))
    values = [y for _, y in fitted]
    assert values == sorted(values)
    assert math.isclose(sum(values), sum(noisy.values()))  # pooling keeps the mean level
    profile = LatencyProfile("m", "bfloat16", "cpu", 1, 128, table={1: noisy})
    times = [profile.verify_seconds(n) for n in range(1, 9)]
    assert times == sorted(times)
    # the early-stopping cost rule reads the same fit: a bump at 6 tokens no longer ends the search at 5
    survival = [0.95] * 7
    assert cost_length(survival, 0.02, lambda n: latency_from_points(latency_points(noisy), n)) == 7
    raw = sorted(noisy.items())
    assert cost_length(survival, 0.02, lambda n: latency_from_points(raw, n)) < 7  # the raw curve stops early


def latency_from_points(points, n):
    from hf_dspark.models.dspark.generation_dspark import interpolate_latency

    return interpolate_latency(points, n)
