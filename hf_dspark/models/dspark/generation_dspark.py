"""`target.generate(..., assistant_model=dspark_drafter)`: the DSpark candidate generator.

This file ships as remote code next to drafter checkpoints (imports: torch, transformers and
its siblings only), so a user who loads a drafter with ``trust_remote_code=True`` gets DSpark
generation without installing hf-dspark.

How ``generate`` reaches :class:`DSparkCandidateGenerator` (the hook on transformers' private
``GenerationMixin._get_candidate_generator``, the transformers releases it supports, the refusals
of stateful targets and reused caches, who installs it) lives in :mod:`generate_hook_dspark`; its
public names are re-exported here so earlier imports keep working.

Verification policies (``draft.generation_config.verification_policy``)
-----------------------------------------------------------------------
* ``full``: submit the whole block;
* ``threshold``: cut at the first position whose (calibrated) prefix survival
  ``a_k = prod_{i<=k} c_i`` falls below ``confidence_threshold``;
* ``cost``: extend the submitted prefix while the expected tokens per second
  ``(1 + sum_{j<=L} a_j) / (T_draft + T_verify(1 + L))`` keeps improving and stop at the first
  non-improvement; ``T_verify(n)`` comes from ``latency_table`` (a target latency profile) and
  ``T_draft`` is measured during the call. Deciding on token ``k`` only ever looks at
  ``a_k``, which depends on the tokens before ``k`` and not on token ``k`` itself, so the cut is
  non-anticipating and the output distribution stays exact.
``policy="auto"`` (default) means ``cost`` when a cost curve is known for the target's device and dtype
(the drafter's ``latency_table``, else a registered latency source: with hf-dspark installed, a profile
of this target cached on this machine) and ``full`` otherwise.

N-gram rounds (``draft.generation_config.ngram_lookup_tokens``, off by default)
------------------------------------------------------------------------------
With ``ngram_lookup_tokens = N > 0``, a round first looks for an earlier occurrence of the
last ``ngram_max_size`` .. ``ngram_min_size`` tokens of the sequence (longest first). When
one exists, the round submits up to ``N`` tokens that followed it (as a one-hot proposal when
sampling) and skips the drafter; the target features of that round are kept and handed to
the drafter with the next block it drafts. Otherwise the drafter drafts as usual. The choice
depends only on the committed tokens, never on the tokens being proposed, so greedy output
still equals plain ``generate`` and sampled output still follows the target distribution.
It pays off where the target repeats itself (loops, code, quoting the prompt).

With ``ngram_lookup_tokens = "auto"`` and a cost curve, the copy length, whether a round without a match
drafts or decodes plainly, and an n-gram continuation appended to a fully submitted drafter block all
come from one model of a
round's time (drafting, the curve's ``T_verify``, the measured rest of the round) and the acceptance
copied tokens have had in this call (docs/decoding.md, "Lengths from the cost curve").
"""

from __future__ import annotations

import time

import torch
from transformers import GenerationConfig
from transformers.generation.candidate_generator import CandidateGenerator

from .generate_hook_dspark import (  # noqa: F401  (re-exported: the hook and the supported releases moved there)
    CHECKED_INTERNAL,
    CHECKED_INTERNAL_PARAMETERS,
    HOOKED_INTERNAL,
    HOOKED_INTERNAL_PARAMETERS,
    SUPPORTED_TRANSFORMERS,
    AssistedDecodingFeatures,
    assisted_decoding_features,
    attention_implementation,
    install_generate_hook,
    is_dspark_drafter,
    is_stateful_target,
    refuse_stateful_target,
    transformers_supported,
)
from .verify_head_dspark import (  # noqa: F401  (re-exported)
    FAST_HEAD_MAX_ROWS,
    activate_verify_head,
    skinny_linear,
)
from .warpers_dspark import VOCAB_LOCAL_WARPERS, FusedTopKTopPWarper, fuse_top_k_top_p
from .sampling_dspark import ProposalLaw, SupportWarp, begin_round, clear_round
from .generation_config_dspark import (  # noqa: F401  (re-exported)
    DEFAULT_DSPARK_GENERATION,
    LATENCY_SOURCES,
    POLICIES,
    DSparkGenerationConfig,
    DSparkGenerationStats,
    key_place,
    target_place,
    warn_once,
    check_dspark_generation_setting,
    default_dspark_generation_config,
    latency_table_fits,
)
from .policies_dspark import GENERATE, verification_policy_class
from .scheduling_dspark import (  # noqa: F401  (re-exported for callers of earlier releases; import them from scheduling_dspark)
    prefix_survival,
    threshold_length,
    latency_points,
    nondecreasing_fit,
    interpolate,
    interpolate_latency,
    latency_from_table,
    prefix_length,
    cost_length,
    check_ngram_settings,
    ngram_continuation,
    ngram_match,
    ProposalAcceptance,
    fixed_ngram_tokens,
    curve_tokens,
    copy_length,
    expected_rate,
)


# ----------------------------------------------------------------------------- generator
DRAFTER_RETRY = 4  # with lengths from the cost curve: draft (copy) again after this many rounds passed it over
# A retried copy that commits fewer tokens per second than the drafter's rounds doubles the number of matches
# passed over before the next retry, up to this many; one that commits more brings it back to DRAFTER_RETRY.
COPY_RETRY_MAX = 64
# Weight of the past in the drafter's running rate: committed tokens and modelled seconds of its rounds are
# each summed with this decay, and the rate is their ratio (a mean of per-round rates would swing with every
# round's accepted count).
DRAFTER_RATE_DECAY = 0.9


class DSparkCandidateGenerator(CandidateGenerator):
    """Candidate generator driving a DSpark drafter inside transformers' assisted decoding.

    Per round: take the target features of the tokens accepted last round, run one drafter
    block with the incremental draft cache, run the Markov loop (sampling through the same
    logits processors/warpers the target uses), compute confidences, choose how many tokens to
    submit, and return them with the exact logits each was drawn from.
    """

    requires_model_outputs = True

    def __init__(
        self,
        target_model,
        assistant_model,
        generation_config: GenerationConfig,
        logits_processor=None,
        input_ids: torch.LongTensor | None = None,
    ):
        from .cache_dspark import DSparkDraftCache

        if input_ids is not None and input_ids.shape[0] != 1:
            raise ValueError(
                f"DSpark assisted generate() runs one sequence at a time (got batch size {input_ids.shape[0]}); "
                "transformers' assisted decoding is batch-size-1 only. For several requests use the batched "
                "engine: hf_dspark.decoding.batched.BatchedSpeculativeGenerator (or `hf-dspark bench-batch`)."
            )
        self.draft = assistant_model
        self.draft.bind_target(target_model)
        cfg = self.draft.config
        self.block_size = cfg.block_size
        # Only the layers the drafter reads; a caller asking for every hidden state in the generate output
        # (``output_hidden_states=True``) gets all of them, since transformers splits each layer's states.
        wants_all = bool(generation_config.output_hidden_states and generation_config.return_dict_in_generate)
        self.model_kwargs_overrides = {
            "output_hidden_states": True if wants_all else [i + 1 for i in cfg.target_layer_ids]
        }
        self.cache = DSparkDraftCache(cfg.num_hidden_layers)
        self.max_length = generation_config.max_length
        self.do_sample = bool(generation_config.do_sample)
        self.vocab_size = cfg.vocab_size
        settings = dict(DEFAULT_DSPARK_GENERATION)
        gen_cfg = getattr(self.draft, "generation_config", None)
        if gen_cfg is not None:
            for key in settings:
                if getattr(gen_cfg, key, None) is not None:
                    settings[key] = getattr(gen_cfg, key)
        policy_class = verification_policy_class(settings["verification_policy"], GENERATE)
        policy = policy_class.name
        curve, refused = self._latency_curve(settings, target_model, policy)
        if refused and policy == "cost" and curve is None:
            policy_class = verification_policy_class("full")
        self.verification = policy_class(settings["confidence_threshold"], settings["min_draft_tokens"]).resolve(
            GENERATE, cost_curve=bool(curve), confidence_head=cfg.enable_confidence_head is not False)
        policy = self.verification.name
        if policy == "cost" and not curve:
            raise ValueError(
                "verification_policy='cost' needs draft.generation_config.latency_table; measure it with "
                "hf_dspark.profile_latency(target) (or `hf-dspark profile`) and set it, or use 'full'/'threshold'."
            )
        if self.verification.needs_confidence_head and cfg.enable_confidence_head is False:
            raise ValueError(f"verification_policy={policy!r} needs a drafter with a confidence head")
        self.policy = policy
        # transformers passes the same list to the verification loop, so fusing it here speeds up both sides.
        self.fused_warpers = fuse_top_k_top_p(logits_processor) if settings["fast_warpers"] and self.do_sample else 0
        self.logits_processor = logits_processor
        # Sampling through [temperature] top-k [top-p] (fast_warpers): every law of a round, the drafter's and the
        # target's, is computed on its support and the accept/reject draw runs there (sampling_dspark.py). Not when
        # the caller asks for the processed scores (output_scores), which are full-vocabulary by definition.
        wants_scores = bool(generation_config.output_scores and generation_config.return_dict_in_generate)
        self.support_warp = None
        if (self.do_sample and settings["fast_warpers"] and not wants_scores
                and getattr(generation_config, "assistant_ensemble_weight", None) is None):
            self.support_warp = SupportWarp.from_processors(logits_processor)
        self._support_active = False
        clear_round()
        self.threshold = float(settings["confidence_threshold"])
        self.min_tokens = int(settings["min_draft_tokens"])
        self.latency_points = curve
        self.ngram_sizes = (int(settings["ngram_max_size"]), int(settings["ngram_min_size"]))
        # "auto" with a cost curve: every copy length, block extension and n-gram-or-drafter choice comes from
        # the curve (lengths up to the longest measured pass); without one, fixed copies of one block.
        self.adaptive = settings["ngram_lookup_tokens"] == "auto" and curve is not None
        if settings["ngram_lookup_tokens"] == "auto":
            self.ngram_tokens = max(self.block_size, curve_tokens(curve) - 1) if self.adaptive else self.block_size
        else:
            self.ngram_tokens = int(settings["ngram_lookup_tokens"] or 0)
        check_ngram_settings(self.ngram_tokens, *self.ngram_sizes)
        # per-position acceptance of copied tokens, from a prior of 0.9 worth 4 attempts (as the batched engine),
        # kept per size of the matched suffix n-gram (a one-token match predicts less than a three-token one)
        self.ngram_acceptance = {size: ProposalAcceptance(prior=0.9, prior_weight=4.0)
                                 for size in range(1, self.ngram_sizes[0] + 1)}
        self._match_size = 0
        self.extension_acceptance = ProposalAcceptance(prior=0.9, prior_weight=4.0)  # continuations of full blocks
        self.overhead_ema = 0.0  # round wall time the cost curve and the drafter timing do not explain
        self.drafter_rate_ema: float | None = None  # committed tokens per modelled second of drafter rounds
        self._drafter_tokens = self._drafter_seconds = 0.0  # their decayed sums (DRAFTER_RATE_DECAY)
        self._round_model: tuple[float, float] | None = None  # (round begin, modelled seconds) of the last round
        self._extension = 0
        self._skipped = 0  # consecutive rounds that skipped the drafter because plain decoding paid more
        self._copies_skipped = 0  # consecutive n-gram matches passed over because the drafter paid more
        self._copy_retry = DRAFTER_RETRY  # matches passed over before a copy is retried (COPY_RETRY_MAX)
        self._retried_copy = False  # this round's copy was taken only to retry copying
        self._plain_round = False
        # How many tokens a round may propose; 5.25+ sizes the target's recurrent-state history by it.
        self.max_proposal_tokens = max(self.block_size, self.ngram_tokens)
        self._pending: list[torch.Tensor] = []  # target features not yet handed to the drafter (n-gram rounds)
        self._ngram_round = False
        self.draft_time_ema: float | None = None
        self._draft_blocks = 0
        # Released when this generator is garbage collected, i.e. when generate() returns.
        handle = activate_verify_head(target_model, self) if settings["fast_verify_head"] else None
        self.fast_verify_head = handle is not None
        self.stats = DSparkGenerationStats(self.block_size)
        self.stats["policy"] = policy
        self.stats["fast_verify_head"] = self.fast_verify_head
        self.stats["fused_warpers"] = self.fused_warpers
        self.stats["support_sampling"] = self.support_warp is not None
        self.stats["ngram_lookup_tokens"] = self.ngram_tokens
        self.draft.last_generation_stats = self.stats
        self._is_prefill = True
        self._submitted = 0
        self._last_confidence: torch.Tensor | None = None  # raw confidence logits of the submitted tokens
        self._draft_space_logits = False  # set per block by _chooser
        self._round_start = time.perf_counter()

    @staticmethod
    def _latency_curve(settings: dict, target_model, policy: str) -> tuple[list | None, bool]:
        """The target's verification cost curve ``[(tokens, seconds), ...]`` on its device and dtype, and
        whether a saved table was refused for being measured elsewhere.

        The drafter's own ``latency_table`` when it was measured where the target runs; else the first
        registered latency source's (with hf-dspark installed: a profile of this target cached on this
        machine by ``hf_dspark.profile_latency``); else ``None``.
        """
        table, key = settings["latency_table"], settings["latency_profile_key"]
        refused = bool(table) and not latency_table_fits(key, target_model)
        if table and not refused:
            return latency_points(table), False
        if policy in ("auto", "cost"):
            for source in LATENCY_SOURCES:
                found = source(target_model)
                if found:
                    return latency_points(found), refused
        if refused:
            # a table measured on another device or dtype would pick verification lengths for other costs
            place = target_place(target_model)
            warn_once(
                f"the drafter's latency_table was measured on {key_place(key)}, but the target runs on {place}: "
                f"it is not used (verification_policy {policy!r} -> 'full'). Profile this setup: hf-dspark profile "
                f"--target ... --device {place.split('/')[0]} --dtype {place.split('/')[1]}"
            )
        return None, refused

    @property
    def num_drafting_tokens(self) -> int:
        """The most tokens one round proposes (read by transformers >= 5.25's assisted decoding)."""
        return self.max_proposal_tokens

    # -- helpers -----------------------------------------------------------------------
    def _new_context(self, model_outputs, input_ids: torch.LongTensor, n_last_matches: int) -> torch.Tensor:
        if model_outputs is None or getattr(model_outputs, "hidden_states", None) is None:
            raise ValueError("DSpark drafting needs the target's hidden states from the previous forward pass")
        # After prefill every prompt token is context; afterwards only the anchor + accepted drafts.
        n_new = input_ids.shape[1] - 1 if self._is_prefill else n_last_matches + 1
        layers = [model_outputs.hidden_states[i + 1] for i in self.draft.config.target_layer_ids]
        if any(h is None for h in layers):
            raise ValueError("the target did not return the hidden states of the drafter's target_layer_ids")
        # Layers of a target split over devices return their hidden states where they ran: move each
        # one to the drafter before they are combined (a no-op when all are there already).
        device = self.draft.device
        return torch.cat([h[:, :n_new].to(device) for h in layers], dim=-1)

    def _full_vocab(self, draft_logits: torch.Tensor) -> torch.Tensor:
        d2t = self.draft.draft_to_target
        if d2t is None:
            return draft_logits.float()
        full = draft_logits.new_full((*draft_logits.shape[:-1], self.vocab_size), float("-inf"), dtype=torch.float32)
        full[..., d2t] = draft_logits.float()
        return full

    def _chooser(self, input_ids: torch.LongTensor, drafted: list, laws: list | None = None):
        """Returns the Markov loop's per-position choice function (processors, then argmax/sample). With a
        support warp each position's sparse law is appended to ``laws``."""
        t2d = self.draft.target_to_draft_table()

        processors = self.logits_processor if self.logits_processor is not None else []
        plain_greedy = not self.do_sample and len(processors) == 0
        # Sampling with a reduced draft vocabulary and only vocabulary-local warpers (temperature, top-k,
        # top-p, min-p): warp and sample in the draft vocabulary, return the result scattered over the
        # full vocabulary (-inf elsewhere). Same distribution as warping the full vocabulary.
        draft_space = (
            self.do_sample
            and self.draft.draft_to_target is not None
            and all(type(p) in VOCAB_LOCAL_WARPERS for p in processors)
        )
        # draft-space scores go to the full vocabulary once per block, for the submitted tokens only
        self._draft_space_logits = draft_space
        warp = self.support_warp if self._support_active else None

        def choose(logits_k: torch.Tensor, k: int):
            if warp is not None:  # the law on its support; laws[k] = (ids in the drafter's vocabulary, probs)
                ids, probs = warp.law(logits_k, keep_ties=False)  # any law is exact for proposals: no host read
                draft_ids = ids.gather(-1, torch.multinomial(probs, num_samples=1)).squeeze(-1)
                laws.append((ids, probs))
                drafted.append(self.draft.draft_ids_to_target(draft_ids)[:, None])
                return draft_ids, logits_k
            if plain_greedy:  # argmax over the draft vocabulary; no full-vocabulary logits needed
                draft_ids = logits_k.argmax(-1)
                drafted.append(self.draft.draft_ids_to_target(draft_ids)[:, None])
                return draft_ids, logits_k
            if draft_space:
                scores = logits_k.float()
                for processor in processors:
                    scores = processor(input_ids, scores)  # these warpers never read the ids
                draft_ids = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(-1)
                drafted.append(self.draft.draft_ids_to_target(draft_ids)[:, None])
                return draft_ids, scores
            scores = self._full_vocab(logits_k)
            if len(processors) > 0:
                prefix = torch.cat([input_ids] + drafted, dim=1) if drafted else input_ids
                scores = self.logits_processor(prefix, scores)
            if self.do_sample:
                token = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(-1)
            else:
                token = scores.argmax(-1)
            drafted.append(token[:, None])
            draft_ids = token if t2d is None else t2d[token]
            return draft_ids, scores

        return choose

    def _survival(self, confidence: torch.Tensor | None, n_max: int) -> list[float] | None:
        """Calibrated prefix survival of the first ``n_max`` drafted tokens (``None`` without confidences)."""
        if confidence is None:
            return None
        return prefix_survival(self.draft.calibrated_confidence(confidence[0, :n_max])).tolist()

    def _submit_length(self, confidence: torch.Tensor | None, n_max: int, survival: list[float] | None = None) -> int:
        """Draft tokens to submit out of ``n_max``: the verification policy's choice (the whole block without
        confidences)."""
        if self.policy == "full" or confidence is None:
            return n_max
        survival = survival if survival is not None else self._survival(confidence, n_max)
        round_seconds = None
        if self.draft_time_ema is not None:
            draft_seconds = self.draft_time_ema
            round_seconds = lambda n: self._round_seconds(n, draft_seconds)  # noqa: E731
        return self.verification.submit_length(survival, n_max, round_seconds)

    def _pass_seconds(self, proposed: int) -> float:
        """The verification pass over the anchor and ``proposed`` tokens, from the cost curve."""
        return interpolate_latency(self.latency_points, 1 + proposed)

    def _round_seconds(self, proposed: int, draft_seconds: float = 0.0) -> float:
        """Modelled wall time of a round proposing ``proposed`` tokens: drafting, the verification pass and
        the measured rest of the round (``overhead_ema``)."""
        return draft_seconds + self._pass_seconds(proposed) + self.overhead_ema

    def _copy_length(self, available: int, size: int) -> int:
        """How many of ``available`` tokens looked up after a ``size``-token match an n-gram round submits (>= 1)."""
        if not self.adaptive:
            return available
        return copy_length(self.ngram_acceptance[size].survival(available), self._round_seconds)

    def _copy_pays(self, length: int, size: int) -> bool:
        """Whether a copy of ``length`` tokens is expected to commit at least as many tokens per second as the
        drafter's rounds have in this call (always without a curve). After ``DRAFTER_RETRY`` matches passed
        over a copy is taken anyway, so the copies' estimate keeps learning; retries that keep losing to the
        drafter come less and less often (:meth:`_after_retried_copy`)."""
        self._retried_copy = False
        if not self.adaptive or self.drafter_rate_ema is None:
            self._copies_skipped = 0
            return True
        if self._copies_skipped >= self._copy_retry:
            self._copies_skipped = 0
            self._retried_copy = True
            return True
        survival = self.ngram_acceptance[size].survival(length)
        if expected_rate(survival, self._round_seconds(length)) >= self.drafter_rate_ema:
            self._copies_skipped = 0
            return True
        self._copies_skipped += 1
        return False

    def _after_retried_copy(self, committed: int) -> None:
        """A copy taken only to retry copying committed ``committed`` tokens: when that is fewer per modelled
        second than the drafter's rounds commit, the next retry waits twice as many matches (up to
        ``COPY_RETRY_MAX``); otherwise retries come every ``DRAFTER_RETRY`` matches again. (Under sampling a
        copied token is accepted with the target's probability of it, often low: a retry every few matches
        would hand a large share of the rounds to copies that the drafter beats.)"""
        if self._round_model is None or self.drafter_rate_ema is None:
            return
        rate = committed / (self._round_model[1] + self.overhead_ema)
        if rate < self.drafter_rate_ema:
            self._copy_retry = min(2 * self._copy_retry, COPY_RETRY_MAX)
        else:
            self._copy_retry = DRAFTER_RETRY

    def _plain_pays(self) -> bool:
        """Whether a round without drafting (the target decodes one token) is expected to commit more tokens per
        second than the drafter's rounds have in this call. Every ``DRAFTER_RETRY``-th skipped round drafts
        anyway, so the drafter's estimate keeps learning."""
        if not self.adaptive or self.drafter_rate_ema is None or self._skipped >= DRAFTER_RETRY:
            return False
        return 1.0 / self._round_seconds(0) > self.drafter_rate_ema

    def _extend(self, sequence: torch.Tensor, survival: list[float] | None, length: int, room: int):
        """An n-gram continuation appended to a fully submitted drafter block, as long as the cost curve says
        its expected tokens pay for the wider pass (``None``: no extension)."""
        space = min(self.max_proposal_tokens, room) - length
        if not self.adaptive or survival is None or length < len(survival) or space <= 0 or survival[-1] <= 0:
            return None
        lookup = ngram_continuation(sequence, space, *self.ngram_sizes)
        if lookup is None:
            return None
        extended = survival + self.extension_acceptance.survival(space, start=survival[-1])
        draft_seconds = self.draft_time_ema or 0.0
        total = prefix_length(extended, lambda n: self._round_seconds(n, draft_seconds), length)
        return lookup[: total - length] if total > length else None

    def _no_proposal(self, input_ids: torch.LongTensor) -> torch.Tensor | None:
        """Candidate logits of a round that proposes nothing: ``None`` (transformers draws from the processed
        scores), or on the support the placeholder of an empty proposal (transformers no longer processes them)."""
        if not self._support_active:
            return None
        empty = input_ids.new_zeros((0,))
        return begin_round(ProposalLaw.one_hot(empty), self.support_warp, input_ids.device)

    def _one_hot(self, tokens: torch.Tensor, device) -> torch.Tensor:
        """[1, n, V] logits of deterministic proposals: q = 1 at each proposed token."""
        logits = torch.full((1, tokens.shape[0], self.vocab_size), float("-inf"), device=device)
        logits[0, torch.arange(tokens.shape[0], device=device), tokens.to(device)] = 0.0
        return logits

    # -- protocol ----------------------------------------------------------------------
    @torch.no_grad()
    def get_candidates(
        self,
        input_ids: torch.LongTensor,
        model_kwargs: dict | None = None,
        model_outputs=None,
        is_first_iteration: bool = False,
        n_last_matches: int = 0,
        **kwargs,
    ) -> tuple[torch.LongTensor, torch.Tensor | None]:
        now = time.perf_counter()
        if is_first_iteration:
            # transformers runs the target's prefill first; we draft from its features next round.
            self._round_start = now
            return input_ids, None
        if self._is_prefill:
            self.stats["prefill_seconds"] += now - self._round_start
        elif self._round_model is not None:
            # what the last round cost beyond the model of it: the loop around the passes, learnt per call
            begin, modelled = self._round_model
            surplus = max(0.0, (now - begin) - modelled)
            self.overhead_ema = 0.8 * self.overhead_ema + 0.2 * surplus
        self._round_model = None
        if self.support_warp is not None and not self._support_active:
            # From the first verification on, transformers must not warp the verified positions over the whole
            # vocabulary (its prefill draw, made before this call, used them): the round's placeholder takes the
            # draw to speculative_sample, which warps on the support. The processor list is this call's own.
            self.logits_processor[:] = []
            self._support_active = True

        context = self._new_context(model_outputs, input_ids, n_last_matches)
        self._is_prefill = False
        room = self.max_length - input_ids.shape[1]
        n_max = min(self.block_size, room)
        self._ngram_round = self._plain_round = False
        self._extension = 0
        if room > 0 and self.ngram_tokens > 0:
            found = ngram_match(input_ids[0], min(self.ngram_tokens, room), *self.ngram_sizes)
            if found is not None:
                lookup, self._match_size = found
                length = self._copy_length(lookup.shape[0], self._match_size)
                if self._copy_pays(length, self._match_size):
                    if self.adaptive:
                        self._round_model = (now, self._pass_seconds(length))
                    return self._ngram_candidates(input_ids, lookup[:length], context)
        if n_max > 0 and self._plain_pays():
            # the drafter has been committing fewer tokens per second than plain decoding: a plain round
            self._skipped += 1
            self._pending.append(context)
            self._plain_round = True
            self._submitted = 0
            self._last_confidence = None
            self._round_model = (now, self._pass_seconds(0))
            self._round_start = time.perf_counter()
            return input_ids, self._no_proposal(input_ids)
        self._skipped = 0
        if self._pending:
            context = torch.cat(self._pending + [context], dim=1)
            self._pending = []
        if n_max <= 0:
            # nothing to draft; still append the new context so the draft cache stays in sync
            self.draft.draft_block(input_ids[:, -1].to(self.draft.device), context, self.cache)
            self._submitted = 0
            self._last_confidence = None
            self._round_start = time.perf_counter()
            return input_ids, self._no_proposal(input_ids)

        start = time.perf_counter()
        anchor = input_ids[:, -1].to(self.draft.device)
        block = self.draft.draft_block(anchor, context, self.cache)
        drafted: list[torch.Tensor] = []
        laws: list[tuple[torch.Tensor, torch.Tensor]] = []
        tokens, logits, confidence = self.draft.sample_block(
            block.base_logits, block.hidden_states, anchor, choose=self._chooser(input_ids, drafted, laws),
            num_tokens=n_max
        )
        survival = self._survival(confidence, n_max) if self.policy != "full" or self.adaptive else None
        length = self._submit_length(confidence, n_max, survival)
        # the survival's .tolist() above already waited for the drafter's kernels, so on an accelerator this
        # wall time is the drafter's and not its launch time; the first block (allocator, kernel warm-up) is
        # not a sample of the steady cost and stays out of the estimate
        elapsed = time.perf_counter() - start
        self._draft_blocks += 1
        if self._draft_blocks > 1:
            self.draft_time_ema = elapsed if self.draft_time_ema is None else 0.8 * self.draft_time_ema + 0.2 * elapsed
        self.stats["draft_seconds"] += elapsed

        proposal = tokens[:, :length].to(input_ids.device)
        extension = self._extend(torch.cat([input_ids[0], proposal[0]]), survival, length, room)
        self._extension = 0 if extension is None else extension.shape[0]
        self._submitted = length + self._extension
        self._last_confidence = None if confidence is None else confidence[0, :length]
        if self.adaptive and self._draft_blocks > 1:
            self._round_model = (now, elapsed + self._pass_seconds(self._submitted))
        self._round_start = time.perf_counter()
        candidates = torch.cat([input_ids, proposal] + ([extension[None]] if self._extension else []), dim=1)
        candidate_logits = None
        if self._support_active:
            parts = [ProposalLaw(self.draft.draft_ids_to_target(ids), probs) for ids, probs in laws[:length]]
            if self._extension:
                parts.append(ProposalLaw.one_hot(extension))
            proposal = ProposalLaw.concat(parts) if parts else ProposalLaw.one_hot(proposal[0])
            candidate_logits = begin_round(proposal, self.support_warp, input_ids.device)
        elif self.do_sample:
            candidate_logits = logits[:, :length]
            if self._draft_space_logits:
                candidate_logits = self._full_vocab(candidate_logits)
            candidate_logits = candidate_logits.to(input_ids.device)
            if self._extension:
                candidate_logits = torch.cat([candidate_logits, self._one_hot(extension, input_ids.device)], dim=1)
        return candidates, candidate_logits

    def _ngram_candidates(self, input_ids: torch.LongTensor, lookup: torch.Tensor, context: torch.Tensor):
        """An n-gram round: submit the looked-up tokens, keep this round's features for the drafter."""
        self._pending.append(context)
        self._ngram_round = True
        self._submitted = lookup.shape[0]
        self._last_confidence = None
        self._round_start = time.perf_counter()
        candidates = torch.cat([input_ids, lookup[None].to(input_ids.device)], dim=1)
        if not self.do_sample:
            return candidates, None
        if self._support_active:
            return candidates, begin_round(ProposalLaw.one_hot(lookup), self.support_warp, input_ids.device)
        # A deterministic proposal is the one-hot distribution q = 1 at the copied token.
        return candidates, self._one_hot(lookup, input_ids.device)

    def update_candidate_strategy(self, input_ids: torch.LongTensor, scores: torch.Tensor, num_matches: int):
        elapsed = time.perf_counter() - self._round_start
        if self._is_prefill:
            return
        matches = min(int(num_matches), self._submitted)
        self.stats["verify_seconds"] += elapsed
        self.stats.record_round(self._submitted, matches, ngram=self._ngram_round, extension=self._extension,
                                plain=self._plain_round)
        if self._plain_round:
            return
        if self._ngram_round:
            self.ngram_acceptance[self._match_size].record(self._submitted, matches)
            if self._retried_copy:
                self._after_retried_copy(1 + matches)
            return
        drafted = self._submitted - self._extension
        if self._extension and matches >= drafted:  # the extension was reached
            self.extension_acceptance.record(self._extension, matches - drafted)
        if self._round_model is not None:
            self._drafter_tokens = DRAFTER_RATE_DECAY * self._drafter_tokens + (1 + matches)
            self._drafter_seconds = DRAFTER_RATE_DECAY * self._drafter_seconds + self._round_model[1] + self.overhead_ema
            self.drafter_rate_ema = self._drafter_tokens / self._drafter_seconds
        # Opt-in per-round record for calibration (hf_dspark.decoding.calibration): set draft.record_rounds = [].
        rounds = getattr(self.draft, "record_rounds", None)
        if isinstance(rounds, list):
            conf = self._last_confidence
            rounds.append({
                "confidence_logits": [] if conf is None else conf.float().tolist(),
                "submitted": drafted,
                "accepted": min(matches, drafted),
            })


__all__ = [
    "DSparkCandidateGenerator",
    "DSparkGenerationConfig",
    "DSparkGenerationStats",
    "activate_verify_head",
    "skinny_linear",
    "FusedTopKTopPWarper",
    "fuse_top_k_top_p",
    "install_generate_hook",
    "is_dspark_drafter",
    "cost_length",
    "prefix_length",
    "check_dspark_generation_setting",
    "check_ngram_settings",
    "ngram_continuation",
    "threshold_length",
    "interpolate",
    "nondecreasing_fit",
    "latency_from_table",
    "latency_table_fits",
    "prefix_survival",
    "HOOKED_INTERNAL",
    "CHECKED_INTERNAL",
    "SUPPORTED_TRANSFORMERS",
]
