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
  ``tests/decoding/test_batched.py`` reproduces the bias of a global search on current scores).
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

The engine's parts
------------------
* :mod:`hf_dspark.decoding.admission`: requests entering (queue, batched prefill) and leaving the batch;
* :mod:`hf_dspark.decoding.batched_drafting`: the drafter's batched call over ragged contexts;
* :mod:`hf_dspark.decoding.target_pass`: the target's verification pass over ragged KV caches, the
  verification of every row, and the rollback of rejected slots;
* :mod:`hf_dspark.decoding.round_plan` and the policy registry: who drafts and how much is verified;
* :mod:`hf_dspark.decoding.engine_config`: what the engine reads from its ``DSparkGenerationConfig``.
This module holds the engine itself: its settings and the round that ties the parts together.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Sequence

import torch
from transformers import LogitsProcessorList

from hf_dspark.decoding.admission import RequestAdmission
from hf_dspark.decoding.batch_requests import SamplingSettings, SpeculativeRequest
from hf_dspark.decoding.batched_drafting import BatchedDrafting
from hf_dspark.decoding.engine_config import SAMPLING_FIELDS, engine_generation_config, engine_settings, warn_deprecated
from hf_dspark.decoding.engine_target import SCHEDULERS, attention_settings, check_engine_arguments
from hf_dspark.decoding.ngram_rounds import NgramRounds
from hf_dspark.decoding.packing import position_wise_modules
from hf_dspark.decoding.ragged import DraftKV, PendingFeatures, RaggedSlots, TargetKV, ragged_causal_mask
from hf_dspark.decoding.round_cost import RoundCost
from hf_dspark.decoding.round_plan import RoundPlanner
from hf_dspark.decoding.target_pass import TargetVerification
from hf_dspark.models.dspark.generation_config_dspark import DSparkGenerationConfig
from hf_dspark.models.dspark.policies_dspark import CostPolicy
from hf_dspark.models.dspark.verify_head_dspark import activate_verify_head
from hf_dspark.models.dspark.warpers_dspark import fuse_top_k_top_p

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
class BatchedSpeculativeGenerator(RequestAdmission, BatchedDrafting, TargetVerification):
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

    The engine's parts are its bases: :class:`~hf_dspark.decoding.admission.RequestAdmission` (the queue and
    the batch's membership), :class:`~hf_dspark.decoding.batched_drafting.BatchedDrafting` (the drafter's
    call) and :class:`~hf_dspark.decoding.target_pass.TargetVerification` (the target's pass, verification
    and rollback); this class holds the settings and runs the round.
    """

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
        self._target_kv = TargetKV(0, self.device)
        self._draft_kv = DraftKV(0, self.device, self.draft.config.num_hidden_layers)
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

    # ---------------------------------------------------------------- scheduling (after the drafter ran)
    def _schedule(self, survival, limits: list[int], drafted_rows: int = 0, tokens=None) -> list[int]:
        """Draft tokens each request verifies (:meth:`hf_dspark.decoding.round_plan.RoundPlanner.schedule`)."""
        return self.planner.schedule(survival, limits, drafted_rows, self.sampling.do_sample, self._active, tokens)
