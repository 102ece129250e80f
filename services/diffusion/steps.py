"""The step math: one denoising step as a Gaussian policy with an exact log-probability, in float32.

Two steps, one per scheduler kind:
- DDIM with eta > 0 (DDPO, Black et al. 2023, Sec. 4.3): SD 1.x/2.x and SDXL UNets.
- The flow-matching Euler step turned into an SDE (Flow-GRPO, Liu et al. 2025, arXiv 2505.05470, eq. 9 and App.
  A): SD3-class transformers with a `FlowMatchEulerDiscreteScheduler`.

DDIM:

Symbols (Song et al., "Denoising Diffusion Implicit Models", 2021):

| code               | paper                                                 |
| ------------------ | ----------------------------------------------------- |
| `alpha_prod_t`     | alpha_t (cumulative product of (1 - beta))            |
| `alpha_prod_prev`  | alpha_{t-1}, the next (less noisy) timestep's          |
| `x0_pred`          | the predicted x_0 ("predicted x_0" term of eq. 12)    |
| `eps_pred`         | epsilon_theta(x_t, t)                                 |
| `std_dev_t`        | sigma_t = eta * sqrt((1-a_{t-1})/(1-a_t)) * sqrt(1 - a_t/a_{t-1})  (eq. 16) |
| `prev_mean`        | mu_theta(x_t, t), the mean of x_{t-1} in eq. 12        |

One denoising step is the action of a policy pi(x_{t-1} | x_t, c) = N(mu_theta(x_t, t, c), sigma_t^2 I).

Flow-matching SDE (rectified flow x_sigma = (1 - sigma) x_0 + sigma eps, velocity v = eps - x_0; sigma runs 1 -> 0):

| code        | Flow-GRPO                                                                   |
| ----------- | --------------------------------------------------------------------------- |
| `sigma`     | sigma_t of the current step (scheduler.sigmas[i])                           |
| `dt`        | sigma_{t+1} - sigma_t < 0 (the next sigma minus this one)                   |
| `std_dev_t` | noise_level * sqrt(sigma / (1 - sigma)) (a in the paper; at sigma 1 the denominator uses sigmas[1]) |
| `prev_mean` | x (1 + std^2 dt / (2 sigma)) + v (1 + std^2 (1 - sigma) / (2 sigma)) dt      |
| `step_std`  | std_dev_t sqrt(-dt), the std of x_{t+1} given x_t                           |

With noise_level 0 the mean is x + v dt: the deterministic Euler (ODE) step of the scheduler.
"""

from __future__ import annotations

import math

import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

_MIN_STD = (
    1e-6  # keeps log N finite when eta * sqrt(variance) underflows (e.g. the last step of some schedules)
)


def _broadcastable(values: torch.Tensor, ndim: int, device: torch.device) -> torch.Tensor:
    """A 0-d or [B] float64 tensor -> float32 on `device`, shaped [B, 1, 1, ...] to broadcast over a sample."""
    out = values.float().to(device)
    return out.reshape(-1, *([1] * (ndim - 1))) if out.ndim else out


def ddim_step_mean_std(
    scheduler: DDIMScheduler,
    model_output: torch.Tensor,
    timestep: int | torch.Tensor,
    sample: torch.Tensor,
    eta: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Gaussian of one DDIM step: mu_theta(x_t, t) [B, C, h, w] float32 and sigma_t (broadcastable to it, >= a
    tiny floor). Arguments as `ddim_step_with_logprob`."""
    if scheduler.num_inference_steps is None:
        raise ValueError("call scheduler.set_timesteps(num_steps) before ddim_step_with_logprob")
    cfg = scheduler.config
    device = sample.device
    t = torch.as_tensor(timestep, device="cpu", dtype=torch.long)
    if t.ndim > 1 or (t.ndim == 1 and t.shape[0] != sample.shape[0]):
        raise ValueError(f"timestep must be a scalar or have shape [{sample.shape[0]}], got {tuple(t.shape)}")
    # 1. previous timestep t_prev = t - (num_train_timesteps / num_inference_steps)
    t_prev = t - cfg.num_train_timesteps // scheduler.num_inference_steps
    alphas = scheduler.alphas_cumprod.to(torch.float64)
    final = torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float64)
    alpha_prod_t = alphas[t.clamp(0, len(alphas) - 1)]
    alpha_prod_prev = torch.where(t_prev >= 0, alphas[t_prev.clamp(0, len(alphas) - 1)], final)
    # Computations in float32 whatever the model dtype: log-probs of nearby policies are compared in ratios.
    ndim = sample.ndim
    a_t = _broadcastable(alpha_prod_t, ndim, device)
    a_prev = _broadcastable(alpha_prod_prev, ndim, device)
    b_t = 1 - a_t
    x_t = sample.float()
    out = model_output.float()
    # 2. predicted x_0 and epsilon (eq. 12's "predicted x_0"), by prediction type
    if cfg.prediction_type == "epsilon":
        x0_pred = (x_t - b_t.sqrt() * out) / a_t.sqrt()
        eps_pred = out
    elif cfg.prediction_type == "v_prediction":
        x0_pred = a_t.sqrt() * x_t - b_t.sqrt() * out
        eps_pred = a_t.sqrt() * out + b_t.sqrt() * x_t
    elif cfg.prediction_type == "sample":
        x0_pred = out
        eps_pred = (x_t - a_t.sqrt() * x0_pred) / b_t.sqrt()
    else:
        raise ValueError(f"unsupported prediction_type {cfg.prediction_type!r}")
    # 3. optional clipping of x_0, as the scheduler's config asks (eps re-derived to stay consistent)
    if cfg.thresholding:
        raise ValueError("DDIMScheduler thresholding is not supported by ddim_step_with_logprob")
    if cfg.clip_sample:
        x0_pred = x0_pred.clamp(-cfg.clip_sample_range, cfg.clip_sample_range)
        eps_pred = (x_t - a_t.sqrt() * x0_pred) / b_t.sqrt()
    # 4. sigma_t (eq. 16): variance = (1 - a_prev)/(1 - a_t) * (1 - a_t / a_prev)
    variance = (1 - a_prev) / b_t * (1 - a_t / a_prev)
    std_dev_t = (eta * variance.sqrt()).clamp_min(_MIN_STD)
    # 5. mean of x_{t-1} (eq. 12): sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps
    direction = (1 - a_prev - std_dev_t**2).clamp_min(0).sqrt() * eps_pred
    prev_mean = a_prev.sqrt() * x0_pred + direction
    return prev_mean, std_dev_t


def ddim_step_with_logprob(
    scheduler: DDIMScheduler,
    model_output: torch.Tensor,
    timestep: int | torch.Tensor,
    sample: torch.Tensor,
    eta: float = 1.0,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM step x_t -> x_{t-1} and log pi(x_{t-1} | x_t).

    Args:
        scheduler: a `DDIMScheduler` after `set_timesteps`.
        model_output: [B, C, h, w] the (guided) UNet prediction: epsilon, v or x_0 per `prediction_type`.
        timestep: an int, a 0-d tensor, or a [B] tensor with one timestep per sample.
        sample: [B, C, h, w] x_t.
        eta: DDIM eta; sigma_t = eta * sqrt(variance(t, t_prev)). With eta 0 the step is deterministic DDIM: the
            mean is returned and no noise is drawn (its log_prob is not a policy's and must not be trained).
        prev_sample: [B, C, h, w] x_{t-1} to score; sampled from the policy when None.
        generator: RNG for sampling prev_sample.

    Returns:
        prev_sample [B, C, h, w] (dtype of `sample`) and log_prob [B] float32: the Gaussian log-density of
        prev_sample **averaged** (not summed) over all latent dimensions, as the DDPO reference implementation does.
        Averaging rescales the policy gradient by 1/(C*h*w) uniformly, which the learning rate absorbs.
    """
    prev_mean, std_dev_t = ddim_step_mean_std(scheduler, model_output, timestep, sample, eta)
    return _draw_and_score(prev_mean, std_dev_t, sample, eta == 0, prev_sample, generator)


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, std^2 I) averaged over all non-batch dimensions, in float32. [B, ...] -> [B]."""
    x = x.detach().float()
    log_density = -((x - mean) ** 2) / (2 * std**2) - torch.log(std) - math.log(math.sqrt(2 * math.pi))
    return log_density.mean(dim=tuple(range(1, x.ndim)))


def gaussian_kl(mean: torch.Tensor, ref_mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, std^2 I) || N(ref_mean, std^2 I)) per sample, averaged over the non-batch dimensions like the
    log-prob: mean over dims of (mean - ref_mean)^2 / (2 std^2). [B, ...] -> [B] float32."""
    per_dim = (mean.float() - ref_mean.float()) ** 2 / (2 * std.float() ** 2)
    return per_dim.mean(dim=tuple(range(1, per_dim.ndim)))


# ---- the flow-matching SDE step (Flow-GRPO) ---------------------------------------------------------------------


def flow_step_indices(
    scheduler: FlowMatchEulerDiscreteScheduler, timestep: float | torch.Tensor, batch: int
) -> torch.Tensor:
    """Indices i [B] (long, CPU) into scheduler.sigmas of each sample's timestep (the nearest schedule entry)."""
    if getattr(scheduler, "num_inference_steps", None) is None:
        raise ValueError("call scheduler.set_timesteps(num_steps) before flow_sde_step_with_logprob")
    t = torch.as_tensor(timestep, dtype=torch.float64).detach().cpu()
    if t.ndim > 1 or (t.ndim == 1 and t.shape[0] != batch):
        raise ValueError(f"timestep must be a scalar or have shape [{batch}], got {tuple(t.shape)}")
    schedule = scheduler.timesteps.detach().cpu().to(torch.float64)  # [T]
    index = (schedule[None, :] - t.reshape(-1, 1)).abs().argmin(dim=1)  # [B or 1]
    return index.expand(batch) if t.ndim == 0 else index


def flow_sde_step_mean_std(
    scheduler: FlowMatchEulerDiscreteScheduler,
    model_output: torch.Tensor,
    timestep: float | torch.Tensor,
    sample: torch.Tensor,
    noise_level: float = 0.7,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Gaussian of one flow SDE step: mean [B, C, h, w] float32 and step_std = std_dev_t sqrt(-dt)
    (broadcastable to it, >= a tiny floor). Arguments as `flow_sde_step_with_logprob`."""
    if noise_level < 0:
        raise ValueError(f"noise_level must be >= 0, got {noise_level}")
    index = flow_step_indices(scheduler, timestep, sample.shape[0])
    sigmas = scheduler.sigmas.detach().cpu().to(torch.float64)  # [T+1], the last is 0
    ndim, device = sample.ndim, sample.device
    sigma = _broadcastable(sigmas[index], ndim, device)
    sigma_next = _broadcastable(sigmas[index + 1], ndim, device)
    # at sigma = 1, sqrt(sigma / (1 - sigma)) is infinite: Flow-GRPO uses the schedule's second sigma there
    sigma_denominator = torch.where(sigma == 1, _broadcastable(sigmas[1], ndim, device), sigma)
    x, v = sample.float(), model_output.float()
    dt = sigma_next - sigma  # < 0
    std_dev_t = noise_level * (sigma / (1 - sigma_denominator)).sqrt()
    prev_mean = (
        x * (1 + std_dev_t**2 / (2 * sigma) * dt) + v * (1 + std_dev_t**2 * (1 - sigma) / (2 * sigma)) * dt
    )
    step_std = (std_dev_t * (-dt).sqrt()).clamp_min(_MIN_STD)
    return prev_mean, step_std


def flow_sde_step_with_logprob(
    scheduler: FlowMatchEulerDiscreteScheduler,
    model_output: torch.Tensor,
    timestep: float | torch.Tensor,
    sample: torch.Tensor,
    noise_level: float = 0.7,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One flow-matching SDE step x_t -> x_{t+1} (sigma decreasing) and its log-probability (Flow-GRPO).

    Args:
        scheduler: a `FlowMatchEulerDiscreteScheduler` after `set_timesteps` (its sigmas define the step).
        model_output: [B, C, h, w] the (guided) velocity prediction v.
        timestep: a 0-d or [B] tensor (or a float) of the scheduler's timesteps.
        sample: [B, C, h, w] x_t.
        noise_level: a in std_dev_t = a sqrt(sigma / (1 - sigma)). 0 = the deterministic Euler step (the ODE:
            evaluation only; its log_prob is not a policy's and must not be trained).
        prev_sample: [B, C, h, w] x_{t+1} to score; sampled from the step's Gaussian when None.
        generator: RNG for sampling prev_sample.

    Returns:
        prev_sample [B, C, h, w] (dtype of `sample`) and log_prob [B] float32: the Gaussian log-density of
        prev_sample averaged over all non-batch dimensions (as `ddim_step_with_logprob`).
    """
    prev_mean, step_std = flow_sde_step_mean_std(scheduler, model_output, timestep, sample, noise_level)
    return _draw_and_score(prev_mean, step_std, sample, noise_level == 0, prev_sample, generator)


def _draw_and_score(
    mean: torch.Tensor,
    std: torch.Tensor,
    sample: torch.Tensor,
    deterministic: bool,
    prev_sample: torch.Tensor | None,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The next sample (drawn from N(mean, std^2) in float32 and rounded to `sample`'s dtype, or the mean itself for
    a deterministic step, or `prev_sample` when given) and its Gaussian log-probability [B]."""
    if prev_sample is None:
        if deterministic:
            prev_sample = mean.to(sample.dtype)
        else:
            noise = torch.randn(sample.shape, generator=generator, device=sample.device, dtype=torch.float32)
            prev_sample = (mean + std * noise).to(sample.dtype)
    return prev_sample, gaussian_log_prob(prev_sample, mean, std)
