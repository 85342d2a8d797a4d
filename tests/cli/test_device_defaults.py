"""Device-aware defaults: ``--device auto`` and ``--dtype`` (unset: bf16 on an accelerator, fp32 on a CPU;
``auto``: on a CPU the dtype measured fastest) are shared by every command that loads a target."""

from __future__ import annotations

import argparse

import pytest
import torch

from hf_dspark import targets
from hf_dspark.commands import _args


def test_the_dtype_default_follows_the_device(monkeypatch):
    assert _args.resolve_target_dtype(None, "cpu") == "float32"
    assert _args.resolve_target_dtype("bfloat16", "cpu") == "bfloat16"
    assert _args.resolve_target_dtype("auto", "cpu") == "auto"
    monkeypatch.setattr(targets, "resolve_device", lambda device: torch.device("cuda"))
    monkeypatch.setattr(_args, "resolve_device", lambda device: torch.device("cuda"))
    assert _args.resolve_target_dtype(None, "auto") == "bfloat16"


def test_auto_device_is_the_cpu_without_an_accelerator(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert targets.resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert targets.resolve_device("auto") == torch.device("cuda")
    assert targets.resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("command", ["eval", "profile", "calibrate", "bench_batch", "bench_serve", "bench_oracle"])
def test_every_target_command_has_the_same_placement_flags(command):
    import importlib

    module = importlib.import_module(f"hf_dspark.commands.{command}")
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    actions = {a.dest: a for a in parser._actions}
    assert actions["device"].default == "auto"
    assert actions["dtype"].default is None and "auto" in actions["dtype"].choices


def test_dtype_auto_on_a_cpu_measures_and_keeps_the_faster(tiny_target_dir, monkeypatch):
    from hf_dspark.decoding import latency

    seen = {}

    def choose(model, **kwargs):
        seen["dtype"] = next(model.parameters()).dtype
        return "bfloat16", {}

    monkeypatch.setattr(latency, "choose_dtype", choose)
    model, _ = targets.load_target(str(tiny_target_dir), dtype="auto", device="cpu")
    assert seen["dtype"] == torch.float32  # loaded in fp32, then measured
    assert targets.dtype_name(model) == "bfloat16"
    model, _ = targets.load_target(str(tiny_target_dir), dtype="float32", device="cpu")
    assert targets.dtype_name(model) == "float32"
