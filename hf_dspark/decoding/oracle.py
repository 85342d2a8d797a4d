"""The scheduling ceiling: the batched engine verifying exactly the draft tokens the target accepts.

Every scheduler of :class:`~hf_dspark.decoding.batched.BatchedSpeculativeGenerator` guesses, from the
drafter's confidences and the round's time model, how much of each proposed block is worth
verifying. A scheduler that knew which tokens the target will accept would verify those and nothing
else: no rejected token would ever cost a slot, and no accepted one would be cut. In greedy decoding
that knowledge exists, it is the target's own output, so :class:`OraclePolicy` (the registered
verification policy ``"oracle"``) can run it given that output (from a plain run of the same prompts).

It is a measuring instrument, not a decoder, since it needs the answer before it starts. A second
run can also skip the drafter perfectly: a row whose block the target would reject from its first
token commits the same single token whether it drafted or not, so the rounds, and every request's
path through them, stay the same when exactly those rows skip the drafter. The first run records,
per request and position, how many drafted tokens the target accepted (``draft_outcomes``); a run
given that table drafts only where that number is above zero, and only that many tokens. Its
throughput bounds what any scheduler could reach with the same drafter, n-gram setting and machine:
better confidences, a better time model or a better search can close the gap between a scheduler
and the oracle, and nothing more. ``hf-dspark bench-batch --methods plain oracle ...`` measures both
runs beside plain ``generate``.

Use::

    engine = BatchedSpeculativeGenerator(target, draft, DSparkGenerationConfig(verification_policy="oracle"))
    outputs = engine.generate(prompts, max_new_tokens, references=plain_outputs)
    table = engine.policy.draft_outcomes  # for a second run: engine.policy.known_outcomes = table

The target still verifies every round as usual, so the output is exact whatever the references
say; a reference that differs from the target's greedy output only makes the oracle verify too
little from that point on (``bench-batch`` reports this as ``greedy_agreement_with_plain`` < 1).
"""

from __future__ import annotations

from typing import Sequence

from hf_dspark.decoding.batched import BatchedSpeculativeGenerator
from hf_dspark.decoding.engine_config import warn_deprecated
from hf_dspark.models.dspark.generation_config_dspark import DSparkGenerationConfig
from hf_dspark.models.dspark.policies_dspark import ENGINE, FullPolicy, register_verification_policy

__all__ = ["OraclePolicy", "OracleSchedule"]


@register_verification_policy
class OraclePolicy(FullPolicy):
    """Each request verifies the longest prefix of its proposal that matches its reference output (the
    engine's ``add_request(..., reference=)``; greedy decoding only).

    Rows with an n-gram copy verify the copy and skip the drafter, as under every policy. Without
    :attr:`known_outcomes` the other rows draft their whole block, and :attr:`draft_outcomes` collects how
    many drafted tokens the target accepted at each (prompt, position); given the table of an earlier run of
    the same requests, a row drafts only where that number is above zero, and only that many tokens.
    """

    name = "oracle"
    runs_in = (ENGINE,)
    greedy_only = True
    needs_reference = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.known_outcomes: dict | None = None
        self.draft_outcomes: dict[tuple, int] = {}  # (prompt ids, anchor position) -> drafted tokens accepted
        self._drafting: list = []  # keys of this round's drafting rows

    @staticmethod
    def _key(request) -> tuple:
        return tuple(request.prompt_ids), request.anchor_position

    def draft_rows(self, planner, candidates, requests, limits, ngram_survival, now, stats):
        rows = candidates
        if self.known_outcomes is not None:  # a row missing from the table (another path) drafts as usual
            rows = [row for row in rows if self.known_outcomes.get(self._key(requests[row]), 1) > 0]
        self._drafting = [(row, self._key(requests[row])) for row in rows]
        return rows

    def draft_length(self, planner, request, limit):
        if self.known_outcomes is None:
            return limit
        return min(limit, self.known_outcomes.get(self._key(request), limit))

    def verify_counts(self, planner, survival, limits, drafted_rows, do_sample, requests, proposed):
        tokens = [[] for _ in limits] if proposed is None else proposed.tolist()
        counts = []
        for row, request in enumerate(requests):
            wanted = request.reference[len(request.output_ids):]
            limit = min(limits[row], len(wanted), len(tokens[row]))
            n = 0
            while n < limit and tokens[row][n] == wanted[n]:
                n += 1
            counts.append(n)
        for row, key in self._drafting:
            self.draft_outcomes[key] = counts[row]
        return counts


class OracleSchedule(BatchedSpeculativeGenerator):
    """Deprecated alias: ``BatchedSpeculativeGenerator(target, draft,
    DSparkGenerationConfig(verification_policy="oracle"))``, with ``draft_outcomes`` given to
    ``engine.policy.known_outcomes`` and read from ``engine.policy.draft_outcomes``. Kept for one release."""

    def __init__(self, target, draft, draft_outcomes: dict | None = None, **kwargs):
        warn_deprecated("OracleSchedule", "use BatchedSpeculativeGenerator(target, draft, "
                        "DSparkGenerationConfig(verification_policy='oracle')) and engine.policy.draft_outcomes")
        if "scheduler" in kwargs:
            raise ValueError("OracleSchedule chooses its own verification lengths; do not pass scheduler=")
        config = DSparkGenerationConfig(**{**kwargs.pop("generation_config", DSparkGenerationConfig()).to_diff_dict(),
                                           "verification_policy": "oracle"})
        super().__init__(target, draft, config, **kwargs)
        self.policy.known_outcomes = draft_outcomes

    @property
    def draft_outcomes(self) -> dict:
        return self.policy.draft_outcomes

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, references: Sequence[Sequence[int]],
                 eos_token_id=None) -> list[list[int]]:
        return super().generate(prompts, max_new_tokens, eos_token_id=eos_token_id, references=references)
