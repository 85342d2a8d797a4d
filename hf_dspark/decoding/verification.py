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

__all__ = ["accept_probabilities", "residual_distribution", "verify_block", "verify_rows_greedy", "verify_rows_sampled"]


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
        n_accepted = int((x == target_probs[:n].argmax(-1)).long().cumprod(0).sum())
        return n_accepted, int(target_probs[n_accepted].argmax())

    q = draft_probs[:n].double()
    if n:
        # Accept x_j with probability min(1, p_j(x_j) / q_j(x_j)) (u_j ~ U[0, 1) falls below it),
        # left to right; the first rejection ends the round. accept_probabilities reads rows 0 .. n - 1
        # of target_probs only; its ratio is computed in float64 (q's dtype).
        u = torch.rand(n, generator=generator, device=target_probs.device, dtype=q.dtype)
        accepted = u < accept_probabilities(x, q, target_probs)
        n_accepted = int(accepted.long().cumprod(0).sum())
    else:
        n_accepted = 0
    p = target_probs[n_accepted].double()  # p_{k+1}: the law at the first rejection, or p_{n+1} after a full match
    if n_accepted < n:
        # First rejection at x_{k+1}: draw its replacement from normalize(max(p_{k+1} - q_{k+1}, 0)).
        # Then P(token y at k+1) = min(p, q)(y) + (1 - sum min(p, q)) * max(p - q, 0)(y) / sum max(p - q, 0)
        # = min(p, q)(y) + max(p - q, 0)(y) = p_{k+1}(y), since sum max(p - q, 0) = 1 - sum min(p, q).
        law = residual_distribution(p, q[n_accepted])
    else:
        # Every admitted token survived: the bonus token is drawn from p_{n+1}.
        law = p
    next_token = torch.multinomial(law, 1, generator=generator)
    return n_accepted, int(next_token)


def verify_rows_greedy(draft_tokens: torch.Tensor, target_logits: torch.Tensor, counts: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`verify_block`'s greedy rule for every row of a right-padded round at once.

    Args:
        draft_tokens: [R, >= W - 1] draft tokens (columns past a row's count are ignored).
        target_logits: [sum_r (1 + counts[r]), V] the target's scores of the real slots, packed row
            after row (row ``r``'s anchor first), as the engine's verification forward returns them.
        counts: [R] long, draft tokens each row submitted; ``W = 1 + max(counts)``.

    Returns ``(n_accepted, next_token)``, both [R] long: one argmax over the packed block, then one
    compare / cumulative product over the padded [R, W - 1] block."""
    rows, width = counts.shape[0], int(draft_tokens.shape[1]) + 1
    offsets = torch.arange(width, device=counts.device)
    real = offsets[None, :] < (1 + counts)[:, None]
    # the argmax of the fp32 scores, as generate() takes it (an argmax over bf16 scores is slower on CPU)
    choice = torch.full((rows, width), -1, dtype=torch.long, device=counts.device)
    choice[real] = target_logits.float().argmax(-1)
    matches = (draft_tokens[:, : width - 1] == choice[:, : width - 1]) & real[:, 1:]
    n_accepted = matches.long().cumprod(1).sum(1)
    return n_accepted, choice.gather(1, n_accepted[:, None]).squeeze(1)


def verify_rows_sampled(
    draft_tokens: torch.Tensor,
    draft_probs: list,
    target_probs: torch.Tensor,
    counts: list[int],
    generator: torch.Generator | None = None,
) -> tuple[list[int], list[int]]:
    """:func:`verify_block` for every row of a round: the accept/reject test of all rows in one step,
    then the one law each row draws its next token from, drawn in one batched call.

    Args:
        draft_tokens: [R, >= max(counts)] draft tokens.
        draft_probs: per row, its [>= counts[r], V] proposal laws ``q`` (or None for a row that submits nothing).
        target_probs: [sum_r (1 + counts[r]), V] the target's processed laws of the real slots, packed row
            after row.
        counts: draft tokens each row submitted.

    Every draft token gets its own uniform draw (those after a row's first rejection are unused), so the
    rows are independent and each follows :func:`verify_block`'s law exactly."""
    device, rows = target_probs.device, len(counts)
    starts = [0] * rows
    for row in range(1, rows):
        starts[row] = starts[row - 1] + counts[row - 1] + 1
    width = max(counts, default=0)
    n_accepted = [0] * rows
    if width > 0:
        x = draft_tokens[:, :width]
        q_x = torch.ones(rows, width, dtype=torch.float64, device=device)  # 1 where nothing was submitted
        for row, count in enumerate(counts):  # q at the submitted tokens (the laws are per row)
            if count:
                q_x[row, :count] = draft_probs[row][torch.arange(count, device=device), x[row, :count]].double()
        offsets = torch.arange(width, device=device)
        submitted = offsets[None, :] < torch.tensor(counts, device=device)[:, None]
        slots = (torch.tensor(starts, device=device)[:, None] + offsets).clamp(max=target_probs.shape[0] - 1)
        p_x = target_probs[slots, x].double()
        # accept x_j with probability min(1, p_j(x_j) / q_j(x_j)), left to right; the first rejection ends a row
        u = torch.rand(rows, width, generator=generator, device=device, dtype=torch.float64)
        accepted = (u < torch.clamp(p_x / q_x, max=1.0)) & submitted
        n_accepted = accepted.long().cumprod(1).sum(1).tolist()
    laws = target_probs[[start + k for start, k in zip(starts, n_accepted)]].double()
    for row, (count, k) in enumerate(zip(counts, n_accepted)):
        if k < count:  # rejected at x_{k+1}: its replacement comes from normalize(max(p_{k+1} - q_{k+1}, 0))
            laws[row] = residual_distribution(laws[row], draft_probs[row][k].double())
    # otherwise every submitted token survived: the bonus token comes from p_{n+1}
    next_tokens = torch.multinomial(laws, 1, generator=generator).squeeze(1)
    return n_accepted, next_tokens.tolist()
