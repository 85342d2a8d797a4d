"""The drafter's training layout: anchor blocks drawn from each sequence, teacher forced in one forward.

This file ships as remote code next to drafter checkpoints: it imports only torch, transformers and its
sibling files. :meth:`DSparkDraftModel.forward` (``modeling_dspark.py``) lays out its blocks with
:func:`anchor_blocks` and returns a :class:`DSparkTrainingOutput`; the trainer's losses read that output.

Block ``a`` holds ``[input_ids[p], mask...]`` at positions ``p .. p + K - 1`` for anchor ``p``; it
attends to the context rows ``< p`` and bidirectionally to itself; position ``k`` predicts
``input_ids[p + k + 1]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.utils import ModelOutput


@dataclass
class DSparkTrainingOutput(ModelOutput):
    """Output of the training forward (many anchor blocks per sequence, teacher forced).

    Shapes: ``batch`` sequences, ``A`` anchors per sequence, ``K = block_size``, ``Vd`` draft vocabulary.
    """

    draft_logits: torch.Tensor | None = None  # [batch, A, K, Vd] Markov-corrected, teacher forced
    confidence_logits: torch.Tensor | None = None  # [batch, A, K]
    target_ids: torch.Tensor | None = None  # [batch, A, K] next tokens (target ids)
    eval_mask: torch.Tensor | None = None  # [batch, A, K] bool, cumulative over the block
    anchor_positions: torch.Tensor | None = None  # [batch, A]
    block_keep_mask: torch.Tensor | None = None  # [batch, A] bool
    hidden_states: torch.Tensor | None = None  # [batch, A, K, H]


@dataclass
class AnchorBlocks:
    """The teacher-forced blocks of a batch. Shapes: ``batch`` sequences of ``seq`` tokens, ``A`` anchors,
    ``K = block_size``."""

    anchor_positions: torch.Tensor  # [batch, A]
    block_keep_mask: torch.Tensor  # [batch, A] bool: False for the dummy blocks of short rows
    positions: torch.Tensor  # [batch, A, K] position of every block token
    input_ids: torch.Tensor  # [batch, A, K] the anchor token, then mask tokens
    target_ids: torch.Tensor  # [batch, A, K] the token each block position predicts
    previous_ids: torch.Tensor  # [batch, A, K] the token before each target (the Markov head's input)
    eval_mask: torch.Tensor  # [batch, A, K] bool, cumulative over the block
    attention_mask: torch.Tensor  # [batch, 1, A*K, seq + A*K] bool: context strictly before the anchor + own block


def sample_anchor_positions(
    loss_mask: torch.Tensor, num_anchors: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw up to ``num_anchors`` anchors per row among positions ``p`` with ``loss_mask[p]`` and
    ``loss_mask[p + 1]`` (the anchor and its first target are supervised); rows with fewer valid
    positions get dummy blocks (anchor 0, keep False). Anchors are returned sorted."""
    bsz, seq_len = loss_mask.shape
    mask = loss_mask.bool()
    valid = torch.zeros_like(mask)
    valid[:, :-1] = mask[:, :-1] & mask[:, 1:]
    scores = torch.rand(valid.shape, generator=generator, device=valid.device if generator is None else generator.device)
    scores = scores.to(valid.device).masked_fill(~valid, -1.0)
    take = min(num_anchors, seq_len)
    top = scores.topk(take, dim=1)
    # a pick with score -1 is no valid position: it becomes seq_len, so the ascending sort puts it last
    picked = top.indices.masked_fill(top.values < 0, seq_len).sort(dim=1).values
    keep = picked < seq_len
    pad = num_anchors - take  # sequences shorter than num_anchors: dummy blocks up to num_anchors
    anchors = torch.cat([picked.masked_fill(~keep, 0), picked.new_zeros(bsz, pad)], dim=1)
    return anchors, torch.cat([keep, keep.new_zeros(bsz, pad)], dim=1)


def anchor_blocks(input_ids: torch.Tensor, anchor_positions: torch.Tensor, block_keep_mask: torch.Tensor | None,
                  loss_mask: torch.Tensor | None, block_size: int, mask_token_id: int) -> AnchorBlocks:
    """Lay out the blocks of ``input_ids`` [batch, seq] at ``anchor_positions`` [batch, A] (all kept when
    ``block_keep_mask`` is ``None``). Targets past the end of a row or outside ``loss_mask`` (all ones when
    ``None``) end the block's evaluation: the mask is cumulative."""
    bsz, seq_len = input_ids.shape
    K = block_size
    device = input_ids.device
    loss_mask = torch.ones_like(input_ids, dtype=torch.bool) if loss_mask is None else loss_mask.bool()
    if block_keep_mask is None:
        block_keep_mask = torch.ones_like(anchor_positions, dtype=torch.bool)
    block_keep_mask = block_keep_mask.bool()
    num_blocks = anchor_positions.shape[1]
    offsets = torch.arange(K, device=device)
    positions = anchor_positions.unsqueeze(-1) + offsets  # [b, A, K]

    # Targets and the cumulative evaluation mask.
    target_pos = positions + 1
    in_range = target_pos < seq_len
    safe_pos = target_pos.clamp(max=seq_len - 1)
    target_ids = torch.gather(input_ids, 1, safe_pos.view(bsz, -1)).view(bsz, num_blocks, K)
    supervised = torch.gather(loss_mask, 1, safe_pos.view(bsz, -1)).view(bsz, num_blocks, K) & in_range
    eval_mask = supervised.long().cumprod(-1).bool() & block_keep_mask.unsqueeze(-1)

    # Block inputs: anchor then mask tokens.
    block_ids = input_ids.new_full((bsz, num_blocks, K), mask_token_id)
    block_ids[..., 0] = torch.gather(input_ids, 1, anchor_positions)

    # Attention mask [b, 1, A*K, seq + A*K]: context strictly before the anchor + own block.
    ctx_visible = torch.arange(seq_len, device=device).view(1, 1, seq_len) < anchor_positions.unsqueeze(-1)
    ctx_visible = ctx_visible & block_keep_mask.unsqueeze(-1)
    ctx_visible = ctx_visible.repeat_interleave(K, dim=1)  # [b, A*K, seq]
    block_of = torch.arange(num_blocks, device=device).repeat_interleave(K)
    own_block = (block_of.view(-1, 1) == block_of.view(1, -1)).expand(bsz, -1, -1)
    mask = torch.cat([ctx_visible, own_block], dim=-1).unsqueeze(1)

    return AnchorBlocks(
        anchor_positions=anchor_positions,
        block_keep_mask=block_keep_mask,
        positions=positions,
        input_ids=block_ids,
        target_ids=target_ids,
        previous_ids=torch.cat([block_ids[..., :1], target_ids[..., :-1]], dim=-1),
        eval_mask=eval_mask,
        attention_mask=mask,
    )


__all__ = ["AnchorBlocks", "DSparkTrainingOutput", "anchor_blocks", "sample_anchor_positions"]
