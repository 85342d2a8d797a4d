"""The scheduling ceiling: the batched engine verifying exactly the draft tokens the target accepts.

Every scheduler of :class:`~hf_dspark.decoding.batched.BatchedSpeculativeGenerator` guesses, from the
drafter's confidences and the round's time model, how much of each proposed block is worth
verifying. A scheduler that knew which tokens the target will accept would verify those and nothing
else: no rejected token would ever cost a slot, and no accepted one would be cut. In greedy decoding
that knowledge exists, it is the target's own output, so :class:`OracleSchedule` can run it given
that output (from a plain run of the same prompts).

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

The target still verifies every round as usual, so the output is exact whatever the references
say; a reference that differs from the target's greedy output only makes the oracle verify too
little from that point on (``bench-batch`` reports this as ``greedy_agreement_with_plain`` < 1).
"""

from __future__ import annotations

from typing import Sequence

import torch

from hf_dspark.decoding.batched import BatchedSpeculativeGenerator


class OracleSchedule(BatchedSpeculativeGenerator):
    """The engine with an oracle for a scheduler: each request verifies the longest prefix of its
    proposal that matches its reference output (greedy decoding only).

    Rows with an n-gram copy verify the copy and skip the drafter, as under every scheduler. Without
    ``draft_outcomes`` the other rows draft their whole block, and :attr:`draft_outcomes` collects how
    many drafted tokens the target accepted at each (prompt, position); with the table of an earlier
    run of the same requests, a row drafts only where that number is above zero, and only that many
    tokens. Takes :class:`BatchedSpeculativeGenerator`'s arguments except ``scheduler``.
    """

    def __init__(self, target, draft, draft_outcomes: dict | None = None, **kwargs):
        if "scheduler" in kwargs:
            raise ValueError("OracleSchedule chooses its own verification lengths; do not pass scheduler=")
        super().__init__(target, draft, scheduler="full", **kwargs)
        self._references: dict[int, list[int]] = {}
        self._known = draft_outcomes
        self.draft_outcomes: dict[tuple, int] = {}  # (prompt ids, anchor position) -> drafted tokens accepted
        self._drafting: list[int] = []

    def set_sampling(self, do_sample: bool = False, *args, **kwargs) -> None:
        if do_sample:
            raise ValueError(
                "OracleSchedule needs the output in advance, which only greedy decoding has (a sampled token is not "
                "known before it is drawn); use do_sample=False"
            )
        super().set_sampling(do_sample, *args, **kwargs)

    def add_request(self, prompt_ids, max_new_tokens: int, eos_token_id=None,
                    reference: Sequence[int] | None = None) -> int:
        """Queue a request with ``reference``, the target's greedy output for it (e.g. from plain ``generate``)."""
        if reference is None:
            raise ValueError(
                "OracleSchedule.add_request needs reference=, the target's greedy output for this prompt "
                "(e.g. the new tokens of target.generate(..., do_sample=False))"
            )
        request_id = super().add_request(prompt_ids, max_new_tokens, eos_token_id)
        self._references[request_id] = [int(t) for t in reference]
        return request_id

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, references: Sequence[Sequence[int]],
                 eos_token_id=None) -> list[list[int]]:
        """Greedy generation of every prompt, scheduled by its reference; returns the new tokens of each."""
        if len(references) != len(prompts):
            raise ValueError(f"got {len(references)} references for {len(prompts)} prompts; give one per prompt")
        self.set_sampling(False)
        ids = [self.add_request(p, max_new_tokens, eos_token_id, reference=r) for p, r in zip(prompts, references)]
        while self.has_unfinished():
            self.step()
        return [self.pop(i).output_ids for i in ids]

    def _key(self, row: int) -> tuple:
        request = self._active[row]
        return tuple(request.prompt_ids), request.anchor_position

    def _plan(self, limits: list[int]) -> list[int]:
        rows = super()._plan(limits)
        if self._known is not None:  # a row missing from the table (another path) drafts as usual
            rows = [row for row in rows if self._known.get(self._key(row), 1) > 0]
        self._drafting = rows
        return rows

    def _draft(self, draft_rows: list[int], limits: list[int]):
        if self._known is not None:
            limits = list(limits)
            for row in draft_rows:
                limits[row] = min(limits[row], self._known.get(self._key(row), limits[row]))
        return super()._draft(draft_rows, limits)

    def _schedule(self, survival, limits: list[int], drafted_rows: int = 0, tokens=None) -> list[int]:
        proposed = [[] for _ in limits] if tokens is None else tokens.tolist()
        counts = []
        for row, request in enumerate(self._active):
            wanted = self._references[request.request_id][len(request.output_ids):]
            limit = min(limits[row], len(wanted), len(proposed[row]))
            n = 0
            while n < limit and proposed[row][n] == wanted[n]:
                n += 1
            counts.append(n)
        for row in self._drafting:
            self.draft_outcomes[self._key(row)] = counts[row]
        return counts

    def pop(self, request_id: int):
        request = super().pop(request_id)
        self._references.pop(request_id, None)
        return request
