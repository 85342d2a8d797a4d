"""Requests entering and leaving the batched engine: the queue, admission with a batched prefill, cancellation,
and the rows of finished requests dropped from the caches (which are compacted once garbage piles up).

:class:`RequestAdmission` is a part of :class:`hf_dspark.decoding.batched.BatchedSpeculativeGenerator`; its
methods work on the engine's state (``_queue``, ``_active``, ``_requests``, the caches and pending features).
"""

from __future__ import annotations

import time
from collections import deque
from typing import Sequence

import torch

from hf_dspark.decoding.batch_requests import SpeculativeRequest, checked_prompt, prefill_groups
from hf_dspark.decoding.ragged import DraftKV, PendingFeatures, TargetKV
from hf_dspark.errors import EngineRequestError

__all__ = ["RequestAdmission"]


class RequestAdmission:
    """The request queue of the batched engine and the batch's membership."""

    # Compact a cache once its garbage slots reach both this many slots and this fraction of its length.
    compaction_slack = 16
    compaction_fraction = 0.25
    _PAD_ID = 0  # fills right-padding in prefill batches: any in-vocabulary id, the mask hides it

    def add_request(self, prompt_ids: Sequence[int] | torch.Tensor, max_new_tokens: int,
                    eos_token_id: int | Sequence[int] | None = None, reference: Sequence[int] | None = None) -> int:
        """Queue a request; it joins the batch at the next ``step()`` with room. Returns its id.

        ``eos_token_id=None`` uses ``target.generation_config.eos_token_id`` (as ``generate`` does).
        ``reference``: the target's greedy output for this prompt, which the ``oracle`` policy schedules by."""
        prompt = self._checked_prompt(prompt_ids, "prompt_ids")
        self._check_reference(reference)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise EngineRequestError(f"max_new_tokens={max_new_tokens!r} must be an int >= 0")
        if eos_token_id is None:
            eos_token_id = getattr(self.target.generation_config, "eos_token_id", None)
        eos = frozenset() if eos_token_id is None else frozenset(
            [int(eos_token_id)] if isinstance(eos_token_id, int) else [int(t) for t in eos_token_id]
        )
        request = SpeculativeRequest(self._next_id, prompt, max_new_tokens, eos, added_at=time.perf_counter(),
                                     reference=None if reference is None else [int(t) for t in reference])
        self._next_id += 1
        self._requests[request.request_id] = request
        if max_new_tokens == 0:
            request.finish_reason = "length"
            request.started_at = request.finished_at = request.added_at
        else:
            self._queue.append(request)
        return request.request_id

    def _check_reference(self, reference) -> None:
        if self.policy.needs_reference and reference is None:
            raise ValueError(
                f"verification_policy={self.policy.name!r}: add_request needs reference=, the target's greedy output "
                "for this prompt (e.g. the new tokens of target.generate(..., do_sample=False))"
            )

    def _checked_prompt(self, prompt_ids, name: str) -> list[int]:
        return checked_prompt(prompt_ids, self.target.get_input_embeddings().num_embeddings, name)

    def has_unfinished(self) -> bool:
        return bool(self._active or self._queue)

    def request(self, request_id: int) -> SpeculativeRequest:
        return self._requests[request_id]

    def pop(self, request_id: int) -> SpeculativeRequest:
        """Remove a finished request from the engine and return it."""
        request = self._requests[request_id]
        if not request.finished:
            raise ValueError(f"request {request_id} has not finished yet")
        return self._requests.pop(request_id)


    def cancel_all(self, reason: str = "cancelled") -> list[SpeculativeRequest]:
        """Drop every request in flight (queued or in the batch) and return them, finished with ``reason``.

        ``step()`` calls it with ``"error"`` when a round fails half-way, since the caches of the rows in
        the batch no longer match their requests; requests added afterwards decode normally."""
        dropped = [*self._active, *self._queue]
        now = time.perf_counter()
        for request in dropped:
            request.finish_reason = reason
            request.finished_at = now
            self._requests.pop(request.request_id, None)
        self._active, self._queue = [], deque()
        self._reset_state()
        return dropped


    PREFILL_PADDING_SLACK = 0.25  # see batch_requests.prefill_groups
    PREFILL_MIN_TOKENS = 256

    def _admit(self) -> None:
        """Prefill queued requests (all but their last prompt token) and add them to the batch."""
        room = self.max_batch_size - len(self._active)
        joining = [self._queue.popleft() for _ in range(min(room, len(self._queue)))]
        lengths = [len(r.prompt_ids) - 1 for r in joining]
        for group in prefill_groups(lengths, self.PREFILL_PADDING_SLACK, self.PREFILL_MIN_TOKENS):
            self._prefill([joining[i] for i in group])

    def _prefill(self, joining: list[SpeculativeRequest]) -> None:
        start = time.perf_counter()
        lengths = torch.tensor([len(r.prompt_ids) - 1 for r in joining], device=self.device)
        width = int(lengths.max())
        kv = TargetKV(len(joining), self.device)
        joined = PendingFeatures.empty(len(joining), self._pending.features.shape[2], self._pending.features.dtype,
                                       self.device)
        if width > 0:
            ids = torch.full((len(joining), width), self._PAD_ID, dtype=torch.long, device=self.device)
            for row, request in enumerate(joining):
                ids[row, : len(request.prompt_ids) - 1] = torch.tensor(request.prompt_ids[:-1], device=self.device)
            positions = torch.arange(width, device=self.device).expand(len(joining), -1)
            valid = positions < lengths[:, None]
            _, features = self._target_forward(kv, ids, positions, valid)
            if features is not None:
                joined = PendingFeatures(features.to(joined.features.dtype), lengths)
        self._target_kv.extend(kv)
        self._draft_kv.extend(DraftKV(len(joining), self.device, self.draft.config.num_hidden_layers))
        self._pending = self._pending.extend(joined)
        now = time.perf_counter()
        for request in joining:
            request.anchor = request.prompt_ids[-1]
            request.anchor_position = len(request.prompt_ids) - 1
            request.started_at = now
        self._active.extend(joining)
        self.stats["prefill_seconds"] += now - start
        self.stats["prefill_forwards"] += width > 0


    def _retire(self, finished: list[SpeculativeRequest]) -> None:
        if finished:
            keep = [row for row, r in enumerate(self._active) if not r.finished]
            rows = torch.tensor(keep, dtype=torch.long, device=self.device)
            for kv in (self._target_kv, self._draft_kv):
                kv.keep_rows(rows)
            self._pending = self._pending.select(rows)
            self._active = [self._active[row] for row in keep]
        for kv in (self._target_kv, self._draft_kv):
            garbage = kv.slots.garbage()
            if garbage > 0 and garbage >= max(self.compaction_slack, self.compaction_fraction * kv.slots.length):
                kv.compact()
                self.stats["compactions"] += 1
