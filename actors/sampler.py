"""The sampling side as a plain class: prompts -> trajectories with log-probs -> rewards -> ScoredTrajectory.

`Sampler` holds a pipeline and the policy version it samples with; the Ray actor is a thin shell around it.
"""

from __future__ import annotations

import logging
import zlib

import torch

from services.config import TrainConfig
from services.diffusion import sample_trajectory
from services.images import tensor_to_pil
from services.models import DTYPES, autocast, load_pipeline, load_policy_state_dict
from services.prompts import PromptSampler
from services.rewards import LOCAL_REWARDS, RewardFn
from services.trajectory import ScoredTrajectory, Trajectory, split_scored

logger = logging.getLogger(__name__)


def actor_seed(seed: int, actor_id: str) -> int:
    """A stable per-actor seed (zlib.crc32, unlike hash(), does not change between processes)."""
    return (seed * 1_000_003 + zlib.crc32(actor_id.encode())) % 2**63


class Sampler:
    """Samples batches of trajectories under the current policy version and scores them with a local reward."""

    def __init__(
        self,
        cfg: TrainConfig,
        pipeline=None,
        actor_id: str = "local",
        reward_fn: RewardFn | None = None,
    ) -> None:
        self.cfg = cfg
        self.actor_id = actor_id
        self.pipe = (
            pipeline
            if pipeline is not None
            else load_pipeline(cfg.model, cfg.lora, seed=cfg.seed, perf=cfg.performance)
        )
        seed = actor_seed(cfg.seed, actor_id)
        self.prompt_sampler = PromptSampler(cfg.prompts, seed)
        self.generator = torch.Generator(device=self.pipe.unet.device).manual_seed(seed)
        self.reward_fn = reward_fn if reward_fn is not None else LOCAL_REWARDS.get(cfg.reward.name)
        self.policy_version = 0

    def load_policy(self, version: int, weights: dict[str, torch.Tensor]) -> None:
        """Apply a new LoRA version (call between batches, never during one)."""
        load_policy_state_dict(self.pipe.unet, weights)
        self.policy_version = version

    def sample(
        self, prompts: list[str] | None = None, generator: torch.Generator | None = None
    ) -> Trajectory:
        """One batch of `sampling.batch_size` trajectories (prompts drawn from the prompt set unless given)."""
        s = self.cfg.sampling
        prompts = prompts if prompts is not None else self.prompt_sampler.sample(s.batch_size)
        with autocast(self.cfg.performance, self.pipe.unet.device):
            return sample_trajectory(
                self.pipe,
                prompts,
                num_steps=s.num_steps,
                guidance_scale=s.guidance_scale,
                eta=s.eta,
                negative_prompt=s.negative_prompt,
                generator=generator or self.generator,
                resolution=s.resolution,
                latent_dtype=DTYPES[self.cfg.cluster.latent_dtype],
            )

    def score(self, traj: Trajectory) -> tuple[torch.Tensor, dict]:
        """Rewards [B] and per-sample info of a batch, with the in-process reward function."""
        if self.reward_fn is None:
            raise ValueError(
                f"reward {self.cfg.reward.name!r} has no local implementation; use reward.mode=http"
            )
        return self.reward_fn(tensor_to_pil(traj.images), traj.prompts, [{} for _ in traj.prompts])

    def sample_scored(self) -> list[ScoredTrajectory]:
        """Sample one batch and score it in process: the whole sampling side of DDPO, without Ray or HTTP."""
        traj = self.sample()
        rewards, info = self.score(traj)
        return split_scored(traj, rewards, info, self.policy_version, self.actor_id)
