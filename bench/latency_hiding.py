"""Latency hiding (issue 4): an actor's sampling throughput with a reward server that adds 1 s per request vs none.

    python -m bench.latency_hiding [--delay-s 1.0] [--batch 8] [--steps 20] [--batches 12] [--rounds 4]

Two jpeg reward servers run as subprocesses on 127.0.0.1 (`bench.delayed_jpeg.delayed_jpeg_app` under uvicorn: the
jpeg API, `POST /v1/score {"images"} -> {"scores", "jpeg_kb"}` with `jpeg_kb = services.images.jpeg_kb`, plus
`asyncio.sleep(delay)` per request), one with no delay and one with `--delay-s`. Two `SamplerWorker`s (tiny model,
`reward.mode: http`, the real Redis) each score through one of them and stream into their own run's stream. In
alternating rounds each runs `run(max_batches=...)` for `--batches` more batches.

Figures per condition (samples = batches x batch size):
- `sampling_samples_per_s`: samples / seconds from the start of `run` until its last batch is sampled and handed
  to scoring -- the actor's sampling rate (the worker's own `sampler.sample` is wrapped by a clock). It includes
  every wait for an in-flight slot; it leaves out the one-off wait for the last rewards when `run` returns, which a
  long-running actor never does.
- `run_samples_per_s`: samples / wall seconds of `run`, that final wait included.
`ratio` = delayed / no-delay sampling rate, the median of per-round ratios (acceptance: >= 0.90).

`cluster.max_inflight_batches` ("auto"): a batch's reward is in flight for delay + ~0.25 s (PNG encoding, HTTP,
scoring), and the worker samples the next batch only while fewer than max_inflight batches are in flight, so by
Little's law it never waits when max_inflight >= ceil((delay + 0.25) / batch_seconds) + 1; "auto" takes one more,
since batch_seconds (the faster of two warm `Sampler` batches, timed first) varies on a shared host. Rounds of at least 2 x max_inflight batches fill the in-flight window and then run in
steady state. Redis keys of both runs (`ddpo:{run_id}:*`) are deleted at the end; the servers are stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from actors.sampler import Sampler, SamplerWorker
from bench.delayed_jpeg import DELAY_ENV
from bench.sd15 import machine
from services.app.infra import free_port, wait_until_ready
from services.config import build_config
from services.credentials import redact_url
from services.models import quiet_model_loading
from services.streams import delete_run_keys, redis_client
from services.tiny_models import write_tiny_sd

PROMPTS = ["a photo of a cat", "a dog riding a bike", "a painting of a horse", "a bird on a branch"]
SCORING_OVERHEAD_S = 0.25  # encoding + HTTP + scoring of a tiny batch, on top of the added delay


@contextlib.contextmanager
def delayed_server(delay_s: float, timeout_s: float = 60.0) -> Iterator[str]:
    """Run `bench.delayed_jpeg.delayed_jpeg_app(delay_s)` under uvicorn in a subprocess on a free loopback port;
    yield its URL."""
    port = free_port()
    cmd = [sys.executable, "-m", "uvicorn", "bench.delayed_jpeg:app_from_env", "--factory"]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, DELAY_ENV: str(delay_s), "PYTHONPATH": root}
    proc = subprocess.Popen(cmd, cwd=root, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:

        def exited() -> str | None:
            return None if proc.poll() is None else f"delayed reward server exited with {proc.returncode}"

        wait_until_ready(url, timeout_s, exited)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


# ---- the actors ------------------------------------------------------------------------------------------------
def make_config(args: argparse.Namespace, model_dir: str, url: str, max_inflight: int):
    total = (args.warmup + args.batches * args.rounds) * args.batch
    return build_config(
        {
            "seed": 0,
            "model": {"pretrained": model_dir, "dtype": "float32", "device": "cpu"},
            "sampling": {"num_steps": args.steps, "batch_size": args.batch, "num_batches_per_epoch": 1},
            "training": {"batch_size": args.batch, "gradient_accumulation_steps": 1},
            "prompts": {"set": "list", "items": PROMPTS},
            "reward": {
                "name": "jpeg_compressibility",
                "mode": "http",
                "servers": {"jpeg": {"urls": [url]}},
                "timeout_s": 30 + args.delay_s,
                "max_retries": 2,
            },
            "cluster": {
                "torch_threads": args.threads,
                "max_policy_lag": 1,
                "max_inflight_batches": max_inflight,
                "stream_max_backlog": total + args.batch,  # nobody reads: never apply backpressure
                "latent_dtype": "float32",
            },
        }
    )


def time_one_batch(cfg) -> float:
    """Seconds of one warm `Sampler.sample` batch (the worker's sampling cost, used to size max_inflight)."""
    sampler = Sampler(cfg, actor_id="timing")
    sampler.sample()
    seconds = []
    for _ in range(2):
        t0 = time.perf_counter()
        sampler.sample()
        seconds.append(time.perf_counter() - t0)
    return min(seconds)


class SampleClock:
    """Wraps a sampling function; `done` holds the perf_counter time at which each call returned."""

    def __init__(self, sample: Callable) -> None:
        self.sample = sample
        self.done: list[float] = []

    def __call__(self, *args, **kwargs):
        out = self.sample(*args, **kwargs)
        self.done.append(time.perf_counter())
        return out


def timed_run(worker, clock: SampleClock, batches: int) -> tuple[float, float, float]:
    """Run `batches` more batches; returns seconds (until the last one was sampled, inside `sample` itself, of the
    whole `run`)."""
    target = worker.stats["batches"] + batches
    busy0 = worker.stats["sample_s"]
    t0 = time.perf_counter()
    worker.run(max_batches=target)
    wall = time.perf_counter() - t0
    if worker.stats["batches"] != target:
        raise RuntimeError(f"worker sampled {worker.stats['batches']} batches, expected {target}")
    return clock.done[-1] - t0, worker.stats["sample_s"] - busy0, wall


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--delay-s", type=float, default=1.0, help="latency the slow reward server adds per request"
    )
    p.add_argument("--batch", type=int, default=8, help="images per sampled batch")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps per batch")
    p.add_argument("--batches", type=int, default=12, help="batches per worker per round")
    p.add_argument("--rounds", type=int, default=4, help="alternating rounds (no delay, delayed)")
    p.add_argument("--warmup", type=int, default=2, help="untimed batches per worker first")
    p.add_argument("--max-inflight", default="auto", help="cluster.max_inflight_batches, or auto (see above)")
    p.add_argument("--threads", type=int, default=1, help="cluster.torch_threads of the workers")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    p.add_argument(
        "--model", help="a tiny SD pipeline directory (`ddpo tiny-models` DIR/sd); default: write one"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    quiet_model_loading()
    torch.set_num_threads(
        args.threads
    )  # as the workers will (cluster.torch_threads), also for the timing batch
    r = redis_client(args.redis_url)
    r.ping()
    conditions = {"no_delay": 0.0, "delayed": args.delay_s}
    with (
        tempfile.TemporaryDirectory(prefix="bench-latency-") as tmp,
        delayed_server(0.0) as fast_url,
        delayed_server(args.delay_s) as slow_url,
    ):
        model_dir = args.model or str(write_tiny_sd(Path(tmp) / "sd"))
        urls = {"no_delay": fast_url, "delayed": slow_url}
        batch_s = time_one_batch(make_config(args, model_dir, fast_url, 1))
        if args.max_inflight == "auto":
            max_inflight = math.ceil((args.delay_s + SCORING_OVERHEAD_S) / batch_s) + 2
        else:
            max_inflight = int(args.max_inflight)
        workers, clocks, run_ids = {}, {}, {}
        try:
            for name in conditions:
                run_ids[name] = f"bench-latency-{uuid.uuid4().hex[:12]}"
                cfg = make_config(args, model_dir, urls[name], max_inflight)
                workers[name] = SamplerWorker(
                    cfg.model_dump_json(),
                    run_ids[name],
                    args.redis_url,
                    f"bench-{name}",
                    {"jpeg": [urls[name]]},
                )
                total = (args.warmup + args.batches * args.rounds) * args.batch
                workers[name].quota.set_limit(0, total)  # no learner here: allow every batch of the benchmark
                clocks[name] = SampleClock(workers[name].sampler.sample)
                workers[name].sampler.sample = clocks[name]  # instance attribute: the worker's loop calls it
                workers[name].run(max_batches=args.warmup)  # loads, first calls, HTTP connection
            sampling_s = {name: [] for name in conditions}
            busy_s = {name: [] for name in conditions}
            wall_s = {name: [] for name in conditions}
            order = list(conditions)
            for i in range(args.rounds):
                for name in order if i % 2 == 0 else order[::-1]:
                    s, b, w = timed_run(workers[name], clocks[name], args.batches)
                    sampling_s[name].append(s)
                    busy_s[name].append(b)
                    wall_s[name].append(w)
            stats = {name: dict(w.stats) for name, w in workers.items()}
        finally:
            for name, worker in workers.items():
                worker.close()
                delete_run_keys(r, run_ids[name])

    samples = args.batches * args.batch
    sampling_rate = {n: samples * len(s) / sum(s) for n, s in sampling_s.items()}
    run_rate = {n: samples * len(w) / sum(w) for n, w in wall_s.items()}
    per_round = [n / d for n, d in zip(sampling_s["no_delay"], sampling_s["delayed"], strict=True)]
    result = {
        "bench": "latency_hiding",
        "config": {
            "preset": "tiny",
            "delay_s": args.delay_s,
            "batch": args.batch,
            "steps": args.steps,
            "batches_per_round": args.batches,
            "rounds": args.rounds,
            "warmup_batches": args.warmup,
            "torch_threads": args.threads,
            "batch_seconds_measured": round(batch_s, 3),
            "max_inflight_batches": max_inflight,
            "max_inflight_rule": f"ceil((delay_s + {SCORING_OVERHEAD_S}) / batch_seconds) + 2 (Little's law + 1 spare)"
            if args.max_inflight == "auto"
            else "given",
            "steady_state": args.batches >= 2 * max_inflight,
            "why": (
                f"batch {args.batch} x {args.steps} steps takes ~{batch_s:.2f} s on the tiny model, so a "
                f"{args.delay_s} s reward is {args.delay_s / batch_s:.1f} batches of sampling: enough in-flight "
                "batches hide it, too few would show as a lower delayed rate"
            ),
            "reward": "jpeg_compressibility over HTTP (uvicorn subprocess on loopback)",
            "redis": redact_url(args.redis_url),
            "run_ids": run_ids,
        },
        "machine": machine(torch.device("cpu")) | {"redis_server": r.info("server")["redis_version"]},
        "no_delay_sampling_samples_per_s": round(sampling_rate["no_delay"], 3),
        "delayed_sampling_samples_per_s": round(sampling_rate["delayed"], 3),
        "no_delay_run_samples_per_s": round(run_rate["no_delay"], 3),
        "delayed_run_samples_per_s": round(run_rate["delayed"], 3),
        # share of the sampling seconds spent inside `sample` (the rest: waiting for an in-flight slot, image
        # conversion, submitting, streaming): equal shares mean the delay was hidden, whatever the host's load
        "busy_fraction": {n: round(sum(busy_s[n]) / sum(s), 3) for n, s in sampling_s.items()},
        "streamed_samples": {n: s["samples"] for n, s in stats.items()},
        "ratio": round(statistics.median(per_round), 3),
        "round_sampling_seconds": {n: [round(x, 3) for x in s] for n, s in sampling_s.items()},
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
