"""Sampler math: DDIM as a Gaussian policy with exact log-probabilities (DDPO, Black et al. 2023, Sec. 4.3).

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
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from diffusers import DDIMScheduler
from tqdm.auto import tqdm

from services.trajectory import Trajectory

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
    if prev_sample is None:
        if eta == 0:
            prev_sample = prev_mean.to(sample.dtype)
        else:
            noise = torch.randn(sample.shape, generator=generator, device=sample.device, dtype=torch.float32)
            prev_sample = (prev_mean + std_dev_t * noise).to(sample.dtype)
    return prev_sample, gaussian_log_prob(prev_sample, prev_mean, std_dev_t)


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, std^2 I) averaged over all non-batch dimensions, in float32. [B, ...] -> [B]."""
    x = x.detach().float()
    log_density = -((x - mean) ** 2) / (2 * std**2) - torch.log(std) - math.log(math.sqrt(2 * math.pi))
    return log_density.mean(dim=tuple(range(1, x.ndim)))


def guided_noise_pred(
    unet: Callable[..., torch.Tensor],
    latents: torch.Tensor,
    timestep: torch.Tensor,
    prompt_embeds: torch.Tensor,
    negative_prompt_embeds: torch.Tensor,
    guidance_scale: float,
) -> torch.Tensor:
    """Classifier-free guidance: eps_uncond + w (eps_text - eps_uncond).

    latents [B, C, h, w]; timestep 0-d or [B]; embeds [B, L, D] each. Returns [B, C, h, w].
    With guidance_scale == 1 the unconditional branch is skipped. The latents enter the UNet in its own dtype
    (trajectories keep theirs: the step math is float32 whatever the model runs in).
    """
    latents = latents.to(getattr(unet, "dtype", latents.dtype))
    if guidance_scale == 1.0:
        return unet(latents, timestep, encoder_hidden_states=prompt_embeds).sample
    t = timestep.repeat(2) if timestep.ndim == 1 else timestep
    both = unet(
        torch.cat([latents, latents]),
        t,
        encoder_hidden_states=torch.cat([negative_prompt_embeds, prompt_embeds]),
    ).sample
    uncond, text = both.chunk(2)
    return uncond + guidance_scale * (text - uncond)


@torch.no_grad()
def encode_prompts(pipeline, prompts: list[str]) -> torch.Tensor:
    """Prompts -> text-encoder hidden states [B, L, D] (padded to the tokenizer's max length, as SD does)."""
    tok = pipeline.tokenizer(
        prompts,
        padding="max_length",
        max_length=pipeline.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    device = pipeline.text_encoder.device
    return pipeline.text_encoder(tok.input_ids.to(device))[0]


@torch.no_grad()
def decode_latents(pipeline, latents: torch.Tensor) -> torch.Tensor:
    """x_0 latents [B, C, h, w] -> images [B, 3, H, W] float32 in [0, 1]."""
    vae = pipeline.vae
    images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
    return (images.float() / 2 + 0.5).clamp(0, 1)


def window_bounds(num_steps: int, sde_window: tuple[int, int] | list[int] | None) -> tuple[int, int]:
    """The stochastic window [start, end) of step indices (None: all steps), checked against num_steps."""
    if sde_window is None:
        return 0, num_steps
    start, end = int(sde_window[0]), int(sde_window[1])
    if not 0 <= start < end <= num_steps:
        raise ValueError(f"sampling.sde_window {[start, end]} must satisfy 0 <= start < end <= {num_steps}")
    return start, end


@torch.no_grad()
def sample_trajectory(
    pipeline,
    prompts: list[str],
    num_steps: int = 50,
    guidance_scale: float = 5.0,
    eta: float = 1.0,
    negative_prompt: str = "",
    generator: torch.Generator | None = None,
    resolution: int | None = None,
    progress: bool = False,
    latent_dtype: torch.dtype = torch.float32,
    sde_window: tuple[int, int] | list[int] | None = None,
) -> Trajectory:
    """Run the full CFG DDIM loop from noise, recording latents and log-probs of the stochastic steps.

    `pipeline` is a diffusers StableDiffusionPipeline whose scheduler is a DDIMScheduler. Each x_{t-1} is rounded
    to `latent_dtype` as it is drawn and its log-probability is that of the rounded value, so a trajectory stored
    in `latent_dtype` scores exactly the same when the learner recomputes it (float32: no rounding at all).

    `sde_window` = [start, end) (step indices, default all T steps): steps outside it are deterministic DDIM (eta 0),
    steps inside use `eta`, and only the window's W = end - start steps are recorded (they are the policy's actions;
    the deterministic ones have no log-probability to train).

    Returns a Trajectory: latents [B, W+1, C, h, w] in `latent_dtype` (x before the window's first step, then after
    each of its steps), log_probs [B, W] float32, timesteps [W], images [B, 3, H, W] of the final x_0, prompts, and
    final_latents [B, C, h, w] = x_0 when the window ends before the last step (else x_0 is latents[:, -1]).
    """
    unet, scheduler = pipeline.unet, pipeline.scheduler
    device, dtype = unet.device, unet.dtype
    prompt_embeds = encode_prompts(pipeline, prompts).to(dtype)
    negative_embeds = encode_prompts(pipeline, [negative_prompt]).to(dtype).expand_as(prompt_embeds)
    scheduler.set_timesteps(num_steps, device=device)
    start, end = window_bounds(len(scheduler.timesteps), sde_window)
    side = (resolution or unet.config.sample_size * pipeline.vae_scale_factor) // pipeline.vae_scale_factor
    shape = (len(prompts), unet.config.in_channels, side, side)
    latents = torch.randn(shape, generator=generator, device=device, dtype=torch.float32).to(latent_dtype)
    latents = latents * scheduler.init_noise_sigma
    all_latents, all_log_probs = [], []
    steps = scheduler.timesteps
    iterator = tqdm(steps, desc="sampling", leave=False) if progress else steps
    for i, t in enumerate(iterator):
        inside = start <= i < end
        if i == start:
            all_latents.append(latents)
        noise_pred = guided_noise_pred(unet, latents, t, prompt_embeds, negative_embeds, guidance_scale)
        latents, log_prob = ddim_step_with_logprob(
            scheduler, noise_pred, t, latents, eta=eta if inside else 0.0, generator=generator
        )
        if inside:
            all_latents.append(latents)
            all_log_probs.append(log_prob)
    images = decode_latents(pipeline, latents)
    return Trajectory(
        latents=torch.stack(all_latents, dim=1),
        log_probs=torch.stack(all_log_probs, dim=1),
        timesteps=steps[start:end].detach().clone().long().cpu(),
        images=images,
        prompts=list(prompts),
        final_latents=latents if end < len(steps) else None,
    )


def gaussian_kl(mean: torch.Tensor, ref_mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, std^2 I) || N(ref_mean, std^2 I)) per sample, averaged over the non-batch dimensions like the
    log-prob: mean over dims of (mean - ref_mean)^2 / (2 std^2). [B, ...] -> [B] float32."""
    per_dim = (mean.float() - ref_mean.float()) ** 2 / (2 * std.float() ** 2)
    return per_dim.mean(dim=tuple(range(1, per_dim.ndim)))


def step_log_prob(
    unet: Callable[..., torch.Tensor],
    scheduler: DDIMScheduler,
    latents: torch.Tensor,
    next_latents: torch.Tensor,
    timesteps: torch.Tensor,
    prompt_embeds: torch.Tensor,
    negative_prompt_embeds: torch.Tensor,
    guidance_scale: float,
    eta: float,
    reference: Callable[..., torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log pi_theta(next_latents | latents) under the current weights (with grad): what the learner optimises.

    latents, next_latents [B, C, h, w]; timesteps [B]; embeds [B, L, D]. Returns (log_prob [B] float32, kl) where,
    if `reference` (the base model's denoiser, e.g. the UNet with its LoRA disabled) is given, kl [B] is the KL of
    this step's Gaussian to the reference's (equal variances: ||mu_theta - mu_ref||^2 / (2 sigma^2), averaged over
    dimensions like the log-prob; with grad through mu_theta), else None.
    """
    noise_pred = guided_noise_pred(
        unet, latents, timesteps, prompt_embeds, negative_prompt_embeds, guidance_scale
    )
    mean, std = ddim_step_mean_std(scheduler, noise_pred, timesteps, latents, eta)
    log_prob = gaussian_log_prob(next_latents, mean, std)
    kl = None
    if reference is not None:
        with torch.no_grad():
            ref_pred = guided_noise_pred(
                reference, latents, timesteps, prompt_embeds, negative_prompt_embeds, guidance_scale
            )
            ref_mean, _ = ddim_step_mean_std(scheduler, ref_pred, timesteps, latents, eta)
        kl = gaussian_kl(mean, ref_mean, std)
    return log_prob, kl
