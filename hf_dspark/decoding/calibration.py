"""Calibrating the confidence head with Sequential Temperature Scaling (STS).

The confidence head predicts ``c_k``, the probability that draft token ``k`` survives
verification given that tokens ``1..k-1`` survived; the scheduler uses the prefix survival
``a_k = prod_{i<=k} c_i`` as an absolute probability, so it has to be calibrated, not only
well ranked. STS (docs/design.md, "Calibration") fits one temperature per block position on held-out
rounds: for ``k = 1..K`` in order, a 1-D grid search picks the ``T_k`` that minimises the
expected calibration error (ECE) of ``a_k = prod_{i<=k} sigmoid(l_i / T_i)`` against the
observed prefix survival, with ``T_1..T_{k-1}`` already fixed. A positive temperature keeps
the order of the confidences at each position, so the head's ranking (AUROC) is unchanged.

Data: the drafter runs with the target on held-out prompts with the whole block submitted
every round, so the outcome of every position is observable up to the first rejection.
Per round we keep the raw confidence logits and the number of accepted draft tokens:

* prefix survival of position ``k``: 1 iff tokens ``1..k`` were all accepted (known for every
  drafted position);
* conditional survival of position ``k``: 1 iff token ``k`` was accepted, observed only in
  rounds that *reached* ``k`` (tokens ``1..k-1`` accepted).

The last round of each generation is dropped: transformers cuts its accepted count at EOS
or at the length limit, which would read as a rejection.

Command line::

    hf-dspark calibrate --target gemma-3-270m --draft runs/drafter \\
        --prompts work_data/holdout.jsonl --max-prompts 200 --max-new-tokens 128 --temperature 0

writes ``confidence_temperatures`` into the drafter's ``config.json`` (in place, or a full copy
under ``--output``), a JSON report with per-position ECE / AUROC / Brier before and after, and
a reliability diagram.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch


DEFAULT_GRID = (0.05, 20.0, 241)  # log-spaced temperatures: min, max, points
DEFAULT_BINS = 15
REPORT_NAME = "calibration_report.json"
PLOT_NAME = "calibration_reliability.png"


# ----------------------------------------------------------------------------- metrics
def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -60.0, 60.0)))


def _ece_rows(pred: np.ndarray, label: np.ndarray, n_bins: int) -> np.ndarray:
    """ECE of each row of ``pred`` [G, n] against one label vector [n] (equal-width bins on [0, 1]).

    ``sum_b n_b / n * |mean_b(pred) - mean_b(label)|`` equals ``sum_b |sum_b(pred) - sum_b(label)| / n``.
    """
    rows, n = pred.shape
    if n == 0:
        return np.full(rows, np.nan)
    bins = np.minimum((pred * n_bins).astype(np.int64), n_bins - 1).clip(min=0)
    flat = (bins + n_bins * np.arange(rows)[:, None]).ravel()
    sum_pred = np.bincount(flat, weights=pred.ravel(), minlength=rows * n_bins)
    sum_label = np.bincount(flat, weights=np.broadcast_to(label, pred.shape).ravel(), minlength=rows * n_bins)
    return np.abs(sum_pred - sum_label).reshape(rows, n_bins).sum(axis=1) / n


def expected_calibration_error(pred, label, n_bins: int = DEFAULT_BINS) -> float:
    """ECE with ``n_bins`` equal-width bins: bin-size-weighted mean |mean prediction - frequency|.

    Empty input gives NaN.
    """
    pred = np.asarray(pred, dtype=np.float64).ravel()
    label = np.asarray(label, dtype=np.float64).ravel()
    return float(_ece_rows(pred[None, :], label, n_bins)[0])


def brier_score(pred, label) -> float:
    """Mean squared error of probabilities against 0/1 outcomes (NaN for empty input)."""
    pred = np.asarray(pred, dtype=np.float64).ravel()
    label = np.asarray(label, dtype=np.float64).ravel()
    return float(np.mean((pred - label) ** 2)) if pred.size else float("nan")


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, tied values sharing the mean of their ranks."""
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    ranks = np.empty(values.size, dtype=np.float64)
    start = 0
    while start < values.size:
        end = start
        while end + 1 < values.size and sorted_values[end + 1] == sorted_values[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2.0 + 1.0
        start = end + 1
    return ranks


def auroc(scores, labels) -> float:
    """Area under the ROC curve from ranks (Mann-Whitney U); ties count one half.

    NaN when only one class is present.
    """
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels).ravel().astype(bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _average_ranks(scores)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def reliability_bins(pred, label, n_bins: int = DEFAULT_BINS) -> list[dict[str, float]]:
    """Non-empty equal-width bins: ``{"low", "high", "count", "mean_prediction", "frequency"}``."""
    pred = np.asarray(pred, dtype=np.float64).ravel()
    label = np.asarray(label, dtype=np.float64).ravel()
    bins = np.minimum((pred * n_bins).astype(np.int64), n_bins - 1).clip(min=0)
    out = []
    for b in range(n_bins):
        sel = bins == b
        if sel.any():
            out.append({
                "low": b / n_bins,
                "high": (b + 1) / n_bins,
                "count": int(sel.sum()),
                "mean_prediction": float(pred[sel].mean()),
                "frequency": float(label[sel].mean()),
            })
    return out


# ----------------------------------------------------------------------------- data
@dataclass
class CalibrationData:
    """Verification rounds as arrays, one row per round.

    ``confidence_logits`` [N, K] raw logits (NaN where the position was not drafted),
    ``submitted`` [N] drafted-and-verified tokens, ``accepted`` [N] accepted draft tokens.
    """

    confidence_logits: np.ndarray
    submitted: np.ndarray
    accepted: np.ndarray

    @classmethod
    def from_rounds(cls, rounds: Iterable[dict[str, Any]], block_size: int) -> "CalibrationData":
        """From the dicts recorded by the generator (``draft.record_rounds``); empty rounds are skipped."""
        rows, submitted, accepted = [], [], []
        for r in rounds:
            logits = list(r["confidence_logits"])[:block_size]
            n = min(int(r["submitted"]), len(logits))
            if n <= 0:
                continue
            row = np.full(block_size, np.nan)
            row[:n] = logits[:n]
            rows.append(row)
            submitted.append(n)
            accepted.append(min(int(r["accepted"]), n))
        if not rows:
            return cls(np.zeros((0, block_size)), np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))
        return cls(np.stack(rows), np.asarray(submitted, dtype=np.int64), np.asarray(accepted, dtype=np.int64))

    def __len__(self) -> int:
        return self.confidence_logits.shape[0]

    @property
    def block_size(self) -> int:
        return self.confidence_logits.shape[1]

    def _positions(self) -> np.ndarray:
        return np.arange(self.block_size)[None, :]

    @property
    def prefix_observed(self) -> np.ndarray:
        """[N, K] position drafted and verified, so its prefix survival is known."""
        return self._positions() < self.submitted[:, None]

    @property
    def prefix_survived(self) -> np.ndarray:
        """[N, K] tokens 1..k all accepted."""
        return self._positions() < self.accepted[:, None]

    @property
    def reached(self) -> np.ndarray:
        """[N, K] tokens 1..k-1 accepted and token k verified: conditional survival observed."""
        return self.prefix_observed & (self._positions() <= self.accepted[:, None])


def prefix_survival_probabilities(confidence_logits, temperatures: Sequence[float] | None = None) -> np.ndarray:
    """``a_k = prod_{i<=k} sigmoid(l_i / T_i)`` for every row ([N, K]; NaN logits propagate)."""
    logits = np.asarray(confidence_logits, dtype=np.float64)
    temps = np.ones(logits.shape[1]) if temperatures is None else np.asarray(temperatures, dtype=np.float64)
    return np.cumprod(_sigmoid(logits / temps[None, :]), axis=1)


def default_grid(
    low: float = DEFAULT_GRID[0], high: float = DEFAULT_GRID[1], points: int = DEFAULT_GRID[2]
) -> np.ndarray:
    """Log-spaced temperatures from ``low`` to ``high``, with 1.0 always included."""
    if not 0 < low < high or points < 2:
        raise ValueError(f"the temperature grid needs 0 < low < high and >= 2 points, got {low}, {high}, {points}")
    return np.unique(np.append(np.geomspace(low, high, points), 1.0))


def fit_sts(
    conf_logits,
    prefix_survived,
    grid: Sequence[float] | None = None,
    observed=None,
    n_bins: int = DEFAULT_BINS,
) -> list[float]:
    """Sequential Temperature Scaling.

    Args:
        conf_logits: [N, K] raw confidence logits.
        prefix_survived: [N, K] 1 iff draft tokens ``1..k`` were all accepted.
        grid: candidate temperatures (default: 241 log-spaced points in [0.05, 20], plus 1).
        observed: optional [N, K] mask of known labels; position ``k`` uses rows observed at
            every position ``<= k`` (default: every entry).
        n_bins: ECE bins.

    Returns:
        ``K`` temperatures: ``T_k`` minimises the ECE of ``a_k = a_{k-1} * sigmoid(l_k / T_k)``
        against the prefix survival, with ``T_1..T_{k-1}`` fixed. Ties go to the temperature
        closest to 1; a position without data gets 1.
    """
    logits = np.asarray(conf_logits, dtype=np.float64)
    labels = np.asarray(prefix_survived, dtype=np.float64)
    if logits.ndim != 2 or labels.shape != logits.shape:
        raise ValueError(
            f"fit_sts needs conf_logits and prefix_survived of the same [N, K] shape, got "
            f"{logits.shape} and {labels.shape}"
        )
    mask = np.ones(logits.shape, dtype=bool) if observed is None else np.asarray(observed, dtype=bool)
    if mask.shape != logits.shape:
        raise ValueError(f"observed must have shape {logits.shape}, got {mask.shape}")
    candidates = default_grid() if grid is None else np.asarray(grid, dtype=np.float64)
    if candidates.size == 0 or (candidates <= 0).any():
        raise ValueError(f"the temperature grid must be non-empty and positive, got {candidates}")
    # Try temperatures closest to 1 first so that np.argmin breaks ties towards "no change".
    candidates = candidates[np.argsort(np.abs(np.log(candidates)), kind="stable")]
    mask = np.cumprod(mask, axis=1).astype(bool)
    chunk = max(1, 4_000_000 // max(1, logits.shape[0]))
    temperatures: list[float] = []
    prev = np.ones(logits.shape[0])
    for k in range(logits.shape[1]):
        rows = mask[:, k]
        best = 1.0
        if rows.any():
            base, logit, label = prev[rows], logits[rows, k], labels[rows, k]
            eces = np.concatenate([
                _ece_rows(base[None, :] * _sigmoid(logit[None, :] / part[:, None]), label, n_bins)
                for part in np.array_split(candidates, math.ceil(candidates.size / chunk))
            ])
            best = float(candidates[int(np.argmin(eces))])
        temperatures.append(best)
        prev = prev * _sigmoid(np.nan_to_num(logits[:, k]) / best)  # undrafted rows are masked from here on
    return temperatures


def calibration_metrics(
    data: CalibrationData, temperatures: Sequence[float] | None = None, n_bins: int = DEFAULT_BINS
) -> list[dict[str, Any]]:
    """Per-position ECE and Brier of ``a_k`` vs prefix survival, AUROC of ``c_k`` vs conditional survival."""
    survival = prefix_survival_probabilities(data.confidence_logits, temperatures)
    temps = np.ones(data.block_size) if temperatures is None else np.asarray(temperatures, dtype=np.float64)
    confidence = _sigmoid(data.confidence_logits / temps[None, :])
    observed, reached, prefix = data.prefix_observed, data.reached, data.prefix_survived
    out = []
    for k in range(data.block_size):
        obs, hit = observed[:, k], reached[:, k]
        out.append({
            "position": k + 1,
            "rounds": int(obs.sum()),
            "reached": int(hit.sum()),
            "ece": expected_calibration_error(survival[obs, k], prefix[obs, k], n_bins),
            "brier": brier_score(survival[obs, k], prefix[obs, k]),
            # among rounds that reached k, "token k accepted" is the same event as "tokens 1..k accepted"
            "auroc": auroc(confidence[hit, k], prefix[hit, k]),
            "mean_predicted_survival": float(survival[obs, k].mean()) if obs.any() else float("nan"),
            "observed_survival": float(prefix[obs, k].mean()) if obs.any() else float("nan"),
        })
    return out


# ----------------------------------------------------------------------------- collection
def collect_rounds(
    target,
    draft,
    prompt_ids: list[int],
    max_new_tokens: int = 128,
    do_sample: bool = False,
    **sampling,
) -> list[dict[str, Any]]:
    """Generate once with the whole block verified every round; return the recorded rounds.

    ``sampling`` goes to ``generate`` (temperature, top_p, top_k). The drafter's verification
    policy is set to ``full`` for the call and restored afterwards.
    """
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=target.device)
    policy = draft.generation_config.verification_policy
    draft.generation_config.verification_policy = "full"
    draft.record_rounds = []
    try:
        with torch.no_grad():
            target.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                assistant_model=draft,
                max_new_tokens=max_new_tokens,
                do_sample=do_sample,
                **sampling,
            )
        rounds = draft.record_rounds
    finally:
        draft.generation_config.verification_policy = policy
        draft.record_rounds = None
    # The last round's accepted count may be cut at EOS / max length (see module docstring).
    return rounds[:-1]


def read_rounds_file(path: Path) -> dict[str, list[dict[str, Any]]]:
    """The rounds already recorded in a calibration rounds file, by prompt id (empty if it does not exist)."""
    done: dict[str, list[dict[str, Any]]] = {}
    if not path.exists():
        return done
    with path.open("r", encoding="utf-8") as handle:
        for line in handle:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # truncated last line of an interrupted run
                continue
            done[row["id"]] = row["rounds"]
    return done


# ----------------------------------------------------------------------------- plot
def plot_reliability(
    data: CalibrationData,
    temperatures: Sequence[float],
    path: str | os.PathLike,
    n_bins: int = DEFAULT_BINS,
) -> Path:
    """Reliability diagram of the prefix survival ``a_k`` per position, before vs after STS.

    The shaded bars are the share of rounds per bin of the calibrated prediction.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    before = calibration_metrics(data, None, n_bins)
    after = calibration_metrics(data, temperatures, n_bins)
    raw = prefix_survival_probabilities(data.confidence_logits)
    fitted = prefix_survival_probabilities(data.confidence_logits, temperatures)
    K = data.block_size
    ncols = min(K, 4)
    nrows = math.ceil(K / ncols)
    fig = Figure(figsize=(3.4 * ncols, 3.2 * nrows))
    FigureCanvasAgg(fig)
    for k in range(K):
        ax = fig.add_subplot(nrows, ncols, k + 1)
        obs = data.prefix_observed[:, k]
        labels = data.prefix_survived[obs, k]
        hist = reliability_bins(fitted[obs, k], labels, n_bins)
        total = max(1, int(obs.sum()))
        ax.bar([b["low"] for b in hist], [b["count"] / total for b in hist], width=1.0 / n_bins,
               align="edge", color="0.85", zorder=0)
        ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect")
        for preds, style, name, metrics in (
            (raw[obs, k], "o-", "before", before[k]),
            (fitted[obs, k], "s-", "after", after[k]),
        ):
            bins = reliability_bins(preds, labels, n_bins)
            ax.plot([b["mean_prediction"] for b in bins], [b["frequency"] for b in bins], style, markersize=3,
                    label=f"{name} (ECE {100 * metrics['ece']:.1f}%)")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_title(f"position {k + 1}  T={temperatures[k]:.2f}  AUC {after[k]['auroc']:.2f}", fontsize=9)
        ax.legend(fontsize=7, loc="upper left")
        if k % ncols == 0:
            ax.set_ylabel("observed prefix survival")
        if k + ncols >= K:  # nothing below this panel
            ax.set_xlabel("predicted prefix survival")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


# ----------------------------------------------------------------------------- report
def _json_number(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else round(float(value), 6)


_REPORTED = ("ece", "auroc", "brier", "mean_predicted_survival")


def build_report(data: CalibrationData, temperatures: Sequence[float], n_bins: int = DEFAULT_BINS, **extra) -> dict:
    """Per-position metrics before (raw logits) and after STS, plus the mean ECE over positions."""
    before = calibration_metrics(data, None, n_bins)
    after = calibration_metrics(data, temperatures, n_bins)
    positions = []
    for b, a, t in zip(before, after, temperatures):
        positions.append({
            "position": b["position"],
            "temperature": float(t),
            "rounds": b["rounds"],
            "reached": b["reached"],
            "observed_survival": _json_number(b["observed_survival"]),
            **{f"{name}_before": _json_number(b[name]) for name in _REPORTED},
            **{f"{name}_after": _json_number(a[name]) for name in _REPORTED},
        })

    def mean_of(rows, name):
        values = [r[name] for r in rows if math.isfinite(r[name])]
        return _json_number(sum(values) / len(values)) if values else None

    return {
        **extra,
        "rounds": len(data),
        "mean_accepted_length": _json_number(float(np.mean(data.accepted + 1))) if len(data) else None,
        "bins": n_bins,
        "temperatures": [float(t) for t in temperatures],
        "mean_ece_before": mean_of(before, "ece"),
        "mean_ece_after": mean_of(after, "ece"),
        "positions": positions,
    }


def format_report(report: dict) -> str:
    lines = [
        f"{report['rounds']} rounds, mean accepted length {report['mean_accepted_length']}",
        f"{'pos':>3} {'T':>7} {'reached':>8} {'ECE before':>11} {'ECE after':>10} {'AUROC':>6} "
        f"{'Brier before':>13} {'Brier after':>12}",
    ]

    def pct(v):
        return "   -" if v is None else f"{100 * v:.2f}%"

    def num(v):
        return "   -" if v is None else f"{v:.3f}"

    for p in report["positions"]:
        lines.append(
            f"{p['position']:>3} {p['temperature']:>7.3f} {p['reached']:>8} {pct(p['ece_before']):>11} "
            f"{pct(p['ece_after']):>10} {num(p['auroc_after']):>6} {num(p['brier_before']):>13} "
            f"{num(p['brier_after']):>12}"
        )
    lines.append(f"mean ECE {pct(report['mean_ece_before'])} -> {pct(report['mean_ece_after'])}")
    return "\n".join(lines)


__all__ = [
    "CalibrationData",
    "auroc",
    "brier_score",
    "build_report",
    "calibration_metrics",
    "collect_rounds",
    "default_grid",
    "expected_calibration_error",
    "fit_sts",
    "format_report",
    "plot_reliability",
    "prefix_survival_probabilities",
    "reliability_bins",
]
