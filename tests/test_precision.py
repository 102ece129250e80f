"""The arithmetic the GPU presets run, on a CPU: their base dtype, SD 1.5's latent size and their accumulation divisor.

The compressibility preset back-propagates loss / (16 micro-batches x 50 timesteps) through a UNet whose log-prob
is a mean over 4 x 64 x 64 latent elements. In float16 that gradient underflows without loss scaling; these tests
compute a few timesteps of the real learner path at full shape and compare the LoRA gradients with float32's.
"""

from __future__ import annotations

import pytest
import torch

from learner.learner import EpochBatch, Learner
from learner.optim import needs_loss_scaling
from services.config import load_config
from services.diffusion import ddim_step_with_logprob, encode_prompts, guided_noise_pred
from services.models import load_pipeline
from services.trajectory import ScoredTrajectory

TRAINED_STEPS = (10, 40)  # two of the preset's 50 step indices


def preset(tiny_sd_path: str, dtype: str):
    return load_config(
        "compressibility",
        [
            f"model.pretrained={tiny_sd_path}",
            f"model.dtype={dtype}",
            "model.device=cpu",
            "sampling.resolution=512",
        ],
    )


@pytest.fixture(scope="module")
def transitions(tiny_sd_path):
    """One sample's (x_t, x_{t-1}) at two of the preset's steps, drawn from the float32 policy at 4 x 64 x 64."""
    cfg = preset(tiny_sd_path, "float32")
    pipe = load_pipeline(cfg.model, cfg.lora, seed=cfg.seed)
    scheduler = pipe.scheduler
    scheduler.set_timesteps(cfg.sampling.num_steps)
    g = torch.Generator().manual_seed(0)
    T = cfg.sampling.num_steps
    latents = torch.zeros(1, T + 1, 4, 64, 64)
    log_probs = torch.zeros(1, T)
    embeds = encode_prompts(pipe, ["a cat"])
    neg = encode_prompts(pipe, [""])
    with torch.no_grad():
        for i in TRAINED_STEPS:
            t = scheduler.timesteps[i]
            x_t = torch.randn(1, 4, 64, 64, generator=g) * (1 - scheduler.alphas_cumprod[t]).sqrt()
            eps = guided_noise_pred(pipe.unet, x_t, t.reshape(1), embeds, neg, cfg.sampling.guidance_scale)
            x_prev, log_prob = ddim_step_with_logprob(
                scheduler, eps, t, x_t, eta=cfg.sampling.eta, generator=g
            )
            latents[0, i], latents[0, i + 1], log_probs[0, i] = x_t, x_prev, log_prob
    return ScoredTrajectory(
        latents=latents[0], log_probs=log_probs[0], timesteps=scheduler.timesteps.clone().long(), prompt="a cat",
        reward=1.0,
    )  # fmt: skip


def lora_gradient(
    tiny_sd_path: str, dtype: str, traj: ScoredTrajectory, loss_scaling: bool = True
) -> torch.Tensor:
    """The unscaled LoRA gradient the preset's optimizer step would see from this sample's two trained steps."""
    cfg = preset(tiny_sd_path, dtype)
    learner = Learner(cfg)
    assert next(learner.unet.parameters()).dtype == {"float32": torch.float32, "float16": torch.float16,
                                                       "bfloat16": torch.bfloat16}[dtype]  # fmt: skip
    g = torch.Generator().manual_seed(1)
    for name, p in learner.unet.named_parameters():  # B != 0, so every LoRA matrix gets a gradient
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=g) * 1e-2
    learner.optim.loss_scaling = loss_scaling and learner.optim.loss_scaling
    if not learner.optim.loss_scaling:
        learner.optim.scaler = torch.amp.GradScaler("cpu", enabled=False)
    data = EpochBatch.stack([traj], learner.device)
    rows = torch.tensor([0])
    embeds = encode_prompts(learner.pipe, ["a cat"]).to(learner.unet.dtype)
    t = cfg.training
    # the preset's scaling: a micro-batch of batch_size samples (this one's share is 1 / batch_size), and the
    # divisor gradient_accumulation_steps x trained timesteps
    share = 1.0 / t.batch_size
    divisor = t.gradient_accumulation_steps * cfg.num_train_timesteps
    assert divisor == 16 * 50
    for step in TRAINED_STEPS:
        loss, _ = learner.policy_gradient_loss(data, rows, torch.tensor([step]), embeds, torch.tensor([1.0]))
        learner.optim.backward(loss * share / divisor)
    grads = learner.optim.unscaled_gradients()
    return torch.cat([g.reshape(-1) for g in grads])


@pytest.fixture(scope="module")
def float32_gradient(tiny_sd_path, transitions):
    return lora_gradient(tiny_sd_path, "float32", transitions)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0))


def test_loss_scaling_is_on_exactly_when_a_float16_forward_is_trained(tiny_sd_path):
    assert needs_loss_scaling(preset(tiny_sd_path, "float16"))
    assert not needs_loss_scaling(preset(tiny_sd_path, "bfloat16"))
    assert not needs_loss_scaling(preset(tiny_sd_path, "float32"))
    autocast = preset(tiny_sd_path, "float32").model_copy(deep=True)
    autocast.performance.autocast = "fp16"
    assert needs_loss_scaling(autocast)


@pytest.mark.slow
def test_float16_base_gradient_matches_float32_with_loss_scaling(tiny_sd_path, transitions, float32_gradient):
    fp16 = lora_gradient(tiny_sd_path, "float16", transitions)
    zeros32, zeros16 = int((float32_gradient == 0).sum()), int((fp16 == 0).sum())
    assert cosine(fp16, float32_gradient) >= 0.99
    assert zeros16 <= zeros32, (zeros16, zeros32)
    # the reason: without the scale the same gradient flushes to zero in float16
    unscaled = lora_gradient(tiny_sd_path, "float16", transitions, loss_scaling=False)
    assert int((unscaled == 0).sum()) > 0.5 * unscaled.numel() > zeros32
    assert cosine(unscaled, float32_gradient) < 0.5


def test_bfloat16_base_gradient_matches_float32(tiny_sd_path, transitions, float32_gradient):
    bf16 = lora_gradient(tiny_sd_path, "bfloat16", transitions)
    assert cosine(bf16, float32_gradient) >= 0.95
    assert int((bf16 == 0).sum()) <= int((float32_gradient == 0).sum())
