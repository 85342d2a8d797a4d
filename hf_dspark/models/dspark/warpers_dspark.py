"""Logits warpers for DSpark sampling: top-k and top-p in one pass, and which warpers act per token.

This file ships as remote code next to drafter checkpoints (it imports only torch and transformers);
:mod:`generation_dspark` uses it in ``generate`` and the batched engine uses it too.
"""

from __future__ import annotations

import torch
from transformers.generation.logits_process import (
    LogitsProcessor,
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

# The two-stage search of ``top_scores``: rows are cut into chunks of this many scores, and a row is searched
# in two stages only when the chunks it keeps hold at most 1/16 of it.
TOP_SCORES_CHUNK = 128


def top_scores(scores: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.topk(scores, width, dim=-1)`` over [rows, V] scores: the ``width`` largest scores of each row,
    descending, and their token ids. The values are exactly topk's; among exactly equal scores the ids kept
    may differ (topk leaves that choice unspecified too).

    On the CPU, over a long row (Gemma's 262,144 scores) a single top-k is a slow scan, so it runs in two
    stages: the maximum of every chunk of ``TOP_SCORES_CHUNK`` scores, the ``width`` chunks with the largest
    maxima, and a top-k over those chunks' scores (plus the row's last, partial chunk). That is exact: a
    chunk holding one of the ``width`` largest scores has a maximum at least as large as the ``width``-th
    largest score, and at most ``width`` chunks do (each such maximum is one of those scores), ties counted
    as topk counts them. Elsewhere (GPU kernels select in one pass) it is ``torch.topk``."""
    vocab = scores.shape[-1]
    chunk = TOP_SCORES_CHUNK
    if scores.device.type != "cpu" or scores.dim() != 2 or vocab < 16 * width * chunk:
        return torch.topk(scores, width, dim=-1)
    rows, n_chunks = scores.shape[0], vocab // chunk
    whole = n_chunks * chunk
    chunks = scores[:, :whole].reshape(rows, n_chunks, chunk)  # a view unless the rows are strided
    best = torch.topk(chunks.amax(dim=-1), width, dim=-1, sorted=False).indices  # [rows, width]
    candidates = chunks.gather(1, best[:, :, None].expand(-1, -1, chunk)).flatten(1)
    ids = (best[:, :, None] * chunk + torch.arange(chunk, device=scores.device)).flatten(1)
    if whole < vocab:  # the last, partial chunk is always searched
        candidates = torch.cat([candidates, scores[:, whole:]], dim=1)
        ids = torch.cat([ids, torch.arange(whole, vocab, device=scores.device).expand(rows, -1)], dim=1)
    values, picked = torch.topk(candidates, width, dim=-1)
    return values, ids.gather(1, picked)


# transformers' TopPLogitsWarper sorts the whole vocabulary (Gemma: 262,144 entries; docs/experiments.md,
# "Sampling warpers", has the cost) even when a TopKLogitsWarper just left only k finite scores. Assisted decoding runs the
# processors once per verified position, so at sampling time a round of 8 positions spent more time
# sorting than in the draft. After top-k only its survivors can pass top-p, so the fused warper sorts
# just those. Top-k keeps every score tied with the k-th one; such ties are rare in fp32 logits but common
# in bf16 ones (8 mantissa bits), so the survivors are taken with their ties (a second top-k of the tied
# count) instead of falling back to the full sort. Among scores that are exactly equal, top-p cuts the
# lower-ranked ones first, and the fused warper ranks them by token id (lower id = kept first); torch.sort,
# which the pair relies on, leaves that order unspecified. That is the only case where the two can differ.
class FusedTopKTopPWarper(LogitsProcessor):
    """Drop-in replacement for ``[TopKLogitsWarper(k), TopPLogitsWarper(p)]`` applied in that order.

    A CPU fast path: one top-k of ``k`` scores, and a second one of the tied count only when scores tie
    with the k-th. It runs the pair itself, with no top-k of its own, where fusing saves no sort: on other
    devices (the host would wait for two reads) and when ``k`` covers the vocabulary; after its top-k, when
    fewer than ``k`` scores are finite or every score ties with the k-th (top-k keeps the whole vocabulary)."""

    @staticmethod
    def can_fuse(first, second) -> bool:
        # a finite filter value gives the entries top-k removed some probability inside top-p
        return (type(first) is TopKLogitsWarper and type(second) is TopPLogitsWarper
                and first.filter_value == second.filter_value == -float("inf"))

    def __init__(self, top_k_warper: TopKLogitsWarper, top_p_warper: TopPLogitsWarper):
        if not self.can_fuse(top_k_warper, top_p_warper):
            raise ValueError("only top-k and top-p warpers with filter_value=-inf can be fused")
        self.top_k_warper = top_k_warper
        self.top_p_warper = top_p_warper
        self.top_k = max(int(top_k_warper.top_k), int(top_k_warper.min_tokens_to_keep))
        self.top_p = float(top_p_warper.top_p)
        self.min_tokens_to_keep = int(top_p_warper.min_tokens_to_keep)
        self.filter_value = top_p_warper.filter_value

    def _reference(self, input_ids, scores):
        return self.top_p_warper(input_ids, self.top_k_warper(input_ids, scores))

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        vocab = scores.shape[-1]
        k = min(self.top_k, vocab)
        # The fused path reads two values on the host (any score left? how many ties?): free on the CPU, a
        # stall per call on an accelerator, where the pair's full sort is cheap and needs no such read.
        if k >= vocab or scores.device.type != "cpu":
            return self._reference(input_ids, scores)
        values, indices = top_scores(scores, k)  # descending
        kth = values[..., -1:]
        if not bool(torch.isfinite(kth).all()):
            return self._reference(input_ids, scores)  # fewer than k finite scores: top-k keeps -inf too
        kept = scores >= kth  # top-k's own rule: everything tied with the k-th score survives
        width = int(kept.sum(dim=-1).max())
        if width >= vocab:
            return self._reference(input_ids, scores)
        if width > k:
            values, indices = top_scores(scores, width)
            values = values.masked_fill(values < kth, self.filter_value)  # rows with fewer ties than the widest
        indices, kept = top_p_of_survivors(values, indices, self.top_p, self.min_tokens_to_keep, self.filter_value)
        return torch.full_like(scores, self.filter_value).scatter_(-1, indices, kept)


def top_p_of_survivors(values: torch.Tensor, indices: torch.Tensor, top_p: float, min_tokens_to_keep: int,
                       filter_value: float = -float("inf")) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-p over the survivors of top-k: ``values`` [rows, W] (``-inf`` for no survivor) at token ids
    ``indices``. Returns ``(indices, values)`` ascending by score, exact ties by descending token id (so
    lower ids are cut last), with the scores top-p removes set to ``filter_value``."""
    indices, by_id = indices.sort(dim=-1, descending=True)
    values = values.gather(-1, by_id)
    ascending, order = values.sort(dim=-1, stable=True)
    indices = indices.gather(-1, order)
    cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= (1 - top_p)
    remove[..., -min_tokens_to_keep:] = False
    return indices, ascending.masked_fill(remove, filter_value)


def fuse_top_k_top_p(processors) -> int:
    """Replaces, in place, each TopKLogitsWarper directly followed by a TopPLogitsWarper in ``processors``
    (a ``LogitsProcessorList``) with one :class:`FusedTopKTopPWarper`. Returns how many pairs it fused."""
    if processors is None:
        return 0
    fused, i = 0, 0
    while i + 1 < len(processors):
        if FusedTopKTopPWarper.can_fuse(processors[i], processors[i + 1]):
            processors[i:i + 2] = [FusedTopKTopPWarper(processors[i], processors[i + 1])]
            fused += 1
        i += 1
    return fused


# Warpers whose result on a token depends only on the scores, not on token ids or the prefix. For them,
# warping the draft-vocabulary logits equals warping the full-vocabulary logits (-inf outside the draft
# vocabulary) restricted to the draft vocabulary, at 1/8 of the cost for Gemma's 262k vocabulary.
VOCAB_LOCAL_WARPERS = (TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper, MinPLogitsWarper,
                       FusedTopKTopPWarper)


__all__ = ["FusedTopKTopPWarper", "TOP_SCORES_CHUNK", "VOCAB_LOCAL_WARPERS", "fuse_top_k_top_p", "top_p_of_survivors",
           "top_scores"]
