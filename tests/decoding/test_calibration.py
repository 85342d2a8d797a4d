"""Sequential Temperature Scaling: metrics on hand-computed cases, recovery of known temperatures,
round recording in generate(), and `hf-dspark calibrate` end to end on a tiny target."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from _models import briefly_trained_drafter, tiny_drafter, tiny_qwen3_target

from hf_dspark import DSparkDraftModel
from hf_dspark.decoding.calibration import (
    CalibrationData,
    auroc,
    brier_score,
    calibration_metrics,
    expected_calibration_error,
    fit_sts,
    prefix_survival_probabilities,
    reliability_bins,
)


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def synthetic_rounds(n, true_temperatures, seed=0, mean=2.0, std=1.5):
    """Raw logits = true logit * T_true; token k survives with probability sigmoid(true logit k),
    and the prefix survives while every token so far did."""
    rng = np.random.default_rng(seed)
    true_logits = rng.normal(mean, std, size=(n, len(true_temperatures)))
    survived = rng.random(true_logits.shape) < sigmoid(true_logits)
    prefix_survived = np.cumprod(survived, axis=1).astype(bool)
    return true_logits * np.asarray(true_temperatures), prefix_survived


def mean_ece(logits, prefix_survived, temperatures=None):
    a = prefix_survival_probabilities(logits, temperatures)
    return float(np.mean([expected_calibration_error(a[:, k], prefix_survived[:, k]) for k in range(a.shape[1])]))


# ----------------------------------------------------------------------------- metrics by hand
def test_ece_by_hand():
    # 15 bins: 0.10 and 0.11 share bin 1, 0.90 and 0.91 share bin 13
    pred, label = [0.10, 0.11, 0.90, 0.91], [0, 1, 1, 1]
    expected = 0.5 * abs(0.105 - 0.5) + 0.5 * abs(0.905 - 1.0)
    assert expected_calibration_error(pred, label) == pytest.approx(expected)
    # one prediction per bin: the mean absolute gap
    assert expected_calibration_error([0.1, 0.5, 0.95], [0, 1, 1]) == pytest.approx((0.1 + 0.5 + 0.05) / 3)
    # a prediction of exactly 1 falls in the last bin; perfect predictions give 0
    assert expected_calibration_error([1.0, 0.0], [1, 0]) == pytest.approx(0.0)
    assert expected_calibration_error([0.3, 0.3], [0, 1], n_bins=1) == pytest.approx(0.2)
    assert math.isnan(expected_calibration_error([], []))
    assert expected_calibration_error([0.7], [1]) == pytest.approx(0.3)  # one prediction is enough
    # 0.9 falls in bin 13 and 0.95 in bin 14 (the last): two bins, (0.1 + 0.95) / 2
    assert expected_calibration_error([0.9, 0.95], [1, 0]) == pytest.approx(0.525)


def test_auroc_by_hand():
    # positives 0.35, 0.8 vs negatives 0.1, 0.4: 3 of 4 pairs ordered
    assert auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert auroc([0.5, 0.5], [0, 1]) == pytest.approx(0.5)  # a tie counts one half
    assert auroc([0.2, 0.5, 0.5, 0.9], [0, 1, 0, 1]) == pytest.approx((1 + 1 + 0.5 + 1) / 4)
    assert auroc([0.9, 0.1], [0, 1]) == pytest.approx(0.0)
    assert math.isnan(auroc([0.1, 0.2], [1, 1]))


def test_brier_and_reliability_bins_by_hand():
    assert brier_score([0.2, 0.7], [0, 1]) == pytest.approx((0.04 + 0.09) / 2)
    bins = reliability_bins([0.10, 0.11, 0.90], [0, 1, 1], n_bins=15)
    assert [b["count"] for b in bins] == [2, 1]
    assert bins[0]["mean_prediction"] == pytest.approx(0.105) and bins[0]["frequency"] == pytest.approx(0.5)


def test_labels_from_recorded_rounds():
    rounds = [
        {"confidence_logits": [1.0, 2.0, 3.0, 4.0], "submitted": 4, "accepted": 1},  # rejected at token 2
        {"confidence_logits": [1.0, 2.0], "submitted": 2, "accepted": 2},  # short block, all accepted
        {"confidence_logits": [], "submitted": 0, "accepted": 0},  # nothing drafted: skipped
    ]
    data = CalibrationData.from_rounds(rounds, block_size=4)
    assert len(data) == 2
    assert data.prefix_observed.tolist() == [[True] * 4, [True, True, False, False]]
    assert data.prefix_survived.tolist() == [[True, False, False, False], [True, True, False, False]]
    assert data.reached.tolist() == [[True, True, False, False], [True, True, False, False]]
    assert np.isnan(data.confidence_logits[1, 2:]).all()
    metrics = calibration_metrics(data)
    assert [m["rounds"] for m in metrics] == [2, 2, 1, 1]
    assert [m["reached"] for m in metrics] == [2, 2, 0, 0]


# ----------------------------------------------------------------------------- STS
@pytest.mark.parametrize("seed", [0, 1])
def test_fit_sts_recovers_known_temperatures(seed):
    true_t = [2.0, 0.5, 1.5, 3.0]
    logits, prefix_survived = synthetic_rounds(20000, true_t, seed=seed)
    fitted = fit_sts(logits, prefix_survived)
    assert len(fitted) == len(true_t) and all(t > 0 for t in fitted)
    np.testing.assert_allclose(fitted, true_t, rtol=0.15)
    before, after, oracle = mean_ece(logits, prefix_survived), mean_ece(logits, prefix_survived, fitted), mean_ece(
        logits, prefix_survived, true_t
    )
    assert before > 0.03
    assert after < 0.015 and after < before / 3
    assert after <= oracle + 0.003


def test_sts_preserves_order_and_auroc():
    logits, prefix_survived = synthetic_rounds(5000, [0.6, 2.5, 1.0], seed=3)
    fitted = fit_sts(logits, prefix_survived)
    calibrated = sigmoid(logits / np.asarray(fitted))
    for k in range(logits.shape[1]):
        assert np.array_equal(np.argsort(logits[:, k], kind="stable"), np.argsort(calibrated[:, k], kind="stable"))
    accepted = prefix_survived.sum(axis=1)
    data = CalibrationData(logits, np.full(len(logits), logits.shape[1]), accepted)
    for raw, cal in zip(calibration_metrics(data), calibration_metrics(data, fitted)):
        assert raw["auroc"] == pytest.approx(cal["auroc"])
        assert cal["ece"] <= raw["ece"] + 1e-12


def test_fit_sts_edge_cases():
    logits, prefix_survived = synthetic_rounds(100, [1.0, 1.0], seed=0)
    # no observed data at all: identity temperatures
    assert fit_sts(logits, prefix_survived, observed=np.zeros_like(prefix_survived)) == [1.0, 1.0]
    # a grid containing only 1 gives 1
    assert fit_sts(logits, prefix_survived, grid=[1.0]) == [1.0, 1.0]
    with pytest.raises(ValueError, match="same"):
        fit_sts(logits, prefix_survived[:, :1])
    with pytest.raises(ValueError, match="positive"):
        fit_sts(logits, prefix_survived, grid=[0.0, 1.0])


# ----------------------------------------------------------------------------- round recording
def test_generate_records_rounds_only_when_asked():
    target = tiny_qwen3_target()
    draft = tiny_drafter(target)
    ids = torch.randint(3, 90, (1, 7), generator=torch.Generator().manual_seed(0))
    plain = target.generate(ids, max_new_tokens=20, do_sample=False, assistant_model=draft)
    assert getattr(draft, "record_rounds", None) is None
    draft.record_rounds = []
    recorded = target.generate(ids, max_new_tokens=20, do_sample=False, assistant_model=draft)
    assert torch.equal(plain, recorded)
    stats, rounds = draft.last_generation_stats, draft.record_rounds
    assert [r["submitted"] for r in rounds] == stats["submitted_lengths"]
    assert [r["accepted"] + 1 for r in rounds] == stats["accepted_lengths"]
    assert all(len(r["confidence_logits"]) == r["submitted"] for r in rounds)
    assert all(isinstance(x, float) for r in rounds for x in r["confidence_logits"])


# ----------------------------------------------------------------------------- CLI end to end
PROMPT_TEXTS = [  # eight words each: the brief training below needs prompts of equal length
    "what is the sum of two and three",
    "write python code to list the number question",
    "how many step by step reason the answer",
    "please write the answer of a python question",
    "reason step by step and write final sum",
    "what is the answer to the code question",
]


@pytest.fixture(scope="module")
def drafter_dir(tiny_target_dir, tmp_path_factory):
    from hf_dspark.targets import load_target

    target, tokenizer = load_target(str(tiny_target_dir))
    prompts = [torch.tensor([tokenizer(text)["input_ids"]]) for text in PROMPT_TEXTS]
    assert len({p.shape[1] for p in prompts}) == 1
    draft = briefly_trained_drafter(target, prompts, steps=30, target_layer_ids=[0, 1])
    folder = tmp_path_factory.mktemp("drafter")
    draft.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "holdout.jsonl"
    path.write_text("".join(json.dumps({"turns": [text]}) + "\n" for text in PROMPT_TEXTS))
    return path


def test_calibrate_cli_end_to_end(tiny_target_dir, drafter_dir, prompts_file, tmp_path):
    from hf_dspark.cli import main
    from hf_dspark.targets import load_target

    out, report_path, plot_path, rounds_path = (tmp_path / "calibrated", tmp_path / "r.json", tmp_path / "r.png",
                                                tmp_path / "rounds.jsonl")
    argv = ["calibrate", "--target", str(tiny_target_dir), "--draft", str(drafter_dir), "--prompts", str(prompts_file),
            "--max-new-tokens", "40", "--output", str(out), "--report", str(report_path), "--plot", str(plot_path),
            "--rounds", str(rounds_path)]
    assert main(argv) == 0

    temperatures = json.loads((out / "config.json").read_text())["confidence_temperatures"]
    assert len(temperatures) == 5 and all(t > 0 for t in temperatures)
    assert json.loads((drafter_dir / "config.json").read_text()).get("confidence_temperatures") is None
    report = json.loads(report_path.read_text())
    assert report["temperatures"] == pytest.approx(temperatures)
    assert report["rounds"] > 0 and len(report["positions"]) == 5
    # fitted on 3/4 of the prompts, reported on the held-out quarter; STS cannot worsen the fit set
    assert report["evaluated_on"] == "held-out prompts" and report["eval_prompts"] == round(0.25 * len(PROMPT_TEXTS))
    assert report["fit"]["prompts"] + report["eval_prompts"] == len(PROMPT_TEXTS)
    assert report["fit"]["mean_ece_after"] <= report["fit"]["mean_ece_before"] + 1e-9
    rounds_per_prompt = [len(json.loads(line)["rounds"]) for line in rounds_path.read_text().splitlines()]
    assert report["fit"]["rounds"] + report["rounds"] <= sum(rounds_per_prompt)
    first = report["positions"][0]
    assert {"ece_before", "ece_after", "auroc_before", "auroc_after", "brier_before", "brier_after"} <= set(first)
    assert plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(rounds_path.read_text().splitlines()) == len(PROMPT_TEXTS)

    # the calibrated drafter loads, uses its temperatures, and stays lossless
    target, tokenizer = load_target(str(tiny_target_dir))
    draft = DSparkDraftModel.from_pretrained(out)
    assert draft.config.confidence_temperatures == pytest.approx(temperatures)
    draft.generation_config.verification_policy = "threshold"
    draft.generation_config.confidence_threshold = 0.4
    for text in PROMPT_TEXTS[:3]:
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        plain = target.generate(ids, max_new_tokens=30, do_sample=False)
        spec = target.generate(ids, max_new_tokens=30, do_sample=False, assistant_model=draft)
        assert torch.equal(plain, spec)

    # in place, reusing the recorded rounds (no generation), default report and plot in the folder
    in_place = tmp_path / "in_place"
    shutil.copytree(drafter_dir, in_place)
    argv = ["calibrate", "--target", str(tiny_target_dir), "--draft", str(in_place), "--prompts", str(prompts_file),
            "--rounds", str(rounds_path)]
    assert main(argv) == 0
    assert json.loads((in_place / "config.json").read_text())["confidence_temperatures"] == pytest.approx(temperatures)
    assert (in_place / "calibration_report.json").exists() and (in_place / "calibration_reliability.png").exists()


def test_calibrate_cli_sampling(tiny_target_dir, drafter_dir, prompts_file, tmp_path):
    from hf_dspark.cli import main

    out = tmp_path / "sampled"
    argv = ["calibrate", "--target", str(tiny_target_dir), "--draft", str(drafter_dir), "--prompts", str(prompts_file),
            "--max-prompts", "3", "--max-new-tokens", "24", "--temperature", "0.8", "--top-k", "20", "--output", str(out)]
    assert main(argv) == 0
    report = json.loads((out / "calibration_report.json").read_text())
    assert report["sampling_temperature"] == 0.8 and report["prompts"] == 3
    assert len(report["temperatures"]) == 5


def test_calibrate_cli_rejects_bad_arguments(tiny_target_dir, drafter_dir, prompts_file):
    from hf_dspark.cli import run_command

    with pytest.raises(ValueError, match="--temperature"):
        run_command(["calibrate", "--target", str(tiny_target_dir), "--draft", str(drafter_dir), "--prompts",
              str(prompts_file), "--temperature", "-1"])
    with pytest.raises(ValueError, match="--output"):
        run_command(["calibrate", "--target", str(tiny_target_dir), "--draft", "org/not-a-folder", "--prompts",
              str(prompts_file)])
