"""The policy update: a batch of scored trajectories -> advantages -> DDPO-IS / DDPO-SF / RWR steps on the LoRA.

Phases of `Learner.train_epoch` (read top to bottom):
  1. ADVANTAGES  rewards -> per-prompt normalised, clipped advantages
  2. SHUFFLE     samples across the batch, and each sample's timesteps independently
  3. UPDATE      for every micro-batch and trained timestep: recompute log pi_theta, loss, backward;
                 one optimizer step per (gradient_accumulation_steps micro-batches x trained timesteps)
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from diffusers import DDIMScheduler
from tqdm.auto import tqdm

from learner.advantages import PerPromptStatTracker, batch_advantages, clip_advantages
from learner.losses import LossStats, ddpo_is_loss, ddpo_sf_loss, rwr_loss, rwr_weights
from services.config import TrainConfig
from services.diffusion import encode_prompts, step_log_prob
from services.models import (
    autocast,
    load_pipeline,
    load_policy_state_dict,
    policy_state_dict,
    trainable_parameters,
)
from services.trajectory import ScoredTrajectory

logger = logging.getLogger(__name__)


@dataclass
class EpochBatch:
    """A learner epoch's samples stacked on the training device."""

    latents: torch.Tensor  # [N, T+1, C, h, w]
    log_probs: torch.Tensor  # [N, T] float32, recorded by the sampler (the old policy)
    timesteps: torch.Tensor  # [N, T] long
    rewards: torch.Tensor  # [N] float32
    prompts: list[str]  # [N]

    @classmethod
    def stack(cls, batch: Sequence[ScoredTrajectory], device: torch.device, dtype: torch.dtype) -> EpochBatch:
        return cls(
            latents=torch.stack([t.latents for t in batch]).to(device, dtype),
            log_probs=torch.stack([t.log_probs for t in batch]).to(device, torch.float32),
            timesteps=torch.stack([t.timesteps for t in batch]).to(device, torch.long),
            rewards=torch.tensor([t.reward for t in batch], dtype=torch.float32, device=device),
            prompts=[t.prompt for t in batch],
        )


class Learner:
    """Owns the trainable policy (UNet + LoRA), its optimizer and the reward statistics. No Ray, no Redis."""

    def __init__(self, cfg: TrainConfig, pipeline=None) -> None:
        self.cfg = cfg
        self.pipe = (
            pipeline
            if pipeline is not None
            else load_pipeline(cfg.model, cfg.lora, seed=cfg.seed, perf=cfg.performance)
        )
        self.unet = self.pipe.unet
        self.device = self.unet.device
        # A private scheduler: the sampler may share the pipeline object and call set_timesteps itself.
        self.scheduler = DDIMScheduler.from_config(self.pipe.scheduler.config)
        self.scheduler.set_timesteps(cfg.sampling.num_steps)
        self.params = trainable_parameters(self.unet)
        t = cfg.training
        self.optimizer = torch.optim.AdamW(
            self.params,
            lr=t.learning_rate,
            betas=(t.adam_beta1, t.adam_beta2),
            weight_decay=t.adam_weight_decay,
            eps=t.adam_epsilon,
            fused=cfg.performance.fused_adamw or None,
        )
        self.stat_tracker = PerPromptStatTracker(cfg.stat_tracking.buffer_size, cfg.stat_tracking.min_count)
        self.policy_version = 0
        self.generator = torch.Generator().manual_seed(cfg.seed + 1)  # shuffles samples and timesteps
        self._negative_embeds = encode_prompts(self.pipe, [cfg.sampling.negative_prompt]).to(self.unet.dtype)
        # data-parallel rank within an initialised torch.distributed group (1 rank otherwise)
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1

    # ---- 1. ADVANTAGES -------------------------------------------------------------------------------------------
    def compute_advantages(self, prompts: Sequence[str], rewards: torch.Tensor) -> torch.Tensor:
        """prompts [N], rewards [N] -> clipped advantages [N] float32 (updates the per-prompt buffers)."""
        if self.cfg.stat_tracking.enabled:
            adv = self.stat_tracker.update(prompts, rewards.cpu())
        else:
            adv = batch_advantages(rewards.cpu())
        return clip_advantages(adv, self.cfg.training.adv_clip_max)

    # ---- 2. + 3. SHUFFLE and UPDATE --------------------------------------------------------------------------------
    def train_epoch(
        self, batch: Sequence[ScoredTrajectory], progress: bool = False
    ) -> dict[str, float | None]:
        """One epoch of policy updates on `batch`; returns the epoch's training metrics."""
        cfg, t = self.cfg, self.cfg.training
        if len(batch) % t.batch_size:
            raise ValueError(
                f"batch of {len(batch)} samples is not divisible by training.batch_size={t.batch_size}"
            )
        data = EpochBatch.stack(batch, self.device, self.unet.dtype)
        advantages = self.compute_advantages(data.prompts, data.rewards).to(self.device)
        rwr_w = rwr_weights(data.rewards, t.rwr_temperature) if t.objective == "rwr" else None
        n, num_steps = data.log_probs.shape
        num_train_t = cfg.num_train_timesteps
        stats: list[LossStats] = []
        losses: list[float] = []
        grad_norms: list[float] = []
        # data parallelism: rank r takes micro-batches r, r + world, ...; gradients are summed over ranks before
        # each optimizer step, so N ranks take exactly the step one rank would (gradient_accumulation_steps % N == 0)
        rank, world = self.rank, self.world_size
        if t.gradient_accumulation_steps % world:
            raise ValueError(
                f"training.gradient_accumulation_steps={t.gradient_accumulation_steps} must be divisible by the "
                f"{world} learner ranks"
            )
        local_accum = t.gradient_accumulation_steps // world
        self.unet.train()
        local_micro_batches = 0
        num_mb = n // t.batch_size
        total = t.num_inner_epochs * len(range(rank, num_mb, world)) * num_train_t
        bar = tqdm(total=total, desc=f"train v{self.policy_version}", leave=False, disable=not progress)
        for inner in range(t.num_inner_epochs):
            # identical on every rank: the generators start equal and are consumed identically
            order = torch.randperm(n, generator=self.generator)
            # each sample trains a random subset of its timesteps, in random order
            step_perm = torch.stack([torch.randperm(num_steps, generator=self.generator) for _ in range(n)])
            for mb in range(rank, num_mb, world):
                idx = order[mb * t.batch_size : (mb + 1) * t.batch_size]
                embeds = encode_prompts(self.pipe, [data.prompts[i] for i in idx.tolist()]).to(
                    self.unet.dtype
                )
                rows = idx.to(self.device)
                for j in range(num_train_t):
                    step = step_perm[idx, j].to(self.device)  # [b] index of the trained step per sample
                    with autocast(cfg.performance, self.device):
                        if t.objective == "rwr":
                            noise_gen = self._rwr_generator(inner, mb, j)
                            loss = self._rwr_loss(data, rows, embeds, rwr_w[rows], noise_gen)
                        else:
                            loss, st = self._pg_loss(data, rows, step, embeds, advantages[rows])
                            stats.append(st)
                    (loss / (t.gradient_accumulation_steps * num_train_t)).backward()
                    losses.append(loss.item())
                    bar.update(1)
                local_micro_batches += 1
                if local_micro_batches % local_accum == 0:
                    if world > 1:
                        self._all_reduce_gradients()
                    grad_norms.append(float(torch.nn.utils.clip_grad_norm_(self.params, t.max_grad_norm)))
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
        bar.close()
        self.unet.eval()
        self.policy_version += 1
        metrics = self._epoch_metrics(stats, losses, grad_norms, advantages)
        return self._mean_over_ranks(metrics) if world > 1 else metrics

    def _mean_over_ranks(self, metrics: dict[str, float | None]) -> dict[str, float | None]:
        """Every rank trains the same number of micro-batches, so the global mean is the mean of rank means."""
        keys = [
            k for k, v in metrics.items() if v is not None and k not in ("grad_norm", "advantage_abs_mean")
        ]
        values = torch.tensor([metrics[k] for k in keys], dtype=torch.float64)
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        return {**metrics, **{k: float(v) / self.world_size for k, v in zip(keys, values, strict=True)}}

    def _pg_loss(
        self,
        data: EpochBatch,
        rows: torch.Tensor,
        step: torch.Tensor,
        embeds: torch.Tensor,
        adv: torch.Tensor,
    ) -> tuple[torch.Tensor, LossStats]:
        """DDPO-IS / DDPO-SF loss of one trained timestep per sample. rows, step [b]; embeds [b, L, D]; adv [b]."""
        cfg = self.cfg
        guidance = cfg.sampling.guidance_scale if cfg.training.cfg else 1.0
        log_prob = step_log_prob(
            self.unet,
            self.scheduler,
            latents=data.latents[rows, step],
            next_latents=data.latents[rows, step + 1],
            timesteps=data.timesteps[rows, step],
            prompt_embeds=embeds,
            negative_prompt_embeds=self._negative_embeds.expand_as(embeds),
            guidance_scale=guidance,
            eta=cfg.sampling.eta,
        )
        old_log_prob = data.log_probs[rows, step]
        if cfg.training.objective == "ddpo_is":
            return ddpo_is_loss(log_prob, old_log_prob, adv, cfg.training.clip_range)
        return ddpo_sf_loss(log_prob, old_log_prob, adv, cfg.training.clip_range)

    def _rwr_generator(self, inner: int, micro_batch: int, j: int) -> torch.Generator:
        """RWR's (t, noise) draws depend only on (run seed, version, position), not on which rank computes them."""
        seed = hash((self.cfg.seed, self.policy_version, inner, micro_batch, j)) % 2**63
        return torch.Generator().manual_seed(seed)

    def _rwr_loss(
        self,
        data: EpochBatch,
        rows: torch.Tensor,
        embeds: torch.Tensor,
        weights: torch.Tensor,
        generator: torch.Generator,
    ) -> torch.Tensor:
        """RWR: weighted denoising loss on the final samples x_0 at a fresh random (t, noise). rows [b]."""
        x0 = data.latents[rows, -1]
        num_train = self.scheduler.config.num_train_timesteps
        t = torch.randint(0, num_train, (len(rows),), generator=generator).to(self.device)
        noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(self.device, x0.dtype)
        noisy = self.scheduler.add_noise(x0, noise, t)
        if self.scheduler.config.prediction_type == "v_prediction":
            target = self.scheduler.get_velocity(x0, noise, t)
        else:
            target = noise
        pred = self.unet(noisy, t, encoder_hidden_states=embeds).sample
        return rwr_loss(pred, target, weights)

    def _all_reduce_gradients(self) -> None:
        """Sum the trainable parameters' gradients over ranks (one flat buffer, one collective)."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for p, g in zip(self.params, grads, strict=True):
            p.grad = flat[offset : offset + g.numel()].view_as(g).clone()
            offset += g.numel()

    @staticmethod
    def _epoch_metrics(
        stats: list[LossStats], losses: list[float], grad_norms: list[float], advantages: torch.Tensor
    ) -> dict[str, float | None]:
        def mean(xs: list[float]) -> float | None:
            return float(np.mean(xs)) if xs else None

        return {
            "loss": mean(losses),
            "approx_kl": mean([s.approx_kl for s in stats]),
            "clipfrac": mean([s.clipfrac for s in stats]),
            "ratio_mean": mean([s.ratio_mean for s in stats]),
            # the first trained step of the epoch sees the weights that sampled (if the policy did not lag)
            "ratio_first_step": stats[0].ratio_mean if stats else None,
            "grad_norm": mean(grad_norms),
            "advantage_abs_mean": float(advantages.abs().mean()),
        }

    # ---- weights and state ---------------------------------------------------------------------------------------
    def policy_weights(self) -> dict[str, torch.Tensor]:
        """The LoRA tensors that actors load (CPU)."""
        return policy_state_dict(self.unet)

    def state_dict(self) -> dict:
        return {
            "policy": self.policy_weights(),
            "optimizer": self.optimizer.state_dict(),
            "stat_tracker": self.stat_tracker.state_dict(),
            "policy_version": self.policy_version,
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        load_policy_state_dict(self.unet, state["policy"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.stat_tracker.load_state_dict(state["stat_tracker"])
        self.policy_version = int(state["policy_version"])
        self.generator.set_state(state["generator"])
