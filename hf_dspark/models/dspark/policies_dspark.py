"""Verification policies: one registry of the ways a round chooses how many proposed tokens to verify.

``DSparkGenerationConfig.verification_policy`` names an entry of :data:`VERIFICATION_POLICY_MAPPING`
(name -> class, as PEFT maps its types). ``generate(assistant_model=drafter)`` and the batched engine
(``hf_dspark.decoding.BatchedSpeculativeGenerator``) both look the name up here; an entry says where it
runs (:attr:`VerificationPolicy.runs_in`) and implements the length choices of those runners:

* ``generate`` (one request): :meth:`VerificationPolicy.submit_length`;
* the batched engine: :meth:`~VerificationPolicy.draft_rows` (who runs the drafter, decided before any
  of the round's tokens exist), :meth:`~VerificationPolicy.draft_length` and
  :meth:`~VerificationPolicy.verify_counts` (how many drafted tokens each request verifies).

The engine's state between rounds (stale predictions, the prior, the last plan, the round-time model)
lives in its ``RoundPlanner`` (``hf_dspark.decoding.round_plan``), passed to the engine methods as
``planner``. The math is in :mod:`scheduling_dspark`.

Entries: ``auto`` (``cost`` when a cost model is known, else ``full``), ``full``, ``threshold``,
``cost`` (the paper's Algorithm 1: batch-1 in ``generate``, over the right-padded batch in the engine),
and the engine-only ``async`` and ``plain``. hf-dspark registers ``oracle``
(``hf_dspark.decoding.oracle``) with :func:`register_verification_policy`. ``algorithm1`` is the
deprecated name of ``cost``.

Ships as remote code beside drafter checkpoints (imports: its siblings and the standard library only).
"""

from __future__ import annotations

import warnings
from typing import ClassVar, Sequence

from .errors import DSparkConfigError
from .scheduling_dspark import best_padded_allocation, padded_schedule, prefix_length, threshold_length, top_k_prefix

GENERATE, ENGINE = "generate", "engine"


class VerificationPolicy:
    """One way of choosing the verified lengths of a round; subclasses set :attr:`name` and override the
    methods of the runners they support. The defaults verify everything proposed (``full``).

    Args:
        confidence_threshold: the prefix-survival cut of ``threshold``.
        min_draft_tokens: the fewest draft tokens ``threshold`` and ``cost`` submit in ``generate``
            (``threshold`` in the engine too).
    """

    name: ClassVar[str] = ""
    runs_in: ClassVar[tuple[str, ...]] = (GENERATE, ENGINE)
    needs_confidence_head: ClassVar[bool] = False
    drafts: ClassVar[bool] = True  # False: the engine decodes plainly (no drafter, no n-gram rounds)
    greedy_only: ClassVar[bool] = False
    needs_reference: ClassVar[bool] = False  # each engine request needs ``reference=`` (the target's output)
    prediction_lag: ClassVar[int] = 1  # engine: how many rounds old the predictions a plan reads are

    def __init__(self, confidence_threshold: float = 0.3, min_draft_tokens: int = 1):
        self.confidence_threshold = float(confidence_threshold)
        self.min_draft_tokens = int(min_draft_tokens)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"

    def resolve(self, runner: str, cost_curve: bool, confidence_head: bool) -> VerificationPolicy:
        """The entry that actually runs (``auto`` picks one); ``cost_curve``: ``generate`` knows the target's
        latency curve; ``confidence_head``: the drafter predicts its acceptance."""
        return self

    # ---------------------------------------------------------------- generate (one request)
    def submit_length(self, survival: list[float], limit: int, round_seconds) -> int:
        """Draft tokens ``generate`` submits out of ``limit`` drafted ones with this prefix ``survival``;
        ``round_seconds(L)`` models a round verifying ``L`` tokens (``None`` before the drafter was timed)."""
        return limit

    # ---------------------------------------------------------------- the batched engine
    def draft_rows(self, planner, candidates: list[int], requests: Sequence, limits: list[int],
                   ngram_survival: list, now: int, stats: dict) -> list[int]:
        """Rows that run the drafter this round, out of ``candidates`` (rows with room and no n-gram copy)."""
        return candidates

    def draft_length(self, planner, request, limit: int) -> int:
        """Draft tokens to produce for a drafting request allowed ``limit``."""
        return limit

    def verify_counts(self, planner, survival: list[list[float]], limits: list[int], drafted_rows: int,
                      do_sample: bool, requests: Sequence, proposed) -> list[int]:
        """Tokens each row verifies (never more than its limit); ``survival`` is capped at the limits,
        ``proposed`` the round's proposals [rows, n] (a tensor)."""
        return list(limits)


# ----------------------------------------------------------------------------- the registry
VERIFICATION_POLICY_MAPPING: dict[str, type[VerificationPolicy]] = {}
DEPRECATED_POLICY_NAMES = {"algorithm1": "cost"}  # old name -> registered name, kept for one release


def register_verification_policy(cls: type[VerificationPolicy]) -> type[VerificationPolicy]:
    """Add ``cls`` to :data:`VERIFICATION_POLICY_MAPPING` under ``cls.name`` (usable as a decorator)."""
    if not (isinstance(cls, type) and issubclass(cls, VerificationPolicy)) or not cls.name:
        raise TypeError(f"{cls!r} must be a VerificationPolicy subclass with a name")
    VERIFICATION_POLICY_MAPPING[cls.name] = cls
    return cls


def policy_names(runner: str | None = None) -> list[str]:
    """Registered names (those that run in ``runner``, ``"generate"`` or ``"engine"``, when given)."""
    return [name for name, cls in VERIFICATION_POLICY_MAPPING.items() if runner is None or runner in cls.runs_in]


def canonical_policy_name(name: str, warn: bool = True) -> str:
    """``name``, or the registered name a deprecated one stands for (with a ``FutureWarning``)."""
    if name in DEPRECATED_POLICY_NAMES:
        new = DEPRECATED_POLICY_NAMES[name]
        if warn:
            warnings.warn(f"verification policy {name!r} is deprecated and will be removed in the next release; "
                          f"use {new!r} (the same rule)", FutureWarning, stacklevel=3)
        return new
    return name


def verification_policy_class(name: str, runner: str | None = None) -> type[VerificationPolicy]:
    """The registered class of ``name``; ``DSparkConfigError`` listing the registered names otherwise."""
    cls = VERIFICATION_POLICY_MAPPING.get(canonical_policy_name(name) if isinstance(name, str) else name)
    if cls is None:
        raise DSparkConfigError(f"verification policy {name!r} is not registered; choose one of {policy_names()}")
    if runner is not None and runner not in cls.runs_in:
        raise DSparkConfigError(
            f"verification policy {name!r} runs in the batched engine only; generate supports {policy_names(runner)}"
            if runner == GENERATE else
            f"verification policy {name!r} runs in generate only; the batched engine supports {policy_names(runner)}"
        )
    return cls


# ----------------------------------------------------------------------------- the entries
@register_verification_policy
class AutoPolicy(VerificationPolicy):
    """``cost`` when a cost model is known, else ``full``: in ``generate`` a latency curve of the target on
    its device and dtype; in the engine (which measures its own round-time model) a confidence head."""

    name = "auto"

    def resolve(self, runner, cost_curve, confidence_head):
        known = cost_curve if runner == GENERATE else confidence_head
        cls = CostPolicy if known else FullPolicy
        return cls(self.confidence_threshold, self.min_draft_tokens)


@register_verification_policy
class FullPolicy(VerificationPolicy):
    """Verify every proposed token."""

    name = "full"


@register_verification_policy
class ThresholdPolicy(VerificationPolicy):
    """Cut at the first position whose calibrated prefix survival falls below ``confidence_threshold``."""

    name = "threshold"
    needs_confidence_head = True

    def submit_length(self, survival, limit, round_seconds):
        return threshold_length(survival, self.confidence_threshold, self.min_draft_tokens)

    def verify_counts(self, planner, survival, limits, drafted_rows, do_sample, requests, proposed):
        return [threshold_length(row, self.confidence_threshold, self.min_draft_tokens) if row else 0
                for row in survival]


@register_verification_policy
class CostPolicy(VerificationPolicy):
    """The paper's hardware-aware prefix rule (Algorithm 1): verify what maximises the expected committed
    tokens per second of the round.

    ``generate``: :func:`~scheduling_dspark.prefix_length` with a round costing the measured drafter block
    plus ``T_verify(1 + L)`` of the latency curve (the whole block until the drafter was timed). The
    engine: before drafting, the best allocation of the right-padded round on stale predictions decides who
    drafts (``planner.cost_plan``); after, greedy decoding takes the best allocation over every width cap
    (its output does not depend on the counts) and sampling walks the admission path with the early stop,
    which exactness needs."""

    name = "cost"
    needs_confidence_head = True
    DRAFT_BEYOND_PLAN = 1  # the search on current survival may go a little past the stale plan's widest row

    def submit_length(self, survival, limit, round_seconds):
        if round_seconds is None:  # no draft timing yet: verify the whole block once
            return limit
        return prefix_length(survival, round_seconds, min(self.min_draft_tokens, len(survival)))

    def draft_rows(self, planner, candidates, requests, limits, ngram_survival, now, stats):
        return planner.cost_plan(candidates, requests, limits, ngram_survival, now, stats)

    def draft_length(self, planner, request, limit):
        widest = max(planner.plan_counts, default=0)
        return min(limit, widest + self.DRAFT_BEYOND_PLAN) if widest > 0 else limit  # else: a probe

    def verify_counts(self, planner, survival, limits, drafted_rows, do_sample, requests, proposed):
        cost = planner.cost()
        seconds = cost.round_seconds(len(survival), 1 + planner.block_size,
                                     sunk_draft_seconds=cost.drafter_seconds(drafted_rows))
        if not do_sample:
            return best_padded_allocation(survival, seconds)
        return padded_schedule(survival, seconds, early_stop=True)


@register_verification_policy
class AsyncPolicy(CostPolicy):
    """The paper's production variant of ``cost`` (engine only): the plan runs on predictions two rounds old
    and fixes who drafts, the budget ``K`` and a width cap; the current survival only ranks the candidates
    and the top ``K`` are verified (:func:`~scheduling_dspark.top_k_prefix`; lossless, Appendix A)."""

    name = "async"
    runs_in = (ENGINE,)
    prediction_lag = 2
    DRAFT_BEYOND_PLAN = 0  # never verifies past the plan's widest request

    def verify_counts(self, planner, survival, limits, drafted_rows, do_sample, requests, proposed):
        return top_k_prefix(survival, sum(planner.plan_counts), max_count=max(planner.plan_counts, default=0))


@register_verification_policy
class PlainPolicy(VerificationPolicy):
    """No drafting and no n-gram rounds (engine only): plain continuous-batching decoding, the baseline of
    ``hf-dspark bench-serve``."""

    name = "plain"
    runs_in = (ENGINE,)
    drafts = False

    def draft_rows(self, planner, candidates, requests, limits, ngram_survival, now, stats):
        return []
