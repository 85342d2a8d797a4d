"""benchmarks/gpu_check.py (issue 30 item 7): the device check runs on CPU with tiny models (--quick), writes
one JSON file, and exits non-zero when a correctness check fails."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"


def test_quick_cpu_run_passes_every_check_in_under_three_minutes(tmp_path):
    start = time.perf_counter()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--output", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, env=env)
    seconds = time.perf_counter() - start
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["failed"] == []
    assert set(report["checks"]) == {"greedy_fp32", "sampling_chi_square", "bf16_near_ties", "engine_fp32",
                                     "placement_drafter_follows_target", "placement_split_target", "host_syncs",
                                     "fsdp_save_load", "bench_oracle"}
    for name, entry in report["checks"].items():
        assert entry["status"] in ("passed", "skipped"), (name, entry)
        if entry["status"] == "skipped":
            assert entry["reason"], name
    assert report["checks"]["host_syncs"]["details"]["generate_greedy"]["per_round"] >= 0
    rows = report["checks"]["bench_oracle"]["details"]["results"]
    assert {(r["mode"], r["batch_size"], r["tau"]) for r in rows} == {
        (m, b, t) for m, b in (("generate", 1), ("engine", 1), ("engine", 8)) for t in (2, 4, 6)}
    assert {"cpu", "gpu", "torch", "transformers", "threads"} <= set(report["machine"])
    assert seconds < 180, f"the quick CPU run took {seconds:.0f} s"


def test_a_failed_correctness_check_is_recorded_and_sets_the_exit_code(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)

    def broken(device, quick):
        raise RuntimeError("boom")

    def fine(device, quick):
        return True, {"ok": 1}

    monkeypatch.setattr(gpu_check, "CHECKS", [("greedy_fp32", broken, True), ("host_syncs", fine, False)])
    assert gpu_check.main(["--device", "cpu", "--quick", "--output", str(tmp_path)]) == 1
    assert torch.is_grad_enabled(), "main() must leave the caller's grad mode as it found it"
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["checks"]["greedy_fp32"]["status"] == "error" and "boom" in report["checks"]["greedy_fp32"]["error"]
    assert report["checks"]["host_syncs"]["status"] == "passed"  # the next check still ran
    assert report["failed"] == ["greedy_fp32"]
