"""The objectives of the update: rewards -> advantages -> a loss, as small pure functions of tensors, and the table
`training.objective` -> objective.

ADVANTAGES (DDPO Sec. 5, App. B): A(x) = (r(x) - mean_p) / (std_p + 1e-6), where mean_p/std_p are over the last
`buffer_size` rewards of the same prompt p, including the current batch. A prompt with fewer than `min_count` rewards
falls back to the current batch's mean/std (all prompts together). `stat_tracking.mode: batch` uses the batch's
mean/std for all; `group` (GRPO) the mean/std of the sample's group (`sampling.group_size` samples of one prompt
draw). With several reward terms each is normalised on its own and the advantages are summed with the terms' weights
(GDPO). Advantages are then clipped to [-adv_clip_max, adv_clip_max].

KL TO THE BASE MODEL (`training.kl_coef` beta): loss += beta * KL(pi_theta(.|x_t) || pi_base(.|x_t)) per trained step,
for two Gaussians with the same sigma_t: ||mu_theta - mu_base||^2 / (2 sigma_t^2), averaged over latent dimensions
like the log-prob (`services.diffusion.gaussian_kl`).

LOSSES (DDPO eq. 3-4): log_prob = log pi_theta(x_{t-1} | x_t, c) under the current weights, old_log_prob = the same
under the weights that sampled the trajectory (recorded by the sampler), A = advantage of the whole trajectory. The
policy-gradient losses take per-sample tensors [B] for ONE timestep each and return a scalar and statistics.
RWR follows the original JAX code (jannerm/ddpo): a denoising loss on the final samples x_0, each sample weighted by
softmax over the epoch's rewards (`rwr_weights`), or, for RWR-sparse, only the samples at or above a reward
percentile with equal weights (`rwr_sparse_weights`).

OBJECTIVES, two kinds:
- policy gradient (`PolicyGradient`): per recorded denoising step, log pi_theta is recomputed and a loss of
  (log_prob, old_log_prob, advantage) is back-propagated: DDPO-IS and DDPO-SF;
- reward-weighted regression (`WeightedRegression`): the diffusion denoising loss on the final samples x_0 at a fresh
  random (t, noise), each sample weighted by a function of the epoch's rewards: RWR and RWR-sparse.
Add an objective by adding a row to `OBJECTIVES` (and its name to `training.objective`'s choices).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from services.config import TrainingConfig

_EPS = 1e-6


# ---- ADVANTAGES ------------------------------------------------------------------------------------------------------
class PerPromptStatTracker:
    """Ring buffer of recent rewards per prompt; `update` returns the advantages of a batch."""

    def __init__(self, buffer_size: int = 16, min_count: int = 16) -> None:
        if buffer_size < 1 or min_count < 1:
            raise ValueError("buffer_size and min_count must be >= 1")
        self.buffer_size = buffer_size
        self.min_count = min_count
        self.stats: dict[str, deque[float]] = {}

    def update(self, prompts: Sequence[str], rewards: torch.Tensor | Sequence[float]) -> torch.Tensor:
        """prompts [B], rewards [B] -> advantages [B] float32 (buffers updated with this batch first)."""
        r = np.asarray(torch.as_tensor(rewards, dtype=torch.float64).cpu(), dtype=np.float64)
        if len(prompts) != len(r):
            raise ValueError(f"{len(prompts)} prompts but {len(r)} rewards")
        prompts_arr = np.array(prompts, dtype=object)
        advantages = np.empty_like(r)
        batch_mean, batch_std = r.mean(), r.std()
        for prompt in dict.fromkeys(prompts):  # unique, in order of first appearance
            mask = prompts_arr == prompt
            buf = self.stats.setdefault(prompt, deque(maxlen=self.buffer_size))
            buf.extend(r[mask].tolist())
            if len(buf) < self.min_count:
                mean, std = batch_mean, batch_std
            else:
                mean, std = float(np.mean(buf)), float(np.std(buf))
            advantages[mask] = (r[mask] - mean) / (std + _EPS)
        return torch.from_numpy(advantages).float()

    def state_dict(self) -> dict:
        return {
            "buffer_size": self.buffer_size,
            "min_count": self.min_count,
            "stats": {p: list(buf) for p, buf in self.stats.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        self.buffer_size = int(state["buffer_size"])
        self.min_count = int(state["min_count"])
        self.stats = {p: deque(v, maxlen=self.buffer_size) for p, v in state["stats"].items()}


def batch_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """Without per-prompt tracking: (r - mean) / (std + eps) over the batch. rewards [B] -> [B] float32."""
    r = rewards.double()
    return ((r - r.mean()) / (r.std(unbiased=False) + _EPS)).float()


def group_advantages(
    groups: Sequence[str], rewards: torch.Tensor, global_std: bool = False
) -> tuple[torch.Tensor, float]:
    """GRPO: (r - mean of the sample's group) / (std of the group + eps), or / (std of the whole batch + eps) with
    `global_std` (population stds). groups [N] (group ids), rewards [N] -> (advantages [N] float32, the fraction of
    groups whose rewards are all equal: their advantages are 0 and they teach nothing)."""
    r = torch.as_tensor(rewards, dtype=torch.float64).cpu()
    if len(groups) != len(r):
        raise ValueError(f"{len(groups)} group ids but {len(r)} rewards")
    ids = np.array(groups, dtype=object)
    adv = torch.empty_like(r)
    batch_std = float(r.std(unbiased=False))
    flat = 0
    unique = list(dict.fromkeys(groups))
    for group in unique:
        mask = torch.from_numpy(ids == group)
        g = r[mask]
        std = float(g.std(unbiased=False))
        flat += int(bool((g == g[0]).all()))
        adv[mask] = (g - g.mean()) / ((batch_std if global_std else std) + _EPS)
    return adv.float(), flat / len(unique) if unique else 0.0


def clip_advantages(advantages: torch.Tensor, adv_clip_max: float) -> torch.Tensor:
    """Clip to [-adv_clip_max, adv_clip_max]."""
    return advantages.clamp(-adv_clip_max, adv_clip_max)


# ---- LOSSES ----------------------------------------------------------------------------------------------------------
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


# ---- OBJECTIVES ------------------------------------------------------------------------------------------------------
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
