"""Data-plane throughput: trajectories through encode -> XADD -> XREADGROUP -> decode -> ack vs raw Redis.

    python -m bench.data_plane [--preset tiny|sd15] [--n N]

Prints one JSON line. ``ratio`` = trajectory MB/s / raw MB/s, where "raw" moves random bytes of the same payload
size through the same stream commands (XADD, XREADGROUP, XACK + XDEL) in the same batches, in the same process.
The two are run in alternating rounds so that drift on the machine hits both alike.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
import uuid

import redis
import torch

from services.streams import TrajectoryStream, redis_client
from services.trajectory import ScoredTrajectory, encode_trajectory

# preset -> (T denoising steps, C, h, w) of the latents; sd15 is 512 px SD 1.5 with 50 DDIM steps
PRESETS: dict[str, tuple[int, int, int, int]] = {"tiny": (10, 4, 8, 8), "sd15": (50, 4, 64, 64)}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def make_trajectories(
    k: int, shape: tuple[int, int, int, int], source_dtype: torch.dtype
) -> list[ScoredTrajectory]:
    t_steps, c, h, w = shape
    g = torch.Generator().manual_seed(0)
    return [
        ScoredTrajectory(
            latents=torch.randn(t_steps + 1, c, h, w, generator=g).to(source_dtype),  # [T+1, C, h, w]
            log_probs=torch.randn(t_steps, generator=g),  # [T]
            timesteps=torch.arange(t_steps * 20, 0, -20),  # [T]
            prompt=f"a photo of animal {i}",
            reward=float(i),
            reward_info={"jpeg_kb": float(i)},
        )
        for i in range(k)
    ]


def run_ours(
    r: redis.Redis, pool: list[ScoredTrajectory], n: int, batch: int, latent_dtype: torch.dtype
) -> float:
    """Seconds to move n trajectories through the TrajectoryStream, batch by batch."""
    run_id = f"bench-{uuid.uuid4().hex}"
    stream = TrajectoryStream(r, run_id, max_backlog=max(2 * batch, 64), latent_dtype=latent_dtype)
    try:
        t0 = time.perf_counter()
        done = 0
        while done < n:
            b = min(batch, n - done)
            stream.add_many([pool[(done + i) % len(pool)] for i in range(b)])
            got: list = []
            for _ in range(100):  # bounded: all b are already in the stream
                got += stream.read("bench", count=b - len(got))
                if len(got) == b:
                    break
            stream.ack([entry_id for entry_id, _ in got])
            done += len(got)
        return time.perf_counter() - t0
    finally:
        r.delete(stream.key, stream.dead_letter_key)


def run_raw(r: redis.Redis, payload: bytes, n: int, batch: int) -> float:
    """Seconds to move n random payloads of the same size through the same commands (pipelined XADDs,
    XREADGROUP, XACK + XDEL) without encoding, decoding, backlog checks or reclaim."""
    key = f"bench-raw-{uuid.uuid4().hex}"
    r.xgroup_create(key, "g", id="0", mkstream=True)
    try:
        t0 = time.perf_counter()
        done = 0
        while done < n:
            b = min(batch, n - done)
            pipe = r.pipeline(transaction=False)
            for _ in range(b):
                pipe.xadd(key, {b"payload": payload})
            pipe.execute()
            got: list = []
            for _ in range(100):
                resp = r.xreadgroup("g", "bench", {key: ">"}, count=b - len(got))
                got += resp[0][1] if resp else []
                if len(got) == b:
                    break
            ids = [entry_id for entry_id, _ in got]
            pipe = r.pipeline(transaction=True)
            pipe.xack(key, "g", *ids)
            pipe.xdel(key, *ids)
            pipe.execute()
            done += len(got)
        return time.perf_counter() - t0
    finally:
        r.delete(key)


def machine(r: redis.Redis) -> dict:
    return {
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "redis_server": r.info("server")["redis_version"],
        "redis_py": redis.__version__,
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="sd15")
    p.add_argument("--n", type=int, default=None, help="trajectories per side (default: 240 sd15, 2000 tiny)")
    p.add_argument("--batch", type=int, default=16, help="entries per XREADGROUP / ack")
    p.add_argument("--rounds", type=int, default=4, help="alternating raw/ours rounds the n is split into")
    p.add_argument("--latent-dtype", choices=sorted(DTYPES), default="bf16", help="wire dtype of latents")
    p.add_argument(
        "--source-dtype", choices=sorted(DTYPES), default="bf16", help="dtype the sampler produced"
    )
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    args = p.parse_args(argv)
    n = args.n or (240 if args.preset == "sd15" else 2000)
    rounds = max(1, min(args.rounds, n))

    r = redis_client(args.redis_url)
    latent_dtype = DTYPES[args.latent_dtype]
    pool = make_trajectories(4, PRESETS[args.preset], DTYPES[args.source_dtype])
    payload_bytes = len(encode_trajectory(pool[0], latent_dtype))
    raw_payload = os.urandom(payload_bytes)

    run_ours(r, pool, min(n, 2 * args.batch), args.batch, latent_dtype)  # warm-up: connections, allocator
    run_raw(r, raw_payload, min(n, 2 * args.batch), args.batch)
    ours_s = raw_s = 0.0
    per_round = [n // rounds + (1 if i < n % rounds else 0) for i in range(rounds)]
    for i, k in enumerate(per_round):
        if i % 2 == 0:
            raw_s += run_raw(r, raw_payload, k, args.batch)
            ours_s += run_ours(r, pool, k, args.batch, latent_dtype)
        else:
            ours_s += run_ours(r, pool, k, args.batch, latent_dtype)
            raw_s += run_raw(r, raw_payload, k, args.batch)

    mb = n * payload_bytes / 1e6
    t_steps, c, h, w = PRESETS[args.preset]
    result = {
        "bench": "data_plane",
        "config": {
            "preset": args.preset,
            "n": n,
            "batch": args.batch,
            "rounds": rounds,
            "latents_shape": [t_steps + 1, c, h, w],
            "latent_dtype": args.latent_dtype,
            "source_dtype": args.source_dtype,
            "payload_bytes": payload_bytes,
        },
        "machine": machine(r),
        "trajectory_MBps": round(mb / ours_s, 1),
        "raw_MBps": round(mb / raw_s, 1),
        "trajectories_per_s": round(n / ours_s, 1),
        "ratio": round(raw_s / ours_s, 3),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
