"""Bradley-Terry loss on scalar rewards, as in TRL's reward trainer.

``P(chosen > rejected) = sigmoid(r_c - r_r)``; the loss is its negative log-likelihood, with an
optional per-pair margin (``-logsigmoid(r_c - r_r - margin)``) and optional reward centering
``coef * mean((r_c + r_r)^2)`` that keeps rewards near zero (the loss only sees differences).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(
    r_chosen: torch.Tensor,
    r_rejected: torch.Tensor,
    margin: torch.Tensor | None = None,
    center_coef: float = 0.0,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean Bradley-Terry loss of a batch of reward pairs (1-D tensors of equal length).

    ``weights`` (one per pair, e.g. a comparison's confidence times its length-balance factor)
    scale each pair's term; the mean is over pairs, so a batch of doubtful comparisons moves
    the model less than a batch of sure ones."""
    diff = r_chosen - r_rejected
    if margin is not None:
        diff = diff - margin
    terms = -F.logsigmoid(diff)
    loss = (terms * weights).mean() if weights is not None else terms.mean()
    if center_coef:
        loss = loss + center_coef * ((r_chosen + r_rejected) ** 2).mean()
    return loss


def pair_accuracy(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> float:
    """Share of pairs ranked right; a tie (equal rewards) counts as wrong."""
    if r_chosen.numel() == 0:
        return 0.0
    return (r_chosen > r_rejected).float().mean().item()


def pair_margin(confidence: float, coef: float) -> float:
    """Margin asked of a pair: ``coef * max(confidence - 0.5, 0)`` (see ``TrainConfig``)."""
    return coef * max(confidence - 0.5, 0.0)
