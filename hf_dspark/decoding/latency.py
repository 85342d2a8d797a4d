"""Latency profile of the target model: time of one verification pass vs tokens scored.

:func:`profile_latency` times ONE target forward pass that scores ``n`` new tokens on top of a
KV cache already holding ``context_length`` tokens, for every ``n`` in ``token_counts`` and every
batch size (rows, each scoring ``n`` tokens) in ``batch_sizes``. Results are cached as JSON under
``~/.cache/hf_dspark/latency`` (or ``cache_dir``), keyed by model name, dtype, device, torch CPU
threads and context length, and reused unless ``force=True``.

The resulting :class:`LatencyProfile` feeds the schedulers of :mod:`hf_dspark.decoding.scheduling`:
``verify_seconds`` for the batch-1 cost policy, ``steps_per_second`` for Algorithm 1.

Command line: ``hf-dspark profile --target T [--max-tokens 16] [--batch-sizes 1 4 8 16]
[--context-length 128] [--dtype float32] [--output FILE]``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import re
import statistics
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch

from hf_dspark.errors import DSparkConfigError, LatencyProfileError
from hf_dspark.models.dspark.scheduling_dspark import interpolate, nondecreasing_fit
from hf_dspark.models.dspark.verify_head_dspark import activate_verify_head
from hf_dspark.targets import TARGET_DTYPES

__all__ = [
    "LatencyProfile",
    "LatencyProfileError",
    "profile_latency",
    "choose_dtype",
    "default_cache_dir",
    "find_cached_profile",
    "cached_latency_table",
    "format_table"]

_FORMAT = "hf_dspark.latency_profile"
_VERSION = 1
# Floor for extrapolated times so that steps_per_second stays finite.
_MIN_SECONDS = 1e-9




def default_cache_dir() -> Path:
    """``$HF_DSPARK_CACHE/latency`` if set, else ``~/.cache/hf_dspark/latency``."""
    root = os.environ.get("HF_DSPARK_CACHE")
    return Path(root) / "latency" if root else Path.home() / ".cache" / "hf_dspark" / "latency"


@dataclass
class LatencyProfile:
    """Measured verification latency of one target on one machine.

    ``table[batch_size][tokens]`` is the median wall time, in seconds, of one forward pass in
    which each of ``batch_size`` rows scores ``tokens`` new tokens after ``context_length``
    cached tokens. The key fields (``model_name``, ``dtype``, ``device``, ``num_threads``,
    ``context_length``) identify where the numbers are valid.
    """

    model_name: str
    dtype: str
    device: str
    num_threads: int
    context_length: int
    table: dict[int, dict[int, float]] = field(default_factory=dict)
    warmup: int = 0
    repeats: int = 0
    verify_head: bool = False  # measured with the skinny verification LM head (generation_dspark)
    architecture: str = ""  # digest of the model's config (see model_identity); "" in older files

    # ------------------------------------------------------------------ identity

    @property
    def key(self) -> str:
        """Human-readable identity of the setup the profile was measured on."""
        return (
            f"{self.model_name}|{self.dtype}|{self.device}|threads={self.num_threads}"
            f"|ctx={self.context_length}" + ("|verify_head" if self.verify_head else "")
            + (f"|arch={self.architecture}" if self.architecture else "")
        )

    @property
    def file_name(self) -> str:
        """File-system-safe cache file name derived from :attr:`key` (readable part + hash)."""
        readable = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{self.model_name}__{self.dtype}__{self.device}")
        digest = hashlib.sha1(self.key.encode("utf-8")).hexdigest()[:10]
        return f"{readable.strip('_')[:100]}__t{self.num_threads}__ctx{self.context_length}__{digest}.json"

    def covers(self, token_counts: Iterable[int], batch_sizes: Iterable[int]) -> bool:
        """True if every ``(batch_size, tokens)`` pair asked for was measured."""
        counts = list(token_counts)
        return all(b in self.table and all(n in self.table[b] for n in counts) for b in batch_sizes)

    # ------------------------------------------------------------------ queries

    def _row(self, batch_size: int) -> list[tuple[int, float]]:
        # queries read the non-decreasing fit of the measured medians (see nondecreasing_fit); the table
        # itself, as saved, keeps what was measured
        return nondecreasing_fit(sorted(self.table[batch_size].items()))

    def verify_seconds(self, n_tokens: float, batch_size: int = 1) -> float:
        """Seconds of one pass where each of ``batch_size`` rows scores ``n_tokens`` tokens.

        Linear interpolation between measured token counts of the row's non-decreasing fit (a pass
        over more tokens never costs less; timing noise can say otherwise), linear extrapolation
        from the two nearest points outside the range. A batch size that was not profiled is
        interpolated (or extrapolated) the same way across the profiled batch sizes. Results are
        floored at 1 ns so that rates stay finite.
        """
        if not self.table or not any(self.table.values()):
            raise LatencyProfileError(f"latency profile {self.key!r} has no measurements")
        if not n_tokens > 0:
            raise LatencyProfileError(f"n_tokens must be > 0, got {n_tokens!r}")
        if not batch_size >= 1:
            raise LatencyProfileError(f"batch_size must be >= 1, got {batch_size!r}")
        if batch_size in self.table and self.table[batch_size]:
            seconds = interpolate(self._row(batch_size), n_tokens)
        else:
            per_batch = [(b, interpolate(self._row(b), n_tokens)) for b in sorted(self.table) if self.table[b]]
            seconds = interpolate(per_batch, batch_size)
        return max(seconds, _MIN_SECONDS)

    def steps_per_second(self, total_tokens: int, batch_size: int | None = None) -> float:
        """Target passes per second when one pass scores ``total_tokens`` tokens in all.

        Mapping to the table: with ``batch_size=None`` the tokens are treated as one packed row,
        ``1 / verify_seconds(total_tokens, 1)`` (exact for batch 1). For a padded batched engine
        give the number of rows ``R``: the tokens are spread over ``R`` rows padded to
        ``ceil(total_tokens / R)`` each, ``1 / verify_seconds(ceil(total_tokens / R), R)``. Pass
        e.g. ``functools.partial(profile.steps_per_second, batch_size=R)`` as the scheduler's
        ``steps_per_second``.
        """
        if batch_size is None:
            return 1.0 / self.verify_seconds(total_tokens, 1)
        if not batch_size >= 1:
            raise LatencyProfileError(f"batch_size must be >= 1, got {batch_size!r}")
        per_row = math.ceil(total_tokens / batch_size)
        return 1.0 / self.verify_seconds(per_row, batch_size)

    # ------------------------------------------------------------------ persistence

    def to_dict(self) -> dict:
        return {
            "format": _FORMAT,
            "version": _VERSION,
            "model_name": self.model_name,
            "dtype": self.dtype,
            "device": self.device,
            "num_threads": self.num_threads,
            "context_length": self.context_length,
            "warmup": self.warmup,
            "repeats": self.repeats,
            "verify_head": self.verify_head,
            "architecture": self.architecture,
            "table": {
                str(b): {str(n): float(s) for n, s in sorted(row.items())} for b, row in sorted(self.table.items())
            },
        }

    def to_json(self, path: str | os.PathLike) -> Path:
        """Write the profile as JSON (atomically: temp file then rename). Returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)
        return path

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "LatencyProfile":
        """Read a profile written by :meth:`to_json`; malformed content raises LatencyProfileError."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise LatencyProfileError(f"latency profile {path} is not valid JSON: {exc}") from exc
        except UnicodeDecodeError as exc:
            raise LatencyProfileError(f"latency profile {path} is not UTF-8 text: {exc}") from exc

        def bad(what: str) -> LatencyProfileError:
            return LatencyProfileError(f"latency profile {path} is malformed: {what}")

        if not isinstance(data, dict):
            raise bad(f"expected a JSON object, got {type(data).__name__}")
        if data.get("format") != _FORMAT:
            raise bad(f"'format' must be {_FORMAT!r}, got {data.get('format')!r}")
        if data.get("version") != _VERSION:
            raise bad(f"unsupported 'version' {data.get('version')!r} (this library reads {_VERSION})")
        for name, kind in (("model_name", str), ("dtype", str), ("device", str), ("num_threads", int),
                           ("context_length", int), ("warmup", int), ("repeats", int), ("table", dict)):
            value = data.get(name)
            if not isinstance(value, kind) or isinstance(value, bool):
                raise bad(f"field {name!r} must be a {kind.__name__}, got {value!r}")
        table: dict[int, dict[int, float]] = {}
        for b_text, row in data["table"].items():
            try:
                b = int(b_text)
            except ValueError:
                raise bad(f"batch size key {b_text!r} is not an integer") from None
            if b < 1 or not isinstance(row, dict):
                raise bad(f"table[{b_text!r}] must map token counts to seconds for a batch size >= 1")
            table[b] = {}
            for n_text, seconds in row.items():
                try:
                    n = int(n_text)
                except ValueError:
                    raise bad(f"token count key {n_text!r} in table[{b_text!r}] is not an integer") from None
                if (n < 1 or isinstance(seconds, bool) or not isinstance(seconds, (int, float))
                        or not math.isfinite(seconds) or seconds <= 0):
                    raise bad(f"table[{b_text!r}][{n_text!r}] must be a positive number of seconds, got {seconds!r}")
                table[b][n] = float(seconds)
        return cls(
            model_name=data["model_name"], dtype=data["dtype"], device=data["device"],
            num_threads=data["num_threads"], context_length=data["context_length"], table=table,
            warmup=data["warmup"], repeats=data["repeats"], verify_head=bool(data.get("verify_head", False)),
            architecture=str(data.get("architecture", "")),
        )


# --------------------------------------------------------------------------- measurement


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover - parameterless model
        return torch.device("cpu")


def _describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return str(device)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps" and hasattr(torch, "mps"):
        torch.mps.synchronize()


def _positive_ints(values, name: str) -> list[int]:
    out = sorted(set(int(v) for v in values))
    if not out or out[0] < 1 or any(isinstance(v, bool) or int(v) != v for v in values):
        raise ValueError(f"{name} must be a non-empty collection of integers >= 1, got {list(values)!r}")
    return out


class _ContextCache:
    """A KV cache holding exactly ``context_length`` tokens, restored after every timed pass.

    Restores by ``cache.crop(-n)`` (cheap); cache types that cannot be cropped back (e.g. a
    sliding-window layer past its window, linear-attention layers) fall back to a deep copy of
    a pristine prefilled cache, made outside the timed region.
    """

    def __init__(self, model, context_ids: torch.Tensor):
        self.model = model
        self.context_ids = context_ids
        self.context_length = context_ids.shape[1]
        self.cache = self._prefill()
        self.pristine = None

    def _prefill(self):
        out = self.model(input_ids=self.context_ids, use_cache=True)
        # transformers 5.24 names the cache `cache` (older releases: `past_key_values`)
        cache = getattr(out, "cache", None)
        return cache if cache is not None else out.past_key_values

    def ready(self):
        if self.pristine is not None:
            self.cache = copy.deepcopy(self.pristine)
        return self.cache

    def rollback(self, n_tokens: int) -> None:
        if self.pristine is not None:
            return
        try:
            self.cache.crop(-n_tokens)
            ok = self.cache.get_seq_length() == self.context_length
        except (RuntimeError, ValueError, AttributeError, NotImplementedError):
            ok = False
        if not ok:
            self.pristine = self._prefill()


class _HeadOwner:
    """Keeps the verification LM-head layout active while a profile is measured."""


def model_identity(model, model_name: str | None = None) -> tuple[str, str]:
    """``(name, architecture digest)`` a latency profile is cached under: ``model_name`` (default
    ``config.name_or_path``, else the class name) with a local path made absolute, and a digest of the
    model's config.

    A name alone is no identity: every model built in code is called by its class name (an 8-layer model
    read a 2-layer model's costs), and ``./target`` names a different folder in every working directory.
    The architecture (the config without its name) is what the forward cost depends on."""
    config = getattr(model, "config", None)
    name = model_name or getattr(config, "name_or_path", "") or type(model).__name__
    if Path(str(name)).expanduser().exists():
        name = str(Path(str(name)).expanduser().resolve())
    if config is None or not hasattr(config, "to_dict"):
        return str(name), ""
    layout = {k: v for k, v in config.to_dict().items() if k not in ("_name_or_path", "transformers_version")}
    return str(name), hashlib.sha1(json.dumps(layout, sort_keys=True, default=str).encode("utf-8")).hexdigest()[:12]


def profile_latency(
    model,
    token_counts: Iterable[int] = range(1, 17),
    batch_sizes: Iterable[int] = (1,),
    context_length: int = 128,
    warmup: int = 2,
    repeats: int = 5,
    cache_dir: str | os.PathLike | None = None,
    force: bool = False,
    model_name: str | None = None,
    seed: int = 0,
    verify_head: bool = True,
) -> LatencyProfile:
    """Measure (or load from the cache) the verification latency table of ``model``.

    For each batch size ``B`` the context (``B x context_length`` random token ids) is prefilled
    once with ``use_cache=True``; then, for each ``n``, ``warmup + repeats`` forward passes over
    ``B x n`` new tokens are run on top of that cache (rolled back to ``context_length`` after
    each pass) and the median of the last ``repeats`` wall times is kept. Runs under
    ``torch.inference_mode()`` with the model in eval mode (its mode is restored afterwards).

    The profile is stored in ``<cache_dir>/<LatencyProfile.file_name>``; a later call with the
    same key reuses it, measuring only the (batch size, tokens) pairs it lacks, unless
    ``force=True``. ``model_name`` defaults to ``model.config.name_or_path``.

    ``verify_head=True`` measures with the LM-head layout a DSpark generation uses while verifying
    (see ``generation_dspark.activate_verify_head``: CPU fp32, 2-8 rows); it is recorded in the key.

    A row that :func:`implausible_row` rejects (measured under load) is measured once more; if it is
    still implausible the profile is returned with a warning and not cached, so one busy moment does
    not set every later run's schedule.
    """
    counts = _positive_ints(list(token_counts), "token_counts")
    sizes = _positive_ints(list(batch_sizes), "batch_sizes")
    if isinstance(context_length, bool) or not isinstance(context_length, int) or context_length < 1:
        raise ValueError(f"context_length must be an int >= 1, got {context_length!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an int >= 0, got {warmup!r}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")

    device = _model_device(model)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    model_name, architecture = model_identity(model, model_name)
    head_owner = _HeadOwner()
    verify_head = bool(verify_head) and activate_verify_head(model, head_owner) is not None
    profile = LatencyProfile(
        model_name=str(model_name), dtype=dtype, device=_describe_device(device),
        num_threads=torch.get_num_threads(), context_length=context_length, warmup=warmup, repeats=repeats,
        verify_head=verify_head, architecture=architecture,
    )
    path = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = path / profile.file_name

    if not force and path.exists():
        try:
            cached = LatencyProfile.from_json(path)
        except LatencyProfileError as exc:
            warnings.warn(f"ignoring unreadable latency cache ({exc}); measuring again", stacklevel=2)
        else:
            if cached.key == profile.key:
                if cached.covers(counts, sizes):
                    return cached
                profile.table = cached.table

    vocab_size = model.get_input_embeddings().num_embeddings
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    implausible: list[str] = []
    try:
        with torch.inference_mode():
            for b in sizes:
                row = profile.table.setdefault(b, {})
                missing = [n for n in counts if force or n not in row]
                if not missing:
                    continue
                ids = torch.randint(0, vocab_size, (b, context_length + max(missing)), generator=generator)
                ids = ids.to(device)
                context, new_ids = _ContextCache(model, ids[:, :context_length]), ids[:, context_length:]
                for attempt in range(2):  # a row measured under a load spike is measured once more
                    loaded = _time_passes(model, context, new_ids, missing, warmup, repeats, device)
                    row.update({n: seconds for n, (seconds, _) in loaded.items()})
                    reasons = implausible_row(row, {n for n, (_, spread) in loaded.items() if spread})
                    if not reasons:
                        break
                if reasons:
                    implausible.append(f"batch size {b}: " + "; ".join(reasons))
                del context
    finally:
        model.train(was_training)
        del head_owner  # releases the verification head layout

    if implausible:
        warnings.warn(
            f"latency profile of {profile.key!r} is implausible after measuring twice ({' | '.join(implausible)}); "
            "is the machine busy? It is used for this run but not cached: measure again when the machine is idle.",
            stacklevel=2)
        return profile
    profile.to_json(path)
    return profile


def find_cached_profile(model, cache_dir: str | os.PathLike | None = None, min_points: int = 2) -> LatencyProfile | None:
    """The cached profile measured for ``model``'s architecture, dtype and device with this process's CPU
    thread count (whatever name it was profiled under), with a batch-1 row of at least ``min_points``
    token counts; the one with the most points when several qualify. ``None`` when there is none."""
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if not folder.is_dir():
        return None
    _, architecture = model_identity(model)
    if not architecture:
        return None
    parameter = next(model.parameters(), None)
    if parameter is None:
        return None
    dtype = str(parameter.dtype).removeprefix("torch.")
    device = _describe_device(parameter.device)
    # generate() asks on every call: the folder is read again only when a profile was written to it since
    key = (str(folder), folder.stat().st_mtime_ns, len(os.listdir(folder)), architecture, dtype, device,
           torch.get_num_threads(), min_points)
    if key not in _FOUND:
        _FOUND.clear()
        _FOUND[key] = _best_profile(folder, architecture, dtype, device, min_points)
    return _FOUND[key]


_FOUND: dict[tuple, LatencyProfile | None] = {}


def _best_profile(folder: Path, architecture: str, dtype: str, device: str, min_points: int) -> LatencyProfile | None:
    best = None
    for path in sorted(folder.glob("*.json")):
        try:
            profile = LatencyProfile.from_json(path)
        except (LatencyProfileError, OSError):
            continue
        fits = (profile.architecture == architecture and profile.dtype == dtype and profile.device == device
                and profile.num_threads == torch.get_num_threads() and len(profile.table.get(1, {})) >= min_points)
        if fits and (best is None or (len(profile.table[1]), profile.verify_head) > (len(best.table[1]), best.verify_head)):
            best = profile
    return best


def cached_latency_table(model) -> dict[str, float] | None:
    """``{tokens: seconds}`` of :func:`find_cached_profile`'s batch-1 row: the latency source hf-dspark
    registers for ``generate`` (``generation_dspark.LATENCY_SOURCES``)."""
    profile = find_cached_profile(model)
    return None if profile is None else {str(n): s for n, s in sorted(profile.table[1].items())}


# A profile row is refused for the cache when a measurement is off the non-decreasing fit of its row by more than
# this factor (either way), when a pass over n > 1 tokens took under half a one-token pass, or when the median of
# a point's repeats is more than this factor above their fastest (most repeats slowed down: the machine was busy).
IMPLAUSIBLE_FACTOR = 2.0


def implausible_row(row: dict[int, float], noisy: Iterable[int] = ()) -> list[str]:
    """Why the measured ``row`` (tokens -> seconds of one batch size) cannot be trusted; ``[]`` if it can.

    A pass scoring more tokens never costs much less (:func:`nondecreasing_fit` smooths small dips), so
    a point far off the row's non-decreasing fit, or a multi-token pass faster than half a one-token
    pass, was measured while something else ran; ``noisy`` lists the token counts whose repeats spread
    too much (see :data:`IMPLAUSIBLE_FACTOR`).
    """
    reasons = [f"n={n}: median {IMPLAUSIBLE_FACTOR:g}x above the fastest repeat" for n in sorted(noisy)]
    points = sorted(row.items())
    if 1 in row:
        reasons += [f"T({n})={t * 1e3:.3g} ms < T(1)/2={row[1] * 1e3 / 2:.3g} ms"
                    for n, t in points if n > 1 and t < 0.5 * row[1]]
    for (n, measured), (_, fitted) in zip(points, nondecreasing_fit(points)):
        if not fitted / IMPLAUSIBLE_FACTOR <= measured <= fitted * IMPLAUSIBLE_FACTOR:
            reasons.append(f"T({n})={measured * 1e3:.3g} ms is off the non-decreasing fit {fitted * 1e3:.3g} ms")
    return reasons


def _time_passes(model, context, new_ids, counts, warmup, repeats, device) -> dict[int, tuple[float, bool]]:
    """``{n: (median seconds, spread too large)}`` of ``repeats`` timed passes over ``n`` new tokens each,
    after ``warmup`` untimed ones.

    The timed passes go round robin over the token counts (1, 2, .., N, 1, 2, ..), so a slow spell of the
    machine lands on every count alike and the shape of the curve, which is what the length rules read,
    survives it."""

    def one_pass(n: int) -> float:
        cache = context.ready()
        _synchronize(device)
        start = time.perf_counter()
        model(input_ids=new_ids[:, :n], cache=cache, use_cache=True)
        _synchronize(device)
        elapsed = time.perf_counter() - start
        context.rollback(n)
        return elapsed

    for n in counts:
        for _ in range(warmup):
            one_pass(n)
    samples: dict[int, list[float]] = {n: [] for n in counts}
    for _ in range(repeats):
        for n in counts:
            samples[n].append(one_pass(n))
    result = {}
    for n, timed in samples.items():
        median = max(statistics.median(timed), _MIN_SECONDS)
        result[n] = (median, len(timed) >= 3 and median > IMPLAUSIBLE_FACTOR * max(min(timed), _MIN_SECONDS))
    return result


def format_table(profile: LatencyProfile) -> str:
    """Plain-text table: one line per token count, milliseconds per batch size, tokens/s at B=1."""
    sizes = sorted(profile.table)
    counts = sorted({n for row in profile.table.values() for n in row})
    header = ["tokens"] + [f"B={b} ms" for b in sizes]
    lines = [f"# {profile.key}", "  ".join(f"{h:>10}" for h in header)]
    for n in counts:
        cells = [f"{n:>10d}"]
        for b in sizes:
            seconds = profile.table[b].get(n)
            cells.append(f"{seconds * 1e3:>10.3f}" if seconds is not None else f"{'-':>10}")
        lines.append("  ".join(cells))
    return "\n".join(lines)


# --------------------------------------------------------------------------- dtype choice
def choose_dtype(
    model,
    candidates: Iterable[str] = ("float32", "bfloat16"),
    verify_tokens: int = 8,
    context_length: int = 128,
    cache_dir: str | os.PathLike | None = None,
    model_name: str | None = None,
    repeats: int = 5,
) -> tuple[str, dict[str, dict[int, float]]]:
    """The dtype in which ``model`` runs speculative decoding fastest on this machine, measured.

    Each candidate dtype is profiled (through :func:`profile_latency`, so the figures are cached per
    machine, threads and dtype) at 1 token and at ``verify_tokens`` tokens per pass; the winner is the
    dtype whose ``verify_tokens``-token pass is cheapest, since a DSpark round is one such pass.
    Whether bf16 is the fast path depends on the CPU: with AVX512-BF16 (or on a GPU) a bf16 pass of
    8-16 tokens costs about one decode step; on an AVX2-only CPU bf16 matrix products of more than
    one row are emulated and cost several times the fp32 ones. ``model`` is not modified: other
    dtypes are profiled on a copy. Returns ``(dtype_name, {dtype_name: {tokens: seconds}})``.
    """
    names = list(dict.fromkeys(candidates))
    if not names or any(n not in TARGET_DTYPES for n in names):
        raise DSparkConfigError(f"candidates must be a non-empty subset of {TARGET_DTYPES}, got {names}")
    own = str(next(model.parameters()).dtype).removeprefix("torch.")
    measured: dict[str, dict[int, float]] = {}  # model_name=None: profile_latency names each copy by model_identity
    for name in names:
        candidate = model if name == own else copy.deepcopy(model).to(getattr(torch, name))
        profile = profile_latency(candidate, token_counts=sorted({1, verify_tokens}), context_length=context_length,
                                  repeats=repeats, cache_dir=cache_dir, model_name=model_name)
        measured[name] = dict(profile.table[1])
        if candidate is not model:
            del candidate
    best = min(names, key=lambda n: measured[n][verify_tokens])
    return best, measured

