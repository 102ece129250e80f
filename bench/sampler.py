"""Sampler throughput: the recording sampling loop vs a bare CFG UNet loop, and the fast path vs eager.

    python -m bench.sampler [--preset tiny|sd15|sdxl|sd3] [--batch B] [--steps T] [--rounds R] [--fast default|none|k=v,...]

Prints one JSON line. Four loops, each timed on whole batches (prompts in, images out):
- recording: `actors.sampler.Sampler.sample` -- what an actor runs: `services.diffusion.sample_trajectory`, CFG
  DDIM with eta, the exact log-prob of every step (`ddim_step_with_logprob`), all T+1 latents kept, images decoded.
- bare: the same batch, prompts, text encoding, T CFG denoiser forwards (the policy's `denoiser_output`), T steps
  of diffusers' own scheduler step (DDIM with the same eta; for sd3 the flow scheduler's Euler step) and VAE
  decode, recording nothing: a plain diffusers sampler.
- unet_only: the T CFG denoiser forwards alone (no scheduler math, no text encoder, no VAE): the model's ceiling.
- fast: `recording` on its own copy of the pipeline with a fast path (`performance.*` switches and a weight
  dtype; default on a GPU: bf16 weights + bf16 autocast + torch.compile + channels-last).

`ratio` = recording / bare images/s: the overhead of log-probs and trajectory recording (acceptance: >= 0.90).
`fast_vs_eager` = fast / recording images/s (GPU acceptance: >= 1.4 against the fp16 eager baseline). The loops run
in alternating rounds so that drift on a shared machine hits all alike; rates are total images / total seconds and
each ratio is the median of its per-round ratios. The UNet carries the LoRA that actors sample with. On a CPU the
benchmarks use one torch thread unless --threads says otherwise, as the quickstart's actors do
(`cluster.torch_threads: 1`): on a shared 2-core host, 2 OpenMP threads slow down many-fold whenever other work runs.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

import torch

from actors.sampler import Sampler
from bench.sd15 import (
    PRESETS,
    PROMPTS,
    FastPath,
    add_workload_args,
    alternating_rounds,
    machine,
    median_ratio,
    pipeline_with_lora,
    setup,
    spec_of,
    tf32_flags,
    workload_config,
)
from services.config import TrainConfig
from services.diffusion import decode_latents, policy_for


def make_config(
    args: argparse.Namespace, device: torch.device, dtype: str, performance: dict | None
) -> TrainConfig:
    """The TrainConfig an actor would get for this workload (the pipeline itself is passed in, not loaded)."""
    training = {"batch_size": args.batch, "gradient_accumulation_steps": 1}
    return workload_config(args, device, dtype, performance, batch_size=args.batch, training=training)


def make_sampler(
    args: argparse.Namespace, device: torch.device, dtype: str, fast: FastPath | None
) -> Sampler:
    """An `actors.sampler.Sampler` on a fresh pipeline of the preset, with the LoRA (and fast path) applied."""
    cfg = make_config(args, device, dtype, fast.performance if fast else None)
    return Sampler(cfg, pipeline=pipeline_with_lora(args.preset, cfg, fast))


@torch.no_grad()
def bare_loop(sampler: Sampler, prompts: list[str], generator: torch.Generator) -> torch.Tensor:
    """T CFG forwards + diffusers' scheduler step + decode; nothing recorded. Returns images [B, 3, H, W]."""
    pipe, s = sampler.pipe, sampler.cfg.sampling
    policy = policy_for(pipe)
    unet, scheduler = policy.denoiser, pipe.scheduler
    embeds = policy.encode_prompts(prompts).to(unet.dtype)  # [B, L, D] (+ pooled)
    negative = policy.encode_negative(s.negative_prompt).to(unet.dtype).expand_as(embeds)
    scheduler.set_timesteps(s.num_steps, device=unet.device)
    side = s.resolution // pipe.vae_scale_factor
    latents = torch.randn(
        (len(prompts), unet.config.in_channels, side, side), generator=generator, device=unet.device
    ).to(unet.dtype)  # [B, C, h, w]
    step_kwargs = {"eta": s.eta, "generator": generator} if policy.timestep_dtype == torch.long else {}
    for t in scheduler.timesteps:
        eps = policy.denoiser_output(unet, latents, t, embeds, negative, s.guidance_scale)
        latents = scheduler.step(eps, t, latents, **step_kwargs).prev_sample
    return decode_latents(pipe, latents)


@torch.no_grad()
def unet_only_loop(sampler: Sampler, embeds, latents: torch.Tensor) -> torch.Tensor:
    """The T CFG denoiser forwards of a batch and nothing else. embeds [B, L, D] (+ pooled), latents [B, C, h, w]."""
    s = sampler.cfg.sampling
    policy = policy_for(sampler.pipe)
    scheduler = sampler.pipe.scheduler
    scheduler.set_timesteps(s.num_steps, device=latents.device)
    eps = latents
    for t in scheduler.timesteps:
        eps = policy.denoiser_output(policy.denoiser, latents, t, embeds, embeds, s.guidance_scale)
    return eps


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_workload_args(p)
    p.add_argument("--batch", type=int, default=None, help="images per batch (preset default)")
    p.add_argument("--rounds", type=int, default=None, help="alternating rounds (5 tiny, 3 sd15)")
    p.add_argument("--iters", type=int, default=None, help="batches per loop per round (2 tiny, 1 sd15)")
    p.add_argument("--warmup", type=int, default=2, help="untimed batches per loop first (compile, caches)")
    args = p.parse_args(argv)
    args.batch = args.batch or PRESETS[args.preset].batch_size
    args.rounds = args.rounds or (5 if args.preset == "tiny" else 3)
    args.iters = args.iters or (2 if args.preset == "tiny" else 1)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    run = setup(args)
    device, dtype, fast = run.device, run.dtype, run.fast

    eager = make_sampler(args, device, dtype, None)
    eager_flags = tf32_flags()
    fast_sampler = make_sampler(args, device, fast.dtype, fast) if fast is not None else None
    fast_flags = tf32_flags()  # apply_fast_paths may have allowed TF32 process-wide
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.batch)]
    generator = torch.Generator(device).manual_seed(0)
    policy = policy_for(eager.pipe)
    dtype_model = policy.denoiser.dtype
    embeds = policy.encode_prompts(prompts).to(dtype_model)  # [B, L, D] (+ pooled)
    side = args.resolution // eager.pipe.vae_scale_factor
    channels = policy.denoiser.config.in_channels
    latents = torch.randn((args.batch, channels, side, side), generator=generator, device=device).to(
        dtype_model
    )
    # [B, C, h, w]

    loops: dict[str, Callable[[], object]] = {
        "recording": lambda: eager.sample(prompts),
        "bare": lambda: bare_loop(eager, prompts, generator),
        "unet_only": lambda: unet_only_loop(eager, embeds, latents),
    }
    if fast_sampler is not None:
        loops["fast"] = lambda: fast_sampler.sample(prompts)
    flags = {name: fast_flags if name == "fast" else eager_flags for name in loops}
    seconds = alternating_rounds(
        loops, flags, device, rounds=args.rounds, iters=args.iters, warmup=args.warmup
    )
    images = args.batch * args.iters * args.rounds
    rate = {name: images / sum(s) for name, s in seconds.items()}

    result = {
        "bench": "sampler",
        "config": {
            "preset": args.preset,
            "batch": args.batch,
            "steps": args.steps,
            "resolution": args.resolution,
            "guidance_scale": args.guidance,
            "eta": PRESETS[args.preset].eta,
            "lora_rank": args.lora_rank,
            "eager_dtype": dtype,
            "fast": spec_of(fast),
            "rounds": args.rounds,
            "iters_per_round": args.iters,
            "warmup": args.warmup,
        },
        "machine": machine(device),
        "recording_images_per_s": round(rate["recording"], 3),
        "bare_images_per_s": round(rate["bare"], 3),
        "unet_only_images_per_s": round(rate["unet_only"], 3),
        "ratio_vs_unet_only": median_ratio(seconds, "recording", "unet_only"),
        "fast_path": None,
        "fast_vs_eager": None,
        "ratio": median_ratio(seconds, "recording", "bare"),
        "round_seconds": {name: [round(x, 3) for x in s] for name, s in seconds.items()},
    }
    if fast_sampler is not None:
        result["fast_path"] = spec_of(fast)
        result["fast_images_per_s"] = round(rate["fast"], 3)
        result["fast_vs_eager"] = median_ratio(seconds, "fast", "recording")
    else:
        result["fast_path_note"] = run.why_no_fast
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
