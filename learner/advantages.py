"""Rewards -> advantages: per-prompt normalisation with a ring buffer of past rewards (DDPO Sec. 5, App. B).

A(x) = (r(x) - mean_p) / (std_p + 1e-6), where mean_p/std_p are over the last `buffer_size` rewards of the same
prompt p, including the current batch. A prompt with fewer than `min_count` rewards falls back to the current
batch's mean/std (all prompts together). Advantages are then clipped to [-adv_clip_max, adv_clip_max].
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import numpy as np
import torch

_EPS = 1e-6


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


def clip_advantages(advantages: torch.Tensor, adv_clip_max: float) -> torch.Tensor:
    """Clip to [-adv_clip_max, adv_clip_max]."""
    return advantages.clamp(-adv_clip_max, adv_clip_max)
