"""Oracle proposals at a chosen acceptance: the drafter runs, its tokens are replaced (``bench-oracle``).

Every speed-up we report mixes two things: how good the drafter is (its acceptance length tau) and
how much the implementation costs around it (drafter time, verification, bookkeeping). To see the
second alone, :class:`OracleCandidateGenerator` (``generate``) and :class:`OracleProposalEngine` (the
batched engine) run the real drafter every round, its backbone block and Markov loop, so its cost
is paid, and then overwrite the proposed block with tokens whose acceptance is known in advance:
the first ``tau - 1`` are the target's own greedy continuation (from a plain ``generate`` run), the
rest are deliberately wrong (``(true + 1) mod V``). Each full round then accepts exactly ``tau - 1``
draft tokens plus the target's own token: tau is set, not measured, and the time per round is what
the implementation costs at that tau.

Both verify every proposal with the target as usual, so the output is still the target's greedy
output whatever the references say (``bench-oracle`` checks it equals plain ``generate``).

Resynchronisation. In bf16/fp16 a multi-token verification pass can round differently from plain
``generate``'s one-token pass, so at a near-tie the committed sequence may take another token than the
reference. From there the reference continues a prefix that was not committed, its tokens are no longer
what the target predicts, and tau would collapse to 1 for the rest of the sequence. So before each draft
the committed tokens are compared with the reference; where they differ, the reference is recomputed by
plain greedy ``generate`` from the committed prefix (:func:`greedy_continuation`). That time is marked
``resync`` on the clock, so the benchmark can leave it out of the timed run, and :attr:`resyncs` counts
the recomputations. The check reads the committed tokens on the host once per round in ``generate``
(transformers' assisted loop has already waited for the device by then: it sliced the accepted tokens by
a count it read back); the engine keeps them on the host anyway.

:class:`RoundClock` splits the time of a run into drafting, verification, prefill and the rest
without adding host synchronisations: on CUDA it records events on the current stream and reads
them once at the end, elsewhere it reads ``time.perf_counter``.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence

import torch

from hf_dspark.decoding.batched import BatchedSpeculativeGenerator
from hf_dspark.models.dspark.generation_config_dspark import DSparkGenerationConfig
from hf_dspark.models.dspark.generation_dspark import DSparkCandidateGenerator

__all__ = [
    "OracleCandidateGenerator",
    "OracleProposalEngine",
    "RoundClock",
    "departure",
    "greedy_continuation",
    "oracle_block",
    "padded_references",
]


class RoundClock:
    """Labelled marks on one timeline; :meth:`totals` sums each interval under the label that opened it.

    On CUDA the marks are timing events on the current stream (no host sync when marking; one
    ``synchronize`` in :meth:`totals`), so the intervals are the device's timeline: an interval where
    the device waited for the host (a host-bound Markov loop) counts as the time the host took."""

    def __init__(self, device: torch.device | str):
        self.cuda = torch.device(device).type == "cuda"
        self.marks: list[tuple[str, object]] = []

    def mark(self, label: str) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append((label, event))
        else:
            self.marks.append((label, time.perf_counter()))

    def totals(self) -> dict[str, float]:
        """Seconds per label (the last mark closes the timeline)."""
        if self.cuda:
            torch.cuda.synchronize()
        out: dict[str, float] = defaultdict(float)
        for (label, start), (_, end) in zip(self.marks, self.marks[1:]):
            out[label] += start.elapsed_time(end) / 1e3 if self.cuda else end - start
        return dict(out)


def padded_references(references: Sequence[Sequence[int]], pad: int, device, min_width: int = 0) -> torch.Tensor:
    """``[R, max(max_len + pad, min_width)]`` long tensor of the references, right-padded with -1 (never a token)."""
    width = max(max((len(r) for r in references), default=0) + pad, min_width)
    out = torch.full((len(references), width), -1, dtype=torch.long)
    for row, ref in enumerate(references):
        out[row, : len(ref)] = torch.tensor(list(ref), dtype=torch.long)
    return out.to(device)


def oracle_block(reference: torch.Tensor, positions: torch.Tensor, length: int, tau: int, vocab_size: int) -> torch.Tensor:
    """Proposals of ``length`` tokens per row: the true next ``tau - 1`` tokens, then wrong ones.

    ``reference`` is ``[R, L]`` (the target's greedy new tokens, -1 past their end), ``positions`` ``[R]``
    how many new tokens each row has committed. A wrong token is ``(true + 1) mod V``, never the true
    one; past the reference's end any token is wrong (generation has stopped there) and 0 is used."""
    offsets = torch.arange(length, device=reference.device)
    index = (positions[:, None] + offsets).clamp(max=reference.shape[1] - 1)
    true = reference.gather(1, index)
    wrong = torch.where(true >= 0, (true + 1) % vocab_size, torch.zeros_like(true))
    return torch.where(offsets < tau - 1, true.clamp(min=0), wrong)


def departure(committed: Sequence[int], reference: Sequence[int]) -> int | None:
    """First position where ``committed`` (the new tokens so far) leaves ``reference``, or None if it follows it.

    Running past the reference's end counts as leaving it at the end (the reference stopped there)."""
    for position, (token, expected) in enumerate(zip(committed, reference)):
        if token != expected:
            return position
    return len(reference) if len(committed) > len(reference) else None


@torch.no_grad()
def greedy_continuation(target, prefix: Sequence[int], max_new_tokens: int, memo: dict | None = None) -> list[int]:
    """The target's plain greedy ``generate`` continuation of ``prefix`` (the same call as the reference run).

    ``memo`` (a dict, optional) keeps continuations by prefix: runs at several tau usually part from the
    reference at the same near-tie, and the continuation of the same prefix is the same."""
    if max_new_tokens <= 0:
        return []
    key = (tuple(prefix), max_new_tokens)
    if memo is not None and key in memo:
        return list(memo[key])
    device = next(target.parameters()).device
    ids = torch.tensor([list(prefix)], dtype=torch.long, device=device)
    out = target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False)
    continuation = out[0, ids.shape[1]:].tolist()
    if memo is not None:
        memo[key] = continuation
    return list(continuation)


class OracleCandidateGenerator(DSparkCandidateGenerator):
    """:class:`DSparkCandidateGenerator` whose proposals are replaced by an oracle block after drafting.

    Use through the drafter's public extension point, for one prompt at a time::

        draft.candidate_generator_class = functools.partial(OracleCandidateGenerator, reference=new_tokens,
                                                             tau=4, clock=RoundClock(device))

    ``reference`` holds the target's greedy new tokens for the prompt that ``generate`` receives next.
    The drafter's policy should be ``full`` so that every round submits the whole block. When the
    committed tokens leave the reference, it is recomputed from the committed prefix (clock label
    ``resync``); :attr:`resyncs` counts those recomputations. ``continuations``: an optional memo shared
    between runs (see :func:`greedy_continuation`)."""

    def __init__(self, *args, reference: Sequence[int], tau: int, clock: RoundClock | None = None,
                 continuations: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if tau < 1:
            raise ValueError(f"tau={tau} must be >= 1 (1 = every draft token rejected)")
        self.tau = int(tau)
        self.clock = clock
        self.target = kwargs.get("target_model", args[0] if args else None)
        input_ids = kwargs.get("input_ids")
        self.reference_device = input_ids.device if input_ids is not None else self.draft.device
        self._set_reference(list(reference))
        self.prompt_length = None if input_ids is None else input_ids.shape[1]
        self.continuations = continuations
        self.resyncs = 0
        self.stats["oracle_resyncs"] = 0

    def _set_reference(self, reference: list[int]) -> None:
        self.reference_ids = reference  # host copy, for the departure check
        self.reference = padded_references([reference], self.block_size + 1, self.reference_device)

    def _mark(self, label: str) -> None:
        if self.clock is not None:
            self.clock.mark(label)

    def _resync_if_departed(self, input_ids: torch.LongTensor) -> None:
        """Recompute the reference from the committed prefix if the committed tokens have left it."""
        ids = input_ids[0].tolist()  # the instrument's one host read per round
        committed = ids[self.prompt_length:]
        if departure(committed, self.reference_ids) is None:
            return
        self._mark("resync")
        continuation = greedy_continuation(self.target, ids, self.max_length - len(ids), self.continuations)
        self._set_reference(committed + continuation)
        self.resyncs += 1
        self.stats["oracle_resyncs"] = self.resyncs

    @torch.no_grad()
    def get_candidates(self, input_ids, model_kwargs=None, model_outputs=None, is_first_iteration=False,
                       n_last_matches=0, **kwargs):
        if self.prompt_length is None:
            self.prompt_length = input_ids.shape[1]
        if not is_first_iteration:
            self._mark("oracle")
            self._resync_if_departed(input_ids)
        self._mark("other" if is_first_iteration else "draft")
        candidates, logits = super().get_candidates(input_ids, model_kwargs=model_kwargs, model_outputs=model_outputs,
                                                    is_first_iteration=is_first_iteration,
                                                    n_last_matches=n_last_matches, **kwargs)
        length = candidates.shape[1] - input_ids.shape[1]
        if length > 0:
            self._mark("oracle")
            position = torch.tensor([input_ids.shape[1] - self.prompt_length], device=self.reference.device)
            block = oracle_block(self.reference, position, length, self.tau, self.vocab_size)
            candidates[:, input_ids.shape[1]:] = block.to(candidates.device)
        self._mark("prefill" if is_first_iteration else "verify")
        return candidates, logits

    def update_candidate_strategy(self, input_ids, scores, num_matches):
        self._mark("other")
        super().update_candidate_strategy(input_ids, scores, num_matches)


class OracleProposalEngine(BatchedSpeculativeGenerator):
    """The batched engine (scheduler ``full``) with oracle proposals at acceptance ``tau`` (greedy only).

    Every row with room runs the drafter, then its block is replaced by :func:`oracle_block` of its
    reference, and the whole block is verified. ``clock`` (a :class:`RoundClock`) is marked around
    prefill, drafting, the oracle overwrite and the verification forward, and ``resync`` around the
    recomputation of a reference its request's committed tokens have left (:attr:`resyncs` counts them;
    ``continuations`` is an optional memo, see :func:`greedy_continuation`). Takes
    :class:`BatchedSpeculativeGenerator`'s arguments except ``scheduler``."""

    def __init__(self, target, draft, tau: int, clock: RoundClock | None = None, continuations: dict | None = None,
                 **kwargs):
        if "scheduler" in kwargs:
            raise ValueError("OracleProposalEngine verifies whole blocks; do not pass scheduler=")
        if tau < 1:
            raise ValueError(f"tau={tau} must be >= 1 (1 = every draft token rejected)")
        super().__init__(target, draft, DSparkGenerationConfig(verification_policy="full"), **kwargs)
        self.tau = int(tau)
        self.clock = clock
        self._reference_rows: dict[int, torch.Tensor] = {}
        self._reference_ids: dict[int, list[int]] = {}  # host copies, for the departure check
        self.continuations = continuations
        self.resyncs = 0

    def _mark(self, label: str) -> None:
        if self.clock is not None:
            self.clock.mark(label)

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, references: Sequence[Sequence[int]],
                 eos_token_id=None) -> list[list[int]]:
        """Greedy generation of every prompt with oracle proposals from its reference; new tokens of each."""
        if len(references) != len(prompts):
            raise ValueError(f"got {len(references)} references for {len(prompts)} prompts; give one per prompt")
        self._set_sampling(dict(do_sample=False, temperature=1.0, top_k=None, top_p=None), None)
        # wide enough for a recomputed reference of max_new_tokens (see _resync_departed)
        padded = padded_references(references, self.block_size + 1, self.device, max_new_tokens + self.block_size + 1)
        ids = []
        for row, prompt in enumerate(prompts):
            request_id = self.add_request(prompt, max_new_tokens, eos_token_id)
            self._reference_rows[request_id] = padded[row]
            self._reference_ids[request_id] = list(references[row])
            ids.append(request_id)
        while self.has_unfinished():
            self.step()
        return [self.pop(i).output_ids for i in ids]

    def set_sampling(self, do_sample: bool = False, *args, **kwargs) -> None:
        if do_sample:
            raise ValueError("oracle proposals come from the target's greedy output; use do_sample=False")
        super().set_sampling(do_sample, *args, **kwargs)

    def _prefill(self, joining):
        self._mark("prefill")
        super()._prefill(joining)
        self._mark("other")

    def _resync_departed(self) -> None:
        """Recompute the reference of every active request whose committed tokens have left it."""
        for request in self._active:
            reference = self._reference_ids[request.request_id]
            if departure(request.output_ids, reference) is None:
                continue
            self._mark("resync")
            continuation = greedy_continuation(self.target, request.prompt_ids + request.output_ids, request.remaining,
                                               self.continuations)
            reference = request.output_ids + continuation
            self._reference_ids[request.request_id] = reference
            # every row keeps the width of the others (rows are stacked); room for max_new_tokens was made
            width = self._reference_rows[request.request_id].shape[0]
            self._reference_rows[request.request_id] = padded_references([reference], 0, self.device, width)[0]
            self.resyncs += 1
            self._mark("oracle")

    def _draft(self, draft_rows: list[int], limits: list[int]):
        self._mark("oracle")
        self._resync_departed()
        self._mark("draft")
        tokens, draft_probs, survival, limits = super()._draft(draft_rows, limits)
        self._mark("oracle")
        if tokens.shape[1] > 0:
            reference = torch.stack([self._reference_rows[r.request_id] for r in self._active])
            positions = torch.tensor([len(r.output_ids) for r in self._active], device=self.device)
            tokens = oracle_block(reference, positions, tokens.shape[1], self.tau, self.draft.config.vocab_size)
        self._mark("other")
        return tokens, draft_probs, survival, limits

    def _verify_forward(self, tokens, counts):
        self._mark("verify")
        out = super()._verify_forward(tokens, counts)
        self._mark("other")
        return out

    def pop(self, request_id: int):
        request = super().pop(request_id)
        self._reference_rows.pop(request_id, None)
        self._reference_ids.pop(request_id, None)
        return request
