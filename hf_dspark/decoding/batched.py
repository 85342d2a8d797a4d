"""Batched speculative decoding with a DSpark drafter: many requests, one target forward per round.

transformers' assisted generation runs one sequence at a time. :class:`BatchedSpeculativeGenerator`
serves many requests with continuous batching. Each round:

1. **plan** (before any of the round's tokens exist): requests with an n-gram match (see below)
   copy tokens instead of drafting; the scheduler decides which of the others run the drafter;
2. one batched drafter call drafts a block for those requests (the anchor, i.e. the last
   committed token, followed by mask tokens; the Markov loop samples the tokens), reading first
   the target features of every token committed since the request last drafted;
3. the scheduler chooses how many draft tokens each request verifies;
4. ONE target forward scores ``[anchor, x_1 .. x_l]`` of every request, right-padded to the
   longest row (logits only for the real tokens);
5. every row is verified in one vectorized step (:func:`hf_dspark.decoding.verification.verify_rows_greedy`:
   one argmax and compare over the padded block; :func:`~hf_dspark.decoding.verification.verify_rows_sampled`:
   exact speculative sampling, the accept/reject of all rows at once and one batched draw); the target
   features of the anchor and the accepted tokens wait for the request's next drafter call;
6. requests that produced EOS or reached ``max_new_tokens`` (possibly in the middle of a
   block: the tokens after that point are dropped) leave; queued requests join (their prompt
   is prefilled in one extra forward) before the next round.

Schedulers
----------
The ``verification_policy`` of the engine's generation config names an entry of the one registry of
verification policies (:data:`hf_dspark.models.dspark.policies_dspark.VERIFICATION_POLICY_MAPPING`,
shared with ``generate``); :class:`~hf_dspark.decoding.round_plan.RoundPlanner` asks it for each decision.

* ``"full"``: every request with room drafts and verifies its whole block.
* ``"threshold"``: cut where the calibrated prefix survival falls below a threshold.
* ``"cost"`` (formerly ``"algorithm1"``): the paper's hardware-aware prefix scheduler on the current drafts. The
  objective is the expected committed tokens per second of the whole round, with the time from
  :class:`hf_dspark.decoding.round_cost.RoundCost`: the right-padded target pass (the profiled step-rate
  curve of the dtype in use) plus the drafter. Before drafting, the best allocation on each
  request's prediction from the previous round (:meth:`~BatchedSpeculativeGenerator._plan`)
  decides who drafts: a request it gives no token skips the drafter, and when no allocation beats
  a plain decoding step nobody drafts (so a round is never planned slower than plain decoding).
  The engine's own time model learns from finished rounds: the forward's and the drafter's own times,
  the engine's overhead beyond them (per kind of round, plain or speculative), and how far drafting
  rounds fell short of what the plan expected, which drafting must then beat a plain step by.
  After drafting, greedy decoding takes the best allocation over every width cap
  (:func:`hf_dspark.decoding.scheduling.best_padded_allocation`: greedy output does not depend on the
  counts), sampling walks the admission path with Algorithm 1's early stop
  (:func:`hf_dspark.decoding.scheduling.padded_schedule`), which exactness needs.
* ``"async"``: the paper's production variant. The plan runs on predictions made two rounds
  earlier (requests too new for that use a stated prior, :class:`hf_dspark.decoding.round_plan.RoundPlanner`) with
  a search over the whole path and every cap, allowed because none of its inputs depends on the
  current drafts. It fixes who drafts, the budget ``K`` (its total) and a width cap (its widest
  request); the current survival only ranks the candidates, and the top ``K`` are verified
  (:func:`hf_dspark.decoding.scheduling.top_k_prefix`). Lossless for sampling too (Appendix A of the paper;
  ``tests/test_batched.py`` reproduces the bias of a global search on current scores).
* ``"plain"``: no drafting and no n-gram rounds: plain continuous-batching decoding through the
  same engine (the baseline of ``hf-dspark bench-serve``).
* ``"oracle"``: verify exactly what the target accepts, read from its greedy output given with each
  request (a measuring instrument, :mod:`hf_dspark.decoding.oracle`).
* ``"auto"`` (default): ``"cost"`` with a drafter that has a confidence head, ``"full"`` without.

A request that skips the drafter (n-gram round, or a round the plan kept it off) keeps the
target features of the tokens it commits in :class:`hf_dspark.decoding.ragged.PendingFeatures`; its next
drafter call reads all of them, so its drafter context is complete again (the catch-up costs
the projection and keys/values of those few tokens, inside that call).

With ``ngram_lookup_tokens > 0`` a request whose last tokens occurred earlier in its prompt or
output submits the tokens that followed them instead of a drafted block (n-gram rounds,
:mod:`hf_dspark.decoding.ngram_rounds`; a one-hot proposal when sampling); under ``cost`` and
``async`` it copies as many as the plan gives it, none when copying does not pay. The schedulers see, for
such a row, the acceptance n-gram proposals had so far at each position (a running estimate from
past rounds only, so the cut stays non-anticipating).

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

The drafter runs batched over ragged contexts through ``DSparkDraftModel.backbone`` with an
explicit mask (the same computation as ``draft_block``; ``tests/test_batched.py`` checks that
the two agree row by row).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Sequence

import torch
from transformers import LogitsProcessorList

from hf_dspark.decoding.batch_requests import SamplingSettings, SpeculativeRequest, checked_prompt, prefill_groups
from hf_dspark.models.dspark.generation_config_dspark import DSparkGenerationConfig
from hf_dspark.models.dspark.policies_dspark import CostPolicy
from hf_dspark.models.dspark.verify_head_dspark import activate_verify_head
from hf_dspark.models.dspark.warpers_dspark import VOCAB_LOCAL_WARPERS, fuse_top_k_top_p
from hf_dspark.models.dspark.modeling_dspark import DSparkDraftCache
from hf_dspark.decoding.packing import position_wise_modules, real_slots_only
from hf_dspark.decoding.ragged import PendingFeatures, RaggedSlots, _DraftKV, _TargetKV, ragged_causal_mask
from hf_dspark.decoding.engine_config import (
    SAMPLING_FIELDS, engine_generation_config, engine_settings, sampling_settings, warn_deprecated,
)
from hf_dspark.decoding.engine_target import SCHEDULERS, attention_settings, check_engine_arguments
from hf_dspark.decoding.round_cost import RoundCost, measure_seconds, token_seconds
from hf_dspark.decoding.round_plan import RoundPlanner
from hf_dspark.decoding.ngram_rounds import NgramRounds
from hf_dspark.decoding.verification import verify_rows_greedy, verify_rows_sampled
from hf_dspark.errors import EngineRequestError

logger = logging.getLogger(__name__)

__all__ = [
    "BatchedSpeculativeGenerator",
    "SpeculativeRequest",
    "SamplingSettings",
    "RaggedSlots",
    "ragged_causal_mask",
    "SCHEDULERS",
]


# --------------------------------------------------------------------------------------
# the engine
# --------------------------------------------------------------------------------------
class BatchedSpeculativeGenerator:
    """Continuous-batching speculative decoding of ``target`` with a DSpark ``draft``.

    Args:
        target: a causal LM (``sdpa`` or ``eager`` attention; full and/or sliding-window layers).
        draft: a ``DSparkDraftModel`` built for ``target`` (binding moves it to the target's device). The
            target must sit on one device: a target split or offloaded by accelerate is refused
            (``DevicePlacementError``); ``target.generate(assistant_model=draft)`` runs those.
        generation_config: a :class:`~hf_dspark.models.dspark.generation_config_dspark.DSparkGenerationConfig`
            (the class of a drafter's ``generation_config``; a plain ``GenerationConfig`` gives its sampling
            settings): ``verification_policy`` (an entry of the policy registry: ``"auto"``, the default,
            is ``"cost"`` with a confidence head and ``"full"`` without; ``"cost"``, ``"async"``, ``"full"``,
            ``"threshold"``, ``"plain"``, ``"oracle"``, see "Schedulers" above), ``confidence_threshold``,
            ``do_sample``/``temperature``/``top_k``/``top_p``, ``ngram_lookup_tokens`` (n-gram rounds, see
            above; at most ``block_size``, ``"auto"`` = one block), ``ngram_max_size``/``ngram_min_size``,
            ``fast_verify_head`` (the target's LM head uses the skinny-product layout for 2-8 rows on CPU
            fp32 while the engine exists) and ``fast_warpers``. The engine keeps a copy
            (:attr:`generation_config`); :mod:`hf_dspark.decoding.engine_config` says how it is read.
        latency_profile: a :class:`hf_dspark.decoding.latency.LatencyProfile` of the target; with
            ``"cost"``/``"async"`` and ``None`` it is measured (and cached) on first use.
        max_batch_size: most requests decoded at once; the rest wait in a queue.
        round_cost: a :class:`hf_dspark.decoding.round_cost.RoundCost` (target profile, drafter and LM-head
            times); ``None`` builds one on first use from ``latency_profile`` and timings of this
            drafter and head.
        skip_padding: on a CPU target, the target's per-slot layers (MLPs, attention projections) run on
            the real slots of a right-padded round only (:mod:`hf_dspark.decoding.packing`); the LM head
            always does. Elsewhere the padded layout is kept: packing reads a mask on the host in every layer.
        seed: seeds the engine's private random generator (``None``: torch's global RNG).
        **deprecated: ``scheduler``, ``confidence_threshold``, ``fast_verify_head``, ``ngram_lookup_tokens``,
            ``ngram_max_size``, ``ngram_min_size`` (the generation config's fields; ``scheduler`` is
            ``verification_policy``) still work for one release, with a ``FutureWarning``.

    Typical use: ``generate(prompts, max_new_tokens)``; or the step API: ``add_request(...)`` (any time),
    ``step()`` until ``has_unfinished()`` is False, ``pop(request_id)``.
    """

    # Compact a cache once its garbage slots reach both this many slots and this fraction of its length.
    compaction_slack = 16
    compaction_fraction = 0.25
    _PAD_ID = 0  # fills right-padding in prefill batches: any in-vocabulary id, the mask hides it

    def __init__(
        self,
        target,
        draft,
        generation_config: DSparkGenerationConfig | None = None,
        latency_profile=None,
        max_batch_size: int = 16,
        *,
        round_cost: RoundCost | None = None,
        skip_padding: bool = True,
        seed: int | None = None,
        **deprecated,
    ):
        if isinstance(generation_config, str):  # the old third positional argument, scheduler
            deprecated["scheduler"] = generation_config
            generation_config = None
        self.generation_config = engine_generation_config(generation_config, deprecated)
        check_engine_arguments(target, draft, max_batch_size)
        settings = engine_settings(self.generation_config, draft, draft.config.block_size)
        self.device = next(target.parameters()).device
        self.target, self.draft = target, draft
        self.policy = settings.policy
        self.latency_profile = latency_profile
        self.round_cost = round_cost
        self.max_batch_size = max_batch_size
        self.confidence_threshold = self.policy.confidence_threshold
        self.block_size = draft.config.block_size
        self.ngram_sizes = settings.ngram_sizes
        self.ngram_lookup_tokens = settings.ngram_lookup_tokens
        self._fast_warpers = settings.fast_warpers
        self.planner = RoundPlanner(self.policy, self.block_size, self._cost)
        self.hidden_state_ids = [i + 1 for i in draft.config.target_layer_ids]
        self._configure_attention(target)
        # Packing the real slots indexes with a boolean mask in every layer: a host sync each time, cheap on
        # CPU where compute is the cost, a stall per layer on an accelerator, where padding is nearly free.
        self._position_wise = position_wise_modules(target) if skip_padding and self.device.type == "cpu" else []
        self._verify_head = activate_verify_head(target, self) if settings.fast_verify_head else None
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
        self.ngram = NgramRounds(self.ngram_lookup_tokens, self.ngram_sizes, self.stats)
        self._use_sampling(settings.sampling, seed)

    @property
    def scheduler(self) -> str:
        """The registered name of the verification policy in use (``self.policy.name``)."""
        return self.policy.name

    def close(self) -> None:
        """Give the target's LM head back its default layout now (also happens when the engine is collected)."""
        if self._verify_head is not None:
            self._verify_head()
        self.fast_verify_head = False

    # ---------------------------------------------------------------- configuration
    def _configure_attention(self, target) -> None:
        self._boolean_mask, self._layer_types, self._sliding_window = attention_settings(target)

    def set_sampling(self, do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None,
                     top_p: float | None = None, seed: int | None = None) -> None:
        """Deprecated: pass the sampling settings in ``generation_config`` (and ``seed=`` to the constructor or
        to :meth:`generate`). Sets them for all requests (only while no request is in flight)."""
        warn_deprecated("BatchedSpeculativeGenerator.set_sampling()",
                        "pass generation_config=DSparkGenerationConfig(do_sample=..., temperature=..., top_k=..., "
                        "top_p=...) and seed= to the constructor (or to generate())")
        self._set_sampling(dict(do_sample=bool(do_sample), temperature=float(temperature), top_k=top_k, top_p=top_p),
                           seed)

    def _set_sampling(self, overrides: dict, seed: int | None) -> None:
        """Write ``overrides`` (sampling fields) into the engine's generation config and decode with them."""
        if self._active or self._queue:
            raise RuntimeError("the sampling settings change how every request decodes; change them while no "
                               "request is in flight")
        candidate = SamplingSettings(**{**vars(self.sampling), **overrides})  # checked before anything changes
        self._use_sampling(candidate, seed)
        for name in SAMPLING_FIELDS:
            setattr(self.generation_config, name, getattr(candidate, name))

    def _use_sampling(self, sampling: SamplingSettings, seed: int | None) -> None:
        """Decode with ``sampling`` from now on. ``seed`` seeds a private generator used for every random draw;
        ``None`` uses torch's global RNG. Sampled outputs always follow the target's distribution exactly, but
        a seed makes them bit-reproducible only with the ``full`` or ``threshold`` policy: ``cost`` and
        ``async`` choose how many draft tokens to verify from measured timings, which vary run to run, and
        each verified token consumes a random draw (docs/serving.md, "Seeded sampling")."""
        if sampling.do_sample and self.policy.greedy_only:
            raise ValueError(
                f"verification_policy={self.policy.name!r} needs the output in advance, which only greedy decoding "
                "has (a sampled token is not known before it is drawn); use do_sample=False"
            )
        changed = sampling.do_sample != self.sampling.do_sample
        self.sampling = sampling
        self._warpers = self._build_warpers()
        self._generator = None if seed is None else torch.Generator(device=self.device).manual_seed(int(seed))
        if changed and self.round_cost is not None and self._measured_cost:
            self.round_cost = None  # the drafter's time depends on greedy vs sampled drafting: measure again

    def _build_warpers(self) -> LogitsProcessorList:
        """transformers' warpers for ``self.sampling``, top-k + top-p fused (same result, top-p sorts only k)."""
        warpers = self.sampling.warpers()
        if self._fast_warpers:
            fuse_top_k_top_p(warpers)
        return warpers

    def _cost(self) -> RoundCost:
        """The round-time model of the schedulers, built (and timed) on first use."""
        if self.round_cost is None:
            if self.latency_profile is None:
                from hf_dspark.decoding.latency import profile_latency

                sizes = sorted({b for b in (1, 2, 4, 8, 16, 32) if b <= self.max_batch_size} | {self.max_batch_size})
                logger.info("profiling the target's latency for the prefix scheduler (batch sizes %s)", sizes)
                self.latency_profile = profile_latency(self.target, token_counts=range(1, self.block_size + 2),
                                                       batch_sizes=sizes)
            rows = sorted({1, max(1, self.max_batch_size // 2), self.max_batch_size})
            self.round_cost = RoundCost(
                self.latency_profile,
                draft_seconds={m: self._time_drafter(m) for m in rows},
                padding_discount=self._time_padding(),
                adapt=True,  # measured on this machine: keep it honest with the rounds as they run
            )
            self._measured_cost = True
        return self.round_cost

    _measured_cost = False
    _forward_seconds = 0.0  # the last verification forward's own time (for the time model)

    @torch.no_grad()
    def _time_padding(self, rows: int = 4, width: int = 8) -> float:
        """How much less a padding slot of a round costs than a real one (seconds, >= 0): the same
        forward timed with every slot real and with one real slot per row (fastest of 5 each), capped
        at the profile's cost of one more real token per row."""
        ids = torch.full((rows, width), self._PAD_ID, dtype=torch.long, device=self.device)
        positions = torch.arange(width, device=self.device).expand(rows, -1)

        def forward(valid):
            return lambda: self._target_forward(_TargetKV(rows, self.device), ids, positions, valid, logits_for=valid)

        every, first = positions >= 0, positions == 0
        saved = (measure_seconds(forward(every), device=self.device)
                 - measure_seconds(forward(first), device=self.device)) / (rows * (width - 1))
        return max(min(saved, token_seconds(self.latency_profile)), 0.0)

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

    # ---------------------------------------------------------------- requests
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

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, do_sample: bool | None = None,
                 temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                 eos_token_id: int | Sequence[int] | None = None, seed: int | None = None,
                 references: Sequence[Sequence[int]] | None = None) -> list[list[int]]:
        """Generate for every prompt (lists of token ids); returns the new tokens of each (EOS included).

        Decodes with the engine's ``generation_config``. When any of ``do_sample``/``temperature``/``top_k``/
        ``top_p`` is given, the engine decodes with exactly those from now on (the others off, as the engine's
        earlier releases did) and its generation config records them. ``seed`` re-seeds the engine's random
        generator (``None``: keep the generator as it is). ``references`` (one per prompt): the target's
        greedy outputs, for the ``oracle`` policy."""
        if any(value is not None for value in (do_sample, temperature, top_k, top_p)):
            self._set_sampling(dict(do_sample=bool(do_sample), temperature=1.0 if temperature is None else float(temperature),
                                    top_k=top_k, top_p=top_p), seed)
        elif seed is not None:
            self._set_sampling({}, seed)
        if references is not None and len(references) != len(prompts):
            raise ValueError(f"got {len(references)} references for {len(prompts)} prompts; give one per prompt")
        for index, prompt in enumerate(prompts):  # refuse a bad request before any of the call's requests enters
            self._checked_prompt(prompt, f"prompts[{index}]")
        try:
            ids = [self.add_request(p, max_new_tokens, eos_token_id, None if references is None else references[i])
                   for i, p in enumerate(prompts)]
            while self.has_unfinished():
                self.step()
        except BaseException:
            # a failed (or interrupted) call leaves no request of its own behind: the next call starts clean
            self.cancel_all()
            raise
        return [self.pop(i).output_ids for i in ids]

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

    # ---------------------------------------------------------------- one round
    def step(self) -> list[SpeculativeRequest]:
        """Admit queued requests, then run one plan / draft / schedule / verify round. Returns the
        requests that finished in this round.

        If the round raises, every request in flight is dropped (see :meth:`cancel_all`) before the
        error propagates, so the engine stays usable."""
        try:
            return self._round()
        except BaseException:
            self.cancel_all("error")
            raise

    @torch.no_grad()
    def _round(self) -> list[SpeculativeRequest]:
        self._admit()
        if not self._active:
            return []
        start = time.perf_counter()
        # a round commits at most (verified drafts + 1) tokens: never draft past max_new_tokens
        limits = [max(0, min(self.block_size, r.remaining - 1)) for r in self._active]
        self.ngram.lookup(self._active, limits)
        draft_rows = self._plan(limits)
        drafter_start = time.perf_counter()
        tokens, draft_probs, survival, limits = self._draft(draft_rows, limits)
        drafter_seconds = time.perf_counter() - drafter_start if draft_rows else 0.0
        if self.ngram_lookup_tokens > 0:
            tokens, draft_probs, survival, limits = self._ngram_proposals(tokens, draft_probs, survival, limits)
        drafted = time.perf_counter()
        counts = self._schedule(survival, limits, len(draft_rows), tokens)
        committed_before = self.stats["committed_tokens"]
        logits, features, first_new_slot = self._verify_forward(tokens, counts)
        finished = self._accept(tokens, draft_probs, logits, features, counts, first_new_slot)
        self._retire(finished)
        now = time.perf_counter()
        stats = self.stats
        stats["rounds"] += 1
        stats["request_rounds"] += len(counts)
        stats["verified_draft_tokens"] += sum(counts)
        stats["drafted_request_rounds"] += len(draft_rows)
        stats["draft_seconds"] += drafted - start
        stats["verify_seconds"] += now - drafted
        if self.round_cost is not None:  # what the schedulers' time model expected this round to take
            cost, rows, width = self.round_cost, len(counts), 1 + max(counts)
            modelled = (cost.verify_seconds(rows, width, rows + sum(counts)) + cost.drafter_seconds(len(draft_rows))
                        + cost.overhead_seconds(width, len(draft_rows)))
            stats["model_seconds"] += modelled
            stats["modelled_round_seconds"] += now - start
            if sum(counts) > 0:  # the plan's expected tokens, on the survival it scheduled with
                expected = rows + sum(sum(row[:count]) for row, count in zip(survival, counts))
                cost.observe_gain(expected, modelled, stats["committed_tokens"] - committed_before, now - start)
            overhead = now - start - self._forward_seconds - drafter_seconds  # the engine's own work
            cost.observe(rows, width, rows + sum(counts), len(draft_rows), drafter_seconds, self._forward_seconds,
                         overhead=overhead)
        stats["max_active"] = max(stats["max_active"], len(counts))
        return finished

    def _reset_state(self) -> None:
        self._target_kv = _TargetKV(0, self.device)
        self._draft_kv = _DraftKV(0, self.device, self.draft.config.num_hidden_layers)
        dtype = next(self.target.parameters()).dtype
        # target features of committed tokens the drafter has not read yet
        self._pending = PendingFeatures.empty(0, self.draft.config.context_size, dtype, self.device)

    def _empty_stats(self) -> dict:
        """Counters over the engine's life; ``accepted_histogram[k]`` counts request-rounds that
        accepted ``k`` draft tokens; ``ragged_rounds`` counts rounds whose rows accepted different
        numbers of tokens; ``draft_skipped_request_rounds`` counts request-rounds the plan kept off the
        drafter (no n-gram match, room to verify, yet drafting did not pay) and ``draft_skipped_rounds``
        the rounds where that left no row drafting (a plain decoding step); ``model_seconds`` is what the
        schedulers' time model predicted for the rounds it was known in (their measured time:
        ``modelled_round_seconds``)."""
        return dict(rounds=0, request_rounds=0, verified_draft_tokens=0, accepted_draft_tokens=0,
                    committed_tokens=0, prefill_seconds=0.0, prefill_forwards=0, draft_seconds=0.0, verify_seconds=0.0,
                    max_active=0, compactions=0, ragged_rounds=0, accepted_histogram=[0] * (self.block_size + 1),
                    drafted_request_rounds=0, draft_skipped_request_rounds=0, draft_skipped_rounds=0,
                    probe_request_rounds=0, model_seconds=0.0, modelled_round_seconds=0.0,
                    ngram_request_rounds=0, ngram_verified_tokens=0, ngram_accepted_tokens=0,
                    ngram_position_attempted=[0] * self.block_size, ngram_position_accepted=[0] * self.block_size)

    def _ngram_proposals(self, tokens, draft_probs, survival, limits):
        """Rows with an n-gram copy submit it instead of a drafted block (:class:`NgramRounds`)."""
        return self.ngram.proposals(tokens, draft_probs, survival, limits, self.draft.config.vocab_size)

    # ---------------------------------------------------------------- planning (before the drafter runs)
    def _plan(self, limits: list[int]) -> list[int]:
        """Rows that run the drafter this round (:meth:`hf_dspark.decoding.round_plan.RoundPlanner.plan`)."""
        draft_rows = self.planner.plan(self._active, limits, self.ngram.planned(), self.stats["rounds"], self.stats)
        if isinstance(self.policy, CostPolicy):  # the plan's count is the copy's length, as for a draft
            self.ngram.keep(self.planner.plan_counts)
        return draft_rows

    # ---------------------------------------------------------------- drafting
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

    # ---------------------------------------------------------------- scheduling (after the drafter ran)
    def _schedule(self, survival, limits: list[int], drafted_rows: int = 0, tokens=None) -> list[int]:
        """Draft tokens each request verifies (:meth:`hf_dspark.decoding.round_plan.RoundPlanner.schedule`)."""
        return self.planner.schedule(survival, limits, drafted_rows, self.sampling.do_sample, self._active, tokens)

    # ---------------------------------------------------------------- verification
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

    def _target_forward(self, kv: _TargetKV, input_ids, positions, query_valid, logits_for=None, padded=True):
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
        kv = _TargetKV(len(joining), self.device)
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
        self._draft_kv.extend(_DraftKV(len(joining), self.device, self.draft.config.num_hidden_layers))
        self._pending = self._pending.extend(joined)
        now = time.perf_counter()
        for request in joining:
            request.anchor = request.prompt_ids[-1]
            request.anchor_position = len(request.prompt_ids) - 1
            request.started_at = now
        self._active.extend(joining)
        self.stats["prefill_seconds"] += now - start
        self.stats["prefill_forwards"] += width > 0

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
