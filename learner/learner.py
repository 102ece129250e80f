"""The policy update: a batch of scored trajectories -> advantages -> DDPO-IS / DDPO-SF / RWR steps on the policy.

Phases of `Learner.train_epoch` (read top to bottom):
  1. ADVANTAGES  rewards -> per-prompt normalised, clipped advantages (and, for RWR, per-sample weights)
  2. SHUFFLE     samples across the batch, and each sample's timesteps independently
  3. UPDATE      for every micro-batch and trained timestep: the objective's loss, backward (loss-scaled when a
                 float16 forward is trained); one optimizer step per (gradient_accumulation_steps micro-batches).
                 performance.timesteps_per_forward > 1 evaluates several trained timesteps of a micro-batch in one
                 forward/backward: the weights do not change between them, so the gradient is the same sum.
  4. METRICS     loss, approx_kl, clipfrac and ratio (overall and per policy lag), gradient norm and scale

The accumulation divisor is gradient_accumulation_steps x trained timesteps per sample: the gradient of one
optimizer step is the mean over its samples and their trained timesteps.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from learner.objectives import (
    LossStats,
    PerPromptStatTracker,
    PolicyGradient,
    WeightedRegression,
    batch_advantages,
    clip_advantages,
    get_objective,
    group_advantages,
    rwr_loss,
)
from services.config import TrainConfig
from services.diffusion import policy_for, step_log_prob
from services.models import (
    autocast,
    load_pipeline,
    load_policy_state_dict,
    policy_state_dict,
    trainable_parameters,
)
from services.rewards import TERM_PREFIX
from services.trajectory import ScoredTrajectory

logger = logging.getLogger(__name__)


@dataclass
class EpochBatch:
    """A learner epoch's samples stacked on the training device (latents keep their recorded dtype)."""

    latents: torch.Tensor  # [N, T+1, C, h, w] as sampled (cluster.latent_dtype)
    log_probs: torch.Tensor  # [N, T] float32, recorded by the sampler (the old policy)
    timesteps: torch.Tensor  # [N, T] long (DDIM) or float32 (flow models), as recorded
    rewards: torch.Tensor  # [N] float32
    prompts: list[str]  # [N]
    lags: torch.Tensor  # [N] long, learner version - sampling version (CPU)
    groups: list[str] = field(default_factory=list)  # [N] group of each sample (sampling.group_size)
    term_rewards: dict[str, torch.Tensor] = field(default_factory=dict)  # reward term -> [N] (several terms)

    @classmethod
    def stack(
        cls, batch: Sequence[ScoredTrajectory], device: torch.device, lags: Sequence[int] | None = None
    ) -> EpochBatch:
        return cls(
            latents=torch.stack([t.latents for t in batch]).to(device),
            log_probs=torch.stack([t.log_probs for t in batch]).to(device, torch.float32),
            timesteps=torch.stack([t.timesteps for t in batch]).to(device),
            rewards=torch.tensor([t.reward for t in batch], dtype=torch.float32, device=device),
            prompts=[t.prompt for t in batch],
            lags=torch.tensor(list(lags) if lags is not None else [0] * len(batch), dtype=torch.long),
            groups=[t.group for t in batch],
            term_rewards={
                key[len(TERM_PREFIX) :]: torch.tensor([float(t.reward_info[key]) for t in batch])
                for key in (batch[0].reward_info if batch else {})
                if key.startswith(TERM_PREFIX)
            },
        )


class PolicyStats:
    """Sums of per-sample ratio statistics over an epoch, overall and by policy lag (one key set on every rank)."""

    def __init__(self, lags: Sequence[int]) -> None:
        self.groups = [""] + [f"_lag{int(lag)}" for lag in sorted(set(lags))]
        self.sums = {f"{stat}{g}": 0.0 for g in self.groups for stat in ("n", "ratio", "clip", "kl")}
        self.first_ratio: float | None = None

    def add(self, stats: LossStats, lags: torch.Tensor) -> None:
        """stats of one loss evaluation ([b] per sample); lags [b] of the same samples."""
        if self.first_ratio is None:
            self.first_ratio = stats.ratio_mean
        ratio, clipped = stats.ratio.double().cpu(), stats.clipped.double().cpu()
        kl = 0.5 * stats.log_ratio.double().cpu() ** 2
        for group in self.groups:
            mask = lags == int(group[4:]) if group else torch.ones_like(lags, dtype=torch.bool)
            self.sums["n" + group] += float(mask.sum())
            self.sums["ratio" + group] += float(ratio[mask].sum())
            self.sums["clip" + group] += float(clipped[mask].sum())
            self.sums["kl" + group] += float(kl[mask].sum())

    def all_reduce(self) -> None:
        """Sum over data-parallel ranks (each trained its share of the micro-batches)."""
        keys = list(self.sums)
        values = torch.tensor([self.sums[k] for k in keys], dtype=torch.float64)
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        self.sums = dict(zip(keys, values.tolist(), strict=True))

    def metrics(self) -> dict[str, float | None]:
        """approx_kl (1/2 E[(log r)^2]), clipfrac, ratio_mean, ratio_first_step; clipfrac_lagK, ratio_mean_lagK."""
        n = self.sums["n"]
        out: dict[str, float | None] = {
            "approx_kl": self.sums["kl"] / n if n else None,
            "clipfrac": self.sums["clip"] / n if n else None,
            "ratio_mean": self.sums["ratio"] / n if n else None,
            # the first trained step of the epoch sees the weights that sampled (if the policy did not lag)
            "ratio_first_step": self.first_ratio,
        }
        for group in self.groups[1:]:
            count = self.sums["n" + group]
            if count:
                out[f"clipfrac{group}"] = self.sums["clip" + group] / count
                out[f"ratio_mean{group}"] = self.sums["ratio" + group] / count
        return out


# ---- the optimizer step, loss-scaled when a float16 forward is trained -----------------------------------------------
# The optimizer step of the learner, with dynamic loss scaling whenever a trained forward runs in float16.
#
# Why: the presets back-propagate loss / (gradient_accumulation_steps x trained timesteps), and the log-probability
# is a mean over C x h x w latent elements (16,384 at SD 1.5's 4 x 64 x 64). The gradient reaching a float16 UNet's
# output is then ~1e-8 per element, below float16's smallest normal (6e-5) and mostly below its smallest subnormal
# (6e-8): it flushes to zero and the LoRA learns nothing. Scaling the loss by S (2^16 to start) before backward and
# the gradients by 1/S before clipping keeps them representable; a step whose gradients overflowed is skipped and S
# backs off (torch.amp.GradScaler semantics). bfloat16 has float32's exponent range and needs no scaling.


def needs_loss_scaling(cfg: TrainConfig) -> bool:
    """True when a trained UNet forward runs in float16: a float16 base under a LoRA, or float16 autocast.
    (Full fine-tuning trains a float32 copy of the UNet, so a float16 base alone does not count there.)"""
    fp16_base = cfg.model.dtype == "float16" and cfg.model.use_lora
    return fp16_base or cfg.performance.autocast == "fp16"


@dataclass
class StepResult:
    grad_norm: float  # global L2 norm of the unscaled gradients, before clipping (inf/nan when skipped)
    skipped: bool  # gradients were not finite: no parameter changed


class ScaledOptimizer:
    """AdamW on the trainable parameters: `backward(loss)` per micro-batch and timestep, `step()` per update.

    step(): sum gradients over data-parallel ranks (`all_reduce`), unscale, clip to `max_grad_norm`, then step
    unless a gradient is not finite (counted in `skipped_steps`); the loss scale grows or backs off as in
    torch.amp.GradScaler. Without float16 the scale is 1 and non-finite steps are skipped all the same.
    """

    def __init__(
        self,
        params: Sequence[torch.nn.Parameter],
        cfg: TrainConfig,
        device: torch.device,
        all_reduce: Callable[[Sequence[torch.nn.Parameter]], None] | None = None,
    ) -> None:
        t = cfg.training
        self.params = list(params)
        self.max_grad_norm = t.max_grad_norm
        self.optimizer = torch.optim.AdamW(
            self.params,
            lr=t.learning_rate,
            betas=(t.adam_beta1, t.adam_beta2),
            weight_decay=t.adam_weight_decay,
            eps=t.adam_epsilon,
            fused=cfg.performance.fused_adamw or None,
        )
        self.loss_scaling = needs_loss_scaling(cfg)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.loss_scaling)
        self.all_reduce = all_reduce
        self.skipped_steps = 0

    @property
    def scale(self) -> float:
        """The current loss scale (1.0 without loss scaling)."""
        return float(self.scaler.get_scale())

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate the gradients of `loss` (a scalar), scaled by the current loss scale."""
        self.scaler.scale(loss).backward()

    def unscaled_gradients(self) -> list[torch.Tensor | None]:
        """The accumulated gradients divided by the loss scale (copies; for tests and diagnostics)."""
        inv = 1.0 / self.scale
        return [None if p.grad is None else p.grad.detach().float() * inv for p in self.params]

    def step(self) -> StepResult:
        if self.all_reduce is not None:
            self.all_reduce(self.params)  # every rank then sees the same gradients: the same skip decision
        self.scaler.unscale_(self.optimizer)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm))
        finite = math.isfinite(grad_norm)
        if self.loss_scaling:
            self.scaler.step(self.optimizer)  # skips the step itself when unscale_ found inf/nan
            self.scaler.update()
        elif finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if not finite:
            self.skipped_steps += 1
        return StepResult(grad_norm, skipped=not finite)

    def state_dict(self) -> dict:
        return {"adamw": self.optimizer.state_dict(), "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if "adamw" not in state:  # checkpoints before loss scaling held the AdamW state alone
            state = {"adamw": state, "scaler": {}}
        self.optimizer.load_state_dict(state["adamw"])
        if self.loss_scaling and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])


class Learner:
    """Owns the trainable policy (denoiser + LoRA), its optimizer and the reward statistics. No Ray, no Redis.

    The model family is the policy's business (`services.diffusion.policies`): the learner only calls it."""

    def __init__(self, cfg: TrainConfig, pipeline=None) -> None:
        self.cfg = cfg
        self.pipe = (
            pipeline
            if pipeline is not None
            else load_pipeline(cfg.model, cfg.lora, seed=cfg.seed, perf=cfg.performance)
        )
        self.policy = policy_for(self.pipe)
        self.unet = self.policy.denoiser  # the trained denoiser: a UNet, or an SD3 transformer
        self.device = self.unet.device
        # A private scheduler: the sampler may share the pipeline object and call set_timesteps itself.
        self.scheduler = type(self.pipe.scheduler).from_config(self.pipe.scheduler.config)
        self.scheduler.set_timesteps(cfg.sampling.num_steps)
        self.objective = get_objective(cfg.training.objective)
        if cfg.performance.gradient_checkpointing:
            # activations are recomputed in backward (only with grad: the sampler's forwards are unchanged)
            self.unet.enable_gradient_checkpointing()
        self.params = trainable_parameters(self.unet)
        # data-parallel rank within an initialised torch.distributed group (1 rank otherwise)
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.optim = ScaledOptimizer(
            self.params, cfg, self.device, all_reduce=_all_reduce_gradients if self.world_size > 1 else None
        )
        st = cfg.stat_tracking
        self.stat_trackers = {
            term.name: PerPromptStatTracker(st.buffer_size, st.min_count)
            for term in cfg.reward.resolved_terms
        }
        self.reference = self._reference_model()
        self.ema = [p.detach().float().clone() for p in self.params] if cfg.training.ema_decay else None
        self.policy_version = 0
        self.generator = torch.Generator().manual_seed(cfg.seed + 1)  # shuffles samples and timesteps
        self._negative_embeds = self.policy.encode_negative(cfg.sampling.negative_prompt).to(self.unet.dtype)

    # ---- 1. ADVANTAGES -------------------------------------------------------------------------------------------
    @property
    def stat_tracker(self) -> PerPromptStatTracker:
        """The per-prompt tracker of the (first) optimised reward."""
        return next(iter(self.stat_trackers.values()))

    def normalise(
        self, term: str, prompts: Sequence[str], groups: Sequence[str] | None, rewards: torch.Tensor
    ) -> torch.Tensor:
        """One reward term's rewards [N] -> unclipped advantages [N], by stat_tracking.mode."""
        st = self.cfg.stat_tracking
        mode = st.resolved_mode
        if mode == "group":
            return group_advantages(groups or list(prompts), rewards.cpu(), st.global_std)[0]
        if mode == "per_prompt":
            return self.stat_trackers[term].update(prompts, rewards.cpu())
        return batch_advantages(rewards.cpu())

    def compute_advantages(
        self,
        prompts: Sequence[str],
        rewards: torch.Tensor,
        groups: Sequence[str] | None = None,
        term_rewards: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """prompts [N], rewards [N] (groups [N] for mode group; term_rewards name -> [N] with several terms) ->
        clipped advantages [N] float32 (updates the per-prompt buffers). Several terms: each normalised on its own,
        then weighted and summed."""
        terms = self.cfg.reward.resolved_terms
        if len(terms) == 1:
            adv = self.normalise(terms[0].name, prompts, groups, rewards)
        else:
            missing = [t.name for t in terms if t.name not in (term_rewards or {})]
            if missing:
                raise ValueError(
                    f"trajectories lack the reward terms {missing} (reward_info {TERM_PREFIX}<name>)"
                )
            adv = sum(t.weight * self.normalise(t.name, prompts, groups, term_rewards[t.name]) for t in terms)
        return clip_advantages(adv, self.cfg.training.adv_clip_max)

    # ---- 2. + 3. SHUFFLE and UPDATE --------------------------------------------------------------------------------
    def train_epoch(
        self,
        batch: Sequence[ScoredTrajectory],
        progress: bool = False,
        lags: Sequence[int] | None = None,
    ) -> dict[str, float | None]:
        """One epoch of policy updates on `batch` (lags [N]: policy lag of each sample, for the per-lag metrics);
        returns the epoch's training metrics."""
        cfg, t = self.cfg, self.cfg.training
        if len(batch) % t.batch_size:
            raise ValueError(
                f"batch of {len(batch)} samples is not divisible by training.batch_size={t.batch_size}"
            )
        data = EpochBatch.stack(batch, self.device, lags)
        advantages = self.compute_advantages(data.prompts, data.rewards, data.groups, data.term_rewards)
        advantages = advantages.to(self.device)
        kls: list[float] = []
        weights = None
        if isinstance(self.objective, WeightedRegression):
            weights = self.objective.weights(data.rewards.cpu(), t).to(self.device)
        n, num_steps = data.log_probs.shape
        num_train_t = cfg.trained_steps_per_sample  # trained denoising steps of each sample
        divisor = t.gradient_accumulation_steps * num_train_t
        policy_stats = PolicyStats(data.lags.tolist())
        losses: list[float] = []
        grad_norms: list[float] = []
        skipped_before = self.optim.skipped_steps
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
                prompts = [data.prompts[i] for i in idx.tolist()]
                embeds = self.policy.encode_prompts(prompts).to(self.unet.dtype)  # [b, L, D] (+ pooled)
                rows = idx.to(self.device)
                for js in self._timestep_chunks(num_train_t):
                    # trained timesteps in this forward (1 unless performance.timesteps_per_forward)
                    k = len(js)
                    with autocast(cfg.performance, self.device):
                        if isinstance(self.objective, PolicyGradient):
                            # [k*b] index of the trained step of each (timestep, sample) pair, timestep-major
                            step = step_perm[idx][:, js].T.reshape(-1).to(self.device)
                            tiled = torch.arange(len(idx), device=self.device).repeat(k)
                            loss, stats, kl = self.policy_gradient_loss(
                                data, rows[tiled], step, embeds[tiled], advantages[rows][tiled]
                            )
                            policy_stats.add(stats, data.lags[idx].repeat(k))
                            if kl is not None:  # k entries: each trained timestep weighs the same in the mean
                                kls.extend([float(kl.detach().mean())] * k)
                        else:
                            noise_gen = self._regression_generator(inner, mb, js[0])
                            loss = self._regression_loss(data, rows, embeds, weights[rows], noise_gen)
                    if loss is not None:
                        # the loss is a mean over its k*b pairs: x k makes it the sum of k one-timestep losses
                        self.optim.backward(loss * (k / divisor))
                        losses.extend([loss.item()] * k)
                    bar.update(k)
                local_micro_batches += 1
                if local_micro_batches % local_accum == 0:
                    result = self.optim.step()
                    grad_norms.append(result.grad_norm)
                    if not result.skipped:
                        self._update_ema()
        bar.close()
        self.unet.eval()
        self.policy_version += 1
        if world > 1:
            policy_stats.all_reduce()
        metrics = {
            "loss": _mean(losses),
            **policy_stats.metrics(),
            "grad_norm": _mean([g for g in grad_norms if np.isfinite(g)]),
            "advantage_abs_mean": float(advantages.abs().mean()),
            "skipped_steps": self.optim.skipped_steps - skipped_before,
        }
        if kls:
            metrics["kl_to_base"] = _mean_over_ranks(kls) if world > 1 else _mean(kls)
        if cfg.sampling.group_size > 1:
            metrics["zero_std_group_frac"] = group_advantages(data.groups, data.rewards.cpu())[1]
        if self.optim.loss_scaling:
            metrics["grad_scale"] = self.optim.scale
        if world > 1:
            metrics["loss"] = _mean_over_ranks(losses)
        self._warn_if_nothing_learned(metrics)
        return metrics

    def _timestep_chunks(self, num_train_t: int) -> list[list[int]]:
        """The trained timesteps' positions 0..num_train_t-1 in groups evaluated by one forward/backward each:
        performance.timesteps_per_forward at a time (0: all) for the policy-gradient objectives, one at a time for
        RWR (each of its evaluations draws its own noise level)."""
        per = self.cfg.performance.timesteps_per_forward or num_train_t
        if not isinstance(self.objective, PolicyGradient):
            per = 1
        return [list(range(j, min(j + per, num_train_t))) for j in range(0, num_train_t, per)]

    def policy_gradient_loss(
        self,
        data: EpochBatch,
        rows: torch.Tensor,
        step: torch.Tensor,
        embeds: torch.Tensor,
        adv: torch.Tensor,
    ) -> tuple[torch.Tensor, LossStats, torch.Tensor | None]:
        """DDPO-IS / DDPO-SF loss of one trained timestep per sample (plus kl_coef x its KL to the base model).
        rows, step [b]; embeds [b, L, D]; adv [b]. Returns (loss, statistics, KL [b] or None)."""
        cfg = self.cfg
        guidance = cfg.sampling.guidance_scale if cfg.training.cfg else 1.0
        log_prob, kl = step_log_prob(
            self.unet,
            self.scheduler,
            latents=data.latents[rows, step],
            next_latents=data.latents[rows, step + 1],
            timesteps=data.timesteps[rows, step],
            prompt_embeds=embeds,
            negative_prompt_embeds=self._negative_embeds.expand_as(embeds),
            guidance_scale=guidance,
            eta=cfg.sampling.eta,
            reference=self.reference,
            policy=self.policy,
        )
        old_log_prob = data.log_probs[rows, step]
        loss, stats = self.objective.loss(log_prob, old_log_prob, adv, cfg.training.clip_range)
        if kl is not None and cfg.training.kl_coef > 0:
            loss = loss + cfg.training.kl_coef * kl.mean()
        return loss, stats, kl

    # ---- the base model (KL) and the EMA -----------------------------------------------------------------------------
    def _reference_model(self) -> Callable[..., torch.Tensor] | None:
        """The frozen base model's denoiser, when the KL is trained or logged: the UNet with its LoRA disabled, or,
        under full fine-tuning, a frozen copy made before any update."""
        cfg = self.cfg
        if not (cfg.training.kl_coef > 0 or cfg.logging.kl_to_base):
            return None
        if getattr(self.unet, "peft_config", None):
            return _AdapterDisabled(self.unet)
        return copy.deepcopy(self.unet).requires_grad_(False).eval()

    def _update_ema(self) -> None:
        if self.ema is None:
            return
        decay = self.cfg.training.ema_decay
        with torch.no_grad():
            for avg, p in zip(self.ema, self.params, strict=True):
                avg.mul_(decay).add_(p.detach().float(), alpha=1 - decay)

    @contextlib.contextmanager
    def ema_weights(self) -> Iterator[bool]:
        """Inside, the trainable weights are the EMA's (yields True), restored on exit; without an EMA, a no-op
        (yields False)."""
        if self.ema is None:
            yield False
            return
        saved = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, avg in zip(self.params, self.ema, strict=True):
                p.copy_(avg)
        try:
            yield True
        finally:
            with torch.no_grad():
                for p, kept in zip(self.params, saved, strict=True):
                    p.copy_(kept)

    def _regression_generator(self, inner: int, micro_batch: int, j: int) -> torch.Generator:
        """RWR's (t, noise) draws depend only on (run seed, version, position), not on which rank computes them."""
        seed = hash((self.cfg.seed, self.policy_version, inner, micro_batch, j)) % 2**63
        return torch.Generator().manual_seed(seed)

    def _regression_loss(
        self,
        data: EpochBatch,
        rows: torch.Tensor,
        embeds: torch.Tensor,
        weights: torch.Tensor,
        generator: torch.Generator,
    ) -> torch.Tensor | None:
        """RWR: weighted denoising loss on the final samples x_0 at a fresh random (t, noise); rows [b].

        As in the JAX code, the prediction is classifier-free guided when training.cfg is on. Samples of weight 0
        (RWR-sparse below its percentile) are not run at all; None if none is left.
        """
        if not hasattr(self.scheduler, "add_noise"):
            raise ValueError(
                f"training.objective {self.cfg.training.objective!r} needs a noise-prediction scheduler with "
                f"add_noise (DDIM); {type(self.scheduler).__name__} has none: use ddpo_is or ddpo_sf"
            )
        x0 = data.latents[rows, -1].float()  # [b, C, h, w]
        num_train = self.scheduler.config.num_train_timesteps
        t = torch.randint(0, num_train, (len(rows),), generator=generator).to(self.device)
        noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(self.device)
        keep = weights > 0
        if not bool(keep.any()):
            return None
        x0, t, noise, embeds, kept_weights = x0[keep], t[keep], noise[keep], embeds[keep], weights[keep]
        noisy = self.scheduler.add_noise(x0, noise, t)
        if self.scheduler.config.prediction_type == "v_prediction":
            target = self.scheduler.get_velocity(x0, noise, t)
        else:
            target = noise
        guidance = self.cfg.sampling.guidance_scale if self.cfg.training.cfg else 1.0
        pred = self.policy.denoiser_output(
            self.unet, noisy, t, embeds, self._negative_embeds.expand_as(embeds), guidance
        )
        # mean over the whole micro-batch (dropped samples count as weight 0): the divisor stays the same
        return rwr_loss(pred, target, kept_weights) * keep.sum() / len(rows)

    def _warn_if_nothing_learned(self, metrics: dict[str, float | None]) -> None:
        if metrics["grad_norm"] == 0.0:
            logger.warning(
                "policy version %d: the gradient norm was 0 for the whole epoch, so nothing was learned. Check "
                "that rewards differ within each prompt (advantage_abs_mean=%s), that lora.target_modules exist in "
                "this UNet, and, with a float16 base, that loss scaling is on (grad_scale in metrics.jsonl).",
                self.policy_version,
                metrics["advantage_abs_mean"],
            )
        if metrics["skipped_steps"]:
            logger.warning(
                "policy version %d: %d optimizer step(s) skipped for non-finite gradients (grad_scale=%s)",
                self.policy_version,
                metrics["skipped_steps"],
                metrics.get("grad_scale"),
            )

    # ---- weights and state ---------------------------------------------------------------------------------------
    def policy_weights(self) -> dict[str, torch.Tensor]:
        """The weights actors load (CPU): LoRA tensors, or the whole UNet under full fine-tuning."""
        return policy_state_dict(self.unet)

    def state_dict(self, include_policy: bool = True) -> dict:
        state = {
            "optimizer": self.optim.state_dict(),
            "stat_tracker": self.stat_tracker.state_dict(),
            "stat_trackers": {name: tr.state_dict() for name, tr in self.stat_trackers.items()},
            "policy_version": self.policy_version,
            "generator": self.generator.get_state(),
        }
        if include_policy:
            state["policy"] = self.policy_weights()
        if self.ema is not None:
            state["ema"] = [avg.clone() for avg in self.ema]
        return state

    def load_state_dict(self, state: dict) -> None:
        if "policy" in state:
            load_policy_state_dict(self.unet, state["policy"])
        self.optim.load_state_dict(state["optimizer"])
        trackers = state.get("stat_trackers") or {next(iter(self.stat_trackers)): state["stat_tracker"]}
        for name, tracker_state in trackers.items():
            if name in self.stat_trackers:
                self.stat_trackers[name].load_state_dict(tracker_state)
        if self.ema is not None and "ema" in state:
            self.ema = [avg.float().clone() for avg in state["ema"]]
        self.policy_version = int(state["policy_version"])
        self.generator.set_state(state["generator"])


class _AdapterDisabled:
    """The UNet with its LoRA switched off for one call: the base model, without a second copy in memory."""

    def __init__(self, unet: torch.nn.Module) -> None:
        self.unet = unet

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    def __call__(self, *args, **kwargs):
        self.unet.disable_adapters()
        try:
            return self.unet(*args, **kwargs)
        finally:
            self.unet.enable_adapters()


def _all_reduce_gradients(params: Sequence[torch.nn.Parameter]) -> None:
    """Sum the trainable parameters' gradients over ranks (one flat buffer, one collective)."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for p, g in zip(params, grads, strict=True):
        p.grad = flat[offset : offset + g.numel()].view_as(g).clone()
        offset += g.numel()


def _mean_over_ranks(xs: list[float]) -> float | None:
    """The mean of every rank's values (ranks may hold different numbers of them)."""
    total = torch.tensor([sum(xs), len(xs)], dtype=torch.float64)
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return float(total[0] / total[1]) if total[1] else None


def _mean(xs: list[float]) -> float | None:
    return float(np.mean(xs)) if xs else None
