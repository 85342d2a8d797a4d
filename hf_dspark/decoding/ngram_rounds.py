"""N-gram rounds of the batched engine: rows that copy earlier tokens instead of drafting.

A request whose last ``ngram_max_size`` .. ``ngram_min_size`` tokens occurred earlier in its prompt or
output can submit the tokens that followed them (:func:`hf_dspark.models.dspark.generation_dspark.ngram_continuation`)
instead of a drafted block: the copy costs no drafter call, and when sampling its proposal law is
one-hot at the copied token (exact speculative sampling with ``q = 1`` there).

The schedulers need, before the round's tokens exist, how likely each copied token is to survive:
:meth:`NgramRounds.survival` is the acceptance n-gram proposals had so far at each position, from
past rounds only (with a prior), so every cut stays non-anticipating. How many tokens a row copies is
the plan's count for it (:meth:`hf_dspark.decoding.round_plan.RoundPlanner.plan`, the same cost model as
drafting); a row the plan gives nothing copies nothing and decodes one plain token.
"""

from __future__ import annotations

import torch

from hf_dspark.models.dspark.scheduling_dspark import ngram_continuation

__all__ = ["NgramRounds"]


class NgramRounds:
    """Per-engine n-gram state: this round's matches and the running acceptance of copied tokens.

    Args:
        lookup_tokens: most tokens a row copies (0 turns n-gram rounds off).
        sizes: ``(ngram_max_size, ngram_min_size)``.
        stats: the engine's counters; the ``ngram_*`` ones are read and updated here.
    """

    # Before any evidence an n-gram proposal is believed to survive each position with probability
    # PRIOR_ACCEPTANCE (copied tokens are usually accepted), worth PRIOR_WEIGHT observed attempts. A low
    # prior would make the scheduler never verify copied tokens, and so never learn better.
    PRIOR_ACCEPTANCE = 0.9
    PRIOR_WEIGHT = 4.0

    def __init__(self, lookup_tokens: int, sizes: tuple[int, int], stats: dict):
        self.lookup_tokens = lookup_tokens
        self.sizes = sizes
        self.stats = stats
        self.found: list[torch.Tensor | None] = []  # this round's copy per row (None: no match)

    @property
    def rows(self) -> list[bool]:
        return [found is not None for found in self.found]

    def survival(self, length: int) -> list[float]:
        """Prefix survival of an n-gram proposal from past n-gram rounds only (per position, with a prior)."""
        attempted, accepted = self.stats["ngram_position_attempted"], self.stats["ngram_position_accepted"]
        survival, running = [], 1.0
        for k in range(length):
            running *= (accepted[k] + self.PRIOR_ACCEPTANCE * self.PRIOR_WEIGHT) / (attempted[k] + self.PRIOR_WEIGHT)
            survival.append(running)
        return survival

    def lookup(self, requests, limits: list[int]) -> None:
        """Before planning: the continuation of each row's last tokens, if they occurred before."""
        found = [None] * len(limits)
        if self.lookup_tokens > 0:
            for row, request in enumerate(requests):
                if limits[row] > 0:
                    sequence = torch.tensor(request.prompt_ids + request.output_ids)
                    found[row] = ngram_continuation(sequence, min(self.lookup_tokens, limits[row]), *self.sizes)
        self.found = found

    def planned(self) -> list[list[float] | None]:
        """Survival estimate of each row's copy (None for rows without one), for the plan."""
        return [None if found is None else self.survival(found.shape[0]) for found in self.found]

    def keep(self, counts: list[int]) -> None:
        """The plan's copy length per row: a copy is cut to it, and a row given nothing copies nothing."""
        self.found = [None if found is None or count == 0 else found[:count] for found, count in zip(self.found, counts)]

    def proposals(self, tokens: torch.Tensor, draft_probs, survival, limits, vocab_size: int):
        """Put the copied tokens of the rows with a copy in place of a drafted block (a one-hot ``q`` when
        sampling). Returns the four per-round values of the engine's ``_draft``."""
        if not any(self.rows):
            return tokens, draft_probs, survival, limits
        limits, survival = list(limits), [list(row) for row in survival]
        width = max(found.shape[0] for found in self.found if found is not None)
        if tokens.shape[1] < width:
            tokens = torch.cat([tokens, tokens.new_zeros(tokens.shape[0], width - tokens.shape[1])], 1)
        for row, found in enumerate(self.found):
            if found is None:
                continue
            n, found = found.shape[0], found.to(tokens.device)
            limits[row] = n
            tokens[row, :n] = found
            if draft_probs is not None:  # q is one-hot at the copied token
                q = torch.zeros(n, vocab_size, device=tokens.device)
                q[torch.arange(n, device=tokens.device), found] = 1
                draft_probs[row] = q
            survival[row] = self.survival(n)
        return tokens, draft_probs, survival, limits

    def record(self, submitted: int, n_accepted: int) -> None:
        """One verified copy: ``submitted`` tokens, the first ``n_accepted`` accepted."""
        stats = self.stats
        stats["ngram_request_rounds"] += 1
        stats["ngram_verified_tokens"] += submitted
        stats["ngram_accepted_tokens"] += n_accepted
        for k in range(min(n_accepted + 1, submitted)):
            stats["ngram_position_attempted"][k] += 1
        for k in range(n_accepted):
            stats["ngram_position_accepted"][k] += 1
