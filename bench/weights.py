"""Weight broadcast latency: publish an SD 1.5-sized LoRA -> applied in a subscriber process.

    python -m bench.weights [--n N] [--rank R]

The LoRA has rank-R A/B matrices on every attention projection of SD 1.5's UNet (to_q, to_k, to_v, to_out.0 of
attn1 and attn2 in its 16 transformer blocks): at rank 4 that is 797,184 float32 parameters (3.2 MB). The clock
starts before ``WeightChannel.publish`` (so it includes encoding and hashing) and stops when the subscriber, in
another process, has fetched, verified, decoded and copied every tensor into its own parameters. Prints one JSON
line with ``p50_ms`` and ``p99_ms``; ``ratio`` = 100 ms target / p50 (>= 1 meets the target).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import time
import uuid

import torch

from bench.data_plane import machine
from services.streams import WeightChannel, WeightSubscriber, delete_run_keys, redis_client

TARGET_P50_MS = 100.0
CROSS_ATTENTION_DIM = 768  # CLIP ViT-L/14 text states
# (UNet block prefix, channels, transformer blocks): down 0-2, mid, up 1-3 of SD 1.5
SD15_ATTENTION_BLOCKS = [
    ("down_blocks.0", 320, 2),
    ("down_blocks.1", 640, 2),
    ("down_blocks.2", 1280, 2),
    ("mid_block", 1280, 1),
    ("up_blocks.1", 1280, 3),
    ("up_blocks.2", 640, 3),
    ("up_blocks.3", 320, 3),
]


def sd15_lora_shapes(rank: int) -> dict[str, tuple[int, int]]:
    """Parameter name -> shape of a rank-``rank`` LoRA on SD 1.5's attention projections (PEFT naming)."""
    shapes: dict[str, tuple[int, int]] = {}
    for prefix, dim, n_blocks in SD15_ATTENTION_BLOCKS:
        for i in range(n_blocks):
            block = f"{prefix}.attentions.{i}.transformer_blocks.0"
            for attn, kv_dim in (("attn1", dim), ("attn2", CROSS_ATTENTION_DIM)):
                for proj, d_in in (("to_q", dim), ("to_k", kv_dim), ("to_v", kv_dim), ("to_out.0", dim)):
                    name = f"{block}.{attn}.{proj}"
                    shapes[f"{name}.lora_A.weight"] = (rank, d_in)  # [r, d_in]
                    shapes[f"{name}.lora_B.weight"] = (dim, rank)  # [d_out, r]
    return shapes


def subscriber(redis_url: str, run_id: str, rank: int, last_version: int, ready, out) -> None:
    """Apply every new version into preallocated parameters; report (version, monotonic time applied)."""
    r = redis_client(redis_url)
    params = {k: torch.empty(s) for k, s in sd15_lora_shapes(rank).items()}
    sub = WeightSubscriber(WeightChannel(r, run_id))
    sub.wait(timeout_s=0.01)  # subscribe before signalling ready
    ready.set()
    deadline = time.monotonic() + 600
    while sub.version < last_version and time.monotonic() < deadline:
        got = sub.wait(timeout_s=5.0)
        if got is None:
            continue
        version, state = got
        with torch.no_grad():
            for k, t in state.items():
                params[k].copy_(t)
        out.put((version, time.monotonic()))
    sub.close()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=100, help="timed publishes (after 5 warm-up ones)")
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    args = p.parse_args(argv)
    warmup = 5

    r = redis_client(args.redis_url)
    run_id = f"bench-{uuid.uuid4().hex}"
    channel = WeightChannel(r, run_id)
    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(s, generator=g) for k, s in sd15_lora_shapes(args.rank).items()}
    n_params = sum(t.numel() for t in state.values())

    ctx = mp.get_context("spawn")
    ready, out = ctx.Event(), ctx.Queue()
    last = warmup + args.n - 1
    proc = ctx.Process(
        target=subscriber, args=(args.redis_url, run_id, args.rank, last, ready, out), daemon=True
    )
    proc.start()
    latencies_ms: list[float] = []
    publish_ms: list[float] = []
    try:
        if not ready.wait(timeout=120):
            raise RuntimeError("subscriber process did not start")
        for version in range(last + 1):
            next(iter(state.values()))[0, 0] = float(version)  # new content every version
            t0 = time.monotonic()
            channel.publish(version, state)
            t_published = time.monotonic()
            got_version, t_applied = out.get(timeout=30)
            if got_version != version:
                raise RuntimeError(f"subscriber applied v{got_version}, expected v{version}")
            if version >= warmup:
                latencies_ms.append((t_applied - t0) * 1e3)
                publish_ms.append((t_published - t0) * 1e3)
            time.sleep(0.01)  # actors apply between batches, not back to back
        proc.join(timeout=30)
    finally:
        if proc.is_alive():
            proc.terminate()
        delete_run_keys(r, run_id)  # the blob, the version and the publication counter (seq)

    q = statistics.quantiles(latencies_ms, n=100, method="inclusive")
    p50 = statistics.median(latencies_ms)
    result = {
        "bench": "weights",
        "config": {
            "n": args.n,
            "rank": args.rank,
            "params": n_params,
            "tensors": len(state),
            "dtype": "float32",
            "bytes": n_params * 4,
            "subscriber": "separate process, WeightSubscriber.wait + copy_ into parameters",
            "run_id": run_id,
        },
        "machine": machine(r),
        "p50_ms": round(p50, 2),
        "p99_ms": round(q[98], 2),
        "max_ms": round(max(latencies_ms), 2),
        "publish_p50_ms": round(statistics.median(publish_ms), 2),
        "target_p50_ms": TARGET_P50_MS,
        "ratio": round(TARGET_P50_MS / p50, 2),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
