"""The target's LM head during verification: a layout that is faster for a few rows on CPU fp32.

Ships as remote code beside drafter checkpoints (imports torch only); :mod:`generation_dspark`
re-exports every name.
"""

from __future__ import annotations

import weakref

import torch

# On CPU the target's LM head dominates a small model's forward (Gemma 3 270M: 262,144 x 640). For one
# row PyTorch uses a matrix-vector kernel that streams the weight once; for 2..8 rows ``x @ W.T`` goes to a
# GEMM that repacks the whole transposed weight and costs several one-row passes (figures: docs/experiments.md,
# "The verification head on CPU"). ``W @ x.T`` (the
# same products, the big operand untransposed) stays close to the one-row cost for a few rows. That is
# exactly the verification pass of speculative decoding (1 + k rows), so while a DSpark generation is
# running the target's output embedding uses that layout for 2..FAST_HEAD_MAX_ROWS rows on CPU fp32.
# Values are the same dot products summed in a different order (rounding-level differences, bounded in
# tests/models/test_verify_head.py);
# every other call (one row, prefill, other devices/dtypes) goes to nn.Linear unchanged.
FAST_HEAD_MAX_ROWS = 8


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` computed as ``(weight @ x.T).T`` (faster for a few rows on CPU)."""
    rows = x.reshape(-1, x.shape[-1])
    out = torch.mm(weight, rows.t()).t()
    if bias is not None:
        out = out + bias
    return out.contiguous().reshape(*x.shape[:-1], weight.shape[0])


def use_skinny(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``skinny_linear`` serves ``x @ weight.T``: 2..FAST_HEAD_MAX_ROWS rows, CPU, fp32, no gradient."""
    rows = x.numel() // max(x.shape[-1], 1)
    return (
        2 <= rows <= FAST_HEAD_MAX_ROWS
        and weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and x.dtype == torch.float32
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
    )


class _VerifyHead:
    """Per-module state of the verification layout: active while any owner (generation) is alive."""

    def __init__(self, module: torch.nn.Linear):
        self.module_ref = weakref.ref(module)
        self.owners = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        module = self.module_ref()
        if self.owners > 0 and use_skinny(x, module.weight):
            return skinny_linear(x, module.weight, module.bias)
        return type(module).forward(module, x)

    def __deepcopy__(self, memo):
        # ``copy.deepcopy(model)`` copies the head's ``__dict__``, which holds our bound ``forward``. Without
        # this the copy's head would keep calling the *original* module (a weakref copies as itself), so a
        # copy cast to another dtype or device would run the original's weights. The copy gets its own
        # inactive state bound to the copied module: it behaves as a plain ``nn.Linear``.
        module = self.module_ref()
        copied = memo.get(id(module)) if module is not None else None
        state = _VerifyHead(copied if copied is not None else module)
        memo[id(self)] = state
        return state

    def release(self) -> None:
        self.owners -= 1
        module = self.module_ref()
        if self.owners <= 0 and module is not None and module.__dict__.get("_dspark_verify_head") is self:
            module.__dict__.pop("forward", None)
            module.__dict__.pop("_dspark_verify_head", None)


def activate_verify_head(target_model, owner):
    """Use the skinny layout for ``target_model``'s LM head until ``owner`` is garbage collected.

    Returns a ``weakref.finalize`` handle (call it to release earlier; releasing twice is a no-op),
    or ``None`` when the layout does not apply (not an ``nn.Linear`` head, not CPU fp32).
    """
    head = target_model.get_output_embeddings() if hasattr(target_model, "get_output_embeddings") else None
    if type(head) is not torch.nn.Linear or head.weight.device.type != "cpu" or head.weight.dtype != torch.float32:
        return None
    state = head.__dict__.get("_dspark_verify_head")
    if state is None:
        state = _VerifyHead(head)
        head.__dict__["_dspark_verify_head"] = state
        head.__dict__["forward"] = state.forward
    state.owners += 1
    return weakref.finalize(owner, state.release)
