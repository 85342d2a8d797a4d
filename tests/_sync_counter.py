"""A counter of host synchronisations, for tests on CPU (where ``torch.cuda.set_sync_debug_mode`` cannot see them).

:class:`HostSyncCounter` is a ``TorchFunctionMode`` that records every tensor operation that makes the
host wait for the device on an accelerator: reading a value (``item``, ``tolist``, ``bool``/``int``/
``float`` of a tensor), copying from an accelerator to the CPU, and the operations whose output size depends on the data
(``nonzero``, boolean-mask indexing, ``masked_select``, ``unique``, ``repeat_interleave`` with tensor
repeats, ``torch.equal``). Each record names the kind and the innermost frame of hf-dspark or
transformers code that asked for it, so a test can bound the syncs of one library.
"""

from __future__ import annotations

import sys
from collections import Counter

import torch
from torch.overrides import TorchFunctionMode

_READS = {
    torch.Tensor.item: "item", torch.Tensor.tolist: "tolist", torch.Tensor.__bool__: "bool",
    torch.Tensor.__int__: "int", torch.Tensor.__float__: "float", torch.Tensor.__index__: "index",
    torch.Tensor.numpy: "numpy",
}
_DATA_DEPENDENT = {
    torch.nonzero: "nonzero", torch.Tensor.nonzero: "nonzero", torch.masked_select: "masked_select",
    torch.Tensor.masked_select: "masked_select", torch.unique: "unique", torch.Tensor.unique: "unique",
    torch.equal: "equal", torch.Tensor.equal: "equal",
}


def _index_syncs(index) -> str | None:
    """Boolean masks (the output size depends on the data) and slices bounded by tensors (the bound is read
    on the host) make indexing wait for the device. (A 0-d integer tensor index is not counted: on CUDA
    PyTorch indexes with it on the device.)"""
    for item in index if isinstance(index, tuple) else (index,):
        if isinstance(item, torch.Tensor) and item.dtype == torch.bool:
            return "bool-index"
        if isinstance(item, slice) and any(isinstance(v, torch.Tensor) for v in (item.start, item.stop, item.step)):
            return "tensor-slice"
    return None


class HostSyncCounter(TorchFunctionMode):
    """``with HostSyncCounter() as syncs: ...``; then ``syncs.total``, ``syncs.count(where="hf_dspark")``,
    ``syncs.by_site()``."""

    def __init__(self):
        super().__init__()
        self.records: list[tuple[str, str]] = []  # (kind, "module:function:line" of the asking library frame)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kind = _READS.get(func) or _DATA_DEPENDENT.get(func)
        if func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__) and len(args) > 1 and _index_syncs(args[1]):
            kind = _index_syncs(args[1])
        elif func in (torch.repeat_interleave, torch.Tensor.repeat_interleave) and len(args) > 1 \
                and isinstance(args[1], torch.Tensor) and "output_size" not in kwargs:
            kind = "repeat_interleave"
        elif func in (torch.Tensor.to, torch.Tensor.cpu) and args[0].device.type != "cpu" and (func is torch.Tensor.cpu or any(
                str(a).startswith("cpu") for a in (*args[1:], kwargs.get("device")) if isinstance(a, (str, torch.device)))):
            kind = "to-cpu"  # a copy from an accelerator to the host (on a CPU-only machine: never)
        if kind is not None:
            self.records.append((kind, self._site()))
        return func(*args, **kwargs)

    @staticmethod
    def _site() -> str:
        frame = sys._getframe(2)
        while frame is not None:
            name = frame.f_globals.get("__name__", "")
            if name.startswith(("hf_dspark", "transformers")) or "dspark" in name:
                return f"{name}:{frame.f_code.co_name}:{frame.f_lineno}"
            frame = frame.f_back
        return "other"

    @property
    def total(self) -> int:
        return len(self.records)

    def count(self, where: str = "") -> int:
        return sum(1 for _, site in self.records if site.startswith(where))

    def by_site(self) -> Counter:
        return Counter(f"{kind} @ {site}" for kind, site in self.records)
