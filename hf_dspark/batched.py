"""Batched speculative decoding with a DSpark drafter: many requests, one target forward per round.

transformers' assisted generation runs one sequence at a time. :class:`BatchedSpeculativeGenerator`
serves many requests with continuous batching. Each round:

1. one batched drafter call drafts a block for every active request (the anchor, i.e. the last
   committed token, followed by mask tokens; the Markov loop samples the tokens);
2. the scheduler chooses how many draft tokens each request verifies: ``"full"`` (the whole
   block), ``"threshold"`` (cut where the calibrated prefix survival falls below a threshold)
   or ``"algorithm1"`` (:func:`hf_dspark.scheduling.prefix_schedule`, the paper's
   hardware-aware scheduler fed with the prefix survival of every request and the target's
   measured steps per second at the number of tokens in the batch; greedy decoding, whose
   output does not depend on the verified lengths, uses the best allocation along the whole
   admission path instead, :func:`hf_dspark.scheduling.global_search_schedule`);
3. ONE target forward scores ``[anchor, x_1 .. x_l]`` of every request, right-padded to the
   longest row;
4. :func:`hf_dspark.verification.verify_block` accepts/rejects per request (exact speculative
   sampling, or argmax matching for greedy decoding); the target features of the anchor and the
   accepted tokens become the drafter's new context next round;
5. requests that produced EOS or reached ``max_new_tokens`` (possibly in the middle of a
   block: the tokens after that point are dropped) leave; queued requests join (their prompt
   is prefilled in one extra forward) before the next round.

With ``ngram_lookup_tokens > 0`` a request whose last tokens occurred earlier in its prompt or
output submits the tokens that followed them instead of its drafted block (n-gram rounds, as in
:mod:`hf_dspark.generation_dspark`; a one-hot proposal when sampling). The drafter still drafts
every row, so its context cache stays in step. The schedulers see, for such a row, the
acceptance n-gram proposals had so far at each position (a running estimate from past rounds
only, so the cut stays non-anticipating).

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
length. The drafter's context cache is handled by the same table.

The target cache is a ``DynamicCache()`` built without a config: every layer is a plain
``DynamicLayer`` that keeps all slots, including layers the model runs with a sliding window
(a ``DynamicSlidingWindowLayer`` drops slots by count, which is wrong once garbage slots
exist; the window is applied by the mask instead). Row selection, merging and compaction
rewrite the layers' ``keys``/``values`` tensors. Masks are boolean for the ``sdpa`` attention
implementation and additive for ``eager``; models with sliding-window layers get the mapping
``{"full_attention": mask, "sliding_attention": mask}`` that transformers' models use as-is.

The drafter runs batched over ragged contexts through ``DSparkDraftModel._backbone`` with an
explicit mask (the same computation as ``draft_block``; ``tests/test_batched.py`` checks that
the two agree row by row).
"""

from __future__ import annotations

import functools
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
from transformers import DynamicCache, LogitsProcessorList
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from .generation_dspark import (
    activate_verify_head,
    check_ngram_settings,
    fuse_top_k_top_p,
    ngram_continuation,
    threshold_length,
)
from .modeling_dspark import DSparkDraftCache
from .scheduling import global_search_schedule, prefix_schedule
from .verification import verify_block

logger = logging.getLogger(__name__)

SCHEDULERS = ("algorithm1", "full", "threshold")
SUPPORTED_ATTENTION = ("sdpa", "eager")
SUPPORTED_LAYER_TYPES = ("full_attention", "sliding_attention")

__all__ = [
    "BatchedSpeculativeGenerator",
    "SpeculativeRequest",
    "SamplingSettings",
    "RaggedSlots",
    "SCHEDULERS",
    "add_arguments",
    "run",
]


# --------------------------------------------------------------------------------------
# requests and settings
# --------------------------------------------------------------------------------------
@dataclass
class SamplingSettings:
    """How tokens are chosen; the same warpers process the draft and the target distributions."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        if self.do_sample and not self.temperature > 0:
            raise ValueError(f"temperature={self.temperature!r} must be > 0 when do_sample=True (use do_sample=False for greedy)")
        if self.top_k is not None and (isinstance(self.top_k, bool) or int(self.top_k) != self.top_k or self.top_k < 0):
            raise ValueError(f"top_k={self.top_k!r} must be None or an int >= 0 (0 or None disables it)")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p!r} must be None or in (0, 1] (1 or None disables it)")

    def warpers(self) -> LogitsProcessorList:
        """transformers' own warpers, in the order ``generate`` applies them."""
        warpers = LogitsProcessorList()
        if not self.do_sample:
            return warpers
        if self.temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(self.temperature))
        if self.top_k:
            warpers.append(TopKLogitsWarper(int(self.top_k)))
        if self.top_p is not None and self.top_p < 1.0:
            warpers.append(TopPLogitsWarper(float(self.top_p)))
        return warpers


@dataclass
class SpeculativeRequest:
    """One request: its prompt, what it generated so far, and per-round verification statistics."""

    request_id: int
    prompt_ids: list[int]
    max_new_tokens: int
    eos_token_ids: frozenset[int]
    output_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "eos" or "length"
    submitted: list[int] = field(default_factory=list)  # draft tokens verified, per round
    accepted: list[int] = field(default_factory=list)  # draft tokens accepted, per round
    committed: list[int] = field(default_factory=list)  # tokens appended to output_ids, per round
    added_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    # engine state: the last committed token (no KV yet) and its position
    anchor: int = 0
    anchor_position: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def remaining(self) -> int:
        return self.max_new_tokens - len(self.output_ids)

    def tokens_per_second(self) -> float:
        """Generated tokens over the time from joining the batch to finishing."""
        if self.started_at is None or self.finished_at is None or self.finished_at <= self.started_at:
            return 0.0
        return len(self.output_ids) / (self.finished_at - self.started_at)

    def _commit(self, tokens: Iterable[int]) -> int:
        """Append tokens until EOS (kept) or max_new_tokens; returns how many were appended."""
        count = 0
        for token in tokens:
            if self.finished:
                break
            self.output_ids.append(int(token))
            count += 1
            if int(token) in self.eos_token_ids:
                self.finish_reason = "eos"
            elif len(self.output_ids) >= self.max_new_tokens:
                self.finish_reason = "length"
        return count


# --------------------------------------------------------------------------------------
# ragged caches
# --------------------------------------------------------------------------------------
class RaggedSlots:
    """Bookkeeping of a ragged KV cache: ``valid[r, s]`` says whether slot ``s`` of row ``r`` holds
    a committed token, ``positions[r, s]`` is that token's position. Both are [rows, slots]."""

    def __init__(self, valid: torch.Tensor, positions: torch.Tensor):
        self.valid = valid
        self.positions = positions

    @classmethod
    def empty(cls, rows: int, device) -> "RaggedSlots":
        return cls(torch.zeros(rows, 0, dtype=torch.bool, device=device), torch.zeros(rows, 0, dtype=torch.long, device=device))

    @property
    def rows(self) -> int:
        return self.valid.shape[0]

    @property
    def length(self) -> int:
        return self.valid.shape[1]

    def append(self, valid: torch.Tensor, positions: torch.Tensor) -> "RaggedSlots":
        return RaggedSlots(torch.cat([self.valid, valid], 1), torch.cat([self.positions, positions], 1))

    def select(self, rows: torch.Tensor) -> "RaggedSlots":
        return RaggedSlots(self.valid.index_select(0, rows), self.positions.index_select(0, rows))

    def left_pad(self, length: int) -> "RaggedSlots":
        pad = length - self.length
        if pad <= 0:
            return self
        return RaggedSlots(
            torch.cat([self.valid.new_zeros(self.rows, pad), self.valid], 1),
            torch.cat([self.positions.new_zeros(self.rows, pad), self.positions], 1),
        )

    def garbage(self) -> int:
        """Slots that a compaction would free (length minus the fullest row's valid count)."""
        if self.length == 0 or self.rows == 0:
            return self.length
        return self.length - int(self.valid.sum(1).max())

    def compaction_index(self) -> torch.Tensor:
        """[rows, L] slot indices that move every row's valid slots to the right end, in order;
        ``L`` is the largest number of valid slots of a row."""
        keep = int(self.valid.sum(1).max()) if self.rows else 0
        order = torch.sort(self.valid.to(torch.int8), dim=1, stable=True).indices  # invalid first, then valid
        return order[:, self.length - keep :]


def _pad_time_left(tensor: torch.Tensor, length: int) -> torch.Tensor:
    pad = length - tensor.shape[2]
    if pad <= 0:
        return tensor
    zeros = tensor.new_zeros(tensor.shape[0], tensor.shape[1], pad, tensor.shape[3])
    return torch.cat([zeros, tensor], 2)


class _RaggedKV:
    """A KV store ([rows, heads, slots, head_dim] tensors per layer) plus its :class:`RaggedSlots`."""

    def __init__(self, rows: int, device):
        self.slots = RaggedSlots.empty(rows, device)

    def tensors(self) -> list[torch.Tensor] | None:  # keys of every layer, then values
        raise NotImplementedError

    def set_tensors(self, tensors: list[torch.Tensor]) -> None:
        raise NotImplementedError

    def keep_rows(self, rows: torch.Tensor) -> None:
        tensors = self.tensors()
        if tensors is not None:
            self.set_tensors([t.index_select(0, rows) for t in tensors])
        self.slots = self.slots.select(rows)

    def extend(self, other: "_RaggedKV") -> None:
        """Append ``other``'s rows; the shorter side is left-padded with invalid (zero) slots."""
        length = max(self.slots.length, other.slots.length)
        mine, theirs = self.tensors(), other.tensors()
        if mine is not None or theirs is not None:
            templates = mine if mine is not None else theirs

            def padded(tensors, rows):
                if tensors is None:
                    return [t.new_zeros(rows, t.shape[1], length, t.shape[3]) for t in templates]
                return [_pad_time_left(t, length) for t in tensors]

            a, b = padded(mine, self.slots.rows), padded(theirs, other.slots.rows)
            self.set_tensors([torch.cat([x, y], 0) for x, y in zip(a, b)])
        left, right = self.slots.left_pad(length), other.slots.left_pad(length)
        self.slots = RaggedSlots(torch.cat([left.valid, right.valid], 0), torch.cat([left.positions, right.positions], 0))

    def compact(self) -> None:
        index = self.slots.compaction_index()
        tensors = self.tensors()
        if tensors is not None:
            gathered = []
            for t in tensors:
                idx = index[:, None, :, None].expand(t.shape[0], t.shape[1], index.shape[1], t.shape[3])
                gathered.append(t.gather(2, idx))
            self.set_tensors(gathered)
        self.slots = RaggedSlots(self.slots.valid.gather(1, index), self.slots.positions.gather(1, index))


class _TargetKV(_RaggedKV):
    """The target's cache: a config-less ``DynamicCache`` (full ``DynamicLayer`` everywhere)."""

    def __init__(self, rows: int, device):
        super().__init__(rows, device)
        self.cache = DynamicCache()

    def tensors(self):
        layers = self.cache.layers
        if not layers or not all(layer.is_initialized for layer in layers):
            return None
        return [layer.keys for layer in layers] + [layer.values for layer in layers]

    def set_tensors(self, tensors):
        n = len(tensors) // 2
        if self.tensors() is None:
            self.cache = DynamicCache(ddp_cache_data=list(zip(tensors[:n], tensors[n:])))
            return
        for layer, keys, values in zip(self.cache.layers, tensors[:n], tensors[n:]):
            layer.keys, layer.values = keys, values


class _DraftKV(_RaggedKV):
    """The drafter's context cache (``DSparkDraftCache``)."""

    def __init__(self, rows: int, device, num_layers: int):
        super().__init__(rows, device)
        self.cache = DSparkDraftCache(num_layers)

    def tensors(self):
        if self.cache.keys[0] is None:
            return None
        return list(self.cache.keys) + list(self.cache.values)

    def set_tensors(self, tensors):
        n = len(tensors) // 2
        self.cache.keys, self.cache.values = list(tensors[:n]), list(tensors[n:])


def ragged_causal_mask(
    slots: RaggedSlots, query_valid: torch.Tensor, query_positions: torch.Tensor, sliding_window: int | None = None
) -> torch.Tensor:
    """Boolean [rows, 1, W, slots + W] mask (True = attend) of a forward appending W slots per row.

    Key slot ``s`` is visible to a query at position ``t`` when it holds a committed token
    (past slots) or a real new token (new slots), its position is ``<= t`` and, with a sliding
    window, ``> t - sliding_window`` (transformers' convention). Every query also sees its own
    slot, which keeps padding queries finite (their outputs are never used)."""
    key_valid = torch.cat([slots.valid, query_valid], 1)
    key_pos = torch.cat([slots.positions, query_positions], 1)
    q = query_positions[:, :, None]
    allowed = key_valid[:, None, :] & (key_pos[:, None, :] <= q)
    if sliding_window is not None:
        allowed &= key_pos[:, None, :] > q - sliding_window
    width = query_positions.shape[1]
    own = torch.arange(width, device=allowed.device)
    allowed[:, own, slots.length + own] = True
    return allowed[:, None]


# --------------------------------------------------------------------------------------
# the engine
# --------------------------------------------------------------------------------------
class BatchedSpeculativeGenerator:
    """Continuous-batching speculative decoding of ``target`` with a DSpark ``draft``.

    Args:
        target: a causal LM (``sdpa`` or ``eager`` attention; full and/or sliding-window layers).
        draft: a ``DSparkDraftModel`` built for ``target`` (on the same device).
        scheduler: ``"algorithm1"`` (hardware-aware prefix scheduler, needs a confidence head and a
            latency profile), ``"full"`` (verify the whole block) or ``"threshold"`` (cut at
            prefix survival < ``confidence_threshold``).
        latency_profile: a :class:`hf_dspark.latency.LatencyProfile` of the target; with
            ``"algorithm1"`` and ``None`` it is measured (and cached) on first use.
        max_batch_size: most requests decoded at once; the rest wait in a queue.
        confidence_threshold: the ``"threshold"`` scheduler's cut.
        fast_verify_head: while the engine exists, the target's LM head uses the skinny-product layout
            for 2-8 rows on CPU fp32 (``generation_dspark.activate_verify_head``: the same dot products,
            summed in another order).
        ngram_lookup_tokens: n-gram rounds (see above): a request whose last ``ngram_max_size`` ..
            ``ngram_min_size`` tokens occurred before submits up to this many of the tokens that
            followed (at most ``block_size``); 0 (default) turns them off.

    Typical use: ``generate(prompts, max_new_tokens)``; or the step API: ``set_sampling(...)``,
    ``add_request(...)`` (any time), ``step()`` until ``has_unfinished()`` is False,
    ``pop(request_id)``.
    """

    # Compact a cache once its garbage slots reach both this many slots and this fraction of its length.
    compaction_slack = 16
    compaction_fraction = 0.25
    _PAD_ID = 0  # fills right-padding in prefill batches: any in-vocabulary id, the mask hides it

    def __init__(
        self,
        target,
        draft,
        scheduler: str = "algorithm1",
        latency_profile=None,
        max_batch_size: int = 16,
        confidence_threshold: float = 0.3,
        fast_verify_head: bool = True,
        ngram_lookup_tokens: int = 0,
        ngram_max_size: int = 3,
        ngram_min_size: int = 2,
    ):
        if scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler={scheduler!r} is not one of {SCHEDULERS}")
        if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"max_batch_size={max_batch_size!r} must be an int >= 1")
        draft.bind_target(target)
        if scheduler in ("algorithm1", "threshold") and getattr(draft, "confidence_head", None) is None:
            raise ValueError(
                f"scheduler={scheduler!r} needs a drafter with a confidence head "
                "(enable_confidence_head=True); use scheduler='full' with this drafter"
            )
        self.device = next(target.parameters()).device
        draft_device = next(draft.parameters()).device
        if draft_device != self.device:
            raise ValueError(
                f"the drafter is on {draft_device} but the target is on {self.device}; move the drafter with "
                f"draft.to({str(self.device)!r})"
            )
        self.target, self.draft = target, draft
        self.scheduler = scheduler
        self.latency_profile = latency_profile
        self.max_batch_size = max_batch_size
        self.confidence_threshold = float(confidence_threshold)
        self.block_size = draft.config.block_size
        self.ngram_sizes = (int(ngram_max_size), int(ngram_min_size))
        check_ngram_settings(int(ngram_lookup_tokens), *self.ngram_sizes)
        self.ngram_lookup_tokens = min(int(ngram_lookup_tokens), self.block_size)
        self._ngram_rows: list[bool] = []
        self.hidden_state_ids = [i + 1 for i in draft.config.target_layer_ids]
        self._configure_attention(target)
        self._verify_head = activate_verify_head(target, self) if fast_verify_head else None
        self.fast_verify_head = self._verify_head is not None
        self.sampling = SamplingSettings()
        self._warpers = self._build_warpers()
        self._generator: torch.Generator | None = None
        self._queue: deque[SpeculativeRequest] = deque()
        self._active: list[SpeculativeRequest] = []
        self._requests: dict[int, SpeculativeRequest] = {}
        self._next_id = 0
        self._reset_state()
        self.stats = self._empty_stats()

    def close(self) -> None:
        """Give the target's LM head back its default layout now (also happens when the engine is collected)."""
        if self._verify_head is not None:
            self._verify_head()
        self.fast_verify_head = False

    # ---------------------------------------------------------------- configuration
    def _configure_attention(self, target) -> None:
        text_config = target.config.get_text_config()
        implementation = getattr(target.config, "_attn_implementation", None) or "eager"
        if implementation not in SUPPORTED_ATTENTION:
            raise ValueError(
                f"the target uses attn_implementation={implementation!r}; the batched engine passes its own ragged "
                f"4-D masks, which need one of {SUPPORTED_ATTENTION}. Load the target with attn_implementation='sdpa'."
            )
        self._boolean_mask = implementation == "sdpa"
        layer_types = getattr(text_config, "layer_types", None)
        self._layer_types = list(layer_types) if layer_types else None
        unknown = sorted(set(self._layer_types or ()) - set(SUPPORTED_LAYER_TYPES))
        if unknown:
            raise ValueError(
                f"the target has layer types {unknown}; the batched engine supports {SUPPORTED_LAYER_TYPES} only"
            )
        window = getattr(text_config, "sliding_window", None)
        uses_window = "sliding_attention" in (self._layer_types or ()) or (self._layer_types is None and window)
        self._sliding_window = int(window) if uses_window and window else None

    def set_sampling(self, do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None,
                     top_p: float | None = None, seed: int | None = None) -> None:
        """Decoding settings for all requests (only while no request is in flight).

        ``seed`` seeds a private generator used for every random draw; ``None`` uses torch's global RNG."""
        if self._active or self._queue:
            raise RuntimeError("set_sampling() changes how every request decodes; call it while no request is in flight")
        self.sampling = SamplingSettings(bool(do_sample), float(temperature), top_k, top_p)
        self._warpers = self._build_warpers()
        self._generator = None if seed is None else torch.Generator(device=self.device).manual_seed(int(seed))

    def _build_warpers(self) -> LogitsProcessorList:
        """transformers' warpers for ``self.sampling``, top-k + top-p fused (same result, top-p sorts only k)."""
        warpers = self.sampling.warpers()
        fuse_top_k_top_p(warpers)
        return warpers

    def _steps_per_second(self, total_tokens: int, rows: int) -> float:
        if self.latency_profile is None:
            from .latency import profile_latency

            sizes = sorted({b for b in (1, 2, 4, 8, 16) if b <= self.max_batch_size} | {self.max_batch_size})
            logger.info("profiling the target's latency for the prefix scheduler (batch sizes %s)", sizes)
            self.latency_profile = profile_latency(self.target, token_counts=range(1, self.block_size + 2), batch_sizes=sizes)
        return self.latency_profile.steps_per_second(total_tokens, batch_size=rows)

    # ---------------------------------------------------------------- requests
    def add_request(self, prompt_ids: Sequence[int] | torch.Tensor, max_new_tokens: int,
                    eos_token_id: int | Sequence[int] | None = None) -> int:
        """Queue a request; it joins the batch at the next ``step()`` with room. Returns its id.

        ``eos_token_id=None`` uses ``target.generation_config.eos_token_id`` (as ``generate`` does)."""
        if isinstance(prompt_ids, torch.Tensor):
            if prompt_ids.dim() == 2 and prompt_ids.shape[0] == 1:
                prompt_ids = prompt_ids[0]
            prompt_ids = prompt_ids.tolist()
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise ValueError("prompt_ids is empty; a request needs at least one prompt token")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an int >= 0")
        if eos_token_id is None:
            eos_token_id = getattr(self.target.generation_config, "eos_token_id", None)
        eos = frozenset() if eos_token_id is None else frozenset(
            [int(eos_token_id)] if isinstance(eos_token_id, int) else [int(t) for t in eos_token_id]
        )
        request = SpeculativeRequest(self._next_id, prompt, max_new_tokens, eos, added_at=time.perf_counter())
        self._next_id += 1
        self._requests[request.request_id] = request
        if max_new_tokens == 0:
            request.finish_reason = "length"
            request.started_at = request.finished_at = request.added_at
        else:
            self._queue.append(request)
        return request.request_id

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

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 eos_token_id: int | Sequence[int] | None = None, seed: int | None = None) -> list[list[int]]:
        """Generate for every prompt (lists of token ids); returns the new tokens of each (EOS included)."""
        self.set_sampling(do_sample, temperature, top_k, top_p, seed)
        ids = [self.add_request(p, max_new_tokens, eos_token_id) for p in prompts]
        while self.has_unfinished():
            self.step()
        return [self.pop(i).output_ids for i in ids]

    # ---------------------------------------------------------------- one round
    @torch.no_grad()
    def step(self) -> list[SpeculativeRequest]:
        """Admit queued requests, then run one draft / schedule / verify round. Returns the requests
        that finished in this round."""
        self._admit()
        if not self._active:
            return []
        start = time.perf_counter()
        tokens, draft_probs, survival, limits = self._draft()
        if self.ngram_lookup_tokens > 0:
            tokens, draft_probs, survival, limits = self._ngram_proposals(tokens, draft_probs, survival, limits)
        else:
            self._ngram_rows = [False] * len(limits)
        drafted = time.perf_counter()
        counts = self._schedule(survival, limits)
        logits, features, first_new_slot = self._verify_forward(tokens, counts)
        finished = self._accept(tokens, draft_probs, logits, features, counts, first_new_slot)
        self._retire(finished)
        now = time.perf_counter()
        stats = self.stats
        stats["rounds"] += 1
        stats["request_rounds"] += len(counts)
        stats["verified_draft_tokens"] += sum(counts)
        stats["draft_seconds"] += drafted - start
        stats["verify_seconds"] += now - drafted
        stats["max_active"] = max(stats["max_active"], len(counts))
        return finished

    def _reset_state(self) -> None:
        self._target_kv = _TargetKV(0, self.device)
        self._draft_kv = _DraftKV(0, self.device, self.draft.config.num_hidden_layers)
        width = self.draft.config.context_size
        dtype = next(self.target.parameters()).dtype
        self._pending = torch.zeros(0, 0, width, dtype=dtype, device=self.device)  # target features not yet drafted on
        self._pending_len = torch.zeros(0, dtype=torch.long, device=self.device)

    def _empty_stats(self) -> dict:
        """Counters over the engine's life; ``accepted_histogram[k]`` counts request-rounds that
        accepted ``k`` draft tokens; ``ragged_rounds`` counts rounds whose rows accepted different
        numbers of tokens."""
        return dict(rounds=0, request_rounds=0, verified_draft_tokens=0, accepted_draft_tokens=0,
                    committed_tokens=0, prefill_seconds=0.0, draft_seconds=0.0, verify_seconds=0.0,
                    max_active=0, compactions=0, ragged_rounds=0, accepted_histogram=[0] * (self.block_size + 1),
                    ngram_request_rounds=0, ngram_verified_tokens=0, ngram_accepted_tokens=0,
                    ngram_position_attempted=[0] * self.block_size, ngram_position_accepted=[0] * self.block_size)

    # Before any evidence an n-gram proposal is believed to survive each position with probability 0.9 (on
    # Gemma 3 270M copied tokens were accepted 0.93 per position at greedy), worth 4 observed attempts. A low
    # prior would make the scheduler never verify copied tokens, and so never learn better.
    NGRAM_PRIOR_ACCEPTANCE = 0.9
    NGRAM_PRIOR_WEIGHT = 4.0

    def _ngram_survival(self, length: int) -> list[float]:
        """Prefix survival of an n-gram proposal from past n-gram rounds only (per position, with a prior)."""
        attempted, accepted = self.stats["ngram_position_attempted"], self.stats["ngram_position_accepted"]
        prior, weight = self.NGRAM_PRIOR_ACCEPTANCE, self.NGRAM_PRIOR_WEIGHT
        survival, running = [], 1.0
        for k in range(length):
            running *= (accepted[k] + prior * weight) / (attempted[k] + weight)
            survival.append(running)
        return survival

    def _ngram_proposals(self, tokens, draft_probs, survival, limits):
        """Replace the drafted block of every row with an n-gram match by the tokens that followed it."""
        self._ngram_rows = [False] * len(limits)
        lookups = []
        for row, request in enumerate(self._active):
            found = None
            if limits[row] > 0:
                sequence = torch.tensor(request.prompt_ids + request.output_ids)
                found = ngram_continuation(sequence, min(self.ngram_lookup_tokens, limits[row]), *self.ngram_sizes)
            lookups.append(found)
        if all(found is None for found in lookups):
            return tokens, draft_probs, survival, limits
        limits = list(limits)
        survival = None if survival is None else [list(row) for row in survival]
        for row, found in enumerate(lookups):
            if found is None:
                continue
            n, found = found.shape[0], found.to(tokens.device)
            self._ngram_rows[row] = True
            limits[row] = n
            tokens[row, :n] = found
            if draft_probs is not None:  # q is one-hot at the copied token
                draft_probs[row, :n] = 0
                draft_probs[row, torch.arange(n, device=tokens.device), found] = 1
            if survival is not None:
                survival[row] = self._ngram_survival(n)
        return tokens, draft_probs, survival, limits

    def _target_forward(self, kv: _TargetKV, input_ids, positions, query_valid, all_logits: bool):
        """One target pass appending ``W`` slots per row; returns (logits, selected features)."""
        masks = self._attention_masks(kv.slots, query_valid, positions)
        out = self.target(
            input_ids=input_ids, attention_mask=masks, position_ids=positions, cache=kv.cache, use_cache=True,
            output_hidden_states=self.hidden_state_ids, logits_to_keep=0 if all_logits else 1,
        )
        kv.slots = kv.slots.append(query_valid, positions)
        features = torch.cat([out.hidden_states[i] for i in self.hidden_state_ids], dim=-1)
        return out.logits, features

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

    def _admit(self) -> None:
        """Prefill queued requests (all but their last prompt token) and add them to the batch."""
        room = self.max_batch_size - len(self._active)
        joining = [self._queue.popleft() for _ in range(min(room, len(self._queue)))]
        if not joining:
            return
        start = time.perf_counter()
        lengths = torch.tensor([len(r.prompt_ids) - 1 for r in joining], device=self.device)
        width = int(lengths.max())
        kv = _TargetKV(len(joining), self.device)
        features = self._pending.new_zeros(len(joining), width, self._pending.shape[2])
        if width > 0:
            ids = torch.full((len(joining), width), self._PAD_ID, dtype=torch.long, device=self.device)
            for row, request in enumerate(joining):
                ids[row, : len(request.prompt_ids) - 1] = torch.tensor(request.prompt_ids[:-1], device=self.device)
            positions = torch.arange(width, device=self.device).expand(len(joining), -1)
            valid = positions < lengths[:, None]
            _, features = self._target_forward(kv, ids, positions, valid, all_logits=False)
        self._target_kv.extend(kv)
        self._draft_kv.extend(_DraftKV(len(joining), self.device, self.draft.config.num_hidden_layers))
        self._pending = _cat_right_padded(self._pending, features.to(self._pending.dtype))
        self._pending_len = torch.cat([self._pending_len, lengths])
        now = time.perf_counter()
        for request in joining:
            request.anchor = request.prompt_ids[-1]
            request.anchor_position = len(request.prompt_ids) - 1
            request.started_at = now
        self._active.extend(joining)
        self.stats["prefill_seconds"] += now - start

    def _draft(self):
        """One batched drafter block over ragged contexts, then the Markov loop.

        Returns draft tokens [rows, n], their sampling distributions [rows, n, V] (None when
        greedy), the prefix survival of each row (lists, or None without a confidence head) and
        the most draft tokens each row may verify."""
        draft, rows, K = self.draft, len(self._active), self.block_size
        anchors = torch.tensor([r.anchor for r in self._active], device=self.device)
        anchor_pos = torch.tensor([r.anchor_position for r in self._active], device=self.device)
        # a round commits at most (verified drafts + 1) tokens: never draft past max_new_tokens
        limits = [max(0, min(K, r.remaining - 1)) for r in self._active]

        context = context_pos = None
        slots_after = self._draft_kv.slots
        width = self._pending.shape[1]
        if width > 0:
            offsets = torch.arange(width, device=self.device)
            context_valid = offsets < self._pending_len[:, None]
            context_pos = (anchor_pos - self._pending_len)[:, None] + offsets  # the tokens just before the anchor
            context = draft.project_context(self._pending)
            slots_after = slots_after.append(context_valid, context_pos)
        mask = None
        if slots_after.length > 0:
            # block queries see every committed context row of their own request, and the whole block
            block = torch.ones(rows, K, K, dtype=torch.bool, device=self.device)
            mask = torch.cat([slots_after.valid[:, None, :].expand(rows, K, -1), block], -1)[:, None]
        block_pos = anchor_pos[:, None] + torch.arange(K, device=self.device)
        hidden = draft._backbone(draft.embed(draft.block_input_ids(anchors)), block_pos, context, context_pos, mask,
                                 self._draft_kv.cache)
        self._draft_kv.slots = slots_after
        self._pending = self._pending[:, :0]
        self._pending_len = torch.zeros_like(self._pending_len)

        n = max(limits)
        if n == 0:  # only the target's own next token this round (empty q: still sampling, not greedy)
            empty = None if not self.sampling.do_sample else hidden.new_zeros(rows, 0, draft.config.vocab_size)
            return anchors.new_zeros(rows, 0), empty, [[] for _ in range(rows)], limits
        probs: list[torch.Tensor] = []
        tokens, _, confidence = draft.sample_block(draft.compute_logits(hidden), hidden, anchors,
                                                   choose=self._chooser(probs), num_tokens=n)
        survival = None
        if confidence is not None:
            survival = torch.cumprod(draft.calibrated_confidence(confidence).float(), dim=-1).tolist()
        draft_probs = torch.stack(probs, dim=1) if probs else None
        return tokens, draft_probs, survival, limits

    def _chooser(self, probs_out: list):
        """Markov-loop choice: greedy argmax over the draft vocabulary, or a draw from the draft
        logits spread over the full vocabulary and processed by the target's warpers (the exact
        distribution is kept for verification)."""
        if not self.sampling.do_sample:
            return None
        draft, vocab = self.draft, self.draft.config.vocab_size
        d2t, t2d = draft.draft_to_target, draft.target_to_draft_table()

        def choose(logits_k: torch.Tensor, k: int):
            scores = logits_k.float()
            if d2t is not None:
                scores = scores.new_full((scores.shape[0], vocab), float("-inf")).index_copy_(1, d2t, scores)
            scores = self._warpers(None, scores)
            p = torch.softmax(scores, dim=-1)
            token = torch.multinomial(p, 1, generator=self._generator).squeeze(-1)
            probs_out.append(p)
            return (token if t2d is None else t2d[token]), scores

        return choose

    def _schedule(self, survival, limits: list[int]) -> list[int]:
        """Draft tokens each request verifies this round (never more than its limit)."""
        if self.scheduler == "full" or survival is None:
            return list(limits)
        rows = [row[:limit] for row, limit in zip(survival, limits)]
        if self.scheduler == "threshold":
            return [threshold_length(row, self.confidence_threshold) if row else 0 for row in rows]
        # Algorithm 1: admit (request, position) pairs in descending prefix survival while the expected
        # committed tokens x target passes per second (at that many tokens in the batch) improves.
        rate = functools.partial(self._steps_per_second, rows=len(rows))
        if not self.sampling.do_sample:
            # Greedy output does not depend on how many drafts are verified, so the schedule may look along
            # the whole admission path. In a right-padded batch one more token for one row widens every
            # row's pass, so it only pays once many rows grow: stopping at the first non-improvement
            # (needed for exact sampling) would stop before that.
            return global_search_schedule(rows, rate)
        return prefix_schedule(rows, rate)

    def _verify_forward(self, tokens: torch.Tensor, counts: list[int]):
        """Score ``[anchor, x_1 .. x_l]`` of every row in one target forward (right-padded)."""
        width = 1 + max(counts)
        anchors = torch.tensor([r.anchor for r in self._active], device=self.device)
        ids = anchors[:, None].repeat(1, width)
        if width > 1:
            ids[:, 1:] = tokens[:, : width - 1]  # columns past a row's count are padding (masked)
        offsets = torch.arange(width, device=self.device)
        positions = torch.tensor([r.anchor_position for r in self._active], device=self.device)[:, None] + offsets
        valid = offsets < (1 + torch.tensor(counts, device=self.device))[:, None]
        first_new_slot = self._target_kv.slots.length
        logits, features = self._target_forward(self._target_kv, ids, positions, valid, all_logits=True)
        return logits, features, first_new_slot

    def _accept(self, tokens, draft_probs, logits, features, counts, first_new_slot) -> list[SpeculativeRequest]:
        rows, width = logits.shape[:2]
        if self.sampling.do_sample:
            scores = self._warpers(None, logits.float().reshape(rows * width, -1))
            target_probs = torch.softmax(scores, dim=-1).view(rows, width, -1)
        else:
            target_probs = logits  # greedy: only the argmax is used
        token_lists = tokens.tolist()
        accepted, finished = [], []
        for row, request in enumerate(self._active):
            n_accepted, next_token = verify_block(
                tokens[row], None if draft_probs is None else draft_probs[row], target_probs[row], counts[row],
                self._generator,
            )
            committed = request._commit(token_lists[row][:n_accepted] + [next_token])
            request.submitted.append(counts[row])
            request.accepted.append(n_accepted)
            request.committed.append(committed)
            request.anchor = next_token
            request.anchor_position += 1 + n_accepted
            accepted.append(n_accepted)
            if self._ngram_rows[row]:
                self._record_ngram(counts[row], n_accepted)
            self.stats["accepted_draft_tokens"] += n_accepted
            self.stats["accepted_histogram"][n_accepted] += 1
            self.stats["committed_tokens"] += committed
            if request.finished:
                request.finished_at = time.perf_counter()
                finished.append(request)
        if len(set(accepted)) > 1:
            self.stats["ragged_rounds"] += 1  # rows kept different numbers of slots this round
        # the anchor and the accepted drafts are committed: keep their slots, drop the rest
        n_kept = 1 + torch.tensor(accepted, device=self.device)
        keep = torch.arange(width, device=self.device)[None, :] < n_kept[:, None]
        self._target_kv.slots.valid[:, first_new_slot:] &= keep
        # their target features are the drafter's new context next round
        self._pending, self._pending_len = features.to(self._pending.dtype), n_kept
        return finished

    def _record_ngram(self, submitted: int, n_accepted: int) -> None:
        stats = self.stats
        stats["ngram_request_rounds"] += 1
        stats["ngram_verified_tokens"] += submitted
        stats["ngram_accepted_tokens"] += n_accepted
        for k in range(min(n_accepted + 1, submitted)):
            stats["ngram_position_attempted"][k] += 1
        for k in range(n_accepted):
            stats["ngram_position_accepted"][k] += 1

    def _retire(self, finished: list[SpeculativeRequest]) -> None:
        if finished:
            keep = [row for row, r in enumerate(self._active) if not r.finished]
            rows = torch.tensor(keep, dtype=torch.long, device=self.device)
            for kv in (self._target_kv, self._draft_kv):
                kv.keep_rows(rows)
            self._pending = self._pending.index_select(0, rows)
            self._pending_len = self._pending_len.index_select(0, rows)
            self._active = [self._active[row] for row in keep]
        for kv in (self._target_kv, self._draft_kv):
            garbage = kv.slots.garbage()
            if garbage > 0 and garbage >= max(self.compaction_slack, self.compaction_fraction * kv.slots.length):
                kv.compact()
                self.stats["compactions"] += 1


def _cat_right_padded(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Concatenate [rows, T, C] tensors along rows, right-padding the shorter one in T with zeros."""
    width = max(a.shape[1], b.shape[1])

    def pad(t):
        if t.shape[1] == width:
            return t
        return torch.cat([t, t.new_zeros(t.shape[0], width - t.shape[1], t.shape[2])], 1)

    return torch.cat([pad(a), pad(b)], 0)


# --------------------------------------------------------------------------------------
# command line (`hf-dspark bench-batch`): implemented in bench_batch.py
# --------------------------------------------------------------------------------------
def add_arguments(parser) -> None:
    from .bench_batch import add_arguments as _add

    _add(parser)


def run(args) -> int:
    from .bench_batch import run as _run

    return _run(args)
