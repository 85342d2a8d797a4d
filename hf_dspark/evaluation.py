"""``hf-dspark eval``: acceptance length and speed-up of a drafter, measured side by side.

Usage::

    hf-dspark eval --target gemma-3-270m --draft default --prompts eval/gsm8k.jsonl eval/mt-bench.jsonl \\
        --baseline --prompt-lookup --output results.json --plots plots/
    hf-dspark eval --target T --draft DRAFT_DIR --dataset gsm8k humaneval --max-prompts 50 --baseline
    hf-dspark eval --target T --draft DRAFT_DIR --compare-draft DFLASH_DIR --compare-name dflash --prompts F.jsonl

Prompt files hold one ``{"turns": [...]}`` object per line (only the first turn is used; by
default it is encoded as the drafter's training prompts were: through the target's chat template or
as raw text, see ``--chat-template``); each file is a
*prompt set* named by its file stem. ``--dataset`` fetches a known benchmark from the Hub instead
(see :data:`DATASETS`).

For every prompt, every requested method runs in this process on the same token ids, one after
the other: plain ``generate`` (``--baseline``), the drafter, each ``--compare-draft`` drafter and
transformers' prompt lookup decoding (``--prompt-lookup``). Each run goes through
:func:`measure_generate`, so every number comes from one code path; sampling reseeds torch with
the same per-prompt seed before each method.

The JSON written to ``--output`` holds ``settings``, the macro average over prompt sets at the
top level (``num_prompts``, ``new_tokens`` and ``seconds`` are totals; every other number is the
unweighted mean of the per-set values, ``speedup`` included), and ``datasets[stem]`` with each
set's summary and its per-prompt ``prompts`` records. Summaries are recomputed from the records,
and the file is rewritten atomically after every prompt: an interrupted run keeps what it
measured, and rerunning the same command resumes, skipping finished prompts.

Per set: ``mean_accepted_length`` (tau, bonus token included: accepted tokens / rounds over the
set), ``per_position_acceptance`` (accepted / attempted at each draft position; null where never
attempted), ``tokens_per_second`` (new tokens / wall seconds), and with the matching flags
``baseline_tokens_per_second``, ``speedup``, ``outputs_match_baseline`` (greedy: every output
identical; sampling: null), ``prompt_lookup_tokens_per_second``, ``prompt_lookup_speedup`` and
(sampling with top-k and top-p) ``baseline_fused_tokens_per_second``: plain ``generate`` with
:class:`~hf_dspark.generation_dspark.FusedTopKTopPWarper` as its logits processor. ``speedup`` is
against plain ``generate`` as a user calls it; ``speedup_vs_best_plain`` against the faster of the two
plain runs (``best_plain_tokens_per_second``), and is the figure the README and model cards quote;
``compare[name]`` (with ``dspark_tau_ratio``: tau of the drafter under test over this one's).
``mean_accepted_length_ci90`` and ``dspark_tau_ratio_ci90`` are 90% bootstrap intervals over the
set's prompts (per set only): with a few prompts, and above all when sampling, they are wide.
Prompt sets whose name contains ``gsm8k`` also get ``quality``: the final
number of each answer, compared by exact match between drafter and baseline and, for rows with an
``answer`` field, against the reference.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .errors import DataError, HfDSparkError

__all__ = [
    "DATASETS", "HubPromptSet", "Measurement", "PromptSet", "add_arguments", "alpaca_row", "bootstrap_ci",
    "extract_final_number", "gsm8k_row", "humaneval_row", "load_dataset_prompts", "macro_average",
    "math500_row", "mbpp_row", "measure_generate", "mt_bench_row", "read_prompt_file", "run",
    "summarize_prompt_set", "write_plots",
]

RESULTS_FORMAT = "hf_dspark.eval"
RESULTS_VERSION = 1
DSPARK = "dspark"  # record / plot name of the drafter under test
QUALITY_KEYWORD = "gsm8k"
STEP_BY_STEP = "\nPlease reason step by step, and put your final answer within \\boxed{}."
CODE_REQUEST = "Write a solution to the following problem and make sure that it passes the tests:\n```python\n{}\n```"


# ----------------------------------------------------------------------------- prompt sets
@dataclass
class PromptSet:
    """Prompts measured together; ``rows`` are ``{"id", "turns"[, "answer"]}`` dicts in file order."""

    key: str
    rows: list[dict[str, Any]]
    source: str
    skipped: Any = None  # trainer.prompts.SkippedRows of a prompt file: rows without a usable prompt


def _eval_row(turns: list[str] | None, answer: Any = None) -> dict[str, Any] | None:
    from .trainer.prompts import prompt_id, prompt_text

    if not turns:
        return None
    row: dict[str, Any] = {"id": prompt_id(prompt_text(turns)), "turns": list(turns)}
    if answer is not None:
        row["answer"] = str(answer)
    return row


def read_prompt_file(path: str | os.PathLike, strict: bool = False) -> PromptSet:
    """Read a ``{"turns": [...]}`` JSON Lines file (an ``answer`` field, if any, is kept as reference).

    Rows without a usable prompt are counted in ``PromptSet.skipped``; ``strict`` raises
    :class:`DataError` at the first one instead.
    """
    from .trainer.prompts import SkippedRows, row_to_turns, unusable_reason

    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"Prompt file {path} does not exist; pass JSON Lines files of {{\"turns\": [...]}} rows.")
    rows, skipped = [], SkippedRows(str(path))
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            skipped.rows_read += 1
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(
                    f"{path}, line {line_number}: not valid JSON ({error.msg}); each line must be one object "
                    'such as {"turns": ["..."]}.'
                ) from error
            row = _eval_row(row_to_turns(raw), raw.get("answer") if isinstance(raw, dict) else None)
            if row is not None:
                rows.append(row)
                continue
            reason = unusable_reason(raw)
            if strict:
                raise DataError(f"{path}, line {line_number}: {reason}, so it holds no usable prompt; fix or remove "
                                "it (without --strict such rows are skipped and counted).")
            skipped.add(reason, f"line {line_number}")
    if not rows:
        raise DataError(f"{path}: no usable prompt rows; each line should look like {{\"turns\": [\"...\"]}}."
                        + (f" {skipped.describe()}" if skipped.count else ""))
    return PromptSet(key=path.stem, rows=rows, source=str(path), skipped=skipped)


# Conversions of Hub benchmark rows into our rows (pure functions: no I/O).
def gsm8k_row(row: dict[str, Any]) -> dict[str, Any] | None:
    """openai/gsm8k: ``question`` (+ step-by-step instruction); ``answer`` ends in ``#### N``."""
    question = row.get("question")
    return _eval_row([question + STEP_BY_STEP] if question else None, row.get("answer"))


def math500_row(row: dict[str, Any]) -> dict[str, Any] | None:
    """HuggingFaceH4/MATH-500: ``problem`` (+ step-by-step instruction); ``answer`` kept."""
    problem = row.get("problem")
    return _eval_row([problem + STEP_BY_STEP] if problem else None, row.get("answer"))


def humaneval_row(row: dict[str, Any]) -> dict[str, Any] | None:
    """openai/openai_humaneval: the function stub in ``prompt``, wrapped in a coding request."""
    prompt = row.get("prompt")
    return _eval_row([CODE_REQUEST.format(prompt.strip("\n"))] if prompt else None)


def mbpp_row(row: dict[str, Any]) -> dict[str, Any] | None:
    """google-research-datasets/mbpp: the task in ``text``, followed by its ``test_list`` asserts."""
    text = row.get("text")
    if not text:
        return None
    tests = [t for t in row.get("test_list") or [] if isinstance(t, str)]
    if tests:
        text = f"{text}\nYour code should pass these tests:\n" + "\n".join(tests)
    return _eval_row([text])


def mt_bench_row(row: dict[str, Any]) -> dict[str, Any] | None:
    """HuggingFaceH4/mt_bench_prompts: ``prompt`` is the list of turns."""
    turns = row.get("prompt")
    if isinstance(turns, str):
        turns = [turns]
    return _eval_row([t for t in turns or [] if isinstance(t, str) and t.strip()])


def alpaca_row(row: dict[str, Any]) -> dict[str, Any] | None:
    """tatsu-lab/alpaca: ``instruction``, followed by ``input`` when it is not empty."""
    instruction = (row.get("instruction") or "").strip()
    extra = (row.get("input") or "").strip()
    if not instruction:
        return None
    return _eval_row([f"{instruction}\n\n{extra}" if extra else instruction])


@dataclass(frozen=True)
class HubPromptSet:
    """Where a benchmark lives on the Hub and how its rows become prompts."""

    hub_id: str
    config: str | None
    split: str
    convert: Callable[[dict[str, Any]], dict[str, Any] | None]


DATASETS: dict[str, HubPromptSet] = {
    "gsm8k": HubPromptSet("openai/gsm8k", "main", "test", gsm8k_row),
    "math500": HubPromptSet("HuggingFaceH4/MATH-500", None, "test", math500_row),
    "humaneval": HubPromptSet("openai/openai_humaneval", None, "test", humaneval_row),
    "mbpp": HubPromptSet("google-research-datasets/mbpp", "full", "test", mbpp_row),
    "mt-bench": HubPromptSet("HuggingFaceH4/mt_bench_prompts", None, "train", mt_bench_row),
    "alpaca": HubPromptSet("tatsu-lab/alpaca", None, "train", alpaca_row),
}


def load_dataset_prompts(name: str, max_prompts: int | None = None) -> PromptSet:
    """Fetch a known benchmark (``DATASETS[name]``) with ``datasets`` and convert its rows."""
    if name not in DATASETS:
        raise DataError(f"Unknown --dataset {name!r}; choose one of {', '.join(DATASETS)} or pass --prompts FILE.")
    spec = DATASETS[name]
    split = spec.split if max_prompts is None else f"{spec.split}[:{max_prompts}]"
    try:
        import datasets

        table = datasets.load_dataset(spec.hub_id, spec.config, split=split)
    except Exception as error:  # offline, gated, renamed, ...
        raise DataError(
            f"Could not load --dataset {name} ({spec.hub_id}, split {spec.split!r}): {type(error).__name__}: "
            f"{error}. Offline? Save the prompts as a local JSON Lines file with one {{\"turns\": [\"...\"]}} row "
            f"per prompt and pass it with --prompts {name}.jsonl instead."
        ) from error
    rows = [row for row in map(spec.convert, table) if row is not None]
    if not rows:
        raise DataError(f"--dataset {name}: {spec.hub_id} gave no usable rows; pass --prompts FILE instead.")
    return PromptSet(key=name, rows=rows, source=spec.hub_id)


# ----------------------------------------------------------------------------- answers
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _last_boxed(text: str) -> str | None:
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 1, start + len("\\boxed{")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return text[i:]


def _normalize_number(number: str) -> str:
    number = number.replace(",", "")
    if "." in number:
        number = number.rstrip("0").rstrip(".")
    return "0" if number in ("-0", "") else number


def extract_final_number(text: str | None) -> str | None:
    """The final numeric answer of a solution: ``\\boxed{..}``, else ``#### N``, else "answer is N",
    else the last number in the text; commas and trailing decimal zeros removed. None if no number."""
    if not text:
        return None
    for segment in (_last_boxed(text), _after(text, "####"), _after(text.lower(), "answer is")):
        if segment is not None:
            found = _NUMBER.search(segment)
            if found:
                return _normalize_number(found.group())
    numbers = _NUMBER.findall(text)
    return _normalize_number(numbers[-1]) if numbers else None


def _after(text: str, marker: str) -> str | None:
    index = text.rfind(marker)
    return text[index + len(marker):] if index >= 0 else None


@functools.lru_cache(maxsize=1)
def exact_match_metric() -> tuple[Callable[[list[str], list[str]], float], str]:
    """``(compute(predictions, references) -> rate, source)``: ``evaluate``'s exact_match when it
    loads (it fetches the metric script from the Hub once), else the same rule implemented here."""
    try:
        import evaluate

        metric = evaluate.load("exact_match")

        def compute(predictions, references):
            return float(metric.compute(predictions=predictions, references=references)["exact_match"])

        return compute, "evaluate:exact_match"
    except Exception as error:  # offline without a cached metric script, or evaluate missing
        reason = f"{type(error).__name__}: {str(error).splitlines()[0][:160]}" if str(error) else type(error).__name__

        def compute(predictions, references):
            return sum(p == r for p, r in zip(predictions, references)) / len(predictions)

        return compute, f"local exact match (evaluate.load('exact_match') failed: {reason})"


def answer_quality(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Exact match of the extracted final numbers: drafter vs baseline and vs the reference answers."""
    compute, source = exact_match_metric()
    answers = [r["answers"] for r in records]

    def rate(pairs):
        pairs = [(p or "", r) for p, r in pairs if r is not None]
        return compute([p for p, _ in pairs], [r for _, r in pairs]) if pairs else None

    with_baseline = [(a[DSPARK], a["baseline"] or "") for a in answers if "baseline" in a]
    with_reference = [a for a in answers if a.get("reference") is not None]
    return {
        "metric": "exact match of the final number",
        "metric_source": source,
        "answers_match_baseline": rate(with_baseline) if with_baseline else None,
        "num_with_reference": len(with_reference),
        "accuracy": rate((a[DSPARK], a["reference"]) for a in with_reference),
        "baseline_accuracy": rate((a.get("baseline"), a["reference"]) for a in with_reference if "baseline" in a),
    }


# ----------------------------------------------------------------------------- measurement
@dataclass
class Measurement:
    """One ``generate`` call: output ids [1, prompt + new], new tokens, wall seconds, drafter stats."""

    output_ids: torch.Tensor
    new_tokens: int
    seconds: float
    stats: dict[str, Any] | None = field(default=None)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_generate(
    target,
    input_ids: torch.Tensor,
    generation_kwargs: dict[str, Any],
    seed: int = 0,
    assistant_model=None,
    prompt_lookup_num_tokens: int | None = None,
) -> Measurement:
    """Time one ``target.generate`` call (plain, with a drafter, or with prompt lookup).

    Every benchmark number of :mod:`hf_dspark.evaluation` and :mod:`hf_dspark.demo` comes from
    this function. torch is reseeded with ``seed`` first so that sampled runs are reproducible.
    """
    kwargs = dict(generation_kwargs)
    if assistant_model is not None:
        kwargs["assistant_model"] = assistant_model
    if prompt_lookup_num_tokens is not None:
        kwargs["prompt_lookup_num_tokens"] = prompt_lookup_num_tokens
    input_ids = input_ids.to(target.device)
    attention_mask = torch.ones_like(input_ids)
    torch.manual_seed(seed)
    _synchronize(input_ids.device)
    start = time.perf_counter()
    with torch.no_grad():
        output = target.generate(input_ids, attention_mask=attention_mask, **kwargs)
    _synchronize(input_ids.device)
    seconds = time.perf_counter() - start
    stats = None
    if assistant_model is not None and getattr(assistant_model, "last_generation_stats", None) is not None:
        stats = json.loads(json.dumps(assistant_model.last_generation_stats))  # a detached plain copy
    return Measurement(output.cpu(), int(output.shape[1] - input_ids.shape[1]), seconds, stats)


def fused_plain_kwargs(generation_kwargs: dict[str, Any]) -> dict[str, Any] | None:
    """``generate`` kwargs for plain sampling with :class:`FusedTopKTopPWarper` in place of transformers'
    top-k + top-p pair (the same distribution, one sort of the k survivors instead of the vocabulary).
    ``None`` unless the kwargs sample with both a top-k and a top-p < 1."""
    from transformers import LogitsProcessorList
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    from .generation_dspark import FusedTopKTopPWarper

    top_k, top_p = generation_kwargs.get("top_k") or 0, generation_kwargs.get("top_p", 1.0)
    if not generation_kwargs.get("do_sample") or top_k <= 0 or top_p is None or top_p >= 1.0:
        return None
    fused = FusedTopKTopPWarper(TopKLogitsWarper(top_k), TopPLogitsWarper(top_p))
    # transformers adds temperature first and appends custom processors after it: the usual order
    return {**generation_kwargs, "top_k": 0, "top_p": 1.0, "logits_processor": LogitsProcessorList([fused])}


def greedy_divergence(target, prompt_length: int, baseline_ids: torch.Tensor, other_ids: torch.Tensor) -> dict | None:
    """Where a greedy output first differs from plain ``generate``, and how close to a tie the target was there.

    The common prefix is re-scored by one target forward; ``logit_margin`` is the gap between the logits
    of the two tokens chosen there and ``margin_ulps`` that gap in units of the target dtype's rounding
    step at their magnitude (bf16: 8 mantissa bits). A divergence at ``margin_ulps`` <= 2 sits at a
    numerical near-tie: the verification pass (several rows, other kernels) and the one-row decode step
    rounded differently. ``None`` when the outputs are identical.
    """
    n = min(baseline_ids.shape[-1], other_ids.shape[-1])
    differ = (baseline_ids[0, :n] != other_ids[0, :n]).nonzero()
    if differ.numel() == 0:
        return None if baseline_ids.shape[-1] == other_ids.shape[-1] else {"position": n - prompt_length,
                                                                           "length_differs": True}
    at = int(differ[0])
    with torch.no_grad():
        logits = target(baseline_ids[:, :at].to(target.device)).logits[0, -1].float()
    a, b = int(baseline_ids[0, at]), int(other_ids[0, at])
    magnitude = max(abs(float(logits[a])), abs(float(logits[b])), 1e-30)
    mantissa_bits = {torch.bfloat16: 8, torch.float16: 11}.get(target.dtype, 24)
    ulp = 2.0 ** (math.floor(math.log2(magnitude)) - (mantissa_bits - 1))
    margin = abs(float(logits[a]) - float(logits[b]))
    return {"position": at - prompt_length, "baseline_token": a, "token": b, "logit_margin": margin,
            "rounding_step": ulp, "margin_ulps": margin / ulp}


def _timing(m: Measurement) -> dict[str, Any]:
    return {"new_tokens": m.new_tokens, "seconds": m.seconds}


def _drafter_record(m: Measurement) -> dict[str, Any]:
    stats = m.stats or {}
    return {
        **_timing(m),
        "rounds": stats.get("rounds", 0),
        "accepted_tokens": sum(stats.get("accepted_lengths", [])),
        "position_attempted": stats.get("position_attempted", []),
        "position_accepted": stats.get("position_accepted", []),
        "draft_seconds": stats.get("draft_seconds"),
        "verify_seconds": stats.get("verify_seconds"),
        "policy": stats.get("policy"),
        "ngram_rounds": stats.get("ngram_rounds", 0),
        "ngram_accepted_tokens": stats.get("ngram_accepted", 0),
    }


# ----------------------------------------------------------------------------- summaries
def _tokens_per_second(entries: list[dict[str, Any]]) -> float | None:
    seconds = sum(e["seconds"] for e in entries)
    return sum(e["new_tokens"] for e in entries) / seconds if seconds > 0 else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _all_or_none(flags: list[bool | None]) -> bool | None:
    return None if not flags or any(f is None for f in flags) else all(flags)


def _drafter_summary(entries: list[dict[str, Any]], baseline_tps: float | None,
                     best_plain_tps: float | None = None) -> dict[str, Any]:
    rounds = sum(e["rounds"] for e in entries)
    accepted = sum(e["accepted_tokens"] for e in entries)
    width = max(len(e["position_attempted"]) for e in entries)
    def column(name: str, k: int) -> int:
        return sum(e[name][k] for e in entries if k < len(e[name]))

    attempted = [column("position_attempted", k) for k in range(width)]
    hits = [column("position_accepted", k) for k in range(width)]
    tps = _tokens_per_second(entries)
    summary = {
        "mean_accepted_length": accepted / rounds if rounds else None,
        "per_position_acceptance": [h / a if a else None for h, a in zip(hits, attempted)],
        "tokens_per_second": tps,
        "new_tokens": sum(e["new_tokens"] for e in entries),
        "seconds": sum(e["seconds"] for e in entries),
        "rounds": rounds,
        "accepted_tokens": accepted,
        "policy": entries[0].get("policy"),
    }
    ngram_rounds = sum(e.get("ngram_rounds", 0) for e in entries)
    if ngram_rounds:  # per_position_acceptance above covers the drafter's rounds only
        summary["ngram_rounds"] = ngram_rounds
        summary["ngram_accepted_tokens"] = sum(e.get("ngram_accepted_tokens", 0) for e in entries)
    if baseline_tps is not None:
        summary["speedup"] = _ratio(tps, baseline_tps)
        summary["speedup_vs_best_plain"] = _ratio(tps, best_plain_tps or baseline_tps)
        summary["outputs_match_baseline"] = _all_or_none([e.get("matches_baseline") for e in entries])
        matches = [e.get("matches_baseline") for e in entries]
        if matches and all(m is not None for m in matches):  # greedy: the agreement contract, measured
            divergences = [e["divergence"] for e in entries if e.get("divergence")]
            ulps = [d["margin_ulps"] for d in divergences if "margin_ulps" in d]
            summary["greedy_agreement"] = {
                "identical_share": sum(matches) / len(matches),
                "first_divergence_positions": [d["position"] for d in divergences],
                "max_margin_ulps": max(ulps) if ulps else None,
                "all_divergences_near_ties": all(u <= 2.0 for u in ulps) and len(ulps) == len(divergences),
            }
    return summary


BOOTSTRAP_RESAMPLES = 2000


def bootstrap_ci(entries: list, statistic: Callable[[list], float | None], level: float = 0.9,
                 resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> list[float] | None:
    """Percentile bootstrap interval of ``statistic`` over prompts (resampled with replacement).

    Prompts, not rounds, are the independent units: rounds of one answer are strongly correlated,
    so an interval over rounds would be far too narrow. ``None`` with fewer than 2 prompts.
    """
    import random

    if len(entries) < 2:
        return None
    rng = random.Random(seed)
    values = sorted(v for v in (statistic(rng.choices(entries, k=len(entries))) for _ in range(resamples))
                    if v is not None)
    if not values:
        return None
    tail = (1 - level) / 2
    return [values[int(tail * (len(values) - 1))], values[int((1 - tail) * (len(values) - 1))]]


def _tau(entries: list[dict[str, Any]]) -> float | None:
    rounds = sum(e["rounds"] for e in entries)
    return sum(e["accepted_tokens"] for e in entries) / rounds if rounds else None


def summarize_prompt_set(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The summary of one prompt set, computed from its per-prompt records only."""
    has = lambda name: bool(records) and all(name in r for r in records)  # noqa: E731
    baseline_tps = _tokens_per_second([r["baseline"] for r in records]) if has("baseline") else None
    # Plain generate with the fused top-k + top-p warper (sampling only): the fastest exact plain setup.
    fused_tps = _tokens_per_second([r["baseline_fused"] for r in records]) if has("baseline_fused") else None
    best_plain_tps = max(t for t in (baseline_tps, fused_tps) if t is not None) if baseline_tps else None
    dspark = _drafter_summary([r[DSPARK] for r in records], baseline_tps, best_plain_tps)
    summary: dict[str, Any] = {"num_prompts": len(records)}
    summary.update((k, v) for k, v in dspark.items()
                   if k not in ("speedup", "speedup_vs_best_plain", "outputs_match_baseline"))
    if baseline_tps is not None:
        summary["baseline_tokens_per_second"] = baseline_tps
        summary["baseline_fused_tokens_per_second"] = fused_tps
        summary["best_plain_tokens_per_second"] = best_plain_tps
        summary["speedup"] = dspark["speedup"]
        summary["speedup_vs_best_plain"] = dspark["speedup_vs_best_plain"]
        summary["outputs_match_baseline"] = dspark["outputs_match_baseline"]
    if has("prompt_lookup"):
        lookup = [r["prompt_lookup"] for r in records]
        summary["prompt_lookup_tokens_per_second"] = _tokens_per_second(lookup)
        summary["prompt_lookup_speedup"] = _ratio(summary["prompt_lookup_tokens_per_second"], baseline_tps)
        summary["prompt_lookup_speedup_vs_best_plain"] = _ratio(summary["prompt_lookup_tokens_per_second"],
                                                                best_plain_tps)
        if baseline_tps is not None:
            summary["prompt_lookup_outputs_match_baseline"] = _all_or_none([e.get("matches_baseline") for e in lookup])
    summary["mean_accepted_length_ci90"] = bootstrap_ci([r[DSPARK] for r in records], _tau)
    names = list(records[0].get("compare", {})) if records else []
    if names:
        ratio = lambda pairs: _ratio(_tau([a for a, _ in pairs]), _tau([b for _, b in pairs]))  # noqa: E731
        summary["compare"] = {}
        for n in names:
            entries = [r["compare"][n] for r in records]
            pairs = [(r[DSPARK], e) for r, e in zip(records, entries)]
            summary["compare"][n] = {**_drafter_summary(entries, baseline_tps, best_plain_tps),
                                     "mean_accepted_length_ci90": bootstrap_ci(entries, _tau),
                                     "dspark_tau_ratio": ratio(pairs),
                                     "dspark_tau_ratio_ci90": bootstrap_ci(pairs, ratio)}
    if has("answers"):
        summary["quality"] = answer_quality(records)
    return summary


_SUMMED = {"num_prompts", "new_tokens", "seconds", "rounds", "accepted_tokens", "ngram_rounds", "ngram_accepted_tokens"}
# Intervals of different sets do not average into an interval of the macro average.
_NOT_AVERAGED = {"quality", "policy", "mean_accepted_length_ci90", "dspark_tau_ratio_ci90", "greedy_agreement"}


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def macro_average(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """Unweighted mean over prompt sets of every number (counts and seconds are summed), element-wise
    for lists; booleans combine with ``all`` (null if any set has null); nested dicts recurse."""
    keys: list[str] = []
    for summary in summaries:
        keys += [k for k in summary if k not in keys and k not in _NOT_AVERAGED]
    out: dict[str, Any] = {}
    for key in keys:
        values = [s.get(key) for s in summaries]
        present = [v for v in values if v is not None]
        if not present:
            out[key] = None
        elif isinstance(present[0], bool):
            out[key] = _all_or_none(values)
        elif isinstance(present[0], (int, float)):
            out[key] = sum(present) if key in _SUMMED else _mean(present)
        elif isinstance(present[0], list):
            width = max(len(v) for v in present)
            out[key] = [_mean([v[k] for v in present if k < len(v)]) for k in range(width)]
        elif isinstance(present[0], dict):
            out[key] = macro_average(present)
    return out


# ----------------------------------------------------------------------------- results file
def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=2)
            handle.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# Settings added to the results file after its first format: a file written before a key existed was
# measured with the value given here, so it resumes when the new run uses that value.
SETTINGS_ADDED_LATER = {"ngram_lookup_tokens": 0}


class EvalResults:
    """The results JSON: settings, per-prompt records per set, summaries derived from the records."""

    def __init__(self, path: Path | None, settings: dict[str, Any], overwrite: bool = False):
        self.path = path
        self.settings = settings
        self.records: dict[str, list[dict[str, Any]]] = {}
        self.sources: dict[str, str] = {}
        if path is not None and path.is_file() and not overwrite:
            self._resume(path)

    def _resume(self, path: Path) -> None:
        try:
            existing = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            raise DataError(f"--output {path} exists but is not readable JSON ({error}); pass --overwrite or "
                            "another --output.") from error
        if existing.get("format") != RESULTS_FORMAT:
            raise DataError(f"--output {path} exists and is not an hf-dspark eval file; choose another --output.")
        old = dict(existing.get("settings", {}))
        for key, implied in SETTINGS_ADDED_LATER.items():
            old.setdefault(key, implied)
        if old != self.settings:
            changed = sorted(k for k in set(old) | set(self.settings) if old.get(k) != self.settings.get(k))
            raise DataError(f"--output {path} holds results measured with other settings ({', '.join(changed)}); "
                            "rerun with the same settings to resume, or pass --overwrite or another --output.")
        for key, entry in existing.get("datasets", {}).items():
            self.records[key] = list(entry.get("prompts", []))
            self.sources[key] = entry.get("source", key)

    def finished(self, prompt_set: PromptSet) -> set[tuple[int, str]]:
        """``(index, id)`` of the set's measured prompts; records of rows edited since are dropped."""
        rows = prompt_set.rows
        kept = [r for r in self.records.get(prompt_set.key, [])
                if r["index"] >= len(rows) or rows[r["index"]]["id"] == r["id"]]
        if prompt_set.key in self.records:
            self.records[prompt_set.key] = kept
        return {(r["index"], r["id"]) for r in kept}

    def add(self, key: str, source: str, record: dict[str, Any]) -> None:
        self.sources[key] = source
        self.records.setdefault(key, []).append(record)
        self.records[key].sort(key=lambda r: r["index"])

    def to_dict(self) -> dict[str, Any]:
        per_set = {}
        for key, records in self.records.items():
            if records:
                summary = summarize_prompt_set(records)
                per_set[key] = {"source": self.sources.get(key, key), **summary, "prompts": records}
        top = macro_average([{k: v for k, v in s.items() if k not in ("prompts", "source")} for s in per_set.values()])
        # Each prompt file's summary is also exposed at top level under its stem (the documented
        # layout); ``datasets`` keeps the per-prompt records used for resuming.
        by_stem = {key: {k: v for k, v in s.items() if k != "prompts"} for key, s in per_set.items()
                   if key not in top and key not in ("format", "version", "settings", "datasets")}
        return {"format": RESULTS_FORMAT, "version": RESULTS_VERSION, "settings": self.settings, **top,
                **by_stem, "datasets": per_set}

    def write(self) -> dict[str, Any]:
        data = self.to_dict()
        if self.path is not None:
            _write_json_atomic(self.path, data)
        return data


# ----------------------------------------------------------------------------- plots
def write_plots(results: dict[str, Any], folder: str | os.PathLike) -> list[Path]:
    """PNG plots of a results dict: per-position acceptance, tau per set, speed-up per set (with a baseline)."""
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise HfDSparkError("--plots needs matplotlib: pip install 'hf-dspark[plots]'") from error
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sets = results.get("datasets", {})
    names = [DSPARK] + sorted({n for s in sets.values() for n in s.get("compare", {})})
    drafter_of = lambda s, n: s if n == DSPARK else s.get("compare", {}).get(n)  # noqa: E731
    written = []

    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    colors = [f"C{i}" for i in range(10)]
    for i, (key, entry) in enumerate(sets.items()):
        for n, style in zip(names, ("-o", "--s", ":^", "-.v")):
            summary = drafter_of(entry, n)
            if summary and summary.get("per_position_acceptance"):
                values = [v if v is not None else float("nan") for v in summary["per_position_acceptance"]]
                ax.plot(range(1, len(values) + 1), values, style, color=colors[i % 10], label=f"{key} / {n}")
    width = max((len((drafter_of(e, n) or {}).get("per_position_acceptance") or []) for e in sets.values()
                 for n in names), default=1)
    ax.set_xticks(range(1, width + 1))
    ax.set(xlabel="draft position", ylabel="acceptance (accepted / attempted)", ylim=(0, 1.05),
           xlim=(0.5, width + 0.5), title="Per-position acceptance")
    ax.legend(fontsize="small")
    written.append(folder / "acceptance_per_position.png")
    fig.savefig(written[-1], dpi=120, bbox_inches="tight")

    def bars(metric: str, series: list[tuple[str, Callable[[dict], float | None]]], title: str, file: str):
        fig = Figure(figsize=(max(5.0, 1.3 * len(sets) * len(series)), 4))
        ax = fig.add_subplot()
        width = 0.8 / len(series)
        for j, (label, get) in enumerate(series):
            values = [get(entry) or 0.0 for entry in sets.values()]
            ax.bar([i + j * width for i in range(len(sets))], values, width, label=label)
        ax.set_xticks([i + width * (len(series) - 1) / 2 for i in range(len(sets))], list(sets))
        ax.set(ylabel=metric, title=title)
        ax.legend(fontsize="small")
        written.append(folder / file)
        fig.savefig(written[-1], dpi=120, bbox_inches="tight")

    def field_of(n, key):
        return lambda entry: (drafter_of(entry, n) or {}).get(key)

    bars("mean accepted length (tau)", [(n, field_of(n, "mean_accepted_length")) for n in names],
         "Mean accepted length per prompt set", "tau_per_dataset.png")
    if any("speedup" in entry for entry in sets.values()):
        series = [(n, field_of(n, "speedup")) for n in names]
        if any("prompt_lookup_speedup" in entry for entry in sets.values()):
            series.append(("prompt lookup", lambda entry: entry.get("prompt_lookup_speedup")))
        bars("speed-up over plain generate (1 = as fast)", series, "Speed-up per prompt set", "speedup_per_dataset.png")
    return written


# ----------------------------------------------------------------------------- command line
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", required=True, help="Target: Hub id, local folder, or 'gemma-3-270m'.")
    parser.add_argument("--draft", action="append", required=True, metavar="DRAFT",
                        help="Drafter folder / Hub id, or 'default' (the shipped drafter of the target). "
                             "Repeat to measure more drafters: extra ones are reported under compare[folder name].")
    parser.add_argument("--prompts", nargs="+", default=[], metavar="FILE",
                        help='JSON Lines prompt files of {"turns": [...]} rows; each is a set named by its file stem.')
    parser.add_argument("--dataset", nargs="+", default=[], choices=list(DATASETS), metavar="NAME",
                        help=f"Benchmarks fetched from the Hub: {', '.join(DATASETS)}.")
    parser.add_argument("--max-prompts", type=int, default=None, help="Use the first N prompts of each set.")
    parser.add_argument("--strict", action="store_true",
                        help="Stop at the first prompt row without a usable prompt (default: skip and count them).")
    parser.add_argument("--chat-template", default="auto", metavar="auto|yes|no",
                        help="Wrap prompts in the target's chat template. auto (default): as the drafter's training "
                             "prompts were (config.prompt_chat_template), else when the tokenizer has a template.")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="New tokens per prompt (default 256).")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default) decodes greedily.")
    parser.add_argument("--top-k", type=int, default=None, help="Top-k when sampling (default: off).")
    parser.add_argument("--top-p", type=float, default=None, help="Nucleus threshold when sampling (default: off).")
    parser.add_argument("--seed", type=int, default=0, help="Prompt i of a set is sampled with seed + i.")
    parser.add_argument("--policy", choices=("full", "threshold", "cost", "auto"), default=None,
                        help="Verification policy of the drafter(s) under test (default: the saved one); "
                             "'cost' without a saved latency table profiles the target first. "
                             "--compare-draft drafters keep their saved policy.")
    parser.add_argument("--ngram-lookup", type=int, default=None, metavar="N",
                        help="Drafter(s) under test also copy up to N tokens after an earlier match of the last "
                             "2-3 tokens instead of drafting when one exists (ngram_lookup_tokens; 0 = off; "
                             "default: the saved setting). --compare-draft drafters keep their saved setting.")
    parser.add_argument("--baseline", action="store_true", help="Also run plain generate (speed-up, output check).")
    parser.add_argument("--prompt-lookup", action="store_true", help="Also run transformers' prompt lookup decoding.")
    parser.add_argument("--prompt-lookup-tokens", type=int, default=10,
                        help="prompt_lookup_num_tokens for --prompt-lookup (default 10).")
    parser.add_argument("--compare-draft", action="append", default=[], metavar="DIR",
                        help="Another drafter (e.g. the DFlash baseline) measured on the same prompts; repeatable.")
    parser.add_argument("--compare-name", action="append", default=[], metavar="NAME",
                        help="Name of each --compare-draft in the results (default: its folder name).")
    parser.add_argument("--output", default=None,
                        help="Results JSON (rewritten after every prompt; resumed if present).")
    parser.add_argument("--overwrite", action="store_true", help="Start --output afresh instead of resuming it.")
    parser.add_argument("--plots", default=None, metavar="DIR", help="Write PNG plots to this folder.")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--device", default="auto", help="'auto' (cuda if available, else cpu), 'cpu', 'cuda:0', ...")
    parser.add_argument("--no-progress", action="store_true", help="Hide the progress bars.")


def _hardware(device: torch.device) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    text = f"{cpu} ({os.cpu_count()} CPUs)"
    if device.type == "cuda":
        text += f", {torch.cuda.get_device_name(device)}"
    return text


def _generation_kwargs(args) -> dict[str, Any]:
    if args.temperature < 0:
        raise DataError(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}.")
    if args.temperature == 0:
        return {"max_new_tokens": args.max_new_tokens, "do_sample": False}
    # Explicit values, so that sampling is what was asked rather than the target's saved defaults.
    return {"max_new_tokens": args.max_new_tokens, "do_sample": True, "temperature": args.temperature,
            "top_k": args.top_k if args.top_k is not None else 0,
            "top_p": args.top_p if args.top_p is not None else 1.0}


def _load_drafter(source: str, target, device, dtype):
    from .errors import CheckpointError, CorruptFileError
    from .loading import load_drafter  # hf-dspark, DeepSpec and speculators folders alike

    try:
        return load_drafter(source, dtype=dtype, device=device, target=target)
    except CorruptFileError:
        raise  # says which file and what to do
    except (OSError, CheckpointError) as error:
        raise DataError(f"Could not load the drafter {source!r}: {error}. Pass a drafter folder (written by "
                        "`hf-dspark train` / save_pretrained, a DeepSpec or a speculators DSpark checkpoint), "
                        "a Hub id, or 'default'.") from error


def _apply_policy(draft, policy: str | None, target) -> None:
    if policy is None:
        return
    draft.generation_config.verification_policy = policy
    if policy == "cost" and not draft.generation_config.latency_table:
        from .latency import profile_latency

        profile = profile_latency(target, token_counts=range(1, draft.config.block_size + 2))
        draft.generation_config.latency_table = {str(n): s for n, s in profile.table[1].items()}


def _prompt_sets(args) -> list[PromptSet]:
    if not args.prompts and not args.dataset:
        raise DataError("Nothing to evaluate: pass --prompts FILE [FILE ...] and/or --dataset NAME [NAME ...].")
    sets = [read_prompt_file(p, strict=getattr(args, "strict", False)) for p in args.prompts]
    for prompt_set in sets:
        if prompt_set.skipped is not None and prompt_set.skipped.count:
            print(f"Warning: {prompt_set.skipped.describe()} Fix or remove those rows, or pass --strict to stop at "
                  "the first one.", file=sys.stderr, flush=True)
    sets += [load_dataset_prompts(name, args.max_prompts) for name in args.dataset]
    keys = [s.key for s in sets]
    duplicated = sorted({k for k in keys if keys.count(k) > 1})
    if duplicated:
        raise DataError(f"Several prompt sets are named {', '.join(duplicated)} (the file stem); rename the files.")
    if args.max_prompts is not None:
        if args.max_prompts <= 0:
            raise DataError(f"--max-prompts must be positive, got {args.max_prompts}.")
        for s in sets:
            s.rows = s.rows[: args.max_prompts]
    return sets


def _settings(args, drafts: list[tuple[str, str, bool]], device, dtype) -> dict[str, Any]:
    import transformers

    sampling = args.temperature > 0
    return {
        "target": args.target,
        "draft": drafts[0][1],
        "compare": {name: source for name, source, _ in drafts[1:]},
        "policy": args.policy or "saved",
        "ngram_lookup_tokens": _ngram_setting(args, drafts[0][1]),
        "temperature": args.temperature,
        "top_k": (args.top_k if args.top_k is not None else 0) if sampling else None,
        "top_p": (args.top_p if args.top_p is not None else 1.0) if sampling else None,
        "max_new_tokens": args.max_new_tokens,
        "chat_template": getattr(args, "chat_template", "auto"),
        "seed": args.seed,
        "baseline": bool(args.baseline),
        "prompt_lookup_num_tokens": args.prompt_lookup_tokens if args.prompt_lookup else None,
        "dtype": str(dtype).removeprefix("torch."),
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "hardware": _hardware(device),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def _ngram_setting(args, source: str) -> int:
    """The n-gram lookup length the drafter under test will use: ``--ngram-lookup``, else its saved setting."""
    value = getattr(args, "ngram_lookup", None)
    if value is not None:
        if value < 0:
            raise DataError(f"--ngram-lookup must be >= 0 (0 = off), got {value}.")
        return int(value)
    from transformers import GenerationConfig

    try:
        saved = GenerationConfig.from_pretrained(source)
    except (OSError, ValueError):  # no generation_config.json: the drafter's default, off
        return 0
    return int(getattr(saved, "ngram_lookup_tokens", 0) or 0)


def _named_drafts(args) -> list[tuple[str, str, bool]]:
    """``(name, source, under_test)`` of every drafter: ``--draft`` ones take ``--policy``, compare ones do not."""
    from .targets import resolve_draft

    if len(args.compare_name) > len(args.compare_draft):
        raise DataError(f"{len(args.compare_name)} --compare-name for {len(args.compare_draft)} --compare-draft; "
                        "give at most one name per compare drafter.")
    drafts = [(DSPARK, resolve_draft(args.draft[0], args.target), True)]
    for source in args.draft[1:]:
        drafts.append((Path(source.rstrip("/")).name, resolve_draft(source, args.target), True))
    for i, source in enumerate(args.compare_draft):
        name = args.compare_name[i] if i < len(args.compare_name) else Path(source.rstrip("/")).name
        drafts.append((name, resolve_draft(source, args.target), False))
    names = [n for n, _, _ in drafts]
    if len(set(names)) != len(names):
        raise DataError(f"Drafter names must differ, got {names}; name them with --compare-name.")
    return drafts


def measure_prompt(target, tokenizer, drafters: dict[str, Any], row: dict[str, Any], index: int, args,
                   want_answers: bool) -> dict[str, Any]:
    """Every requested method on one prompt; returns its record (timings, drafter stats, output checks).

    ``args.use_chat`` (resolved once by :func:`evaluate_drafters`) says whether the chat template encodes it.
    """
    from .trainer.regenerate import encode_prompt

    input_ids = torch.tensor([encode_prompt(tokenizer, row["turns"][0], args.use_chat)])
    kwargs = _generation_kwargs(args)
    seed = args.seed + index
    greedy = not kwargs["do_sample"]
    record: dict[str, Any] = {"index": index, "id": row["id"], "seed": seed, "prompt_tokens": int(input_ids.shape[1])}
    baseline = measure_generate(target, input_ids, kwargs, seed) if args.baseline else None
    outputs: dict[str, Measurement] = {}
    if baseline is not None:
        record["baseline"] = _timing(baseline)
        fused_kwargs = fused_plain_kwargs(kwargs)
        if fused_kwargs is not None:
            record["baseline_fused"] = _timing(measure_generate(target, input_ids, fused_kwargs, seed))
    for name, draft in drafters.items():
        outputs[name] = measure_generate(target, input_ids, kwargs, seed, assistant_model=draft)
        entry = _drafter_record(outputs[name])
        if baseline is not None:
            entry["matches_baseline"] = torch.equal(outputs[name].output_ids, baseline.output_ids) if greedy else None
            if greedy and not entry["matches_baseline"]:
                entry["divergence"] = greedy_divergence(target, input_ids.shape[1], baseline.output_ids,
                                                        outputs[name].output_ids)
        if name == DSPARK:
            record[DSPARK] = entry
        else:
            record.setdefault("compare", {})[name] = entry
    if args.prompt_lookup:
        lookup = measure_generate(target, input_ids, kwargs, seed, prompt_lookup_num_tokens=args.prompt_lookup_tokens)
        record["prompt_lookup"] = _timing(lookup)
        if baseline is not None:
            record["prompt_lookup"]["matches_baseline"] = (
                torch.equal(lookup.output_ids, baseline.output_ids) if greedy else None)
    n = input_ids.shape[1]
    record["output"] = tokenizer.decode(outputs[DSPARK].output_ids[0, n:], skip_special_tokens=True)
    if want_answers:
        record["answers"] = {DSPARK: extract_final_number(record["output"]),
                             "reference": extract_final_number(row.get("answer"))}
        if baseline is not None:
            text = tokenizer.decode(baseline.output_ids[0, n:], skip_special_tokens=True)
            record["answers"]["baseline"] = extract_final_number(text)
    return record


def _warm_up(target, tokenizer, drafters, row, args) -> None:
    """One short untimed pass of every method, so first-call overheads stay out of the numbers."""
    short = argparse.Namespace(**{**vars(args), "max_new_tokens": min(8, args.max_new_tokens)})
    measure_prompt(target, tokenizer, drafters, row, 0, short, want_answers=False)


def _fmt(value, spec=".2f", suffix="") -> str:
    if value is None or isinstance(value, bool):
        return "-" if value is None else str(value)
    return f"{value:{spec}}{suffix}"


def print_summary(results: dict[str, Any], out=sys.stdout) -> None:
    """A table of tau, tokens/s and speed-up per prompt set (compare drafters and prompt lookup indented)."""
    print(f"{'prompt set':<24}{'prompts':>8}{'tau':>7}{'tok/s':>9}{'best plain':>12}{'speed-up':>10}"
          f"{'vs best':>9}{'lossless':>10}", file=out)
    for key, entry in [*results["datasets"].items(), ("macro average", results)]:
        lines = [(key[:23], entry, entry.get("num_prompts"), entry.get("best_plain_tokens_per_second"))]
        lines += [(f"  {name[:21]}", comp, None, None) for name, comp in entry.get("compare", {}).items()]
        if entry.get("prompt_lookup_tokens_per_second") is not None:
            lookup = {"tokens_per_second": entry["prompt_lookup_tokens_per_second"],
                      "speedup": entry.get("prompt_lookup_speedup"),
                      "speedup_vs_best_plain": entry.get("prompt_lookup_speedup_vs_best_plain"),
                      "outputs_match_baseline": entry.get("prompt_lookup_outputs_match_baseline")}
            lines.append(("  prompt lookup", lookup, None, None))
        for label, e, count, base in lines:
            print(f"{label:<24}{_fmt(count, 'd'):>8}{_fmt(e.get('mean_accepted_length')):>7}"
                  f"{_fmt(e.get('tokens_per_second'), '.1f'):>9}{_fmt(base, '.1f'):>12}"
                  f"{_fmt(e.get('speedup'), '.2f', 'x'):>10}{_fmt(e.get('speedup_vs_best_plain'), '.2f', 'x'):>9}"
                  f"{_fmt(e.get('outputs_match_baseline')):>10}", file=out)


def evaluate_drafters(args) -> dict[str, Any]:
    """Run the evaluation described by parsed ``args``; returns the results dict (also written to --output)."""
    from tqdm.auto import tqdm

    from .targets import load_target

    if args.max_new_tokens < 1:
        raise DataError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}.")
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    drafts = _named_drafts(args)
    sets = _prompt_sets(args)
    results = EvalResults(Path(args.output) if args.output else None, _settings(args, drafts, device, dtype),
                          overwrite=args.overwrite)
    target, tokenizer = load_target(args.target, dtype=dtype, device=device)
    drafters = {}
    for name, source, under_test in drafts:
        drafters[name] = _load_drafter(source, target, device, dtype)
        if under_test:
            _apply_policy(drafters[name], args.policy, target)
            if getattr(args, "ngram_lookup", None) is not None:
                drafters[name].generation_config.ngram_lookup_tokens = args.ngram_lookup
    from .trainer.regenerate import resolve_chat_mode

    trained_with = getattr(drafters[drafts[0][0]].config, "prompt_chat_template", None)
    args.use_chat = resolve_chat_mode(tokenizer, args.chat_template, trained_with)

    _warm_up(target, tokenizer, drafters, sets[0].rows[0], args)
    for prompt_set in sets:
        finished = results.finished(prompt_set)
        todo = [(i, row) for i, row in enumerate(prompt_set.rows) if (i, row["id"]) not in finished]
        bar = tqdm(total=len(prompt_set.rows), initial=len(prompt_set.rows) - len(todo), desc=prompt_set.key,
                   unit="prompt", disable=args.no_progress, dynamic_ncols=True)
        for index, row in todo:
            record = measure_prompt(target, tokenizer, drafters, row, index, args,
                                    want_answers=QUALITY_KEYWORD in prompt_set.key.lower())
            results.add(prompt_set.key, prompt_set.source, record)
            results.write()
            bar.set_postfix(tau=f"{record[DSPARK]['accepted_tokens'] / max(1, record[DSPARK]['rounds']):.2f}")
            bar.update()
        bar.close()
    data = results.write()
    if args.plots:
        write_plots(data, args.plots)
    return data


def run(args) -> int:
    try:
        results = evaluate_drafters(args)
    except HfDSparkError as error:
        print(f"hf-dspark eval: error: {error}", file=sys.stderr)
        return 2
    print_summary(results)
    if args.output:
        print(f"results: {args.output}")
    if args.plots:
        print(f"plots: {args.plots}")
    return 0


# ----------------------------------------------------------------------------- merging shards
# Settings that may differ between shards of one evaluation (every record keeps its own seed).
SHARD_VARIABLE_SETTINGS = ("seed",)


def merge_results(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One results dict from eval files that measured disjoint prompts of the same sets with the same
    settings (e.g. shards run side by side): records are pooled per set and every summary (tau,
    intervals, speed-ups, ratios) is recomputed from the pooled records."""
    if len(results) < 2:
        raise DataError("merge-eval needs at least two results files.")
    for result in results:
        if result.get("format") != RESULTS_FORMAT:
            raise DataError("merge-eval reads files written by `hf-dspark eval` only.")

    def fixed(settings):
        return {k: v for k, v in settings.items() if k not in SHARD_VARIABLE_SETTINGS}

    first = results[0].get("settings", {})
    for index, result in enumerate(results[1:], start=2):
        other = result.get("settings", {})
        if fixed(other) != fixed(first):
            changed = sorted(k for k in set(fixed(first)) | set(fixed(other)) if first.get(k) != other.get(k))
            raise DataError(f"file {index} was measured with other settings ({', '.join(changed)}); only "
                            f"{', '.join(SHARD_VARIABLE_SETTINGS)} may differ between shards.")
    seeds = sorted({r.get("settings", {}).get("seed") for r in results}, key=str)
    merged = EvalResults(None, {**first, "seed": seeds[0] if len(seeds) == 1 else "per prompt (see records)"})
    for result in results:
        for key, entry in result.get("datasets", {}).items():
            taken = {r["id"] for r in merged.records.get(key, [])}
            for record in entry.get("prompts", []):
                if record["id"] in taken:
                    raise DataError(f"prompt {record['id']} of set {key!r} was measured in more than one file; "
                                    "shards must hold disjoint prompts.")
                merged.sources.setdefault(key, entry.get("source", key))
                merged.records.setdefault(key, []).append(record)
    return merged.to_dict()


def add_merge_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="RESULTS_JSON", help="`hf-dspark eval` files to pool.")
    parser.add_argument("--output", required=True, help="Merged results JSON to write.")
    parser.add_argument("--plots", default=None, metavar="DIR", help="Write PNG plots of the merged results.")


def run_merge_eval(args) -> int:
    try:
        loaded = []
        for path in args.inputs:
            try:
                loaded.append(json.loads(Path(path).read_text(encoding="utf-8")))
            except (OSError, json.JSONDecodeError) as error:
                raise DataError(f"cannot read {path}: {error}") from error
        data = merge_results(loaded)
    except HfDSparkError as error:
        print(f"hf-dspark merge-eval: error: {error}", file=sys.stderr)
        return 2
    _write_json_atomic(Path(args.output), data)
    if args.plots:
        write_plots(data, args.plots)
    print_summary(data)
    print(f"results: {args.output}")
    return 0
