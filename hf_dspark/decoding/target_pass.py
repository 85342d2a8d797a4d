"""The target's side of a batched round: one right-padded forward over ragged KV caches, the verification of
every row, and the rollback of the slots of rejected tokens.

Ragged KV caches
----------------
After a round the rows have accepted different numbers of tokens, so their KV lengths differ,
and ``DynamicCache.crop`` crops every row equally. We never crop. Every forward appends the
same number of slots ``W`` to every row and :class:`RaggedSlots` records, per row and slot,
whether the slot holds a committed token (``valid``) and that token's position. Slots of
rejected drafts and of right-padding stay behind as garbage that no query can see, because
each forward gets

* explicit per-row ``position_ids`` that keep counting per row (a row's next token sits at
  ``prompt length + generated tokens - 1``, whatever its slot index), and
* an explicit 4-D mask built from the table: a query at position ``t`` sees the slots that are
  valid and hold a position ``<= t`` (and ``> t - sliding_window`` in sliding-window layers),
  plus its own slot (so padding queries always see something and stay finite).

Keys are stored after RoPE, so where a slot sits in the cache does not matter, only the mask
does. When garbage reaches :attr:`BatchedSpeculativeGenerator.compaction_slack` slots and a
quarter of the cache, the valid slots of every row are gathered to the right (``compact``);
leaving rows are dropped with ``index_select``; joining rows are left-padded to the running
length. The drafter's context cache is handled by the same table (a drafter call over some of the
rows works on a copy of their rows and merges the appended slots back, the other rows getting as
many invalid slots). The caches live in :mod:`hf_dspark.decoding.ragged`.

The target cache is a ``DynamicCache()`` built without a config: every layer is a plain
``DynamicLayer`` that keeps all slots, including layers the model runs with a sliding window
(a ``DynamicSlidingWindowLayer`` drops slots by count, which is wrong once garbage slots
exist; the window is applied by the mask instead). Row selection, merging and compaction
rewrite the layers' ``keys``/``values`` tensors. Masks are boolean for the ``sdpa`` attention
implementation and additive for ``eager``; models with sliding-window layers get the mapping
``{"full_attention": mask, "sliding_attention": mask}`` that transformers' models use as-is.

:class:`TargetVerification` is a part of :class:`hf_dspark.decoding.batched.BatchedSpeculativeGenerator`; its
methods work on the engine's target cache, attention settings, sampling settings and statistics.
"""

from __future__ import annotations

import time

import torch

from hf_dspark.decoding.batch_requests import SpeculativeRequest
from hf_dspark.decoding.packing import real_slots_only
from hf_dspark.decoding.ragged import RaggedSlots, TargetKV, ragged_causal_mask
from hf_dspark.decoding.round_cost import measure_seconds, token_seconds
from hf_dspark.decoding.verification import verify_rows_greedy, verify_rows_sampled

__all__ = ["TargetVerification"]


class TargetVerification:
    """The verification forward of a round and what the engine keeps of it."""

    _forward_seconds = 0.0  # the last verification forward's own time (for the time model)

    def _verify_forward(self, tokens: torch.Tensor, counts: list[int]):
        """Score ``[anchor, x_1 .. x_l]`` of every row in one target forward (right-padded); logits come
        back for the real tokens only, packed row after row ([sum(1 + counts), V])."""
        width = 1 + max(counts)
        # the round's per-row values reach the device in one copy: anchor, its position, the count
        packed = torch.tensor([[r.anchor, r.anchor_position, count] for r, count in zip(self._active, counts)],
                              device=self.device)
        ids = packed[:, :1] if width == 1 else torch.cat([packed[:, :1], tokens[:, : width - 1]], 1)
        offsets = torch.arange(width, device=self.device)
        positions = packed[:, 1:2] + offsets
        valid = offsets < 1 + packed[:, 2:3]  # columns past a row's count are padding (masked)
        first_new_slot = self._target_kv.slots.length
        start = time.perf_counter()
        logits, features = self._target_forward(self._target_kv, ids, positions, valid, logits_for=valid,
                                                padded=min(counts) < max(counts))
        self._forward_seconds = time.perf_counter() - start
        return logits, features, first_new_slot

    def _target_forward(self, kv: TargetKV, input_ids, positions, query_valid, logits_for=None, padded=True):
        """One target pass appending ``W`` slots per row; returns (logits of the ``logits_for`` slots,
        packed [N, V], or None; selected features [rows, W, C], or None for the plain scheduler).

        The LM head only sees the hidden states of the ``logits_for`` slots (a prefill needs none) and
        the target's per-slot layers only its ``query_valid`` slots
        (:func:`hf_dspark.decoding.packing.real_slots_only`): padding costs attention only. ``padded=False``
        says the caller knows every slot is real."""
        masks = self._attention_masks(kv.slots, query_valid, positions)
        keep = query_valid.new_zeros(query_valid.shape) if logits_for is None else logits_for
        # ``padded=False`` (known on the host): no padding slot to skip, and no mask to read back
        real = query_valid if padded else None
        with real_slots_only(self.target.get_output_embeddings(), keep, real, self._position_wise):
            out = self.target(
                input_ids=input_ids, attention_mask=masks, position_ids=positions, cache=kv.cache, use_cache=True,
                output_hidden_states=self.hidden_state_ids if self.policy.drafts else None, logits_to_keep=0,
            )
        kv.slots = kv.slots.append(query_valid, positions)
        features = None
        if self.policy.drafts:
            features = torch.cat([out.hidden_states[i] for i in self.hidden_state_ids], dim=-1)
        return (out.logits[0] if logits_for is not None else None), features

    def _attention_masks(self, slots: RaggedSlots, query_valid, positions):
        full = ragged_causal_mask(slots, query_valid, positions)
        sliding = ragged_causal_mask(slots, query_valid, positions, self._sliding_window) if self._sliding_window else full
        if not self._boolean_mask:
            dtype = next(self.target.parameters()).dtype
            lowest = torch.finfo(dtype).min
            full, sliding = (torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill_(~m, lowest) for m in (full, sliding))
        if self._layer_types is not None:
            return {"full_attention": full, "sliding_attention": sliding}
        return sliding if self._sliding_window else full


    def _accept(self, tokens, draft_probs, logits, features, counts, first_new_slot) -> list[SpeculativeRequest]:
        """Verify every row (:mod:`hf_dspark.decoding.verification`), commit the results, keep the slots and
        target features of the committed tokens."""
        width, count_tensor = 1 + max(counts), torch.tensor(counts, device=self.device)
        if self.sampling.do_sample:
            target_probs = torch.softmax(self._warpers(None, logits.float()), dim=-1)
            accepted, next_tokens = verify_rows_sampled(tokens, draft_probs, target_probs, counts, self._generator)
            n_kept = 1 + torch.tensor(accepted, device=self.device)
        else:
            kept, chosen = verify_rows_greedy(tokens[:, : width - 1], logits, count_tensor)
            n_kept = 1 + kept
            accepted, next_tokens = kept.tolist(), chosen.tolist()
        token_lists = tokens[:, : width - 1].tolist() if width > 1 else [[] for _ in counts]
        finished, now, stats, ngram_rows = [], time.perf_counter(), self.stats, self.ngram.rows
        for row, request in enumerate(self._active):
            n_accepted, next_token = accepted[row], next_tokens[row]
            committed = request._commit(token_lists[row][:n_accepted] + [next_token])
            if request.first_token_at is None and committed:
                request.first_token_at = now
            request.submitted.append(counts[row])
            request.accepted.append(n_accepted)
            request.committed.append(committed)
            request.anchor = next_token
            request.anchor_position += 1 + n_accepted
            if ngram_rows and ngram_rows[row]:
                self.ngram.record(counts[row], n_accepted)
            stats["accepted_histogram"][n_accepted] += 1
            stats["committed_tokens"] += committed
            if request.finished:
                request.finished_at = now
                finished.append(request)
        stats["accepted_draft_tokens"] += sum(accepted)
        if len(set(accepted)) > 1:
            stats["ragged_rounds"] += 1  # rows kept different numbers of slots this round
        if width > 1:  # the anchor and the accepted drafts are committed: keep their slots, drop the rest
            keep = torch.arange(width, device=self.device)[None, :] < n_kept[:, None]
            self._target_kv.slots.valid[:, first_new_slot:] &= keep
        # their target features are the drafter's context when the row drafts next
        if features is not None:
            self._pending.append(features, n_kept)
        return finished


    @torch.no_grad()
    def _time_padding(self, rows: int = 4, width: int = 8) -> float:
        """How much less a padding slot of a round costs than a real one (seconds, >= 0): the same
        forward timed with every slot real and with one real slot per row (fastest of 5 each), capped
        at the profile's cost of one more real token per row."""
        ids = torch.full((rows, width), self._PAD_ID, dtype=torch.long, device=self.device)
        positions = torch.arange(width, device=self.device).expand(rows, -1)

        def forward(valid):
            return lambda: self._target_forward(TargetKV(rows, self.device), ids, positions, valid, logits_for=valid)

        every, first = positions >= 0, positions == 0
        saved = (measure_seconds(forward(every), device=self.device)
                 - measure_seconds(forward(first), device=self.device)) / (rows * (width - 1))
        return max(min(saved, token_seconds(self.latency_profile)), 0.0)

