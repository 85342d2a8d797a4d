"""Reading prompts from local files or Hub datasets (for training, calibration and benchmarks).

Our prompt format is one JSON object per row with a ``"turns"`` list of user
turns::

    {"turns": ["first user turn", "second user turn"]}

Rows with a single text column (``prompt``, ``question``, ``instruction``, or the
one named with ``column=``) and chat-style rows (``"messages"`` /
``"conversations"`` lists of ``{"role", "content"}``) are accepted too.

Every prompt returned by :func:`load_prompts` is a dict::

    {"id": "<16 hex chars>", "turns": [...], "source": "<file or dataset>"}

where ``id`` is the first 16 hex digits of the SHA-1 of the prompt text, so it
is stable across runs and machines. Rows without a usable prompt (``turns`` empty, ``[""]``,
not a list, not a list of strings...) are counted per reason in a :class:`SkippedRows` report
with the first line (or row) where each reason occurs; ``strict=True`` raises on the first one. Prompts are deduplicated by text and then
shuffled with a fixed seed, so that any prefix of the list is a balanced mix of
the sources (useful when regeneration is stopped early).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hf_dspark.errors import DataError

logger = logging.getLogger(__name__)

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")
TEXT_COLUMNS = ("prompt", "question", "instruction")
CHAT_COLUMNS = ("messages", "conversations")
_TURN_SEPARATOR = "\n\n"


def prompt_text(turns: list[str]) -> str:
    """The text identifying a prompt: its turns joined by a blank line."""
    return _TURN_SEPARATOR.join(turns)


def prompt_id(text: str) -> str:
    """Stable id of a prompt text: the first 16 hex digits of its SHA-1."""
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def _turns_from_chat(messages: Any) -> list[str] | None:
    if not isinstance(messages, list):
        return None
    turns = []
    for message in messages:
        if not isinstance(message, dict):
            return None
        role = message.get("role", message.get("from"))
        content = message.get("content", message.get("value"))
        if role in ("user", "human") and isinstance(content, str) and content.strip():
            turns.append(content)
    return turns or None


def row_to_turns(row: dict[str, Any], column: str | None = None) -> list[str] | None:
    """Extract the user turns of one row, or ``None`` when the row has no usable prompt.

    ``column`` forces which field to read; otherwise ``turns`` is used, then a chat
    ``messages``/``conversations`` list, then the first of ``prompt``,
    ``question``, ``instruction`` that holds a non-empty string.
    """
    if not isinstance(row, dict):
        return None
    if column is not None:
        value = row.get(column)
        if isinstance(value, str):
            return [value] if value.strip() else None
        if isinstance(value, list) and value and all(isinstance(turn, str) for turn in value):
            return value if all(turn.strip() for turn in value) else None
        return _turns_from_chat(value)
    turns = row.get("turns")
    if isinstance(turns, list) and turns and all(isinstance(t, str) and t.strip() for t in turns):
        return list(turns)
    for key in CHAT_COLUMNS:
        if key in row:
            chat_turns = _turns_from_chat(row[key])
            if chat_turns:
                return chat_turns
    for key in TEXT_COLUMNS:
        value = row.get(key)
        if isinstance(value, str) and value.strip():
            return [value]
    return None


def _value_problem(key: str, value: Any, text_ok: bool) -> str:
    if isinstance(value, str):
        return f"{key!r} is an empty string" if text_ok else f"{key!r} is not a list but a str"
    if not isinstance(value, list):
        return f"{key!r} is not {'text or ' if text_ok else ''}a list but a {type(value).__name__}"
    if not value:
        return f"{key!r} is an empty list"
    if any(isinstance(item, dict) for item in value):
        return f"{key!r} holds no non-empty user message"
    wrong = next((item for item in value if not isinstance(item, str)), None)
    if wrong is not None:
        return f"{key!r} holds {type(wrong).__name__} values, not text"
    return f"{key!r} holds an empty string"


def unusable_reason(row: Any, column: str | None = None) -> str:
    """Why :func:`row_to_turns` finds no prompt in ``row`` (call it only when that returned ``None``)."""
    if not isinstance(row, dict):
        return f"not a JSON object but a {type(row).__name__}"
    if column is not None:
        return _value_problem(column, row[column], text_ok=True) if column in row else f"no {column!r} field"
    if "turns" in row:
        return _value_problem("turns", row["turns"], text_ok=False)
    key = next((k for k in (*CHAT_COLUMNS, *TEXT_COLUMNS) if k in row), None)
    if key is None:
        return f"no 'turns' field (nor {', '.join(CHAT_COLUMNS + TEXT_COLUMNS)})"
    return _value_problem(key, row[key], text_ok=key in TEXT_COLUMNS)


@dataclass
class SkippedRows:
    """What one prompt source held: rows read, duplicates, and the rows skipped for want of a usable
    prompt, counted per reason with the first line (or row) where each reason occurs."""

    source: str
    rows_read: int = 0
    duplicates: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    first: dict[str, str] = field(default_factory=dict)

    @property
    def count(self) -> int:
        return sum(self.reasons.values())

    def add(self, reason: str, where: str) -> None:
        self.reasons[reason] = self.reasons.get(reason, 0) + 1
        self.first.setdefault(reason, where)

    def describe(self) -> str:
        parts = ", ".join(f"{n} where {reason} ({self.first[reason]})" for reason, n in self.reasons.items())
        return f"{self.source}: skipped {self.count} of {self.rows_read} rows without a usable prompt: {parts}."


def _iter_jsonl(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    with path.open("r", encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield f"line {line_number}", json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(
                    f"{path}, line {line_number}: not valid JSON ({error.msg}). Each line of a .jsonl "
                    'prompt file must be one JSON object such as {"turns": ["..."]}.'
                ) from error


def _iter_json(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        # Many ".json" files are really JSON Lines.
        yield from _iter_jsonl(path)
        return
    if isinstance(data, dict):
        lists = [value for value in data.values() if isinstance(value, list)]
        if "turns" in data or not lists:
            data = [data]
        elif len(lists) == 1:
            data = lists[0]
        else:
            raise DataError(
                f"{path}: a JSON object with several lists ({', '.join(k for k, v in data.items() if isinstance(v, list))}); "
                "store the prompts as a JSON list of rows or as JSON Lines instead."
            )
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of rows, got {type(data).__name__}.")
    yield from _numbered(data)


def _numbered(rows: Iterable[Any]) -> Iterator[tuple[str, Any]]:
    for number, row in enumerate(rows, start=1):
        yield f"row {number}", row


def _iter_parquet(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as error:  # pragma: no cover - pyarrow ships with `datasets`
        raise DataError(f"Reading {path} needs pyarrow: `pip install pyarrow`.") from error
    yield from _numbered(pq.read_table(path).to_pylist())


def _iter_file(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _iter_jsonl(path)
    if suffix == ".json":
        return _iter_json(path)
    if suffix == ".parquet":
        return _iter_parquet(path)
    raise DataError(
        f"{path}: unsupported prompt file type {suffix!r}; use one of {', '.join(LOCAL_SUFFIXES)} "
        "or a Hub dataset id."
    )


def _iter_hub(dataset_id: str, split: str | None) -> Iterable[tuple[str, dict[str, Any]]]:
    try:
        import datasets
    except ImportError as error:  # pragma: no cover - a declared dependency
        raise DataError("Loading a Hub dataset needs `datasets`: `pip install datasets`.") from error
    try:
        return _numbered(datasets.load_dataset(dataset_id, split=split or "train"))
    except Exception as error:  # offline, unknown id, bad split, ...
        raise DataError(
            f"Could not load the Hub dataset {dataset_id!r} (split {split or 'train'!r}): "
            f"{type(error).__name__}: {error}. If you are offline or the id is wrong, pass local "
            f"prompt files instead ({', '.join(LOCAL_SUFFIXES)}, one row per prompt such as "
            '{"turns": ["..."]}).'
        ) from error


def expand_sources(sources: Iterable[str]) -> list[tuple[str, Path | None]]:
    """Turn source arguments into ``(name, path)`` pairs; ``path`` is None for Hub ids.

    A folder expands to the prompt files directly inside it (sorted).
    """
    expanded: list[tuple[str, Path | None]] = []
    for source in sources:
        path = Path(source).expanduser()
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix.lower() in LOCAL_SUFFIXES)
            if not files:
                raise DataError(f"Prompt folder {path} has no {', '.join(LOCAL_SUFFIXES)} files.")
            expanded.extend((str(p), p) for p in files)
        elif path.is_file():
            expanded.append((str(path), path))
        elif path.suffix.lower() in LOCAL_SUFFIXES or source.startswith((".", "/", "~")):
            raise DataError(f"Prompt file {path} does not exist; check the path.")
        else:
            expanded.append((source, None))
    return expanded


def load_prompts(
    sources: list[str],
    split: str | None = None,
    column: str | None = None,
    num_prompts: int | None = None,
    seed: int = 0,
    shuffle: bool = True,
    strict: bool = False,
    skipped: list[SkippedRows] | None = None,
) -> list[dict[str, Any]]:
    """Load, deduplicate and shuffle prompts from local files and/or Hub datasets.

    Args:
        sources: local ``.jsonl``/``.json``/``.parquet`` files, folders of them, or
            Hub dataset ids (loaded with ``datasets.load_dataset``).
        split: the split of Hub datasets (default ``"train"``); ignored for files.
        column: the field holding the prompt text (default: ``turns``, then a chat
            list, then ``prompt``/``question``/``instruction``).
        num_prompts: keep only this many prompts (after dedupe and shuffle).
        seed: seed of the shuffle.
        shuffle: shuffle after deduplication (default True) so that any prefix is a
            balanced mix of the sources; False keeps file order.
        strict: raise :class:`DataError` at the first row without a usable prompt instead
            of skipping it.
        skipped: a list that receives one :class:`SkippedRows` report per source (rows read,
            duplicates, skipped rows by reason) for the caller to print; without it, sources
            with skipped rows are reported as a logged warning.

    Returns:
        A list of ``{"id", "turns", "source"}`` dicts.

    Raises:
        DataError: a source is missing, unreadable, or has no usable rows (or, with
            ``strict``, has any row without a usable prompt).
    """
    if isinstance(sources, (str, Path)):
        sources = [str(sources)]
    if not sources:
        raise DataError("No prompt sources given; pass at least one file, folder or Hub dataset id.")
    if num_prompts is not None and num_prompts <= 0:
        raise DataError(f"num_prompts must be positive, got {num_prompts}.")
    prompts: list[dict[str, Any]] = []
    seen: set[str] = set()
    for name, path in expand_sources(sources):
        rows = _iter_file(path) if path is not None else _iter_hub(name, split)
        usable, report = 0, SkippedRows(name)
        for where, row in rows:
            report.rows_read += 1
            turns = row_to_turns(row, column)
            if turns is None:
                reason = unusable_reason(row, column)
                if strict:
                    raise DataError(f"{name}, {where}: {reason}, so it holds no usable prompt; fix or remove it "
                                    "(without --strict such rows are skipped and counted).")
                report.add(reason, where)
                continue
            usable += 1
            text = prompt_text(turns)
            if text in seen:
                report.duplicates += 1
                continue
            seen.add(text)
            prompts.append({"id": prompt_id(text), "turns": turns, "source": name})
        if usable == 0:
            wanted = f"column {column!r}" if column else f"'turns' or one of {', '.join(TEXT_COLUMNS)}"
            raise DataError(
                f"{name}: no usable prompt rows (looked for {wanted} holding non-empty text). "
                'Use rows like {"turns": ["..."]} or pass --column with the name of the text field.'
                + (f" {report.describe()}" if report.count else "")
            )
        if skipped is not None:
            skipped.append(report)
        elif report.count:
            logger.warning("%s", report.describe())
    if shuffle:
        random.Random(seed).shuffle(prompts)
    if num_prompts is not None:
        prompts = prompts[:num_prompts]
    return prompts


def holdout_split(
    prompts: list[dict[str, Any]], fraction: float, seed: int = 0
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Split prompts into ``(train, holdout)``; ``holdout`` has ``round(fraction * n)`` prompts.

    The choice depends only on the prompt ids and ``seed`` (not on the list order),
    and the train part keeps the input order. A positive fraction always yields at
    least one holdout prompt when there are two or more prompts.
    """
    if not 0.0 <= fraction < 1.0:
        raise DataError(f"The holdout fraction must be in [0, 1), got {fraction}.")
    count = int(round(fraction * len(prompts)))
    if fraction > 0 and count == 0 and len(prompts) >= 2:
        count = 1
    if count == 0:
        return list(prompts), []
    ranked = sorted(prompts, key=lambda p: hashlib.sha1(f"{seed}:{p['id']}".encode()).hexdigest())
    holdout_ids = {p["id"] for p in ranked[:count]}
    train = [p for p in prompts if p["id"] not in holdout_ids]
    holdout = [p for p in prompts if p["id"] in holdout_ids]
    return train, holdout
