"""`hf-dspark bench-serve`: the arrival replay (clock, Poisson workload, metrics) and the command end to end."""

from __future__ import annotations

import json
import math

import pytest
from _fixtures import plain, synthetic_cost, train_prompts
from _models import briefly_trained_drafter, tiny_drafter, tiny_qwen3_target

from hf_dspark.decoding.batched import BatchedSpeculativeGenerator
from hf_dspark.models.dspark.generation_config_dspark import DSparkGenerationConfig
from hf_dspark.commands.bench_serve import Workload, reference_outputs, serve, summarize


def test_workload_arrivals_are_poisson_gaps_scaled_by_the_rate():
    workload = Workload.build([[1, 2]] * 2000, 4, 9, seed=3)
    assert set(workload.max_new_tokens) == set(range(4, 10))
    assert workload == Workload.build([[1, 2]] * 2000, 4, 9, seed=3)  # fixed seed, same workload
    slow, fast = workload.arrivals(2.0), workload.arrivals(8.0)
    assert slow[0] == fast[0] == 0.0
    assert all(s == pytest.approx(4 * f) for s, f in zip(slow, fast))
    gaps = [b - a for a, b in zip(slow, slow[1:])]
    assert sum(gaps) / len(gaps) == pytest.approx(0.5, rel=0.1)  # mean gap 1 / rate
    assert workload.arrivals(math.inf) == [0.0] * 2000


@pytest.fixture(scope="module")
def qwen_and_drafter():
    target = tiny_qwen3_target()
    return target, briefly_trained_drafter(target, train_prompts(), steps=30)


@pytest.mark.parametrize("scheduler", ["plain", "cost", "async"])
def test_serve_replays_arrivals_and_outputs_equal_each_request_alone(qwen_and_drafter, scheduler):
    target, draft = qwen_and_drafter
    prompts = [p[0].tolist() for p in train_prompts(n=3)] + [[5, 9, 11, 40], [7], [70, 71, 72, 73, 74]]
    workload = Workload.build(prompts, 6, 20, seed=1)
    engine = BatchedSpeculativeGenerator(target, draft, DSparkGenerationConfig(verification_policy=scheduler),
                                         round_cost=synthetic_cost(), max_batch_size=3)
    run = serve(engine, workload, rate=50.0)
    assert run["outputs"] == reference_outputs(target, workload)
    assert run["outputs"] == [plain(target, p, n) for p, n in zip(workload.prompts, workload.max_new_tokens)]
    for arrival, first, finished in zip(run["arrival"], run["first_token"], run["finished"]):
        assert arrival <= first <= finished
    row = summarize(run)
    assert row["requests"] == len(prompts) and row["total_tokens"] == sum(len(o) for o in run["outputs"])
    assert row["tpot_p50"] <= row["tpot_p90"] and row["ttft_p50"] <= row["ttft_p90"]
    assert row["max_active"] <= 3
    assert (row["mean_verified_draft_tokens"] > 0) == (scheduler != "plain")


def test_idle_time_is_skipped_not_slept(qwen_and_drafter):
    target, _ = qwen_and_drafter
    engine = BatchedSpeculativeGenerator(target, tiny_drafter(target), DSparkGenerationConfig(verification_policy="plain"))
    workload = Workload.build([[5, 6, 7], [8, 9]], 3, 3, seed=0)
    run = serve(engine, workload, rate=1e-3)  # about 1000 s between the two arrivals
    assert run["arrival"][1] > 10 and run["finished"][1] >= run["arrival"][1]
    assert run["first_token"][1] - run["arrival"][1] < 10  # served as soon as it arrived


def test_bench_serve_cli_writes_results_and_plot(tiny_target_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from hf_dspark.cli import main

    target = AutoModelForCausalLM.from_pretrained(tiny_target_dir)
    tiny_drafter(target, target_layer_ids=[0, 1]).save_pretrained(tmp_path / "draft")
    out, png = tmp_path / "serve.json", tmp_path / "serve.png"
    args = ["bench-serve", "--target", str(tiny_target_dir), "--draft", str(tmp_path / "draft"), "--num-requests", "4",
            "--min-new-tokens", "3", "--max-new-tokens", "6", "--max-concurrency", "2", "--load", "0.5", "1.5",
            "--device", "cpu", "--latency-cache-dir", str(tmp_path / "latency"), "--profile-repeats", "1",
            "--output", str(out)]
    assert main(args + ["--plot", str(png)]) == 0
    results = json.loads(out.read_text())
    rows = results["results"]
    assert {(r["mode"], r["rate"] == "inf") for r in rows} == {(m, s) for m in ("plain", "full", "algorithm1", "async")
                                                               for s in (False, True)}
    assert len(rows) == 4 * 3  # two loads and the saturated run, four modes
    saturated = next(r for r in rows if r["mode"] == "plain" and r["rate"] == "inf")
    assert 0 < saturated["total_tokens"] <= 4 * 6 and saturated["requests"] == 4
    assert results["capacity"]["requests_per_second"] == pytest.approx(
        saturated["tokens_per_second"] * saturated["requests"] / saturated["total_tokens"])
    for row in rows:
        assert row["outputs_equal_alone"] == row["requests"] == 4 and row["mismatched_requests"] == []
        for key in ("tokens_per_second", "tpot_p50", "tpot_p90", "ttft_p50", "ttft_p90", "mean_verified_draft_tokens",
                    "draft_skipped_request_rounds", "draft_skipped_rounds"):
            assert key in row
    assert {e["mode"] for e in results["summary"]["vs_plain"]} == {"full", "algorithm1", "async"}
    assert png.stat().st_size > 0
    # an interrupted run continues: nothing left to do, the rows stay
    assert main(args + ["--resume"]) == 0
    assert json.loads(out.read_text())["results"] == rows
    # --stop-after 0: the capacity run, then stop; --resume finishes the rest
    partial = tmp_path / "partial.json"
    chunked = args[:-1] + [str(partial)]
    assert main(chunked + ["--stop-after", "0"]) == 0
    first = json.loads(partial.read_text())
    assert first["complete"] is False and len(first["results"]) == 1
    assert main(chunked + ["--resume"]) == 0
    finished = json.loads(partial.read_text())
    assert finished["complete"] is True and len(finished["results"]) == 12
    assert main(args[:-2] + ["--resume"]) == 2  # --resume needs --output
