"""Helpers for the reward-server tests: real servers on loopback (processes, or threads of the test process), test
images, metrics."""

from __future__ import annotations

import base64
import io
import struct
import threading
import zlib
from pathlib import Path

import numpy as np
import uvicorn
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from services.app.infra import SpawnedServer, free_port, wait_until_ready  # noqa: F401 (free_port: for the tests)

REPO = Path(__file__).resolve().parents[1]


class ServerProcess(SpawnedServer):
    """`python -m reward_servers.serve KIND FLAGS...` on 127.0.0.1 as the run driver spawns it, offline and without
    access log, with a log file per server (a test may start several of one kind)."""

    def __init__(self, kind: str, *flags: str, log_dir: Path, env: dict[str, str] | None = None) -> None:
        offline = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **(env or {})}
        name = f"{kind}-{len(list(log_dir.glob(f'{kind}-*.log')))}.log"
        super().__init__(kind, None, ["--access-log", "false", *flags], log_dir, env=offline, log_name=name)

    def wait_ready(self, timeout_s: float = 120.0) -> ServerProcess:
        super().wait_ready(timeout_s)
        return self


class ServerThread:
    """`ddpo serve KIND FLAGS...` in a thread of the test process: the same flags (reward_servers.serve.parse_args),
    app (`create_app`) and uvicorn server on 127.0.0.1, real HTTP on loopback, without a process start (a server
    process imports torch and transformers again: 5-10 s of a 2-core machine's CPU each). For tests of what the
    server answers; what the process does (exit status, signals, its log) is tested with ServerProcess."""

    def __init__(self, kind: str, *flags: str) -> None:
        from reward_servers.serve import parse_args

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        server_kind, settings = parse_args([kind, "--host", "127.0.0.1", "--port", str(self.port), *flags])
        self.app = server_kind.create_app(settings)
        config = uvicorn.Config(
            self.app, host="127.0.0.1", port=self.port, log_level="warning", access_log=False
        )
        self.server = uvicorn.Server(config)
        # a model that fails to load stops the server, as `ddpo serve` exits
        self.app.state.on_load_failure = lambda: setattr(self.server, "should_exit", True)
        self.thread = threading.Thread(target=self.server.run, name=f"{kind}-server", daemon=True)
        self.thread.start()

    def wait_ready(self, timeout_s: float = 120.0) -> ServerThread:
        def stopped() -> str | None:
            return (
                None
                if self.thread.is_alive()
                else f"{self.url}: the server stopped: {self.app.state.load_error}"
            )

        wait_until_ready(self.url, timeout_s, stopped)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def start_servers(*servers: ServerProcess | ServerThread) -> None:
    """Wait for servers launched together (they load in parallel); on failure stop them all."""
    try:
        for server in servers:
            server.wait_ready()
    except BaseException:
        for server in servers:
            server.stop()
        raise


def noise_image(seed: int, size: tuple[int, int] = (48, 32), mode: str = "RGB") -> Image.Image:
    """A random image, different for every seed (random pixels do not compress alike)."""
    channels = {"RGB": 3, "RGBA": 4}.get(mode)
    shape = (size[1], size[0], channels) if channels else (size[1], size[0])
    pixels = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
    return Image.fromarray(pixels, mode=mode)


def image_bytes(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def png_b64(image: Image.Image) -> str:
    return b64(image_bytes(image, "PNG"))


def png_with_header_size(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose IHDR claims width x height: a decompression bomb's header, harmless to build."""
    raw = bytearray(image_bytes(Image.new("RGB", (1, 1)), "PNG"))
    ihdr = struct.pack(">II", width, height) + bytes(raw[24:29])  # bytes 16..28: IHDR data, 29..32: its CRC
    raw[16:29] = ihdr
    raw[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(raw)


def metric_samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """(labels, value) of every sample called `name` in a Prometheus text exposition."""
    return [
        (sample.labels, sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    ]


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples called `name` whose labels include `labels` (0 when there are none)."""
    return sum(v for ls, v in metric_samples(text, name) if all(ls.get(k) == x for k, x in labels.items()))


def batches_larger_than_one(metrics_text: str) -> float:
    """Model batches with more than one item, from the batch-size histogram."""
    total = metric_value(metrics_text, "ddpo_reward_batch_size_count")
    return total - metric_value(metrics_text, "ddpo_reward_batch_size_bucket", le="1.0")
