"""The batched engine's two decisions per round: who runs the drafter, and how much each request verifies.

:class:`RoundPlanner` holds what the schedulers of :mod:`hf_dspark.decoding.batched` remember between
rounds (each request's latest survival predictions, the prior, the last plan) and makes both
decisions from a :class:`~hf_dspark.decoding.round_cost.RoundCost`:

* :meth:`RoundPlanner.plan`, before the drafter runs, from information fixed before any of the
  round's tokens exist (predictions of earlier rounds, n-gram estimates, the cost model);
* :meth:`RoundPlanner.schedule`, after it ran, from the current drafts' survival.

Why the ``async`` scheduler stays lossless with a search that has no early stop: its budget ``K``,
its width cap and the set of drafting requests come from :meth:`plan`, whose inputs are all fixed
before the current drafts were sampled; the current survival only ranks the candidates, and the
rank of ``(r, j)`` depends on nothing sampled at or after ``x_{r,j}`` (see
:func:`hf_dspark.decoding.scheduling.top_k_prefix`).
"""

from __future__ import annotations

from typing import Callable, Sequence

from hf_dspark.models.dspark.generation_dspark import threshold_length
from hf_dspark.decoding.round_cost import RoundCost
from hf_dspark.decoding.scheduling import best_padded_allocation, padded_schedule, top_k_prefix

__all__ = ["RoundPlanner"]


class RoundPlanner:
    """Per-engine scheduling state and decisions (``scheduler`` as in ``BatchedSpeculativeGenerator``).

    Planning reads each request's prediction made ``PREDICTION_LAG`` or more rounds earlier (its
    latest such), shrunk toward the prior; predictions older than ``PREDICTION_TTL`` rounds, and
    requests without any, use the prior alone: the mean survival the drafter predicted over the engine's past request-rounds
    (exponential average, weight ``DRAFT_PRIOR_WEIGHT`` for the newest), starting at
    ``DRAFT_PRIOR_ACCEPTANCE ** j``. The start is optimistic on purpose: a prior that never drafts
    would never learn otherwise. When the plan kept every request off the drafter for
    ``PROBE_INTERVAL`` rounds, ``PROBE_ROWS`` of the requests that could draft (taking turns) draft
    once, so that predictions and prior follow text that became easier to draft; when drafting never
    pays this costs one small drafter call per ``PROBE_INTERVAL`` rounds, whatever the batch size.
    """

    # A request's survival one or two blocks later is only loosely tied to its prediction for this block
    # (measured on the shipped Gemma 3 drafter: low and high stale predictions were followed by similar
    # acceptance). So a stale prediction counts with weight STALE_WEIGHT against the prior (smoothing,
    # not a verdict).
    STALE_WEIGHT = 0.25
    PREDICTION_LAG = {"algorithm1": 1, "async": 2}
    PREDICTION_TTL = 8
    PROBE_INTERVAL = 16
    PROBE_ROWS = 2
    DRAFT_PRIOR_ACCEPTANCE = 0.8
    DRAFT_PRIOR_WEIGHT = 1 / 16

    def __init__(self, scheduler: str, block_size: int, cost: Callable[[], RoundCost], confidence_threshold: float):
        self.scheduler = scheduler
        self.block_size = block_size
        self.cost = cost  # built (and timed) on first use by the engine
        self.confidence_threshold = confidence_threshold
        self.prior = [self.DRAFT_PRIOR_ACCEPTANCE ** (j + 1) for j in range(block_size)]
        self.plan_counts: list[int] = []
        self.last_draft_round = -1

    # ---------------------------------------------------------------- memory
    def record(self, request, now: int, survival: list[float]) -> None:
        """``request`` drafted at round ``now`` with this prefix survival."""
        request.predictions.append((now, survival))
        del request.predictions[: -self.PREDICTION_LAG.get(self.scheduler, 1)]
        for j, value in enumerate(survival):
            self.prior[j] += self.DRAFT_PRIOR_WEIGHT * (value - self.prior[j])
        self.last_draft_round = now

    def prediction(self, request, now: int, limit: int) -> list[float]:
        """What the plan expects of the request's next block: its prediction made ``PREDICTION_LAG`` or
        more rounds before ``now`` (its latest such), shrunk toward the prior with weight
        ``STALE_WEIGHT``; the prior alone when there is none (or it is older than ``PREDICTION_TTL``).

        Keeping the last ``PREDICTION_LAG`` predictions is enough: at most ``lag - 1`` of them are
        too recent, so the latest old-enough one is among them."""
        lag = self.PREDICTION_LAG[self.scheduler]
        stale = None
        for made_at, survival in reversed(request.predictions):
            if made_at <= now - lag:
                if now - made_at <= self.PREDICTION_TTL:
                    stale = survival
                break
        values = self.prior[:limit]
        if stale is not None:
            w = self.STALE_WEIGHT
            values = [w * a + (1 - w) * b for a, b in zip(stale[:limit], values)]
        # positions are averaged over different blocks (short blocks near max_new_tokens update only
        # their first positions), so the averages need not be monotone: survival must be
        out, running = [], 1.0
        for value in values:
            running = min(running, value)
            out.append(running)
        return out

    # ---------------------------------------------------------------- decisions
    def plan(self, requests: Sequence, limits: list[int], ngram_survival: list[list[float] | None], now: int,
             stats: dict) -> list[int]:
        """Rows that run the drafter this round, decided before any of this round's tokens exist.

        ``ngram_survival[r]`` is the running estimate of a row that copies an n-gram this round (it
        never drafts), ``None`` otherwise. ``full``/``threshold``: every other row with room to verify.
        ``algorithm1``/``async``: the best allocation of the right-padded round, drafter time included
        (:func:`~hf_dspark.decoding.scheduling.best_padded_allocation`), on each row's stale prediction; rows it
        gives no token do not draft, and when it gives none at all the round is a plain decoding step.
        The allocation is kept: ``async`` verifies its total along the current ranking."""
        candidates = [row for row, limit in enumerate(limits) if limit > 0 and ngram_survival[row] is None]
        if self.scheduler == "plain":
            return []
        if self.scheduler in ("full", "threshold"):
            return candidates
        predicted = [
            found if found is not None else (self.prediction(request, now, limit) if limit > 0 else [])
            for request, limit, found in zip(requests, limits, ngram_survival)
        ]
        seconds = self.cost().round_seconds(len(limits), 1 + self.block_size)
        plan = best_padded_allocation(predicted, seconds, needs_draft=[found is None for found in ngram_survival])
        self.plan_counts = plan
        draft_rows = [row for row in candidates if plan[row] > 0]
        if not draft_rows and candidates and now - self.last_draft_round >= self.PROBE_INTERVAL:
            first = (now // self.PROBE_INTERVAL) * self.PROBE_ROWS % len(candidates)  # take turns
            draft_rows = sorted((candidates[first:] + candidates[:first])[: self.PROBE_ROWS])
            stats["probe_request_rounds"] += len(draft_rows)
        stats["draft_skipped_request_rounds"] += len(candidates) - len(draft_rows)
        stats["draft_skipped_rounds"] += bool(candidates) and not draft_rows
        return draft_rows

    # algorithm1 drafts DRAFT_BEYOND_PLAN positions past the plan's widest request: its search on the
    # current survival may go further than the stale plan, but rarely far, and every drafted position
    # costs the drafter's LM head (32k x 640 per row and position) and a Markov step.
    DRAFT_BEYOND_PLAN = 1

    def draft_length(self, limit: int) -> int:
        """Draft tokens to produce for a drafting row. ``async`` never verifies past the plan's widest
        request, so the drafter's LM head and Markov loop stop there; ``algorithm1`` stops
        ``DRAFT_BEYOND_PLAN`` later; the others may verify up to ``limit``."""
        if self.scheduler in ("async", "algorithm1") and max(self.plan_counts, default=0) > 0:  # else: a probe
            extra = self.DRAFT_BEYOND_PLAN if self.scheduler == "algorithm1" else 0
            return min(limit, max(self.plan_counts) + extra)
        return limit

    def schedule(self, survival, limits: list[int], drafted_rows: int, do_sample: bool) -> list[int]:
        """Draft tokens each request verifies this round (never more than its limit).

        ``algorithm1``: the round-time objective with the drafter's time of this round sunk (it is spent
        whatever is verified); greedy takes the best allocation over every width cap (greedy output does
        not depend on the counts), sampling walks the admission path with Algorithm 1's early stop,
        which exactness needs. ``async``: the total the plan gave (from stale predictions, with its
        widest row as a cap), admitted along the current ranking."""
        if self.scheduler in ("full", "plain"):
            return list(limits)
        rows = [row[:limit] for row, limit in zip(survival, limits)]
        if self.scheduler == "threshold":
            return [threshold_length(row, self.confidence_threshold) if row else 0 for row in rows]
        if self.scheduler == "async":
            return top_k_prefix(rows, sum(self.plan_counts), max_count=max(self.plan_counts, default=0))
        cost = self.cost()
        seconds = cost.round_seconds(len(rows), 1 + self.block_size, sunk_draft_seconds=cost.drafter_seconds(drafted_rows))
        if not do_sample:
            return best_padded_allocation(rows, seconds)
        return padded_schedule(rows, seconds, early_stop=True)
