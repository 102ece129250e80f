"""Held-out evaluation: fixed prompts and seeds, deterministic sampling (DDIM, or the flow ODE), scored by the optimised and the watched rewards.

The paper's two questions, answered from a run directory: does the policy generalise to prompts it never trained
on (`evaluation.prompts`), and does it over-optimise (a watched reward that falls while the optimised one rises)?

Seeds: the k-th image of every prompt uses seed `evaluation.seed + k` and its own `torch.Generator`, so an image
depends only on (checkpoint, prompt, k): not on the batch, the other prompts, or how often evaluation ran before.
With `evaluation.eta == 0` DDIM is deterministic given the initial noise.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from services.config import ConfigError, TrainConfig
from services.diffusion import policy_for, sample_trajectory
from services.images import tensor_to_pil
from services.reward_client import SyncRewardClient
from services.rewards import get_reward

logger = logging.getLogger(__name__)

ScoreFn = Callable[[Sequence[Image.Image], Sequence[str], Sequence[dict[str, Any]]], tuple[Any, dict]]
"""A reward: (images, prompts, metadata) -> (scores [B] as a tensor or list, info of per-sample lists)."""


@dataclass
class EvalResult:
    """One held-out evaluation of one policy. Images are prompt-major: prompt p's k-th image is at p * n + k."""

    epoch: int
    prompts: list[str]  # one per image
    seeds: list[int]  # one per image
    images: list[Image.Image]
    scores: dict[str, list[float]]  # reward name -> one score per image

    def metrics(self) -> dict[str, float]:
        """Flat keys for metrics.jsonl and TensorBoard: eval/<reward>_mean and eval/<reward>_std (population)."""
        out = {}
        for name, values in self.scores.items():
            v = np.asarray(values, dtype=np.float64)
            out[f"eval/{name}_mean"] = float(v.mean())
            out[f"eval/{name}_std"] = float(v.std())
        return out

    def to_json(self) -> dict[str, Any]:
        """Everything but the images (eval/epoch_NNNN.json)."""
        return {
            "epoch": self.epoch,
            "metrics": self.metrics(),
            "prompts": self.prompts,
            "seeds": self.seeds,
            "scores": self.scores,
        }


def eval_prompts_and_seeds(cfg: TrainConfig) -> tuple[list[str], list[int]]:
    """Per image: its prompt and seed, prompt-major (`evaluation.num_per_prompt` images per prompt)."""
    ev = cfg.evaluation
    if not ev.prompts:
        raise ConfigError("evaluation.prompts is empty: list held-out prompts to evaluate")
    prompts = [p for p in ev.prompts for _ in range(ev.num_per_prompt)]
    seeds = [ev.seed + k for _ in ev.prompts for k in range(ev.num_per_prompt)]
    return prompts, seeds


def render_samples(
    pipeline: Any,
    prompt: str,
    seeds: list[int],
    num_steps: int = 50,
    guidance_scale: float = 5.0,
    eta: float = 0.0,
    negative_prompt: str = "",
    resolution: int | None = None,
) -> torch.Tensor:
    """One image per seed, each from its own generator (batch composition never changes an image).

    Returns images [len(seeds), 3, H, W] float32 in [0, 1] on the CPU.
    """
    images = []
    device = policy_for(pipeline).denoiser.device
    for seed in seeds:
        generator = torch.Generator(device=device).manual_seed(seed)
        traj = sample_trajectory(
            pipeline,
            [prompt],
            num_steps=num_steps,
            guidance_scale=guidance_scale,
            eta=eta,
            negative_prompt=negative_prompt,
            generator=generator,
            resolution=resolution,
        )
        images.append(traj.images.float().cpu())  # [1, 3, H, W]
    return torch.cat(images)


def evaluate(
    pipeline: Any,
    cfg: TrainConfig,
    score_fns: dict[str, ScoreFn],
    epoch: int,
    progress: bool = False,
) -> EvalResult:
    """Sample the held-out prompts with fixed seeds under the pipeline's current weights and score them.

    `evaluation.eta`, `evaluation.num_steps` (default: the run's `sampling.num_steps`), the run's guidance, negative
    prompt and resolution.
    `epoch` labels the result: the epoch whose update produced these weights (as in checkpoints/epoch_NNNN).
    """
    prompts, seeds = eval_prompts_and_seeds(cfg)
    s = cfg.sampling
    num_steps = cfg.evaluation.num_steps or s.num_steps
    images = []
    pairs = tqdm(zip(prompts, seeds, strict=True), total=len(prompts), desc=f"eval epoch {epoch}", leave=False,
                 disable=not progress)  # fmt: skip
    for prompt, seed in pairs:
        x = render_samples(
            pipeline, prompt, [seed], num_steps, s.guidance_scale, cfg.evaluation.eta, s.negative_prompt,
            s.resolution,
        )  # fmt: skip
        images += tensor_to_pil(x)  # x: [1, 3, H, W]
    metadata = [{"seed": seed, "eval": True} for seed in seeds]
    scores = {}
    for name, fn in score_fns.items():
        values, _ = fn(images, prompts, metadata)
        scores[name] = [float(v) for v in values]
        if len(scores[name]) != len(images):
            raise ValueError(f"reward {name!r} returned {len(scores[name])} scores for {len(images)} images")
    return EvalResult(epoch=epoch, prompts=prompts, seeds=seeds, images=images, scores=scores)


def eval_reward_names(cfg: TrainConfig) -> list[str]:
    """The optimised reward (each of its terms) first, then each watched reward (no duplicates)."""
    return list(dict.fromkeys([*(t.name for t in cfg.reward.resolved_terms), *cfg.evaluation.watch_rewards]))


def score_fns_for(cfg: TrainConfig, reward_client: SyncRewardClient | None = None) -> dict[str, ScoreFn]:
    """Reward functions for evaluation: rewards that run in process there, the others through `reward_client`
    (required when such a reward is evaluated)."""
    fns: dict[str, ScoreFn] = {}
    for name in eval_reward_names(cfg):
        local = get_reward(name).local
        if local is not None:
            fns[name] = local
        elif reward_client is None:
            raise ValueError(f"evaluating reward {name!r} needs the reward servers: pass a reward_client")
        else:
            fns[name] = partial(reward_client.score, name)
    return fns


# ---- `ddpo eval RUN_DIR` -------------------------------------------------------------------------------------------
def policy_dir(checkpoint: Path) -> Path | None:
    """The checkpoint's policy in the diffusers format: `lora/` (a LoRA) or `unet/` (full fine-tuning), if any."""
    for name in ("lora", "unet"):
        if (checkpoint / name).is_dir():
            return checkpoint / name
    return None


def checkpoint_dirs(run_dir: str | Path, names: Sequence[str] | None = None) -> list[Path]:
    """RUN_DIR/checkpoints/epoch_NNNN dirs with a policy (`lora/` or `unet/`): all, or those named ("epoch_0003", "3")."""
    root = Path(run_dir) / "checkpoints"
    if not names:
        found = sorted(p for p in root.glob("epoch_*") if policy_dir(p) is not None)
        if not found:
            raise FileNotFoundError(f"no checkpoints with a lora/ or unet/ folder under {root}")
        return found
    out = []
    for name in names:
        match = re.fullmatch(r"(?:epoch_)?(\d+)", name)
        if match is None:
            raise ConfigError(f"--checkpoint {name!r}: expected epoch_NNNN or an epoch number")
        path = root / f"epoch_{int(match.group(1)):04d}"
        if policy_dir(path) is None:
            raise FileNotFoundError(
                f"checkpoint {path} has no lora/ or unet/ folder (the diffusers-format policy)"
            )
        out.append(path)
    return out


def checkpoint_epoch(path: Path) -> int:
    return int(path.name.removeprefix("epoch_"))
