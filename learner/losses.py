"""Policy-gradient losses of DDPO (Black et al. 2023, eq. 3-4) and the RWR baseline, per denoising step.

Symbols: log_prob = log pi_theta(x_{t-1} | x_t, c) under the current weights, old_log_prob = the same under the
weights that sampled the trajectory (recorded by the sampler), A = advantage of the whole trajectory.
The policy-gradient losses take per-sample tensors [B] for ONE timestep each and return a scalar and statistics.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LossStats:
    """Statistics of one loss evaluation (Python floats, detached)."""

    approx_kl: float  # 1/2 E[(log r)^2], the estimator used by the DDPO reference implementation
    clipfrac: float  # fraction of samples whose ratio left [1 - eps, 1 + eps]
    ratio_mean: float  # E[pi_theta / pi_old]


def _stats(log_ratio: torch.Tensor, clip_range: float) -> LossStats:
    ratio = log_ratio.exp()
    return LossStats(
        approx_kl=float(0.5 * (log_ratio**2).mean()),
        clipfrac=float(((ratio - 1.0).abs() > clip_range).float().mean()),
        ratio_mean=float(ratio.mean()),
    )


def ddpo_is_loss(
    log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, clip_range: float
) -> tuple[torch.Tensor, LossStats]:
    """DDPO-IS: PPO's clipped surrogate on the per-step importance ratio r = pi_theta / pi_old.

    loss = mean(max(-A r, -A clip(r, 1 - eps, 1 + eps))).  All inputs [B]; returns a scalar.
    """
    log_ratio = log_prob - old_log_prob
    ratio = log_ratio.exp()
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(pg_loss1, pg_loss2).mean()
    return loss, _stats(log_ratio.detach(), clip_range)


def ddpo_sf_loss(
    log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, clip_range: float = 0.0
) -> tuple[torch.Tensor, LossStats]:
    """DDPO-SF: the REINFORCE score-function estimator, loss = -mean(A log pi_theta). No ratio, no clipping.

    old_log_prob only feeds the statistics (the ratio is 1 on-policy, where this estimator is unbiased).
    """
    loss = -(advantages * log_prob).mean()
    return loss, _stats((log_prob - old_log_prob).detach(), clip_range)


def rwr_weights(rewards: torch.Tensor, temperature: float) -> torch.Tensor:
    """Reward-weighted regression weights: softmax(r / temperature) over the batch, rescaled to mean 1. [B] -> [B]."""
    return torch.softmax(rewards.double() / temperature, dim=0).float() * rewards.numel()


def rwr_loss(model_pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """RWR (the paper's baseline): the reward-weighted denoising loss mean_i w_i ||eps_theta(x_t^i, t_i, c_i) - eps_i||^2.

    model_pred, target [B, C, h, w] (noise or velocity, per the scheduler's prediction type); weights [B] from
    `rwr_weights`. The per-sample squared error is averaged over latent dimensions.
    """
    per_sample = ((model_pred.float() - target.float()) ** 2).mean(dim=tuple(range(1, model_pred.ndim)))
    return (weights * per_sample).mean()
