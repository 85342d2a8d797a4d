"""The batched engine's two decisions per round: who runs the drafter, and how much each request verifies.

:class:`RoundPlanner` holds what the engine remembers between rounds (each request's latest survival
predictions, the prior, the last plan, the :class:`~hf_dspark.decoding.round_cost.RoundCost`) and asks
the engine's verification policy (an entry of
:data:`hf_dspark.models.dspark.policies_dspark.VERIFICATION_POLICY_MAPPING`) for both decisions:

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

from hf_dspark.decoding.round_cost import RoundCost
from hf_dspark.models.dspark.policies_dspark import VerificationPolicy
from hf_dspark.models.dspark.scheduling_dspark import best_padded_allocation

__all__ = ["RoundPlanner"]


class RoundPlanner:
    """Per-engine scheduling state; the decisions are the ``policy``'s (a :class:`VerificationPolicy`).

    Planning reads each request's prediction made ``policy.prediction_lag`` or more rounds earlier (its
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
    # (on the shipped Gemma 3 drafter, low and high stale predictions were followed by similar
    # acceptance). So a stale prediction counts with weight STALE_WEIGHT against the prior (smoothing,
    # not a verdict).
    STALE_WEIGHT = 0.25
    PREDICTION_TTL = 8
    PROBE_INTERVAL = 16
    PROBE_ROWS = 2
    DRAFT_PRIOR_ACCEPTANCE = 0.8
    DRAFT_PRIOR_WEIGHT = 1 / 16

    def __init__(self, policy: VerificationPolicy, block_size: int, cost: Callable[[], RoundCost]):
        self.policy = policy
        self.block_size = block_size
        self.cost = cost  # built (and timed) on first use by the engine
        self.prior = [self.DRAFT_PRIOR_ACCEPTANCE ** (j + 1) for j in range(block_size)]
        self.plan_counts: list[int] = []
        self.last_draft_round = -1

    # ---------------------------------------------------------------- memory
    def record(self, request, now: int, survival: list[float]) -> None:
        """``request`` drafted at round ``now`` with this prefix survival."""
        request.predictions.append((now, survival))
        del request.predictions[: -self.policy.prediction_lag]
        for j, value in enumerate(survival):
            self.prior[j] += self.DRAFT_PRIOR_WEIGHT * (value - self.prior[j])
        self.last_draft_round = now

    def prediction(self, request, now: int, limit: int) -> list[float]:
        """What the plan expects of the request's next block: its prediction made ``prediction_lag`` or
        more rounds before ``now`` (its latest such), shrunk toward the prior with weight
        ``STALE_WEIGHT``; the prior alone when there is none (or it is older than ``PREDICTION_TTL``).

        Keeping the last ``prediction_lag`` predictions is enough: at most ``lag - 1`` of them are
        too recent, so the latest old-enough one is among them."""
        lag = self.policy.prediction_lag
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
        """Rows that run the drafter this round, decided before any of this round's tokens exist
        (:meth:`VerificationPolicy.draft_rows` out of the rows with room to verify and no n-gram copy).

        ``ngram_survival[r]`` is the running estimate of a row that copies an n-gram this round (it
        never drafts), ``None`` otherwise."""
        candidates = [row for row, limit in enumerate(limits) if limit > 0 and ngram_survival[row] is None]
        return self.policy.draft_rows(self, candidates, requests, limits, ngram_survival, now, stats)

    def cost_plan(self, candidates: list[int], requests: Sequence, limits: list[int],
                  ngram_survival: list[list[float] | None], now: int, stats: dict) -> list[int]:
        """The plan of ``cost`` and ``async``: the best allocation of the right-padded round, drafter time
        included (:func:`~hf_dspark.models.dspark.scheduling_dspark.best_padded_allocation`), on each row's
        stale prediction; rows it gives no token do not draft, and when it gives none at all the round is a
        plain decoding step (but for a probe, see the class docstring). The allocation is kept
        (:attr:`plan_counts`): ``async`` verifies its total along the current ranking."""
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

    def draft_length(self, limit: int, request=None) -> int:
        """Draft tokens to produce for a drafting request (:meth:`VerificationPolicy.draft_length`)."""
        return self.policy.draft_length(self, request, limit)

    def schedule(self, survival, limits: list[int], drafted_rows: int, do_sample: bool, requests: Sequence = (),
                 proposed=None) -> list[int]:
        """Draft tokens each request verifies this round (:meth:`VerificationPolicy.verify_counts`, on the
        survival capped at each row's limit; never more than its limit)."""
        rows = [row[:limit] for row, limit in zip(survival, limits)]
        return self.policy.verify_counts(self, rows, limits, drafted_rows, do_sample, requests, proposed)
