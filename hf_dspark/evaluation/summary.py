"""Summaries of ``hf-dspark eval`` records: tau and speed-ups per prompt set, bootstrap intervals,
macro averages, the results file (written atomically, resumable) and the merge of shards."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from hf_dspark.evaluation.prompt_sets import PromptSet, exact_match_metric

RESULTS_FORMAT = "hf_dspark.eval"
RESULTS_VERSION = 1
DSPARK = "dspark"  # record / plot name of the drafter under test


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
        summary["ngram_submitted_tokens"] = sum(e.get("ngram_submitted_tokens", 0) for e in entries)
    extended_rounds = sum(e.get("extended_rounds", 0) for e in entries)
    if extended_rounds:  # drafter rounds whose block was continued by an n-gram continuation
        summary["extended_rounds"] = extended_rounds
        summary["extension_accepted_tokens"] = sum(e.get("extension_accepted_tokens", 0) for e in entries)
    if baseline_tps is not None:
        summary["speedup"] = _ratio(tps, baseline_tps)
        summary["speedup_vs_best_plain"] = _ratio(tps, best_plain_tps or baseline_tps)
        summary["outputs_match_baseline"] = _all_or_none([e.get("matches_baseline") for e in entries])
        agreement = greedy_agreement(entries)
        if agreement is not None:
            summary["greedy_agreement"] = agreement
    return summary


def greedy_agreement(entries: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The greedy agreement contract of a run against plain ``generate``, measured over its prompts
    (``None`` for sampling runs, whose entries have no ``matches_baseline``): the share of identical
    outputs, where the others first part, and how close to a tie the target was there."""
    matches = [e.get("matches_baseline") for e in entries]
    if not matches or any(m is None for m in matches):
        return None
    divergences = [e["divergence"] for e in entries if e.get("divergence")]
    ulps = [d["margin_ulps"] for d in divergences if "margin_ulps" in d]
    return {
        "identical_share": sum(matches) / len(matches),
        "first_divergence_positions": [d["position"] for d in divergences],
        "max_margin_ulps": max(ulps) if ulps else None,
        "all_divergences_near_ties": all(u <= 2.0 for u in ulps) and len(ulps) == len(divergences),
    }




from hf_dspark.errors import DataError

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
            if all("divergence" in e or e.get("matches_baseline") is not False for e in lookup):
                # (files of earlier code recorded no divergence of prompt lookup's outputs)
                agreement = greedy_agreement(lookup)
                if agreement is not None:
                    summary["prompt_lookup_greedy_agreement"] = agreement
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


_SUMMED = {"num_prompts", "new_tokens", "seconds", "rounds", "accepted_tokens", "ngram_rounds", "ngram_accepted_tokens",
           "ngram_submitted_tokens", "extended_rounds", "extension_accepted_tokens"}
# Intervals of different sets do not average into an interval of the macro average.
_NOT_AVERAGED = {"quality", "policy", "mean_accepted_length_ci90", "dspark_tau_ratio_ci90", "greedy_agreement",
                 "prompt_lookup_greedy_agreement"}


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
def _current_umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as indented JSON to ``path`` through a temporary file in the same folder, so that a
    reader never sees half a file (the new file gets the permissions the umask gives, like ``open``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates the file 0600; a results file is for sharing, so give it the mode open() would
        os.fchmod(fd, 0o666 & ~_current_umask())
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
# Settings key: {drafter name: sha256 of its config and weight files}. The drafter's path alone does not say
# which drafter was measured: another one saved to the same folder would be averaged with the first.
DRAFT_CHECKSUMS_KEY = "draft_sha256"


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
        # Files written before the drafters' checksums were recorded cannot be checked; they resume as before.
        old.setdefault(DRAFT_CHECKSUMS_KEY, self.settings.get(DRAFT_CHECKSUMS_KEY))
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
            write_json_atomic(self.path, data)
        return data



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
