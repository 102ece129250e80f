"""Model families as policies: what the sampler and the learner need from a text-to-image model, per family.

A policy gives four things, and nothing outside this package asks which family it is:

    encode_prompts(prompts)          -> conditioning c (a tensor [B, L, D], or `PromptEmbeds` with pooled embeddings)
    encode_negative(negative_prompt) -> the unconditional branch's conditioning (batch 1; expand_as(c))
    denoiser_output(denoiser, x_t, t, c, c_neg, w) -> the classifier-free-guided model output [B, C, h, w]
    step_mean_std / step_with_logprob -> the Gaussian step (DDIM or the flow SDE) and its log-probability
    decode(x_0)                      -> images [B, 3, H, W] in [0, 1]

| family | pipeline                     | denoiser                         | step                      |
| ------ | ---------------------------- | -------------------------------- | ------------------------- |
| sd     | StableDiffusionPipeline      | UNet, one CLIP text encoder      | DDIM (eta)                |
| sdxl   | StableDiffusionXLPipeline    | UNet + pooled text + add_time_ids| DDIM (eta)                |
| sd3    | StableDiffusion3Pipeline     | MMDiT transformer (+ pooled)     | flow SDE (noise_level=eta)|

Prompts are encoded by the pipeline's own `encode_prompt` (SDXL, SD3), so our conditioning is the stock pipeline's.
FLUX.1 is not a family yet (guidance-distilled: no CFG branch, packed latents, its own LoRA mixin).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from diffusers import (
    DDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)

from services.diffusion.steps import (
    ddim_step_mean_std,
    ddim_step_with_logprob,
    flow_sde_step_mean_std,
    flow_sde_step_with_logprob,
)


@dataclass
class PromptEmbeds:
    """Text conditioning with pooled embeddings (SDXL, SD3); duck-types the tensor conditioning of SD."""

    hidden: (
        torch.Tensor
    )  # [B, L, D] per-token embeddings (SDXL: both CLIPs' penultimate layers; SD3: CLIPs + T5)
    pooled: torch.Tensor  # [B, P] pooled text embeddings

    def to(self, *args: Any, **kwargs: Any) -> PromptEmbeds:
        return PromptEmbeds(self.hidden.to(*args, **kwargs), self.pooled.to(*args, **kwargs))

    def expand_as(self, other: PromptEmbeds) -> PromptEmbeds:
        """A batch-1 conditioning repeated to `other`'s batch size."""
        b = other.hidden.shape[0]
        return PromptEmbeds(self.hidden.expand(b, -1, -1), self.pooled.expand(b, -1))

    def __getitem__(self, index: Any) -> PromptEmbeds:
        return PromptEmbeds(self.hidden[index], self.pooled[index])

    @property
    def shape(self) -> torch.Size:
        return self.hidden.shape

    @staticmethod
    def cat(parts: list[PromptEmbeds]) -> PromptEmbeds:
        return PromptEmbeds(torch.cat([p.hidden for p in parts]), torch.cat([p.pooled for p in parts]))


Conditioning = torch.Tensor | PromptEmbeds
Denoiser = Callable[..., Any]  # the UNet / transformer (or a wrapper with its LoRA disabled)


class DiffusionPolicy(Protocol):
    """What the sampler (`sample_trajectory`) and the learner (`step_log_prob`) call; see the module docstring."""

    family: str
    pipeline: Any
    timestep_dtype: torch.dtype  # dtype of recorded timesteps: long (DDIM) or float32 (flow)

    @property
    def denoiser(self) -> torch.nn.Module: ...

    def encode_prompts(self, prompts: list[str]) -> Conditioning: ...

    def encode_negative(self, negative_prompt: str) -> Conditioning: ...

    def denoiser_output(
        self,
        denoiser: Denoiser,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        cond: Conditioning,
        uncond: Conditioning,
        guidance_scale: float,
    ) -> torch.Tensor: ...

    def step_mean_std(
        self,
        scheduler: Any,
        model_output: torch.Tensor,
        timestep: torch.Tensor,
        sample: torch.Tensor,
        eta: float,
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def step_with_logprob(
        self,
        scheduler: Any,
        model_output: torch.Tensor,
        timestep: torch.Tensor,
        sample: torch.Tensor,
        eta: float,
        prev_sample: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


# ---- the pieces the families share ---------------------------------------------------------------------------------
def _guided(
    raw: Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor], latents, timestep, cond, uncond, w
):
    """Classifier-free guidance around `raw(latents, timestep, cond)`: uncond + w (text - uncond); w == 1 skips the
    unconditional branch. latents [B, C, h, w]; timestep 0-d or [B]."""
    if w == 1.0:
        return raw(latents, timestep, cond)
    t = timestep.repeat(2) if timestep.ndim == 1 else timestep
    both_cond = (
        PromptEmbeds.cat([uncond, cond]) if isinstance(cond, PromptEmbeds) else torch.cat([uncond, cond])
    )
    uncond_out, text_out = raw(torch.cat([latents, latents]), t, both_cond).chunk(2)
    return uncond_out + w * (text_out - uncond_out)


def _model_dtype(denoiser: Denoiser, latents: torch.Tensor) -> torch.dtype:
    return getattr(denoiser, "dtype", latents.dtype)


class _DDIMStep:
    """DDIM with eta as the policy's step (SD, SDXL); timesteps are integers."""

    timestep_dtype = torch.long

    def step_mean_std(self, scheduler, model_output, timestep, sample, eta):
        return ddim_step_mean_std(scheduler, model_output, timestep, sample, eta)

    def step_with_logprob(
        self, scheduler, model_output, timestep, sample, eta, prev_sample=None, generator=None
    ):
        return ddim_step_with_logprob(scheduler, model_output, timestep, sample, eta, prev_sample, generator)


class _FlowSDEStep:
    """Flow-GRPO's SDE step (SD3-class); `eta` is its noise_level a; timesteps are floats."""

    timestep_dtype = torch.float32

    def step_mean_std(self, scheduler, model_output, timestep, sample, eta):
        return flow_sde_step_mean_std(scheduler, model_output, timestep, sample, eta)

    def step_with_logprob(
        self, scheduler, model_output, timestep, sample, eta, prev_sample=None, generator=None
    ):
        return flow_sde_step_with_logprob(
            scheduler, model_output, timestep, sample, eta, prev_sample, generator
        )


# ---- SD 1.x / 2.x ------------------------------------------------------------------------------------------------
def guided_noise_pred(
    unet: Denoiser,
    latents: torch.Tensor,
    timestep: torch.Tensor,
    prompt_embeds: torch.Tensor,
    negative_prompt_embeds: torch.Tensor,
    guidance_scale: float,
) -> torch.Tensor:
    """Classifier-free guidance of an SD UNet: eps_uncond + w (eps_text - eps_uncond).

    latents [B, C, h, w]; timestep 0-d or [B]; embeds [B, L, D] each. Returns [B, C, h, w].
    With guidance_scale == 1 the unconditional branch is skipped. The latents enter the UNet in its own dtype
    (trajectories keep theirs: the step math is float32 whatever the model runs in).
    """
    latents = latents.to(_model_dtype(unet, latents))

    def raw(x, t, c):
        return unet(x, t, encoder_hidden_states=c).sample

    return _guided(raw, latents, timestep, prompt_embeds, negative_prompt_embeds, guidance_scale)


class SDPolicy(_DDIMStep):
    family = "sd"

    def __init__(self, pipeline: StableDiffusionPipeline) -> None:
        self.pipeline = pipeline

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.pipeline.unet

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> text-encoder hidden states [B, L, D] (padded to the tokenizer's max length, as SD does)."""
        tokenizer = self.pipeline.tokenizer
        tok = tokenizer(
            prompts,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        encoder = self.pipeline.text_encoder
        return encoder(tok.input_ids.to(encoder.device))[0]

    def encode_negative(self, negative_prompt: str) -> torch.Tensor:
        return self.encode_prompts([negative_prompt])  # [1, L, D]

    def denoiser_output(self, denoiser, latents, timestep, cond, uncond, guidance_scale):
        return guided_noise_pred(denoiser, latents, timestep, cond, uncond, guidance_scale)


# ---- SDXL ----------------------------------------------------------------------------------------------------------
class SDXLPolicy(_DDIMStep):
    """SDXL's UNet: two CLIP text encoders (penultimate hidden states concatenated), the second's pooled embedding,
    and the micro-conditioning add_time_ids = (original size, crop top-left, target size) = (H, W, 0, 0, H, W)."""

    family = "sdxl"

    def __init__(self, pipeline: StableDiffusionXLPipeline) -> None:
        self.pipeline = pipeline

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.pipeline.unet

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> PromptEmbeds:
        hidden, _, pooled, _ = self.pipeline.encode_prompt(
            prompt=list(prompts), device=self.denoiser.device, do_classifier_free_guidance=False
        )
        return PromptEmbeds(hidden, pooled)  # [B, 77, D1 + D2], [B, P]

    def encode_negative(self, negative_prompt: str) -> PromptEmbeds:
        """As the stock pipeline: an empty negative prompt is all zeros when the model says so
        (`force_zeros_for_empty_prompt`, True for SDXL base); any other is encoded like a prompt."""
        cond = self.encode_prompts([negative_prompt])
        if not negative_prompt and self.pipeline.config.get("force_zeros_for_empty_prompt", False):
            return PromptEmbeds(torch.zeros_like(cond.hidden), torch.zeros_like(cond.pooled))
        return cond

    def denoiser_output(self, denoiser, latents, timestep, cond, uncond, guidance_scale):
        dtype = _model_dtype(denoiser, latents)
        latents = latents.to(dtype)
        height, width = (side * self.pipeline.vae_scale_factor for side in latents.shape[-2:])
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=dtype, device=latents.device)

        def raw(x, t, c: PromptEmbeds):
            added = {"text_embeds": c.pooled.to(dtype), "time_ids": time_ids.expand(x.shape[0], -1)}
            return denoiser(x, t, encoder_hidden_states=c.hidden.to(dtype), added_cond_kwargs=added).sample

        return _guided(raw, latents, timestep, cond, uncond, guidance_scale)


# ---- SD3 / SD3.5 ---------------------------------------------------------------------------------------------------
class SD3Policy(_FlowSDEStep):
    """SD3-class MMDiT: CLIP-L + CLIP-G (+ T5 when the pipeline has one; zeros otherwise, as the stock pipeline),
    pooled projections, velocity prediction, flow-matching Euler schedule turned into Flow-GRPO's SDE."""

    family = "sd3"

    def __init__(self, pipeline: StableDiffusion3Pipeline) -> None:
        self.pipeline = pipeline

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.pipeline.transformer

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> PromptEmbeds:
        hidden, _, pooled, _ = self.pipeline.encode_prompt(
            prompt=list(prompts),
            prompt_2=None,
            prompt_3=None,
            device=self.denoiser.device,
            do_classifier_free_guidance=False,
        )
        return PromptEmbeds(hidden, pooled)  # [B, 77 + 256, D], [B, P]

    def encode_negative(self, negative_prompt: str) -> PromptEmbeds:
        return self.encode_prompts([negative_prompt])  # the stock pipeline encodes "" like any prompt

    def denoiser_output(self, denoiser, latents, timestep, cond, uncond, guidance_scale):
        dtype = _model_dtype(denoiser, latents)
        latents = latents.to(dtype)

        def raw(x, t, c: PromptEmbeds):
            t = t.to(x.device).expand(x.shape[0]) if t.ndim == 0 else t.to(x.device)
            return denoiser(
                hidden_states=x,
                timestep=t,
                encoder_hidden_states=c.hidden.to(dtype),
                pooled_projections=c.pooled.to(dtype),
                return_dict=False,
            )[0]

        return _guided(raw, latents, timestep, cond, uncond, guidance_scale)


# ---- the registry --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Family:
    """One model family: its diffusers pipeline, policy, the scheduler it samples with, and its denoiser's name."""

    pipeline_class: type
    policy_class: type
    scheduler_class: type
    denoiser_name: str  # the pipeline component that is trained ("unet" or "transformer")
    load_kwargs: tuple[tuple[str, Any], ...] = ()  # extra from_pretrained arguments


FAMILIES: dict[str, Family] = {
    "sd": Family(
        StableDiffusionPipeline,
        SDPolicy,
        DDIMScheduler,
        "unet",
        load_kwargs=(("safety_checker", None), ("requires_safety_checker", False)),
    ),
    "sdxl": Family(StableDiffusionXLPipeline, SDXLPolicy, DDIMScheduler, "unet"),
    "sd3": Family(StableDiffusion3Pipeline, SD3Policy, FlowMatchEulerDiscreteScheduler, "transformer"),
}
FAMILY_OF_PIPELINE = {family.pipeline_class.__name__: name for name, family in FAMILIES.items()}
"""model_index.json's `_class_name` -> family."""


def family_of_pipeline_class(class_name: str) -> str:
    if class_name not in FAMILY_OF_PIPELINE:
        raise ValueError(
            f"pipeline class {class_name!r} is not a supported model family; supported: "
            + ", ".join(f"{cls} ({fam})" for cls, fam in FAMILY_OF_PIPELINE.items())
        )
    return FAMILY_OF_PIPELINE[class_name]


def policy_for(pipeline: Any) -> DiffusionPolicy:
    """The policy of a loaded pipeline (by its class; a subclass counts as its base family)."""
    for family in FAMILIES.values():
        if isinstance(pipeline, family.pipeline_class):
            return family.policy_class(pipeline)
    raise ValueError(f"{type(pipeline).__name__} is not a supported model family ({', '.join(FAMILIES)})")
