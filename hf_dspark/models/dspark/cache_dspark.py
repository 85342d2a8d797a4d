"""The drafter's context cache: per-layer keys/values of the target features of committed tokens.

This file ships as remote code next to drafter checkpoints: it imports only torch.
:meth:`DSparkDraftModel.draft_block` (``modeling_dspark.py``) appends to it once per drafting round;
the batched engine (``hf_dspark.decoding.ragged``) reassigns its lists when rows join, leave or compact.
"""

from __future__ import annotations

import torch


class DSparkDraftCache:
    """Per-layer keys/values of the injected context of committed tokens.

    Only context rows are stored (never block tokens), so a round appends the features of the
    tokens accepted since the previous round and nothing has to be rolled back on rejection.
    Rows are written into a preallocated buffer per layer that doubles when full, so a round copies
    only its new rows (``torch.cat`` of the whole context every round would copy it all);
    ``keys[i]`` / ``values[i]`` are views of the filled part, [batch, kv_heads, length, head_dim].
    Code that assigns those lists itself (the batched engine) is followed: a buffer is used only while
    ``keys[i]`` is still the view this cache handed out.
    """

    min_capacity = 64

    def __init__(self, num_layers: int):
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self._buffers: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * num_layers

    def get_seq_length(self) -> int:
        return 0 if self.keys[0] is None else self.keys[0].shape[2]

    def update(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        old_keys, old_values = self.keys[layer_idx], self.values[layer_idx]
        length = 0 if old_keys is None else old_keys.shape[2]
        needed = length + keys.shape[2]
        buffers = self._buffers[layer_idx]
        usable = (
            buffers is not None
            and (length == 0 or (_is_prefix_view(old_keys, buffers[0]) and _is_prefix_view(old_values, buffers[1])))
            and buffers[0].shape[2] >= needed
            and buffers[0].shape[:2] == keys.shape[:2] and buffers[0].shape[3:] == keys.shape[3:]
            and buffers[0].dtype == keys.dtype and buffers[0].device == keys.device
        )
        if not usable:
            capacity = max(self.min_capacity, 2 * needed)
            buffers = tuple(t.new_empty((*t.shape[:2], capacity, *t.shape[3:])) for t in (keys, values))
            if length:
                buffers[0][:, :, :length] = old_keys
                buffers[1][:, :, :length] = old_values
            self._buffers[layer_idx] = buffers
        buffers[0][:, :, length:needed] = keys
        buffers[1][:, :, length:needed] = values
        self.keys[layer_idx], self.values[layer_idx] = buffers[0][:, :, :needed], buffers[1][:, :, :needed]
        return self.keys[layer_idx], self.values[layer_idx]

    def crop(self, length: int) -> None:
        """Keep the first ``length`` context rows."""
        if length < 0:
            raise ValueError(f"DSparkDraftCache.crop(length={length}): length must be >= 0")
        for i, (k, v) in enumerate(zip(self.keys, self.values)):
            if k is not None:
                self.keys[i], self.values[i] = k[:, :, :length], v[:, :, :length]


def _is_prefix_view(view: torch.Tensor, buffer: torch.Tensor) -> bool:
    """``view`` is ``buffer[:, :, :n]`` for some n (same storage, start and strides; no device read)."""
    return view.data_ptr() == buffer.data_ptr() and view.stride() == buffer.stride() and view.shape[:2] == buffer.shape[:2]


__all__ = ["DSparkDraftCache"]
