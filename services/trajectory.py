"""The records that cross boundaries: a sampled batch (sampler -> scorer) and a scored sample (-> learner).

Shapes use B = batch, T = denoising steps, C/h/w = latent channels/height/width, H/W = image height/width.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Trajectory:
    """One sampled batch with everything needed to recompute its log-probabilities."""

    latents: torch.Tensor  # [B, T+1, C, h, w]  x_T, x_{T-1}, ..., x_0 (index i is the input of step i)
    log_probs: torch.Tensor  # [B, T] float32, log pi(x_{i+1} | x_i, c) of the sampled step
    timesteps: torch.Tensor  # [T] long, the scheduler timestep of each step
    prompt_embeds: torch.Tensor  # [B, L, D] text-encoder states of the prompts
    images: torch.Tensor  # [B, 3, H, W] float in [0, 1], decoded x_0
    prompts: list[str]  # [B]

    def __len__(self) -> int:
        return len(self.prompts)


@dataclass
class ScoredTrajectory:
    """One sample with its reward: the unit that travels through the trajectory stream to the learner."""

    latents: torch.Tensor  # [T+1, C, h, w]
    log_probs: torch.Tensor  # [T] float32
    timesteps: torch.Tensor  # [T] long
    prompt: str
    reward: float
    policy_version: int = 0  # LoRA version that sampled it
    actor_id: str = "local"
    trajectory_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    reward_info: dict[str, Any] = field(default_factory=dict)  # JSON-serialisable per-sample details


def split_scored(
    traj: Trajectory,
    rewards: torch.Tensor,
    reward_info: dict[str, list[Any]],
    policy_version: int,
    actor_id: str = "local",
) -> list[ScoredTrajectory]:
    """Batch + rewards [B] + per-sample info lists -> one ScoredTrajectory per sample (tensors on the CPU)."""
    out = []
    latents, log_probs, timesteps = traj.latents.cpu(), traj.log_probs.float().cpu(), traj.timesteps.cpu()
    for i, prompt in enumerate(traj.prompts):
        out.append(
            ScoredTrajectory(
                latents=latents[i].clone(),
                log_probs=log_probs[i].clone(),
                timesteps=timesteps.clone(),
                prompt=prompt,
                reward=float(rewards[i]),
                policy_version=policy_version,
                actor_id=actor_id,
                reward_info={k: v[i] for k, v in reward_info.items()},
            )
        )
    return out
