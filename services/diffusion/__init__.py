"""The diffusion side of DDPO: denoising steps as Gaussian policies with exact log-probabilities, per model family.

    steps.py     the step math (float32): DDIM with eta (SD, SDXL) and Flow-GRPO's flow-matching SDE (SD3)
    policies.py  one policy per model family (sd, sdxl, sd3): encode prompts, guided denoiser output, step, decode
    sampling.py  sample_trajectory (the sampler) and step_log_prob (the learner), on any family's pipeline

Everything public is re-exported here: `services.diffusion` is a stable name (see DESIGN.md).
"""

from services.diffusion.policies import (
    FAMILIES,
    Conditioning,
    DiffusionPolicy,
    Family,
    PromptEmbeds,
    SD3Policy,
    SDPolicy,
    SDXLPolicy,
    family_of_pipeline_class,
    guided_noise_pred,
    policy_for,
)
from services.diffusion.sampling import (
    decode_latents,
    encode_prompts,
    initial_latents,
    sample_trajectory,
    step_log_prob,
    window_bounds,
)
from services.diffusion.steps import (
    ddim_step_mean_std,
    ddim_step_with_logprob,
    flow_sde_step_mean_std,
    flow_sde_step_with_logprob,
    gaussian_kl,
    gaussian_log_prob,
)

__all__ = [
    "FAMILIES",
    "Conditioning",
    "DiffusionPolicy",
    "Family",
    "PromptEmbeds",
    "SD3Policy",
    "SDPolicy",
    "SDXLPolicy",
    "ddim_step_mean_std",
    "ddim_step_with_logprob",
    "decode_latents",
    "encode_prompts",
    "family_of_pipeline_class",
    "flow_sde_step_mean_std",
    "flow_sde_step_with_logprob",
    "gaussian_kl",
    "gaussian_log_prob",
    "guided_noise_pred",
    "initial_latents",
    "policy_for",
    "sample_trajectory",
    "step_log_prob",
    "window_bounds",
]
