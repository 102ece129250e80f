"""Learner throughput: trained samples/s of `Learner.train_epoch` (every timestep of every sample), fast vs eager.

    python -m bench.learner [--preset tiny|sd15|sdxl|sd3] [--samples N] [--micro-batch b] [--rounds R] [--fast default|none|k=v,...]

Prints one JSON line. Both learners run the real `learner.learner.Learner.train_epoch` (DDPO-IS, CFG log-probs
recomputed at every one of the T timesteps, LoRA on the UNet, AdamW) on the same synthetic epoch: N trajectories of
the preset's shapes (latents [T+1, 4, h, w], log-probs [T], the scheduler's T timesteps, random rewards). Sampling
is not timed. The eager baseline keeps the base weights in fp16 on a GPU (fp32 on a CPU) and no `performance.*`
switch; the fast learner gets the `--fast` path (default on a GPU: bf16 weights + bf16 autocast + torch.compile +
channels-last + fused AdamW), each on its own pipeline. They run in alternating rounds of one epoch each.

`samples_per_s` = N / seconds of one `train_epoch` (a sample counts once with all its T timesteps trained);
`ratio` = fast / eager samples/s, the median of per-round ratios (GPU acceptance: >= 1.3 at SD 1.5 shapes); null
when no fast path runs (`--fast none` or a checkout without `performance` switches).
"""

from __future__ import annotations

import argparse
import json

import torch

from bench.families import parameter_counts
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
from learner.learner import Learner
from services.config import TrainConfig
from services.trajectory import ScoredTrajectory


def make_config(
    args: argparse.Namespace, device: torch.device, dtype: str, performance: dict | None
) -> TrainConfig:
    """A learner config whose epoch is exactly `args.samples` samples, every timestep trained."""
    training = {
        "objective": "ddpo_is",
        "batch_size": args.micro_batch,
        "gradient_accumulation_steps": args.grad_accum,
        "learning_rate": 1e-4,
        "clip_range": 1e-4,
        "timestep_fraction": 1.0,
        "cfg": True,
    }
    return workload_config(
        args, device, dtype, performance,
        batch_size=args.samples,
        sampling={"num_batches_per_epoch": 1},
        training=training,
        stat_tracking={"enabled": False},
    )  # fmt: skip


def make_learner(
    args: argparse.Namespace, device: torch.device, dtype: str, fast: FastPath | None
) -> Learner:
    """A `learner.learner.Learner` on a fresh pipeline of the preset, LoRA attached (and the fast path applied)."""
    cfg = make_config(args, device, dtype, fast.performance if fast else None)
    return Learner(cfg, pipeline=pipeline_with_lora(args.preset, cfg, fast))


def synthetic_epoch(
    n: int, num_steps: int, side: int, timesteps: torch.Tensor, channels: int = 4
) -> list[ScoredTrajectory]:
    """n trajectories of latents [T+1, channels, side, side] with plausible recorded log-probs [T]."""
    g = torch.Generator().manual_seed(0)
    return [
        ScoredTrajectory(
            latents=torch.randn(num_steps + 1, channels, side, side, generator=g),  # [T+1, C, h, w]
            log_probs=torch.full((num_steps,), -1.0),  # [T] float32 (values do not change the cost)
            timesteps=timesteps.clone(),  # [T]
            prompt=PROMPTS[i % len(PROMPTS)],
            reward=float(torch.randn(1, generator=g)),
        )
        for i in range(n)
    ]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_workload_args(p)
    p.add_argument("--samples", type=int, default=None, help="trajectories per epoch (preset's batch size)")
    p.add_argument(
        "--micro-batch", type=int, default=None, help="samples per forward/backward (4 tiny, 2 sd15)"
    )
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds of one epoch per learner")
    p.add_argument("--warmup", type=int, default=1, help="untimed epochs per learner first (compile)")
    args = p.parse_args(argv)
    args.samples = args.samples or PRESETS[args.preset].batch_size
    args.micro_batch = args.micro_batch or {"tiny": 4, "sd15": 2}.get(args.preset, 1)  # sdxl/sd3: batch 1
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    run = setup(args)
    device, dtype, fast = run.device, run.dtype, run.fast

    learners = {"eager": make_learner(args, device, dtype, None)}
    flags = {"eager": tf32_flags()}
    if fast is not None:
        learners["fast"] = make_learner(args, device, fast.dtype, fast)
        flags["fast"] = tf32_flags()  # apply_fast_paths may have allowed TF32 process-wide
    eager = learners["eager"]
    side = args.resolution // eager.pipe.vae_scale_factor
    timesteps = eager.scheduler.timesteps.cpu().to(eager.policy.timestep_dtype)
    channels = eager.unet.config.in_channels
    batch = synthetic_epoch(args.samples, args.steps, side, timesteps, channels)

    loops = {name: (lambda learner=learner: learner.train_epoch(batch)) for name, learner in learners.items()}
    seconds = alternating_rounds(loops, flags, device, rounds=args.rounds, warmup=args.warmup)
    rate = {name: args.samples * len(s) / sum(s) for name, s in seconds.items()}

    result = {
        "bench": "learner",
        "config": {
            "preset": args.preset,
            "samples_per_epoch": args.samples,
            "micro_batch": args.micro_batch,
            "grad_accum": args.grad_accum,
            "steps_trained_per_sample": args.steps,
            "resolution": args.resolution,
            "guidance_scale": args.guidance,
            "objective": "ddpo_is",
            "lora_rank": args.lora_rank,
            "eager_dtype": dtype,
            "fast": spec_of(fast),
            "rounds": args.rounds,
            "warmup": args.warmup,
        },
        "machine": machine(device),
        "eager_samples_per_s": round(rate["eager"], 4),
        "eager_timesteps_per_s": round(rate["eager"] * args.steps, 2),
        "fast_path": spec_of(fast),
        "fast_samples_per_s": None,
        "ratio": None,
        "round_seconds": {name: [round(x, 3) for x in s] for name, s in seconds.items()},
    }
    if args.preset in ("sdxl", "sd3"):
        result["parameters"] = parameter_counts(args.preset)
    if device.type == "cuda":  # both learners' models and the peak of their training passes
        result["peak_memory_GiB"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    if fast is not None:
        result["fast_samples_per_s"] = round(rate["fast"], 4)
        result["ratio"] = median_ratio(seconds, "fast", "eager")
    else:
        result["fast_path_note"] = run.why_no_fast
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
