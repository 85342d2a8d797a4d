"""Ragged KV caches of the batched engine: per-row slot bookkeeping, row selection, merging, compaction.

See :mod:`hf_dspark.decoding.batched` ("Ragged KV caches") for why slots are never cropped: every forward
appends the same number of slots to every row, :class:`RaggedSlots` records which slots hold a
committed token and at which position, and :func:`ragged_causal_mask` turns that table into the
4-D attention mask of the next forward.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from hf_dspark.models.dspark.modeling_dspark import DSparkDraftCache

__all__ = ["RaggedSlots", "ragged_causal_mask", "PendingFeatures", "TargetKV", "DraftKV"]

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

    def _empty(self, rows: int) -> "_RaggedKV":
        raise NotImplementedError

    def subset(self, rows: torch.Tensor) -> "_RaggedKV":
        """A copy holding only ``rows``, e.g. for a drafter call over some of the requests."""
        sub = self._empty(len(rows))
        tensors = self.tensors()
        if tensors is not None:
            sub.set_tensors([t.index_select(0, rows) for t in tensors])
        sub.slots = self.slots.select(rows)
        return sub

    def merge_subset(self, rows: torch.Tensor, sub: "_RaggedKV") -> None:
        """Take back ``sub`` (made by ``subset(rows)``, then appended to): the slots ``sub`` appended go
        to ``rows``; every other row gets as many invalid (zero) slots, so all rows keep one length."""
        added = sub.slots.length - self.slots.length
        if added < 0:
            raise ValueError(f"the subset has {sub.slots.length} slots, fewer than the cache's {self.slots.length}")
        mine, theirs = self.tensors(), sub.tensors()
        if theirs is not None:
            merged = []
            for index, t in enumerate(theirs):
                if mine is None:
                    full = t.new_zeros(self.slots.rows, t.shape[1], t.shape[2], t.shape[3])
                else:
                    full = torch.cat([mine[index], mine[index].new_zeros(*mine[index].shape[:2], added,
                                                                         mine[index].shape[3])], 2)
                merged.append(full.index_copy_(0, rows, t))
            self.set_tensors(merged)
        grown = self.slots.append(self.slots.valid.new_zeros(self.slots.rows, added),
                                  self.slots.positions.new_zeros(self.slots.rows, added))
        grown.valid.index_copy_(0, rows, sub.slots.valid)
        grown.positions.index_copy_(0, rows, sub.slots.positions)
        self.slots = grown

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


class TargetKV(_RaggedKV):
    """The target's cache: a config-less ``DynamicCache`` (full ``DynamicLayer`` everywhere)."""

    def __init__(self, rows: int, device):
        super().__init__(rows, device)
        self.cache = DynamicCache()

    def _empty(self, rows):
        return TargetKV(rows, self.slots.valid.device)

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


class DraftKV(_RaggedKV):
    """The drafter's context cache (``DSparkDraftCache``)."""

    def __init__(self, rows: int, device, num_layers: int):
        super().__init__(rows, device)
        self.cache = DSparkDraftCache(num_layers)

    def _empty(self, rows):
        return DraftKV(rows, self.slots.valid.device, len(self.cache.keys))

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


def _cat_right_padded(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Concatenate [rows, T, C] tensors along rows, right-padding the shorter one in T with zeros."""
    width = max(a.shape[1], b.shape[1])

    def pad(t):
        if t.shape[1] == width:
            return t
        return torch.cat([t, t.new_zeros(t.shape[0], width - t.shape[1], t.shape[2])], 1)

    return torch.cat([pad(a), pad(b)], 0)


class PendingFeatures:
    """Target features of committed tokens the drafter has not read yet, per row (right-padded).

    ``features[r, :lengths[r]]`` are the features of the ``lengths[r]`` tokens just before row
    ``r``'s anchor, oldest first. A row that drafts consumes them; a row that skips the drafter
    (n-gram round, or a round the scheduler decided not to draft) keeps them and appends the next
    round's, so the drafter catches up with every token it missed the next time the row drafts.
    Slots past a row's length hold stale values that the drafter's mask never lets it read.
    """

    def __init__(self, features: torch.Tensor, lengths: torch.Tensor):
        self.features = features  # [rows, T, C]
        self.lengths = lengths  # [rows] long

    @classmethod
    def empty(cls, rows: int, width: int, dtype, device) -> "PendingFeatures":
        return cls(torch.zeros(rows, 0, width, dtype=dtype, device=device), torch.zeros(rows, dtype=torch.long, device=device))

    @property
    def rows(self) -> int:
        return self.features.shape[0]

    def select(self, rows: torch.Tensor) -> "PendingFeatures":
        return PendingFeatures(self.features.index_select(0, rows), self.lengths.index_select(0, rows))

    def extend(self, other: "PendingFeatures") -> "PendingFeatures":
        return PendingFeatures(_cat_right_padded(self.features, other.features.to(self.features.dtype)),
                               torch.cat([self.lengths, other.lengths]))

    def consume(self, rows: torch.Tensor) -> None:
        """The drafter read everything pending for ``rows``."""
        self.lengths = self.lengths.index_fill(0, rows, 0)
        if not bool(self.lengths.any()):
            self.features = self.features[:, :0]

    def append(self, features: torch.Tensor, counts: torch.Tensor) -> None:
        """Append ``features[r, :counts[r]]`` to row ``r`` ([rows, W, C] and [rows]).

        Rows that skip the drafter append every round, so the buffer grows geometrically and new
        features are written in place (one scatter): re-allocating and copying everything pending
        each round was a visible part of the round time with many requests that seldom draft, whose
        prompt features stay pending (docs/serving.md)."""
        features = features.to(self.features.dtype)
        lengths = self.lengths + counts
        if not bool(self.lengths.any()):  # nothing carried over (every row drafted): no copy
            self.features, self.lengths = features, lengths
            return
        needed = int(lengths.max())
        if needed > self.features.shape[1]:
            grown = self.features.new_zeros(self.rows, max(needed, 2 * self.features.shape[1]), self.features.shape[2])
            grown[:, : self.features.shape[1]] = self.features
            self.features = grown
        offsets = torch.arange(features.shape[1], device=counts.device)
        rows, columns = (offsets[None, :] < counts[:, None]).nonzero(as_tuple=True)
        self.features[rows, self.lengths[rows] + columns] = features[rows, columns]
        self.lengths = lengths
