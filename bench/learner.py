"""Learner throughput: trained samples/s of `Learner.train_epoch` (every timestep of every sample), fast vs eager.

    python -m bench.learner [--preset tiny|sd15] [--samples N] [--micro-batch b] [--rounds R] [--fast default|none|k=v,...]

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
import statistics
import time

import torch

from bench.sd15 import (
    DTYPES,
    PRESETS,
    FastPath,
    build_pipeline,
    default_dtype,
    fast_path_unsupported,
    machine,
    matmul_flags,
    parse_fast,
    resolve_device,
    spec_of,
    synchronize,
    tf32_flags,
)
from learner.learner import Learner
from services import models
from services.config import TrainConfig, build_config
from services.trajectory import ScoredTrajectory

PROMPTS = ["a photo of a cat", "a dog riding a bike", "a painting of a horse", "a bird on a branch"]


def make_config(
    args: argparse.Namespace, device: torch.device, dtype: str, performance: dict | None
) -> TrainConfig:
    """A learner config whose epoch is exactly `args.samples` samples, every timestep trained."""
    tree = {
        "seed": 0,
        "model": {"pretrained": f"bench:{args.preset}", "dtype": dtype, "device": str(device)},
        "lora": {"rank": args.lora_rank},
        "sampling": {
            "num_steps": args.steps,
            "batch_size": args.samples,
            "num_batches_per_epoch": 1,
            "guidance_scale": args.guidance,
            "eta": 1.0,
            "resolution": args.resolution,
        },
        "training": {
            "objective": "ddpo_is",
            "batch_size": args.micro_batch,
            "gradient_accumulation_steps": args.grad_accum,
            "learning_rate": 1e-4,
            "clip_range": 1e-4,
            "timestep_fraction": 1.0,
            "cfg": True,
        },
        "stat_tracking": {"enabled": False},
        "prompts": {"set": "list", "items": PROMPTS},
    }
    if performance:
        tree["performance"] = performance
    return build_config(tree)


def make_learner(
    args: argparse.Namespace, device: torch.device, dtype: str, fast: FastPath | None
) -> Learner:
    """A `learner.learner.Learner` on a fresh pipeline of the preset, LoRA attached (and the fast path applied)."""
    cfg = make_config(args, device, dtype, fast.performance if fast else None)
    pipe = build_pipeline(args.preset, device, DTYPES[dtype], seed=0)
    models.add_lora(pipe.unet, cfg.lora, seed=0)
    if fast is not None:
        models.apply_fast_paths(pipe, cfg.performance)
    return Learner(cfg, pipeline=pipe)


def synthetic_epoch(n: int, num_steps: int, side: int, timesteps: torch.Tensor) -> list[ScoredTrajectory]:
    """n trajectories of SD-shaped latents [T+1, 4, side, side] with plausible recorded log-probs [T]."""
    g = torch.Generator().manual_seed(0)
    return [
        ScoredTrajectory(
            latents=torch.randn(num_steps + 1, 4, side, side, generator=g),  # [T+1, C, h, w]
            log_probs=torch.full((num_steps,), -1.0),  # [T] float32 (values do not change the cost)
            timesteps=timesteps.clone(),  # [T]
            prompt=PROMPTS[i % len(PROMPTS)],
            reward=float(torch.randn(1, generator=g)),
        )
        for i in range(n)
    ]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="eager weights (fp16 GPU, fp32 CPU)")
    p.add_argument("--samples", type=int, default=None, help="trajectories per epoch (preset's batch size)")
    p.add_argument(
        "--micro-batch", type=int, default=None, help="samples per forward/backward (4 tiny, 2 sd15)"
    )
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps T, all trained (preset default)")
    p.add_argument("--resolution", type=int, default=None, help="image side in pixels (preset default)")
    p.add_argument("--guidance", type=float, default=5.0, help="CFG scale of the recomputed log-probs")
    p.add_argument("--lora-rank", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds of one epoch per learner")
    p.add_argument("--warmup", type=int, default=1, help="untimed epochs per learner first (compile)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: 1 on CPU)")
    p.add_argument(
        "--fast", default="default", help="fast path: default, none, or k=v,... (dtype, performance.*)"
    )
    args = p.parse_args(argv)
    shapes = PRESETS[args.preset]
    args.samples = args.samples or shapes.batch_size
    args.micro_batch = args.micro_batch or (4 if args.preset == "tiny" else 2)
    args.steps = args.steps or shapes.num_steps
    args.resolution = args.resolution or shapes.resolution
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = resolve_device(args.device)
    if args.threads or device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    dtype = args.dtype or default_dtype(device)
    fast = parse_fast(args.fast, device, dtype)
    why_no_fast = fast_path_unsupported() if fast is not None else "disabled with --fast none"
    if why_no_fast:
        fast = None

    learners = {"eager": make_learner(args, device, dtype, None)}
    flags = {"eager": tf32_flags()}
    if fast is not None:
        learners["fast"] = make_learner(args, device, fast.dtype, fast)
        flags["fast"] = tf32_flags()  # apply_fast_paths may have allowed TF32 process-wide
    eager = learners["eager"]
    side = args.resolution // eager.pipe.vae_scale_factor
    batch = synthetic_epoch(args.samples, args.steps, side, eager.scheduler.timesteps.cpu())

    def epoch_seconds(name: str) -> float:
        with matmul_flags(flags[name]):
            synchronize(device)
            t0 = time.perf_counter()
            learners[name].train_epoch(batch)
            synchronize(device)
            return time.perf_counter() - t0

    for name in learners:
        for _ in range(args.warmup):
            epoch_seconds(name)
    seconds: dict[str, list[float]] = {name: [] for name in learners}
    order = list(learners)
    for r in range(args.rounds):
        for name in order if r % 2 == 0 else order[::-1]:
            seconds[name].append(epoch_seconds(name))
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
    if fast is not None:
        per_round = [e / f for e, f in zip(seconds["eager"], seconds["fast"], strict=True)]
        result["fast_samples_per_s"] = round(rate["fast"], 4)
        result["ratio"] = round(statistics.median(per_round), 3)
    else:
        result["fast_path_note"] = why_no_fast
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
