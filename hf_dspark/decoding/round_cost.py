"""What one round of the batched engine costs: the target's right-padded pass plus the drafter.

The batched engine (:mod:`hf_dspark.decoding.batched`) chooses per round which requests run the drafter
and how many draft tokens each verifies. Both choices trade expected committed tokens against
time, so it needs the time of a round for any allocation:

``seconds = verify(R, width, tokens) + draft(drafted_rows)``

* ``verify(R, width, tokens)``: one target pass over ``R`` rows right-padded to ``width`` slots.
  :class:`~hf_dspark.decoding.latency.LatencyProfile` measures ``R`` rows x ``width`` real tokens; the
  engine runs the LM head and the other per-slot layers on the ``tokens`` real slots only
  (:mod:`hf_dspark.decoding.packing`), so each padding slot costs ``padding_discount`` seconds less
  than a real one (measured by the engine on its target).
* ``draft(m)``: one batched drafter call for ``m`` rows (0 when no row drafts), measured by the
  engine on its own drafter with the current sampling settings, linear in ``m`` between and
  beyond the measured sizes.

The profile and the drafter timings are measured once. A model the engine measured for itself
(``adapt=True``) then learns from the rounds that have finished: it rescales the drafter term and
the verification term of each round width (:meth:`RoundCost.observe`), and prices rounds that draft
or verify drafts with a hurdle, the factor by which such rounds delivered fewer tokens per second
than the plan expected (:meth:`RoundCost.observe_gain`);
a model passed in as is (the tests' synthetic ones) stays fixed, so its schedules are a deterministic
function of the inputs the schedulers are allowed to see.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from hf_dspark.models.dspark.scheduling_dspark import interpolate
from hf_dspark.decoding.latency import LatencyProfile

__all__ = ["RoundCost", "measure_seconds", "token_seconds"]

_FLOOR = 1e-9


def _interpolate(points: list[tuple[int, float]], x: float) -> float:
    if not points:
        return 0.0
    if len(points) == 1:
        # one measured size: assume the time grows in proportion to the rows
        return points[0][1] * x / points[0][0]
    return interpolate(points, x)


@dataclass
class RoundCost:
    """Time model of one engine round (see the module docstring).

    Args:
        verify: the target's latency profile (``table[rows][tokens per row]`` seconds).
        draft_seconds: ``{rows: seconds}`` of one drafter call; empty means drafting is free.
        padding_discount: how much less a padding slot costs than a real one, in seconds (taken off
            for each padding slot of a round).
    """

    verify: LatencyProfile
    draft_seconds: dict[int, float] = field(default_factory=dict)
    padding_discount: float = 0.0
    adapt: bool = False
    verify_scale: float = 1.0
    draft_scale: float = 1.0
    width_scales: dict[int, float] = field(default_factory=dict)
    observed: dict = field(default_factory=dict)  # rounds seen per scale ("verify", "draft", "gain", widths)
    hurdle: float = 1.0  # factor on the price of rounds that draft or verify drafts (observe_gain)
    # the engine's own seconds per round beyond the target forward and the drafter call (planning, n-gram
    # lookups, verification, commits, cache bookkeeping): learnt per kind of round, "plain" (one slot per
    # row, no drafter) and "speculative" (anything else)
    overhead: dict[str, float] = field(default_factory=dict)

    def overhead_seconds(self, width: int, drafted_rows: int) -> float:
        """The engine's learnt overhead of a round of this shape (0 until a round of its kind was seen)."""
        return self.overhead.get("plain" if width <= 1 and drafted_rows == 0 else "speculative", 0.0)

    def verify_scale_at(self, width: int) -> float:
        """The learnt scale of rounds ``width`` slots wide (the all-widths scale until one was seen)."""
        return self.width_scales.get(width, self.verify_scale)

    def verify_seconds(self, rows: int, width: int, tokens: int) -> float:
        return self.verify_scale_at(width) * self._verify_seconds(rows, width, tokens)

    def _verify_seconds(self, rows: int, width: int, tokens: int) -> float:
        padded = self.verify.verify_seconds(width, batch_size=rows)
        return max(padded - self.padding_discount * (rows * width - tokens), _FLOOR)

    def drafter_seconds(self, rows: int) -> float:
        return self.draft_scale * self._drafter_seconds(rows)

    def _drafter_seconds(self, rows: int) -> float:
        if rows <= 0:
            return 0.0
        return max(_interpolate(sorted(self.draft_seconds.items()), rows), 0.0)

    def observe(self, rows: int, width: int, tokens: int, drafted_rows: int, draft_elapsed: float,
                verify_elapsed: float, overhead: float | None = None) -> None:
        """Learn from one finished round (only with ``adapt``): how its parts compare with the model.

        The profile and the drafter timings price the target forward and the drafter call alone; a real
        round also plans, verifies and updates the ragged caches. The engine passes the forward's and the
        drafter call's own times and, as ``overhead``, the rest of the round, which is learnt per kind of
        round (:meth:`overhead_seconds`; same averaging as the scales, in seconds). Each part's measured time
        over its modelled time feeds a running average that scales the model from then on: the plain
        mean over a scale's first rounds, then an exponential average (weight ``ADAPT_WEIGHT``), kept
        in ``[1/4, 4]``. A round width may come up only a few times in a run, so its scale must learn
        from its first rounds, not move a tenth of the way at each. Verification has one such scale
        per round width besides the all-widths one: the profile's error is not the same for a
        one-slot plain step as for an eight-slot verification, and one shared scale prices plain steps too high and wide rounds too low: drafting when it does not
        pay. A width not seen yet uses the all-widths scale.
        Only finished rounds are used, so a round's plan never depends on its own tokens.
        """
        if not self.adapt:
            return
        modelled = self._verify_seconds(rows, width, tokens)
        if verify_elapsed > 0 and modelled > 0:
            ratio = verify_elapsed / modelled
            self.width_scales[width] = self._blend(width, self.verify_scale_at(width), ratio)
            self.verify_scale = self._blend("verify", self.verify_scale, ratio)
        modelled = self._drafter_seconds(drafted_rows)
        if drafted_rows > 0 and draft_elapsed > 0 and modelled > 0:
            self.draft_scale = self._blend("draft", self.draft_scale, draft_elapsed / modelled)
        if overhead is not None:
            kind = "plain" if width <= 1 and drafted_rows == 0 else "speculative"
            self.overhead[kind] = self._blend(kind, self.overhead.get(kind, 0.0), max(overhead, 0.0),
                                              bounds=(0.0, float("inf")), prior=False)

    def observe_gain(self, expected_tokens: float, model_seconds: float, committed_tokens: int, elapsed: float) -> None:
        """Learn from one finished round that verified draft tokens (only with ``adapt``) whether such
        rounds deliver what the plan expected: the model's rate (expected tokens over modelled
        seconds) against the realized one (committed tokens over measured seconds).

        The time scales correct the model's seconds; this corrects the whole bet, the tokens side too
        (survival predictions that were stale or optimistic, and the winner's curse of drafting exactly
        where the model looked best). ``hurdle`` is the running mean (then EMA) of expected over
        realized rate, kept in ``HURDLE_RANGE``: a round that verifies drafts must beat a plain step by
        that factor in the model, so rounds that realize less than a plain step stop being chosen
        (before it, algorithm1 at many requests committed fewer tokens per second than the engine
        without drafting; docs/serving.md). Past rounds only, like the time scales."""
        if not self.adapt or expected_tokens <= 0 or model_seconds <= 0 or elapsed <= 0:
            return
        realized = committed_tokens / elapsed
        ratio = (expected_tokens / model_seconds) / max(realized, _FLOOR)
        self.hurdle = self._blend("gain", self.hurdle, ratio, bounds=HURDLE_RANGE)

    def _blend(self, key, scale: float, ratio: float, bounds=None, prior: bool = True) -> float:
        """``scale`` after one more observed ``ratio``: the running mean while fewer than 1 / ADAPT_WEIGHT
        rounds were seen (starting from the model's own value as one observation unless ``prior`` is
        False), then the EMA."""
        seen = self.observed[key] = self.observed.get(key, 0) + 1
        weight = max(ADAPT_WEIGHT, 1 / (seen + prior))
        low, high = bounds or ADAPT_RANGE
        return min(max((1 - weight) * scale + weight * ratio, low), high)

    def round_seconds(self, rows: int, max_width: int, sunk_draft_seconds: float | None = None
                      ) -> Callable[[int, int, int], float]:
        """A :data:`hf_dspark.decoding.scheduling.RoundSeconds` for ``rows`` requests (widths up to ``max_width``).

        ``sunk_draft_seconds`` fixes the drafter term (the drafter already ran this round: its time
        is part of the round whatever is verified); otherwise it is ``drafter_seconds(drafted_rows)``.
        """
        padded = [0.0] + [self.verify.verify_seconds(w, batch_size=rows) for w in range(1, max_width + 1)]
        draft = [self.drafter_seconds(m) for m in range(rows + 1)]
        discount, hurdle = self.padding_discount, self.hurdle
        scales = [self.verify_scale_at(w) for w in range(max_width + 1)]
        plain_overhead, overhead = self.overhead_seconds(1, 0), self.overhead_seconds(2, 1)

        def seconds(width: int, tokens: int, drafted_rows: int) -> float:
            verify = scales[width] * max(padded[width] - discount * (rows * width - tokens), _FLOOR)
            if sunk_draft_seconds is not None:  # the drafter ran: only verifying drafts is a bet
                return (verify * hurdle if width > 1 else verify) + sunk_draft_seconds + overhead
            if width <= 1 and drafted_rows == 0:  # a plain decoding step
                return verify + plain_overhead
            return (verify + draft[drafted_rows] + overhead) * hurdle

        return seconds


ADAPT_WEIGHT = 0.1  # weight of the newest round in the adaptive scales
ADAPT_RANGE = (0.25, 4.0)
HURDLE_RANGE = (0.8, 2.0)


def measure_seconds(call: Callable[[], object], repeats: int = 5, warmup: int = 1, device=None) -> float:
    """Fastest wall time of ``call()`` over ``repeats`` runs after ``warmup`` untimed ones.

    The fastest, not the median: on a shared machine other jobs only ever add time, and the target's
    latency profile these times are combined with is an uncontended estimate too. On a CUDA ``device``
    each run is bracketed by synchronizations, so the time is the kernels' and not their launch."""
    cuda = device is not None and torch.device(device).type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        call()
    samples = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        call()
        sync()
        samples.append(time.perf_counter() - start)
    return min(samples)


def token_seconds(profile: LatencyProfile | None) -> float:
    """The profile's cost of one more real token per row at its largest batch size (infinite without
    two token counts there): an upper bound on anything a slot can save."""
    if profile is None or not profile.table:
        return float("inf")
    rows = max(profile.table)
    counts = sorted(profile.table[rows])
    if len(counts) < 2:
        return float("inf")
    return (profile.table[rows][counts[-1]] - profile.table[rows][counts[0]]) / (rows * (counts[-1] - counts[0]))
