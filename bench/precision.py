"""Gradients at the presets' precision: the LoRA gradient of a float16 and a bfloat16 base vs a float32 base.

    python -m bench precision [--preset tiny|sd15] [--device auto]

Prints one JSON line. For each base dtype the compressibility preset's learner (`learner.learner.Learner`, its real
loss, loss scaling and accumulation divisor of 16 micro-batches x 50 timesteps) computes the unscaled LoRA gradient
of one sample at two of the 50 steps, at SD 1.5's latent size 4 x 64 x 64 (`--preset tiny`: the tiny UNet at that
latent size; `sd15`: SD 1.5's architecture with random weights). The same (x_t, x_{t-1}) pairs, drawn from the
float32 policy, go into every dtype. Figures: cosine with the float32 gradient and the fraction of exactly-zero
entries, for float16 with and without loss scaling and for bfloat16. `ratio` = cosine(float16 with loss scaling,
float32). tests/test_precision.py asserts the same computation on a CPU.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from bench.sd15 import build_sd15_pipeline, machine, resolve_device
from learner.learner import EpochBatch, Learner
from services.config import TrainConfig, load_config
from services.diffusion import ddim_step_with_logprob, encode_prompts, guided_noise_pred
from services.models import DTYPES, load_pipeline
from services.tiny_models import write_tiny_sd
from services.trajectory import ScoredTrajectory

TRAINED_STEPS = (10, 40)  # two of the preset's 50 step indices
PROMPT = "a cat"


def preset_config(model_dir: str, dtype: str, device: str) -> TrainConfig:
    """The compressibility preset on `model_dir`, at SD 1.5's 512 px (latents 4 x 64 x 64)."""
    return load_config(
        "compressibility",
        [
            f"model.pretrained={model_dir}",
            f"model.dtype={dtype}",
            f"model.device={device}",
            "sampling.resolution=512",
        ],
    )


@torch.no_grad()
def transitions(model_dir: str, device: str, seed: int = 0) -> ScoredTrajectory:
    """One sample whose (x_t, x_{t-1}) at TRAINED_STEPS are drawn from the float32 policy at 4 x 64 x 64."""
    cfg = preset_config(model_dir, "float32", device)
    pipe = load_pipeline(cfg.model, cfg.lora, seed=cfg.seed)
    scheduler = pipe.scheduler
    scheduler.set_timesteps(cfg.sampling.num_steps)
    dev = pipe.unet.device
    g = torch.Generator(device=dev).manual_seed(seed)
    steps = cfg.sampling.num_steps
    latents = torch.zeros(steps + 1, 4, 64, 64)
    log_probs = torch.zeros(steps)
    embeds, neg = encode_prompts(pipe, [PROMPT]), encode_prompts(pipe, [""])
    for i in TRAINED_STEPS:
        t = scheduler.timesteps[i]
        noise_level = (1 - scheduler.alphas_cumprod[t]).sqrt()
        x_t = torch.randn(1, 4, 64, 64, generator=g, device=dev) * noise_level
        eps = guided_noise_pred(
            pipe.unet, x_t, t.reshape(1).to(dev), embeds, neg, cfg.sampling.guidance_scale
        )
        x_prev, log_prob = ddim_step_with_logprob(scheduler, eps, t, x_t, eta=cfg.sampling.eta, generator=g)
        latents[i], latents[i + 1], log_probs[i] = x_t[0].cpu(), x_prev[0].cpu(), log_prob[0].cpu()
    return ScoredTrajectory(
        latents=latents, log_probs=log_probs, timesteps=scheduler.timesteps.clone().long().cpu(), prompt=PROMPT,
        reward=1.0,
    )  # fmt: skip


def lora_gradient(
    model_dir: str, dtype: str, device: str, traj: ScoredTrajectory, loss_scaling: bool = True
) -> torch.Tensor:
    """The unscaled LoRA gradient (flat, float32, CPU) the preset's optimizer step would see from this sample."""
    cfg = preset_config(model_dir, dtype, device)
    learner = Learner(cfg)
    if next(learner.unet.parameters()).dtype != DTYPES[dtype]:
        raise AssertionError(
            f"model.dtype={dtype} but the UNet runs in {next(learner.unet.parameters()).dtype}"
        )
    g = torch.Generator().manual_seed(1)
    for name, p in learner.unet.named_parameters():  # B != 0, so that every LoRA matrix gets a gradient
        if "lora_B" in name:
            p.data = (torch.randn(p.shape, generator=g) * 1e-2).to(p.device, p.dtype)
    if not loss_scaling:
        learner.optim.loss_scaling = False
        learner.optim.scaler = torch.amp.GradScaler(learner.device.type, enabled=False)
    data = EpochBatch.stack([traj], learner.device)
    rows = torch.tensor([0], device=learner.device)
    embeds = encode_prompts(learner.pipe, [PROMPT]).to(learner.unet.dtype)
    t = cfg.training
    # the preset's scaling: this sample's share of a micro-batch (1 / batch_size) and the divisor
    # gradient_accumulation_steps x trained timesteps
    share = 1.0 / t.batch_size
    divisor = t.gradient_accumulation_steps * cfg.trained_steps_per_sample
    adv = torch.ones(1, device=learner.device)
    for step in TRAINED_STEPS:
        step_t = torch.tensor([step], device=learner.device)
        loss, _, _ = learner.policy_gradient_loss(data, rows, step_t, embeds, adv)
        learner.optim.backward(loss * share / divisor)
    return torch.cat([g.reshape(-1).cpu() for g in learner.optim.unscaled_gradients()])


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0))


def compare(model_dir: str, device: str) -> dict:
    traj = transitions(model_dir, device)
    fp32 = lora_gradient(model_dir, "float32", device, traj)
    grads = {
        "float16_loss_scaled": lora_gradient(model_dir, "float16", device, traj),
        "float16_unscaled": lora_gradient(model_dir, "float16", device, traj, loss_scaling=False),
        "bfloat16": lora_gradient(model_dir, "bfloat16", device, traj),
    }
    out = {"float32": {"zero_frac": round(float((fp32 == 0).double().mean()), 4)}}
    for name, g in grads.items():
        out[name] = {
            "cosine": round(cosine(g, fp32), 5),
            "zero_frac": round(float((g == 0).double().mean()), 4),
        }
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=["tiny", "sd15"], default="tiny")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory(prefix="bench-precision-") as tmp:
        model_dir = Path(tmp) / "model"
        if args.preset == "sd15":
            build_sd15_pipeline("cpu", torch.float32).save_pretrained(model_dir, safe_serialization=True)
        else:
            write_tiny_sd(model_dir)
        figures = compare(str(model_dir), str(device))
    result = {
        "bench": "precision",
        "config": {
            "preset": args.preset,
            "latents": [4, 64, 64],
            "divisor": "16 micro-batches x 50 timesteps (compressibility preset)",
            "trained_steps": list(TRAINED_STEPS),
        },
        "machine": machine(device),
        **figures,
        "ratio": figures["float16_loss_scaled"]["cosine"],
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
