"""Prompt sets for ``hf-dspark eval``: prompt files, the Hub benchmarks it knows, and the answer checks
(final-number exact match) used to compare outputs."""

from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from hf_dspark.data.prompts import SkippedRows, prompt_id, prompt_text, row_to_turns, unusable_reason
from hf_dspark.errors import DataError

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
    skipped: SkippedRows | None = None  # of a prompt file: its rows without a usable prompt


def _eval_row(turns: list[str] | None, answer: Any = None) -> dict[str, Any] | None:
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
