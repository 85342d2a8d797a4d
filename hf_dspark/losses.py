"""DSpark training loss (docs/design.md, "Training"; recipes in docs/training.md).

Per block position ``k`` (0-based) with weight ``w_k = exp(-k / decay)``, averaged over the
supervised positions with weights ``w_k * eval_mask``:

* CE   = cross-entropy of the Markov-corrected draft logits against the true next token;
* L1   = ``|| softmax(draft) - p_target ||_1`` (distribution matching);
* CONF = BCE(confidence logit, ``1 - L1 / 2`` detached): ``1 - L1/2`` is the probability that
  a token sampled from the draft survives rejection sampling against the target.

The target distribution comes either as full logits or as a sparse top-k (ids + log-probs,
what the feature cache stores). With a reduced draft vocabulary the draft puts no mass outside
it, so target mass there counts fully in L1. With a top-k target the mass outside the top-k is
unknown and counted as disjoint from the draft (an upper bound that is exact when top-k covers
the distribution).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class DSparkLossOutput:
    loss: torch.Tensor
    ce_loss: torch.Tensor
    l1_loss: torch.Tensor
    confidence_loss: torch.Tensor
    expected_tau: torch.Tensor  # 1 + mean over kept blocks of sum_k prod_{i<=k} (1 - L1_i / 2)
    acceptance: torch.Tensor  # [K] mean of (1 - L1/2) per position over supervised positions
    confidence_error: torch.Tensor  # mean |sigmoid(conf) - (1 - L1/2)| over supervised positions
    position_counts: torch.Tensor  # [K] number of supervised positions


def position_weights(block_size: int, decay: float, device=None) -> torch.Tensor:
    return torch.exp(-torch.arange(block_size, device=device, dtype=torch.float32) / decay)


def l1_to_dense_target(draft_logits: torch.Tensor, target_logits: torch.Tensor, d2t: torch.Tensor | None) -> torch.Tensor:
    """draft_logits [..., Vd], target_logits [..., V] -> L1 distance [...]."""
    p_draft = draft_logits.float().softmax(-1)
    p_target = target_logits.float().softmax(-1)
    if d2t is None:
        return (p_draft - p_target).abs().sum(-1)
    p_target_draft = p_target[..., d2t]
    outside = (1.0 - p_target_draft.sum(-1)).clamp(min=0.0)
    return (p_draft - p_target_draft).abs().sum(-1) + outside


def l1_to_topk_target(
    draft_logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor, t2d: torch.Tensor | None
) -> torch.Tensor:
    """draft_logits [..., Vd]; topk_ids / topk_logprobs [..., k] (target ids) -> L1 distance [...]."""
    p_draft = draft_logits.float().softmax(-1)
    p_target = topk_logprobs.float().exp()
    draft_ids = topk_ids.long() if t2d is None else t2d[topk_ids.long()]
    in_vocab = draft_ids >= 0
    p_draft_at = torch.gather(p_draft, -1, draft_ids.clamp(min=0)) * in_vocab
    p_target_in = p_target * in_vocab
    # sum over the draft vocabulary of |p_d - p_t| where p_t is zero off the top-k:
    overlap = (p_draft_at - p_target_in).abs().sum(-1) + (1.0 - p_draft_at.sum(-1)).clamp(min=0.0)
    target_elsewhere = (p_target * ~in_vocab).sum(-1) + (1.0 - p_target.sum(-1)).clamp(min=0.0)
    return overlap + target_elsewhere


def dspark_loss(
    draft_logits: torch.Tensor,
    confidence_logits: torch.Tensor | None,
    target_ids: torch.Tensor,
    eval_mask: torch.Tensor,
    block_keep_mask: torch.Tensor,
    *,
    target_logits: torch.Tensor | None = None,
    target_topk_ids: torch.Tensor | None = None,
    target_topk_logprobs: torch.Tensor | None = None,
    d2t: torch.Tensor | None = None,
    t2d: torch.Tensor | None = None,
    loss_decay_gamma: float = 4.0,
    ce_loss_alpha: float = 0.1,
    l1_loss_alpha: float = 0.9,
    confidence_head_alpha: float = 1.0,
) -> DSparkLossOutput:
    """Shapes: draft_logits [b, A, K, Vd]; confidence_logits / target_ids / eval_mask [b, A, K];
    block_keep_mask [b, A]; target_logits [b, A, K, V] or top-k tensors [b, A, K, k]."""
    K = draft_logits.shape[-2]
    mask = eval_mask.float()
    weights = position_weights(K, loss_decay_gamma, draft_logits.device) * mask
    denom = weights.sum().clamp(min=1e-12)

    if target_logits is not None:
        l1 = l1_to_dense_target(draft_logits, target_logits, d2t)
    elif target_topk_ids is not None:
        l1 = l1_to_topk_target(draft_logits, target_topk_ids, target_topk_logprobs, t2d)
    else:
        raise ValueError("dspark_loss needs target_logits or target_topk_ids/target_topk_logprobs")

    draft_targets = target_ids if t2d is None else t2d[target_ids]
    ce_valid = draft_targets >= 0
    ce = F.cross_entropy(
        draft_logits.float().flatten(0, -2), draft_targets.clamp(min=0).flatten(), reduction="none"
    ).view_as(l1)
    ce_weights = weights * ce_valid
    ce_loss = (ce * ce_weights).sum() / ce_weights.sum().clamp(min=1e-12)
    l1_loss = (l1 * weights).sum() / denom

    accept = (1.0 - 0.5 * l1).detach()
    if confidence_logits is not None:
        bce = F.binary_cross_entropy_with_logits(confidence_logits.float(), accept, reduction="none")
        confidence_loss = (bce * weights).sum() / denom
        conf_err = ((torch.sigmoid(confidence_logits.float()) - accept).abs() * mask).sum() / mask.sum().clamp(min=1)
    else:
        confidence_loss = draft_logits.new_zeros((), dtype=torch.float32)
        conf_err = confidence_loss.detach()
        confidence_head_alpha = 0.0

    loss = ce_loss_alpha * ce_loss + l1_loss_alpha * l1_loss + confidence_head_alpha * confidence_loss
    keep = block_keep_mask.bool()
    per_block = ((accept * mask).cumprod(-1) * mask).sum(-1)
    expected_tau = 1.0 + (per_block[keep].mean() if keep.any() else per_block.new_zeros(()))
    counts = mask.flatten(0, -2).sum(0)
    acceptance = (accept * mask).flatten(0, -2).sum(0) / counts.clamp(min=1)
    return DSparkLossOutput(
        loss=loss,
        ce_loss=ce_loss.detach(),
        l1_loss=l1_loss.detach(),
        confidence_loss=confidence_loss.detach(),
        expected_tau=expected_tau.detach(),
        acceptance=acceptance.detach(),
        confidence_error=conf_err.detach(),
        position_counts=counts.detach(),
    )
