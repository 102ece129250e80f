"""Objectives by name: `training.objective` -> how an epoch's samples become a loss.

Two kinds:
- policy gradient (`PolicyGradient`): per recorded denoising step, log pi_theta(x_{t-1} | x_t, c) is recomputed and
  a loss of (log_prob, old_log_prob, advantage) is back-propagated: DDPO-IS and DDPO-SF;
- reward-weighted regression (`WeightedRegression`): the diffusion denoising loss on the final samples x_0 at a
  fresh random (t, noise), each sample weighted by a function of the epoch's rewards: RWR and RWR-sparse.

Add an objective by adding a row to `OBJECTIVES` (and its name to `training.objective`'s choices).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from learner.losses import (
    LossStats,
    ddpo_is_loss,
    ddpo_sf_loss,
    rwr_sparse_weights,
    rwr_weights,
)
from services.config import TrainingConfig

PolicyLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], tuple[torch.Tensor, LossStats]]
"""(log_prob [B], old_log_prob [B], advantages [B], clip_range) -> (scalar loss, per-sample statistics)."""

SampleWeights = Callable[[torch.Tensor, TrainingConfig], torch.Tensor]
"""(the epoch's rewards [N], training config) -> per-sample weights [N] with mean 1 (0 = not trained)."""


@dataclass(frozen=True)
class PolicyGradient:
    loss: PolicyLoss
    on_policy_only: bool  # unbiased only when every trained step sees the weights that sampled


@dataclass(frozen=True)
class WeightedRegression:
    weights: SampleWeights


Objective = PolicyGradient | WeightedRegression

OBJECTIVES: dict[str, Objective] = {
    "ddpo_is": PolicyGradient(ddpo_is_loss, on_policy_only=False),
    "ddpo_sf": PolicyGradient(ddpo_sf_loss, on_policy_only=True),
    "rwr": WeightedRegression(lambda rewards, t: rwr_weights(rewards, t.rwr_temperature)),
    "rwr_sparse": WeightedRegression(lambda rewards, t: rwr_sparse_weights(rewards, t.rwr_percentile)),
}


def get_objective(name: str) -> Objective:
    try:
        return OBJECTIVES[name]
    except KeyError:
        raise ValueError(
            f"training.objective: unknown objective {name!r}; known: {', '.join(OBJECTIVES)}"
        ) from None
