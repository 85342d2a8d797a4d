"""The drafter's batched call in the engine: one call over the rows that draft this round, whatever
their context lengths, then the Markov loop and, when sampling, the exact draft distributions.

The drafter runs batched over ragged contexts through ``DSparkDraftModel.backbone`` with an
explicit mask (the same computation as ``draft_block``; ``tests/decoding/test_batched.py`` checks that
the two agree row by row).

:class:`BatchedDrafting` is a part of :class:`hf_dspark.decoding.batched.BatchedSpeculativeGenerator`; its
methods work on the engine's drafter cache, pending features, planner and sampling settings.
"""

from __future__ import annotations

import torch

from hf_dspark.models.dspark.modeling_dspark import DSparkDraftCache
from hf_dspark.models.dspark.warpers_dspark import VOCAB_LOCAL_WARPERS
from hf_dspark.decoding.round_cost import measure_seconds

__all__ = ["BatchedDrafting"]


class BatchedDrafting:
    """Drafting for the rows the plan chose (the drafter's context is read from the engine's caches)."""

    def _draft(self, draft_rows: list[int], limits: list[int]):
        """One batched drafter call over ``draft_rows`` (ragged contexts, with any features they missed
        while not drafting), then the Markov loop.

        Returns, for every active row: draft tokens [rows, n] (zeros for rows that did not draft), their
        sampling distributions (a list with one [n_r, V] tensor per drafted row, None elsewhere; None when
        greedy), the prefix survival of each row (empty for rows that did not draft) and the most draft
        tokens each row may verify (0 for rows that did not draft)."""
        rows = len(self._active)
        drafted_limits = [0] * rows
        for row in draft_rows:
            drafted_limits[row] = self.planner.draft_length(limits[row], self._active[row])
        n = max(drafted_limits, default=0)
        empty_probs = None if not self.sampling.do_sample else [None] * rows
        if not draft_rows or n == 0:
            return torch.zeros(rows, 0, dtype=torch.long, device=self.device), empty_probs, [[] for _ in range(rows)], drafted_limits
        draft, K = self.draft, self.block_size
        every_row = len(draft_rows) == rows
        index = torch.tensor(draft_rows, dtype=torch.long, device=self.device)
        kv = self._draft_kv if every_row else self._draft_kv.subset(index)
        pending = self._pending if every_row else self._pending.select(index)
        requests = [self._active[row] for row in draft_rows]
        m = len(requests)
        anchors = torch.tensor([r.anchor for r in requests], device=self.device)
        anchor_pos = torch.tensor([r.anchor_position for r in requests], device=self.device)

        context = context_pos = None
        slots_after = kv.slots
        width = int(pending.lengths.max()) if m else 0
        if width > 0:
            features = pending.features[:, :width]
            offsets = torch.arange(width, device=self.device)
            context_valid = offsets < pending.lengths[:, None]
            context_pos = (anchor_pos - pending.lengths)[:, None] + offsets  # the tokens just before the anchor
            context = draft.project_context(features)
            slots_after = slots_after.append(context_valid, context_pos)
        mask = None
        if slots_after.length > 0:
            # block queries see every committed context row of their own request, and the whole block
            block = torch.ones(m, K, K, dtype=torch.bool, device=self.device)
            mask = torch.cat([slots_after.valid[:, None, :].expand(m, K, -1), block], -1)[:, None]
        block_pos = anchor_pos[:, None] + torch.arange(K, device=self.device)
        hidden = draft.backbone(draft.embed(draft.block_input_ids(anchors)), block_pos, context, context_pos, mask,
                                 kv.cache)
        kv.slots = slots_after
        if not every_row:
            self._draft_kv.merge_subset(index, kv)
        self._pending.consume(index)

        probs: list[torch.Tensor] = []
        hidden = hidden[:, :n]  # the block is drafted whole; the LM head and Markov loop run only where needed
        sub_tokens, _, confidence = draft.sample_block(draft.compute_logits(hidden), hidden, anchors,
                                                       choose=self._chooser(probs), num_tokens=n)
        tokens = sub_tokens if every_row else sub_tokens.new_zeros(rows, n).index_copy_(0, index, sub_tokens)
        survival = [[] for _ in range(rows)]
        if confidence is not None:
            predicted = torch.cumprod(draft.calibrated_confidence(confidence).float(), dim=-1).tolist()
            for row, request, values in zip(draft_rows, requests, predicted):
                survival[row] = values
                self.planner.record(request, self.stats["rounds"], values)
        draft_probs = empty_probs
        if probs:
            stacked = torch.stack(probs, dim=1)  # [m, n, V]
            for i, row in enumerate(draft_rows):
                draft_probs[row] = stacked[i]
        return tokens, draft_probs, survival, drafted_limits

    def _chooser(self, probs_out: list):
        """Markov-loop choice: greedy argmax over the draft vocabulary, or a draw from the draft logits
        processed by the target's warpers, whose exact distribution over the full vocabulary is kept for
        verification. With a reduced draft vocabulary and only vocabulary-local warpers (temperature,
        top-k, top-p, min-p) the warpers and the softmax run on the draft vocabulary and the result is
        scattered over the full one: the same distribution as warping the full vocabulary with -inf
        outside the draft vocabulary, without warping 262k scores per position (Gemma 3)."""
        if not self.sampling.do_sample:
            return None
        draft, vocab = self.draft, self.draft.config.vocab_size
        d2t, t2d = draft.draft_to_target, draft.target_to_draft_table()
        draft_space = d2t is not None and all(type(w) in VOCAB_LOCAL_WARPERS for w in self._warpers)

        def choose(logits_k: torch.Tensor, k: int):
            scores = logits_k.float()
            if draft_space:
                p_draft = torch.softmax(self._warpers(None, scores), dim=-1)
                draft_ids = torch.multinomial(p_draft, 1, generator=self._generator).squeeze(-1)
                probs_out.append(p_draft.new_zeros(p_draft.shape[0], vocab).index_copy_(1, d2t, p_draft))
                return draft_ids, scores
            if d2t is not None:
                scores = scores.new_full((scores.shape[0], vocab), float("-inf")).index_copy_(1, d2t, scores)
            scores = self._warpers(None, scores)
            p = torch.softmax(scores, dim=-1)
            token = torch.multinomial(p, 1, generator=self._generator).squeeze(-1)
            probs_out.append(p)
            return (token if t2d is None else t2d[token]), scores

        return choose


    @torch.no_grad()
    def _time_drafter(self, rows: int, context: int = 4) -> float:
        """Time of one drafter call for ``rows`` requests (``context`` new features each; fastest of 5)."""
        draft, K = self.draft, self.block_size
        features = torch.randn(rows, context, draft.config.context_size, device=self.device)
        anchors = torch.full((rows,), self._PAD_ID, dtype=torch.long, device=self.device)
        positions = torch.arange(context, device=self.device).expand(rows, -1)
        block_pos = context + torch.arange(K, device=self.device).expand(rows, -1)

        def call():
            hidden = draft.backbone(draft.embed(draft.block_input_ids(anchors)), block_pos,
                                     draft.project_context(features), positions, None, DSparkDraftCache(
                                         draft.config.num_hidden_layers))
            _, _, confidence = draft.sample_block(draft.compute_logits(hidden), hidden, anchors,
                                                  choose=self._chooser([]), num_tokens=K)
            if confidence is not None:
                torch.cumprod(draft.calibrated_confidence(confidence).float(), dim=-1).tolist()

        return measure_seconds(call, device=self.device)

