"""Held-out evaluation: fixed prompts and seeds, deterministic DDIM, scored by the optimised and the watched rewards.

The paper's two questions, answered from a run directory: does the policy generalise to prompts it never trained
on (`evaluation.prompts`), and does it over-optimise (a watched reward that falls while the optimised one rises)?

Seeds: the k-th image of every prompt uses seed `evaluation.seed + k` and its own `torch.Generator`, so an image
depends only on (checkpoint, prompt, k): not on the batch, the other prompts, or how often evaluation ran before.
With `evaluation.eta == 0` DDIM is deterministic given the initial noise.
"""

from __future__ import annotations

import argparse
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from services.config import ConfigError, TrainConfig, load_config
from services.diffusion import sample_trajectory
from services.images import tensor_to_pil
from services.rewards import LOCAL_REWARDS

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
    for seed in seeds:
        generator = torch.Generator(device=pipeline.unet.device).manual_seed(seed)
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

    DDIM with `evaluation.eta`, the run's `sampling.num_steps`, guidance, negative prompt and resolution.
    `epoch` labels the result: the epoch whose update produced these weights (as in checkpoints/epoch_NNNN).
    """
    prompts, seeds = eval_prompts_and_seeds(cfg)
    s = cfg.sampling
    images = []
    pairs = list(zip(prompts, seeds, strict=True))
    if progress:
        from tqdm.auto import tqdm

        pairs = tqdm(pairs, desc=f"eval epoch {epoch}", leave=False)
    for prompt, seed in pairs:
        x = render_samples(
            pipeline, prompt, [seed], s.num_steps, s.guidance_scale, cfg.evaluation.eta, s.negative_prompt,
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
    """The optimised reward first, then each watched reward (no duplicates)."""
    return list(dict.fromkeys([cfg.reward.name, *cfg.evaluation.watch_rewards]))


def score_fns_for(cfg: TrainConfig, reward_client: Any = None) -> dict[str, ScoreFn]:
    """Reward functions for evaluation: jpeg rewards in process, the others through `reward_client`.

    `reward_client` is an `actors.reward_client.SyncRewardClient` (anything with
    `.score(name, images, prompts, metadata) -> (scores, info)`); required when an http-only reward is evaluated.
    """
    fns: dict[str, ScoreFn] = {}
    for name in eval_reward_names(cfg):
        if name in LOCAL_REWARDS:
            fns[name] = LOCAL_REWARDS[name]
        elif reward_client is None:
            raise ValueError(f"evaluating reward {name!r} needs the reward servers: pass a reward_client")
        else:
            fns[name] = _http_reward(reward_client, name)
    return fns


def _http_reward(client: Any, name: str) -> ScoreFn:
    def score(images, prompts, metadata):
        return client.score(name, list(images), list(prompts), list(metadata))

    score.__name__ = name
    return score


def reward_client_for(cfg: TrainConfig) -> Any:
    """A SyncRewardClient on the configured server URLs, or None when every evaluated reward is local.

    Spawned servers of the training run are gone after it: give their URLs with --set reward.servers.KIND.urls=[..].
    """
    if all(name in LOCAL_REWARDS for name in eval_reward_names(cfg)):
        return None
    from actors.reward_client import SyncRewardClient

    replicas = {kind: list(server.urls) for kind, server in cfg.reward.servers.items() if server.urls}
    if not replicas:
        raise ConfigError(
            "evaluation needs reward servers but reward.servers has no urls; "
            "add --set reward.servers.KIND.urls=[http://HOST:PORT]"
        )
    return SyncRewardClient.from_config(cfg.reward, replicas)


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


def evaluate_run(
    run_dir: str | Path,
    checkpoints: Sequence[str] | None = None,
    overrides: Sequence[str] | None = None,
    progress: bool = True,
) -> list[EvalResult]:
    """(Re)compute the held-out evaluation of a run's checkpoints: eval/epoch_NNNN.json + images/eval_epoch_NNNN.png.

    The run's config.yaml (plus `overrides`, e.g. evaluation.prompts or reward server URLs) fixes the prompts, seeds,
    sampler settings and rewards. TensorBoard and metrics.jsonl are left as training wrote them.
    """
    from services.artifacts import write_eval_files
    from services.lora import load_inference_pipeline, load_policy_into_pipeline

    run_dir = Path(run_dir)
    cfg = load_config(str(run_dir / "config.yaml"), list(overrides or []))
    eval_prompts_and_seeds(cfg)  # fail on a missing prompt list before loading anything
    dirs = checkpoint_dirs(run_dir, checkpoints)
    pipe = load_inference_pipeline(cfg.model)
    client = reward_client_for(cfg)
    results = []
    try:
        score_fns = score_fns_for(cfg, client)
        for path in dirs:
            load_policy_into_pipeline(pipe, policy_dir(path))
            result = evaluate(pipe, cfg, score_fns, checkpoint_epoch(path), progress=progress)
            json_path, grid_path = write_eval_files(run_dir, result)
            logger.info("evaluated %s: %s (%s, %s)", path.name, result.metrics(), json_path, grid_path)
            results.append(result)
    finally:
        if client is not None:
            client.close()
    return results


def run_eval(args: argparse.Namespace) -> list[Path]:
    """The `ddpo eval` command; returns the eval/epoch_NNNN.json paths written."""
    results = evaluate_run(args.run_dir, args.checkpoint, args.overrides)
    return [Path(args.run_dir) / "eval" / f"epoch_{r.epoch:04d}.json" for r in results]
