"""Right-padded target forwards that spend no position-wise compute on their padding slots.

A round of the batched engine scores every row right-padded to the widest one: a row verifying two
draft tokens next to a row copying seven n-gram tokens carries five padding slots. Only attention
mixes slots; every other layer (the MLPs, the attention's input and output projections, the LM
head) works on each slot alone. :func:`real_slots_only` hooks those layers for one forward so that
they see the real slots only, packed into one row, and scatters their outputs back to the padded
layout (zeros in the padding slots). The padding slots still take part in attention as keys of
nobody: the engine's masks mark them invalid, so what they hold never reaches a real slot, and the
real slots' results are those of the padded forward.

On Gemma 3 270M (fp32, one CPU thread) the position-wise layers are almost all of a slot's cost: a
padding slot that only attention sees costs a small fraction of a real one (the engine measures
the saving on its own target, ``BatchedSpeculativeGenerator._time_padding``). Packing indexes with a
boolean mask in every hooked layer, which makes the host wait for the device each time; on an
accelerator, where a padding slot costs little, that would stall every layer, so the engine skips
padding on CPU targets only.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["position_wise_modules", "real_slots_only"]


def position_wise_modules(target) -> list[nn.Module]:
    """The target's per-slot layers that may skip padding: each decoder layer's ``mlp`` and the linear
    projections of its ``self_attn``. Empty when the target does not have that layout (then only the
    LM head skips padding)."""
    decoder = target.get_decoder() if hasattr(target, "get_decoder") else getattr(target, "model", None)
    layers = getattr(decoder, "layers", None)
    if layers is None:
        return []
    modules = []
    for layer in layers:
        mlp, attention = getattr(layer, "mlp", None), getattr(layer, "self_attn", None)
        if isinstance(mlp, nn.Module):
            modules.append(mlp)
        if isinstance(attention, nn.Module):
            modules.extend(child for child in attention.children() if isinstance(child, nn.Linear))
    return modules


@contextmanager
def real_slots_only(head: nn.Module, logits_for: torch.Tensor, real: torch.Tensor | None = None,
                    modules: list[nn.Module] = ()):
    """For the forwards inside the block: the LM ``head`` scores only the ``logits_for`` slots (its
    output is packed, ``[1, N, V]``), and each of ``modules`` (per-slot layers) runs on the ``real``
    slots only, its output scattered back to ``[rows, width, ...]`` with zeros in the other slots.

    ``logits_for`` and ``real`` are boolean ``[rows, width]``; ``real=None`` (or no padding) leaves
    ``modules`` untouched."""
    handles = []

    def packed_input(mask, what):
        def hook(module, args):
            hidden = args[0]
            if hidden.shape[:2] != mask.shape:
                raise RuntimeError(
                    f"the target's {what} got hidden states of shape {tuple(hidden.shape)}, expected "
                    f"[{mask.shape[0]}, {mask.shape[1]}, hidden]; the batched engine supports causal LMs whose "
                    "layers keep the [batch, slots, hidden] layout"
                )
            return (hidden[mask].unsqueeze(0),) + tuple(args[1:])

        return hook

    def scattered_output(module, args, output):
        packed = output[0] if isinstance(output, tuple) else output  # e.g. (hidden, router logits)
        full = packed.new_zeros(real.shape + packed.shape[2:])
        full[real] = packed[0]
        return (full,) + tuple(output[1:]) if isinstance(output, tuple) else full

    try:
        handles.append(head.register_forward_pre_hook(packed_input(logits_for, "output embedding")))
        if real is not None and modules and not bool(real.all()):
            for module in modules:
                handles.append(module.register_forward_pre_hook(packed_input(real, type(module).__name__)))
                handles.append(module.register_forward_hook(scattered_output))
        yield
    finally:
        for handle in handles:
            handle.remove()
