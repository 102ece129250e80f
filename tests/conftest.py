"""Shared fixtures: offline hub, small thread count; written or started once per session: the tiny random-weight
models (once for all xdist workers), one local Ray per worker, and the README quickstart's run directory."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# OpenMP threads that wait sleep instead of spinning: on 2 cores shared with the actors, servers and subprocesses the
# tests start, spinning threads made tiny-model sampling and training up to 100x slower. Set before torch is imported
# (OpenMP reads it once), and inherited by every process the tests start.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# local Ray clusters of the tests keep every socket on 127.0.0.1 (Ray's single-machine mode; see services/infra.py)
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import pytest  # noqa: E402
import redis  # noqa: E402
import torch  # noqa: E402
from filelock import FileLock  # noqa: E402

from services.streams import delete_run_keys  # noqa: E402

torch.set_num_threads(2)


class TinyModels(NamedTuple):
    path: Path  # DIR of `ddpo tiny-models --out DIR`
    output: str  # what the command printed (stdout, then stderr)


@pytest.fixture(scope="session")
def tiny_models_run(tmp_path_factory, worker_id: str) -> TinyModels:
    """`ddpo tiny-models --out DIR` run once per test session as a user runs it (a subprocess), shared by the
    xdist workers: the first to get here writes, under a file lock, the others wait and read. Its output is kept
    for the CLI test."""
    # the session's own temp dir: with xdist the workers' dirs share a parent that is new for each session
    root = tmp_path_factory.getbasetemp() if worker_id == "master" else tmp_path_factory.getbasetemp().parent
    out, log, done = root / "tiny-models", root / "tiny-models.log", root / "tiny-models.done"
    with FileLock(str(root / "tiny-models.lock")):
        if not done.exists():
            proc = subprocess.run([sys.executable, "-m", "services.app.cli", "tiny-models", "--out", str(out)],
                                  capture_output=True, text=True, timeout=600)  # fmt: skip
            log.write_text(proc.stdout + proc.stderr)
            assert proc.returncode == 0, proc.stderr[-4000:]
            done.touch()
    return TinyModels(out, log.read_text())


@pytest.fixture(scope="session")
def tiny_models(tiny_models_run: TinyModels) -> Path:
    """Every tiny random model, written once per test session by `ddpo tiny-models`: DIR/sd, DIR/sdxl, DIR/sd3,
    DIR/llava, DIR/aesthetic, DIR/pickscore, DIR/clipscore. Tests read them and never write there."""
    return tiny_models_run.path


@pytest.fixture(scope="session")
def tiny_sd_path(tiny_models) -> str:
    """The tiny Stable Diffusion pipeline (DIR/sd of `tiny_models`)."""
    return str(tiny_models / "sd")


@pytest.fixture(scope="session")
def local_ray() -> Iterator[Path]:
    """One local Ray for the session, started as `services.app.infra.ray_cluster` starts one (every socket on
    127.0.0.1, no dashboard, its own temp dir): `run_distributed` joins an initialised Ray instead of starting one per
    run. Logical CPUs for the largest test run (3 actors). Yields the temp dir (Ray's logs are under it), deleted at
    the end. Fault tests SIGKILL actors' processes, which Ray restarts; the cluster itself outlives them."""
    import ray

    # under /tmp: Ray's socket paths are under it and must stay short
    temp = Path(tempfile.mkdtemp(prefix="ray-ddpo-test-", dir="/tmp"))
    try:
        ray.init(
            num_cpus=max(os.cpu_count() or 1, 4),
            _node_ip_address="127.0.0.1",
            include_dashboard=False,
            runtime_env={"env_vars": {"HF_HUB_OFFLINE": os.environ["HF_HUB_OFFLINE"]}},
            log_to_driver=True,
            _temp_dir=str(temp),
        )
        yield temp
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture()
def r() -> Iterator[redis.Redis]:
    """A client of the machine's Redis at 127.0.0.1:6379 (the test is skipped where none answers)."""
    client = redis.Redis(host="127.0.0.1", port=6379, socket_timeout=10)
    try:
        client.ping()
    except redis.ConnectionError:
        pytest.skip("no Redis on 127.0.0.1:6379")
    yield client
    client.close()


@pytest.fixture()
def run_id(r: redis.Redis) -> Iterator[str]:
    """A fresh run id; every Redis key of that run is deleted after the test (the machine's Redis is shared)."""
    rid = f"test-{uuid.uuid4().hex}"
    yield rid
    delete_run_keys(r, rid)


@pytest.fixture
def tiny_train_config(tiny_sd_path):
    """A factory of small, valid TrainConfigs on the tiny model; keyword sections override the defaults."""
    from services.config import build_config

    def make(**sections) -> object:
        tree = {
            "seed": 0,
            "model": {"pretrained": tiny_sd_path, "dtype": "float32", "device": "cpu"},
            "sampling": {"num_steps": 8, "batch_size": 4, "num_batches_per_epoch": 1},
            "training": {"batch_size": 2, "gradient_accumulation_steps": 1},
            "stat_tracking": {"enabled": False},
            # a micro-batch's trained timesteps in one forward: the same gradient (test_fast_paths), ~1.7x faster
            "performance": {"timesteps_per_forward": 0},
            "prompts": {"set": "list", "items": ["a cat", "a dog"]},
        }
        for key, value in sections.items():
            if isinstance(value, dict):
                tree.setdefault(key, {}).update(value)
            else:
                tree[key] = value
        return build_config(tree)

    return make


@pytest.fixture(scope="session")
def quickstart_run(tmp_path_factory) -> Path:
    """The README's first command, `ddpo train` (the quickstart preset), run once as a user runs it: a subprocess
    in a fresh working directory (about 2 minutes on 2 cores). Returns its run directory; the tests that check what
    a run directory holds read this one instead of training on their own, and none of them writes to it."""
    cwd = tmp_path_factory.mktemp("quickstart")
    run = cwd / "run"
    out = subprocess.run([sys.executable, "-m", "services.app.cli", "train", "--run-dir", str(run)], cwd=cwd,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=840)  # fmt: skip
    assert out.returncode == 0, out.stderr[-4000:]
    return run
