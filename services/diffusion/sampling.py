"""Sampling that records a trajectory, and the learner's recomputation of one step's log-probability, on a policy.

Both take a pipeline of any family (`services.diffusion.policies`); neither knows which family it runs.
"""

from __future__ import annotations

from typing import Any

import torch
from tqdm.auto import tqdm

from services.diffusion.policies import Conditioning, Denoiser, DiffusionPolicy, guided_noise_pred, policy_for
from services.diffusion.steps import ddim_step_mean_std, gaussian_kl, gaussian_log_prob
from services.trajectory import Trajectory


@torch.no_grad()
def encode_prompts(pipeline: Any, prompts: list[str]) -> Conditioning:
    """Prompts -> the pipeline's text conditioning: SD: hidden states [B, L, D] (padded to the tokenizer's max
    length); SDXL/SD3: `PromptEmbeds` (hidden [B, L, D], pooled [B, P])."""
    return policy_for(pipeline).encode_prompts(prompts)


@torch.no_grad()
def decode_latents(pipeline: Any, latents: torch.Tensor) -> torch.Tensor:
    """x_0 latents [B, C, h, w] -> images [B, 3, H, W] float32 in [0, 1] (x / scaling_factor + shift_factor: SD3's
    VAE has a shift, SD's and SDXL's none)."""
    vae = pipeline.vae
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor + shift).sample
    return (images.float() / 2 + 0.5).clamp(0, 1)


def window_bounds(num_steps: int, sde_window: tuple[int, int] | list[int] | None) -> tuple[int, int]:
    """The stochastic window [start, end) of step indices (None: all steps), checked against num_steps."""
    if sde_window is None:
        return 0, num_steps
    start, end = int(sde_window[0]), int(sde_window[1])
    if not 0 <= start < end <= num_steps:
        raise ValueError(f"sampling.sde_window {[start, end]} must satisfy 0 <= start < end <= {num_steps}")
    return start, end


def initial_latents(
    policy: DiffusionPolicy,
    batch: int,
    generator: torch.Generator | None,
    resolution: int | None,
    latent_dtype: torch.dtype,
) -> torch.Tensor:
    """x_T [B, C, h, w]: standard normal noise (drawn in float32, as the stock pipelines draw it) times the
    scheduler's init_noise_sigma (1 for flow models); h = resolution / VAE scale factor, else the denoiser's
    sample_size."""
    pipe, denoiser = policy.pipeline, policy.denoiser
    vae_scale = pipe.vae_scale_factor
    side = (resolution or denoiser.config.sample_size * vae_scale) // vae_scale
    shape = (batch, denoiser.config.in_channels, side, side)
    latents = torch.randn(shape, generator=generator, device=denoiser.device, dtype=torch.float32)
    return latents.to(latent_dtype) * getattr(pipe.scheduler, "init_noise_sigma", 1.0)


@torch.no_grad()
def sample_trajectory(
    pipeline: Any,
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
    """Run the full CFG sampling loop from noise, recording latents and log-probs of the stochastic steps.

    `pipeline` is a diffusers pipeline of a supported family (SD with DDIM, SDXL with DDIM, SD3 with the flow
    scheduler); `eta` is DDIM's eta, or the flow SDE's noise_level. Each x_{t-1} is rounded to `latent_dtype` as it
    is drawn and its log-probability is that of the rounded value, so a trajectory stored in `latent_dtype` scores
    exactly the same when the learner recomputes it (float32: no rounding at all).

    `sde_window` = [start, end) (step indices, default all T steps): steps outside it are deterministic (eta 0: DDIM,
    or the flow ODE's Euler step), steps inside use `eta`, and only the window's W = end - start steps are recorded
    (they are the policy's actions; the deterministic ones have no log-probability to train).

    Returns a Trajectory: latents [B, W+1, C, h, w] in `latent_dtype` (x before the window's first step, then after
    each of its steps), log_probs [B, W] float32, timesteps [W] (long for DDIM, float32 for flow models), images
    [B, 3, H, W] of the final x_0, prompts, and final_latents [B, C, h, w] = x_0 when the window ends before the last
    step (else x_0 is latents[:, -1]).
    """
    policy = policy_for(pipeline)
    denoiser, scheduler = policy.denoiser, pipeline.scheduler
    dtype = denoiser.dtype
    prompt_embeds = policy.encode_prompts(prompts).to(dtype)
    negative_embeds = policy.encode_negative(negative_prompt).to(dtype).expand_as(prompt_embeds)
    scheduler.set_timesteps(num_steps, device=denoiser.device)
    start, end = window_bounds(len(scheduler.timesteps), sde_window)
    latents = initial_latents(policy, len(prompts), generator, resolution, latent_dtype)
    all_latents, all_log_probs = [], []
    steps = scheduler.timesteps
    iterator = tqdm(steps, desc="sampling", leave=False) if progress else steps
    for i, t in enumerate(iterator):
        inside = start <= i < end
        if i == start:
            all_latents.append(latents)
        model_output = policy.denoiser_output(
            denoiser, latents, t, prompt_embeds, negative_embeds, guidance_scale
        )
        latents, log_prob = policy.step_with_logprob(
            scheduler, model_output, t, latents, eta=eta if inside else 0.0, generator=generator
        )
        if inside:
            all_latents.append(latents)
            all_log_probs.append(log_prob)
    images = decode_latents(pipeline, latents)
    return Trajectory(
        latents=torch.stack(all_latents, dim=1),
        log_probs=torch.stack(all_log_probs, dim=1),
        timesteps=steps[start:end].detach().clone().to(policy.timestep_dtype).cpu(),
        images=images,
        prompts=list(prompts),
        final_latents=latents if end < len(steps) else None,
    )


def step_log_prob(
    unet: Denoiser,
    scheduler: Any,
    latents: torch.Tensor,
    next_latents: torch.Tensor,
    timesteps: torch.Tensor,
    prompt_embeds: Conditioning,
    negative_prompt_embeds: Conditioning,
    guidance_scale: float,
    eta: float,
    reference: Denoiser | None = None,
    policy: DiffusionPolicy | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log pi_theta(next_latents | latents) under the current weights (with grad): what the learner optimises.

    latents, next_latents [B, C, h, w]; timesteps [B]; conditioning as the policy's encode_prompts ([B, L, D] for
    SD). `unet` is the policy's denoiser (UNet or transformer); `policy` says how to call it and which step it takes
    (None: SD, a UNet with DDIM). Returns (log_prob [B] float32, kl) where, if `reference` (the base model's
    denoiser, e.g. the denoiser with its LoRA disabled) is given, kl [B] is the KL of this step's Gaussian to the
    reference's (equal variances: ||mu_theta - mu_ref||^2 / (2 sigma^2), averaged over dimensions like the
    log-prob; with grad through mu_theta), else None.
    """
    if eta <= 0:
        raise ValueError(f"eta (noise level) {eta} makes the step deterministic: it has no policy to train")
    output_fn = policy.denoiser_output if policy is not None else guided_noise_pred
    mean_std_fn = policy.step_mean_std if policy is not None else ddim_step_mean_std
    model_output = output_fn(unet, latents, timesteps, prompt_embeds, negative_prompt_embeds, guidance_scale)
    mean, std = mean_std_fn(scheduler, model_output, timesteps, latents, eta)
    log_prob = gaussian_log_prob(next_latents, mean, std)
    kl = None
    if reference is not None:
        with torch.no_grad():
            ref_output = output_fn(
                reference, latents, timesteps, prompt_embeds, negative_prompt_embeds, guidance_scale
            )
            ref_mean, _ = mean_std_fn(scheduler, ref_output, timesteps, latents, eta)
        kl = gaussian_kl(mean, ref_mean, std)
    return log_prob, kl
