"""Requests and decoding settings of the batched engine (:mod:`hf_dspark.decoding.batched`)."""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Iterable

import torch

from transformers import LogitsProcessorList
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from hf_dspark.errors import EngineRequestError

__all__ = ["SamplingSettings", "SpeculativeRequest", "checked_prompt", "prefill_groups"]


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
    started_at: float | None = None  # joined the batch (prefilled)
    first_token_at: float | None = None  # first output token committed
    finished_at: float | None = None
    # engine state: the last committed token (no KV yet) and its position
    anchor: int = 0
    anchor_position: int = 0
    predictions: list = field(default_factory=list)  # (round, prefix survival) of its latest drafted blocks
    reference: list[int] | None = None  # the target's greedy output, for the oracle policy

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


def prefill_groups(lengths: list[int], padding_slack: float = 0.25, min_tokens: int = 256) -> list[list[int]]:
    """Split requests joining together (their prefill ``lengths``) into groups prefilled by one forward each.

    A long prompt in the same forward pads every shorter one to its length (a measured case is in
    docs/experiments.md, "the engine against transformers' own LM head"). Shortest first, a group grows while its
    padded size stays within ``padding_slack`` of its tokens, or while it holds fewer than
    ``min_tokens`` tokens (each forward has a fixed cost). Returns indices into ``lengths``."""
    groups: list[list[int]] = []
    tokens = 0
    for index in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        length = lengths[index]
        if groups:
            padded = length * (len(groups[-1]) + 1)  # sorted: this one is the group's longest
            if tokens + length < min_tokens or padded <= (1 + padding_slack) * (tokens + length):
                groups[-1].append(index)
                tokens += length
                continue
        groups.append([index])
        tokens = length
    return groups


def checked_prompt(prompt_ids, vocab_size: int, name: str = "prompt_ids") -> list[int]:
    """``prompt_ids`` (a sequence or a 1-D / ``1 x n`` tensor) as a list of ints, refused with
    ``EngineRequestError`` unless every id is an integer in ``[0, vocab_size)``: a bad id would fail inside
    a round, half-way through the batch, and ``int()`` would truncate 3.7 to 3 and decode another prompt."""
    if isinstance(prompt_ids, torch.Tensor):
        if prompt_ids.dim() == 2 and prompt_ids.shape[0] == 1:
            prompt_ids = prompt_ids[0]
        if prompt_ids.dim() != 1 or prompt_ids.is_floating_point() or prompt_ids.is_complex():
            raise EngineRequestError(f"{name} must be a 1-D tensor of integer token ids, got shape "
                                     f"{tuple(prompt_ids.shape)} and dtype {prompt_ids.dtype}")
        prompt_ids = prompt_ids.tolist()
    if isinstance(prompt_ids, (str, bytes)):
        raise EngineRequestError(f"{name} is a string; tokenize it first (a list of token ids)")
    prompt = list(prompt_ids)
    if not prompt:
        raise EngineRequestError(f"{name} is empty; a request needs at least one prompt token")
    for position, token in enumerate(prompt):
        if isinstance(token, bool) or not isinstance(token, numbers.Integral):
            raise EngineRequestError(f"{name}[{position}]={token!r} is not an integer token id")
        if not 0 <= token < vocab_size:
            raise EngineRequestError(f"{name}[{position}]={token} is outside the target's vocabulary "
                                     f"(0..{vocab_size - 1}); was the prompt tokenized for another model?")
    return [int(t) for t in prompt]
