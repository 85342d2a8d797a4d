"""Speculative sampling on the warpers' support: the accept/reject rule without full-vocabulary tensors.

Ships as remote code next to drafter checkpoints (imports: torch, transformers and its siblings only).

With top-k sampling (Gemma's and Qwen3's generation configs: top-k 64 / 20, then top-p), the processed
distribution of every position is non-zero on at most ``k`` tokens (plus the scores tied with the k-th).
transformers' assisted decoding nevertheless warps each verified position over the whole vocabulary (one
processor call per position), takes two full-vocabulary softmaxes and draws the replacement token from a
full-vocabulary residual; for a 262,144-token vocabulary that is more work than the drafter. Here the same
laws are computed on their support only:

* :class:`SupportWarp` recognises a processor chain whose result is a finite support (optional temperature,
  then top-k, then optional top-p, or the fused top-k/top-p warper) and computes each row's law as
  ``(token ids [rows, W], probabilities [rows, W])`` from one batched top-k (``warpers_dspark.top_scores``); the probabilities are
  the chain's softmax on its survivors, ties with the k-th score included (top-k keeps them all);
* :class:`ProposalLaw` holds what each proposed token was drawn from in the same sparse form (a drafter's
  warped draft-vocabulary law, or a one-hot law for copied tokens);
* :func:`speculative_sample` is the accept/reject rule of speculative sampling on those laws: accept
  ``x_j`` with probability ``min(1, p_j(x_j) / q_j(x_j))`` left to right, draw the replacement of the first
  rejection from ``normalize(max(p - q, 0))`` (non-zero only on ``p``'s support) or the bonus token from
  ``p_{n+1}``. The emitted tokens follow the target's processed distribution exactly, as in the
  full-vocabulary rule.

:mod:`generate_hook_dspark` routes transformers' ``_speculative_sampling`` here for the rounds a
:class:`~generation_dspark.DSparkCandidateGenerator` prepared (see :func:`begin_round`); every other call
goes to transformers' function unchanged.
"""

from __future__ import annotations

import dataclasses
import threading

import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from .warpers_dspark import FusedTopKTopPWarper, top_p_of_survivors, top_scores

# Scores fetched beyond the k-th by the first top-k: ties with the k-th score usually fit in them, so a
# second, wider top-k is needed only when the last fetched score still ties with the k-th.
TIE_ROOM = 8


@dataclasses.dataclass(frozen=True)
class SupportWarp:
    """A temperature / top-k / top-p chain computed on its support (see the module docstring)."""

    top_k: int
    temperature: float | None = None
    top_p: float | None = None
    min_tokens_to_keep: int = 1

    @classmethod
    def from_processors(cls, processors) -> SupportWarp | None:
        """The chain ``processors`` applies, or ``None`` when it is not [temperature] top-k [top-p] (in that
        order, filter value ``-inf``): then the caller keeps the full-vocabulary path."""
        temperature = top_k = top_p = None
        keep, stage = 1, 0  # stage: 0 before anything, 1 after temperature, 2 after top-k, 3 after top-p
        for processor in processors if processors is not None else ():
            kind = type(processor)
            if kind is TemperatureLogitsWarper and stage == 0:
                temperature, stage = float(processor.temperature), 1
            elif kind is TopKLogitsWarper and stage <= 1 and processor.filter_value == -float("inf"):
                top_k, stage = int(processor.top_k), 2
            elif kind is TopPLogitsWarper and stage == 2 and processor.filter_value == -float("inf"):
                top_p, keep, stage = float(processor.top_p), int(processor.min_tokens_to_keep), 3
            elif kind is FusedTopKTopPWarper and stage <= 1:
                top_k, top_p, keep, stage = processor.top_k, processor.top_p, processor.min_tokens_to_keep, 3
            else:
                return None
        if top_k is None:  # (TopKLogitsWarper itself refuses a top_k below 1)
            return None
        return cls(top_k=top_k, temperature=temperature, top_p=top_p, min_tokens_to_keep=keep)

    def law(self, scores: torch.Tensor, keep_ties: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's processed distribution on its support: ``(ids [rows, W], probs [rows, W])``.

        ``scores``: [rows, V] raw scores (float32, as transformers' processors receive them). Entries of a
        row beyond its support have probability 0 (their ids are valid tokens, never drawn).
        ``keep_ties=False`` keeps exactly ``k`` scores, ties with the k-th broken by the top-k: no host
        read, and a valid law to draw proposals from (exactness only needs the law a token was drawn from,
        which then is this one), but not the target's law when the k-th score ties.
        """
        scores = scores.float()
        if self.temperature is not None:
            scores = scores / self.temperature  # the temperature warper's own operation
        vocab = scores.shape[-1]
        k = min(self.top_k, vocab)
        width = min(k + TIE_ROOM, vocab) if keep_ties else k
        values, ids = top_scores(scores, width)  # descending
        kth = values[:, k - 1:k]
        # top-k keeps every score tied with the k-th; if the last fetched one ties, fetch them all
        if keep_ties:
            if width < vocab and bool((values[:, -1] >= kth[:, 0]).any()):
                width = int((scores >= kth).sum(-1).max())
                values, ids = top_scores(scores, width)
            values = values.masked_fill(values < kth, -float("inf"))
        if self.top_p is not None:  # in the fused warper's order: exact ties cut by descending id
            ids, values = top_p_of_survivors(values, ids, self.top_p, self.min_tokens_to_keep)
        return ids, values.softmax(dim=-1)


@dataclasses.dataclass
class ProposalLaw:
    """What each of ``n`` proposed tokens was drawn from, on its support: ``ids`` / ``probs`` [n, W]
    (target vocabulary ids; probability 0 pads a row)."""

    ids: torch.Tensor
    probs: torch.Tensor

    @classmethod
    def one_hot(cls, tokens: torch.Tensor) -> ProposalLaw:
        """Deterministic proposals (copied tokens): ``q = 1`` at each token."""
        tokens = tokens.reshape(-1, 1)
        return cls(tokens, torch.ones(tokens.shape, dtype=torch.float32, device=tokens.device))

    @classmethod
    def concat(cls, laws: list[ProposalLaw]) -> ProposalLaw:
        if len(laws) == 1:
            return laws[0]
        width = max(law.ids.shape[1] for law in laws)
        ids = [torch.nn.functional.pad(law.ids, (0, width - law.ids.shape[1])) for law in laws]
        probs = [torch.nn.functional.pad(law.probs, (0, width - law.probs.shape[1])) for law in laws]
        return cls(torch.cat(ids), torch.cat(probs))

    def to(self, device) -> ProposalLaw:
        return ProposalLaw(self.ids.to(device), self.probs.to(device))

    def at(self, rows: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """``q_row(token)`` for matching entries of ``rows`` [m] and ``tokens`` [m, t]: [m, t]."""
        ids, probs = self.ids[rows], self.probs[rows]
        match = tokens[:, :, None] == ids[:, None, :]
        return (match * probs[:, None, :]).sum(-1)


def speculative_sample(proposed: torch.Tensor, proposal: ProposalLaw, target_scores: torch.Tensor,
                       warp: SupportWarp) -> tuple[torch.Tensor, int]:
    """One round's accept/reject draw on sparse laws.

    Args:
        proposed: [n] proposed tokens (target ids).
        proposal: their laws ``q_1 .. q_n``.
        target_scores: [n + 1, V] the target's raw scores at the anchor and after each proposed token.
        warp: the processor chain that turns scores into the target's laws ``p_1 .. p_{n+1}``.

    Returns the emitted tokens ([k + 1]: the accepted prefix and one target token) and ``k``. Randomness
    comes from torch's global generator, as in transformers' sampling.
    """
    n = proposed.shape[0]
    ids, probs = warp.law(target_scores)  # [n + 1, W]
    device = ids.device
    proposed = proposed.to(device)
    proposal = proposal.to(device)
    accepted = 0
    if n:
        rows = torch.arange(n, device=device)
        p_x = (probs[:n] * (ids[:n] == proposed[:, None])).sum(-1)
        q_x = proposal.at(rows, proposed[:, None])[:, 0]
        # accept x_j with probability min(1, p_j(x_j) / q_j(x_j)); q_j(x_j) > 0 since x_j was drawn from q_j
        keep = torch.rand(n, device=device) < p_x / q_x.clamp(min=torch.finfo(q_x.dtype).tiny)
        accepted = int(keep.long().cumprod(0).sum())
    law = probs[accepted]
    if accepted < n:
        # first rejection at x_{k+1}: its replacement follows normalize(max(p - q, 0)), zero off p's support
        q_on_p = proposal.at(torch.tensor([accepted], device=device), ids[accepted][None])[0]
        residual = (law - q_on_p).clamp(min=0)
        # (torch.multinomial normalises the weights itself; an empty residual means a rejection of probability 0)
        law = torch.where(residual.sum() > 0, residual, law)
    token = ids[accepted, torch.multinomial(law, 1)]
    return torch.cat([proposed[:accepted], token]), accepted


# ----------------------------------------------------------------------------- the hand-over from generate
# A DSpark candidate generator that verifies on the support hands transformers a placeholder instead of
# full-vocabulary candidate logits ([1, n, 0]) and leaves the round's laws here, per thread; the hook's
# ``_speculative_sampling`` takes them back for that placeholder.
_ROUNDS = threading.local()


@dataclasses.dataclass
class SupportRound:
    proposal: ProposalLaw
    warp: SupportWarp


def begin_round(proposal: ProposalLaw, warp: SupportWarp, device) -> torch.Tensor:
    """Leave one round's laws for the verification and return the placeholder candidate logits."""
    _ROUNDS.pending = SupportRound(proposal, warp)
    return torch.empty((1, proposal.ids.shape[0], 0), device=device)


def take_round(candidate_logits) -> SupportRound | None:
    """The laws :func:`begin_round` left for this placeholder (``None`` for real candidate logits)."""
    pending = getattr(_ROUNDS, "pending", None)
    if pending is None or candidate_logits is None or candidate_logits.shape[-1] != 0:
        return None
    _ROUNDS.pending = None
    return pending


def clear_round() -> None:
    _ROUNDS.pending = None


__all__ = ["SupportWarp", "ProposalLaw", "SupportRound", "speculative_sample", "begin_round", "take_round",
           "clear_round", "TIE_ROOM"]
