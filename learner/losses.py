"""Policy-gradient losses of DDPO (Black et al. 2023, eq. 3-4) and the RWR baseline, per denoising step.

Symbols: log_prob = log pi_theta(x_{t-1} | x_t, c) under the current weights, old_log_prob = the same under the
weights that sampled the trajectory (recorded by the sampler), A = advantage of the whole trajectory.
The policy-gradient losses take per-sample tensors [B] for ONE timestep each and return a scalar and statistics.

RWR follows the original JAX code (jannerm/ddpo): a denoising loss on the final samples x_0, each sample weighted
by softmax over the epoch's rewards (`rwr_weights`), or, for RWR-sparse, only the samples at or above a reward
percentile with equal weights (`rwr_sparse_weights`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_EPS = 1e-6


@dataclass
class LossStats:
    """Per-sample statistics of one loss evaluation (detached)."""

    log_ratio: torch.Tensor  # [B] log pi_theta - log pi_old
    clip_range: float

    @property
    def ratio(self) -> torch.Tensor:  # [B] pi_theta / pi_old
        return self.log_ratio.exp()

    @property
    def clipped(self) -> torch.Tensor:  # [B] bool: the ratio left [1 - eps, 1 + eps]
        return (self.ratio - 1.0).abs() > self.clip_range

    @property
    def approx_kl(self) -> float:
        """1/2 E[(log r)^2], the estimator of the DDPO reference implementation."""
        return float(0.5 * (self.log_ratio**2).mean())

    @property
    def clipfrac(self) -> float:
        return float(self.clipped.float().mean())

    @property
    def ratio_mean(self) -> float:
        return float(self.ratio.mean())


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
    return loss, LossStats(log_ratio.detach(), clip_range)


def ddpo_sf_loss(
    log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, clip_range: float = 0.0
) -> tuple[torch.Tensor, LossStats]:
    """DDPO-SF: the REINFORCE score-function estimator, loss = -mean(A log pi_theta). No ratio, no clipping.

    Unbiased only on-policy (the config refuses ddpo_sf with policy lag or several optimizer steps per epoch);
    old_log_prob only feeds the statistics.
    """
    loss = -(advantages * log_prob).mean()
    return loss, LossStats((log_prob - old_log_prob).detach(), clip_range)


def standardize(rewards: torch.Tensor) -> torch.Tensor:
    """(r - mean) / (std + eps) over the batch (population std). [N] -> [N] float64."""
    r = rewards.double()
    return (r - r.mean()) / (r.std(unbiased=False) + _EPS)


def rwr_weights(rewards: torch.Tensor, temperature: float) -> torch.Tensor:
    """RWR weights w = N softmax(z / temperature) over the epoch, z = standardised rewards; mean 1. [N] -> [N].

    Standardising first makes one temperature mean the same for JPEG kB and aesthetic scores. (The JAX code
    multiplies raw rewards by its `temperature`, an inverse temperature: its 1/5 on kB is our temperature
    5 / std(kB).)
    """
    return (torch.softmax(standardize(rewards) / temperature, dim=0) * rewards.numel()).float()


def rwr_sparse_weights(rewards: torch.Tensor, percentile: float) -> torch.Tensor:
    """RWR-sparse: train only on samples with r >= the epoch's `percentile`-th percentile (linear interpolation,
    numpy's default, as the JAX code's filter), all with the same weight; weights have mean 1. [N] -> [N]."""
    r = rewards.double()
    threshold = torch.quantile(r, percentile / 100.0)
    keep = (r >= threshold).double()
    return (keep * r.numel() / keep.sum()).float()


def rwr_loss(model_pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """RWR (the paper's baseline): the reward-weighted denoising loss mean_i w_i ||eps_theta(x_t^i, t_i, c_i) - eps_i||^2.

    model_pred, target [B, C, h, w] (noise or velocity, per the scheduler's prediction type); weights [B] from
    `rwr_weights`. The per-sample squared error is averaged over latent dimensions.
    """
    per_sample = ((model_pred.float() - target.float()) ** 2).mean(dim=tuple(range(1, model_pred.ndim)))
    return (weights * per_sample).mean()
