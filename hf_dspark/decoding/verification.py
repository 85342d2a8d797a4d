"""The accept/reject rule of speculative decoding, in one place and without any model.

Notation for one request and one round (docs/design.md, "Verification"): the draft proposed
``x_1 .. x_n`` after the committed anchor ``x_0``; ``q_j`` is the exact (processed) distribution
``x_j`` was sampled from; ``p_j`` is the target's (processed) distribution for the token at the
same place, given ``x_0 .. x_{j-1}``; ``p_{n+1}`` is the target's distribution after ``x_n``.
Row ``j - 1`` of ``draft_probs`` holds ``q_j`` and row ``j - 1`` of ``target_probs`` holds
``p_j`` (so ``target_probs`` has ``n + 1`` rows).

:func:`accept_probabilities` and :func:`residual_distribution` are the two formulas;
:func:`verify_block` draws one round from them. The tests check the formulas by exact
enumeration (the emitted tokens follow the target's joint distribution exactly) and check
:func:`verify_block`'s draws against the formulas.
"""

from __future__ import annotations

import torch

__all__ = ["accept_probabilities", "residual_distribution", "verify_block"]


def accept_probabilities(draft_tokens: torch.Tensor, draft_probs: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """``min(1, p_j(x_j) / q_j(x_j))`` for ``j = 1..n``: [n] (x_j was drawn from q_j, so q_j(x_j) > 0)."""
    n = draft_tokens.shape[0]
    rows = torch.arange(n, device=draft_tokens.device)
    p = target_probs[rows, draft_tokens]
    q = draft_probs[rows, draft_tokens]
    return torch.clamp(p / q, max=1.0)


def residual_distribution(target_probs: torch.Tensor, draft_probs: torch.Tensor) -> torch.Tensor:
    """``normalize(max(p - q, 0))``: where a replacement is drawn after a rejection.

    If ``p == q`` (up to rounding) a rejection has probability zero and the residual is empty;
    ``p`` itself is returned then, so a draw is always defined.
    """
    residual = torch.clamp(target_probs - draft_probs, min=0.0)
    total = residual.sum(-1, keepdim=True)
    return torch.where(total > 0, residual / total.clamp(min=torch.finfo(residual.dtype).tiny), target_probs)


def verify_block(
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target_probs: torch.Tensor,
    n_submitted: int,
    generator: torch.Generator | None = None,
) -> tuple[int, int]:
    """Verify the first ``n_submitted`` draft tokens of one request; returns ``(n_accepted, next_token)``.

    Args:
        draft_tokens: [>= n] draft token ids (target vocabulary).
        draft_probs: [>= n, V] the distributions ``q_j`` the tokens were sampled from, or ``None``
            for greedy decoding (when sampling with ``n = 0``, pass an empty [0, V] tensor, not ``None``).
        target_probs: [>= n + 1, V] the target's processed distributions ``p_1 .. p_{n+1}``
            (greedy: any scores whose argmax is the target's choice, e.g. logits).
        n_submitted: ``n``, how many draft tokens the scheduler admitted (0 is allowed: then
            only the target's own next token is produced).
        generator: source of randomness (sampling only), on the device of ``target_probs``.

    The round commits ``x_1 .. x_{n_accepted}`` followed by ``next_token``.
    """
    n = int(n_submitted)
    x = draft_tokens[:n]
    if draft_probs is None:
        # Greedy: the target would emit argmax p_j at every place; keep the draft while it agrees,
        # then emit the target's own choice (its correction, or the bonus after a full match).
        choice = target_probs[: n + 1].argmax(-1)
        n_accepted = int((x == choice[:n]).long().cumprod(0).sum()) if n else 0
        return n_accepted, int(choice[n_accepted])

    p, q = target_probs[: n + 1].double(), draft_probs[:n].double()
    if n:
        # Accept x_j with probability min(1, p_j(x_j) / q_j(x_j)) (u_j ~ U[0, 1) falls below it),
        # left to right; the first rejection ends the round.
        u = torch.rand(n, generator=generator, device=p.device, dtype=p.dtype)
        accepted = u < accept_probabilities(x, q, p[:n])
        n_accepted = int(accepted.long().cumprod(0).sum())
    else:
        n_accepted = 0
    if n_accepted < n:
        # First rejection at x_{k+1}: draw its replacement from normalize(max(p_{k+1} - q_{k+1}, 0)).
        # Then P(token y at k+1) = min(p, q)(y) + (1 - sum min(p, q)) * max(p - q, 0)(y) / sum max(p - q, 0)
        # = min(p, q)(y) + max(p - q, 0)(y) = p_{k+1}(y), since sum max(p - q, 0) = 1 - sum min(p, q).
        law = residual_distribution(p[n_accepted], q[n_accepted])
    else:
        # Every admitted token survived: the bonus token is drawn from p_{n+1}.
        law = p[n]
    next_token = torch.multinomial(law, 1, generator=generator)
    return n_accepted, int(next_token)
