"""The distributed loop on a real local Ray and the real Redis at 127.0.0.1:6379: resume, a reward server outage,
bookkeeping (lag 0 with two actors and two learner ranks: the distributed run of test_signing.py).

Every run checks the trajectory ledger: the ids used in updates, those dropped as stale and those still unread at
the end partition the set of ids that entered the stream, and no id is used twice.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import redis
from reward_server_utils import metric_value

from services.app.driver import make_run_dir, run_distributed
from services.app.infra import SpawnedServer
from services.config import build_config
from services.streams import delete_run_keys

REDIS_URL = "redis://127.0.0.1:6379/0"
pytestmark = pytest.mark.usefixtures("local_ray")  # one Ray for the session: each run joins it (conftest.py)


@pytest.fixture
def redis_keys_cleanup():
    """Delete the Redis keys of the runs a test made (the system Redis is shared)."""
    run_dirs: list[Path] = []
    yield run_dirs
    r = redis.Redis.from_url(REDIS_URL)
    for run_dir in run_dirs:
        meta = run_dir / "run.json"
        if meta.exists():
            delete_run_keys(r, json.loads(meta.read_text())["run_id"])


def dist_config(tiny_sd_path: str, **sections):
    tree = {
        "seed": 0,
        "num_epochs": 6,
        "save_every": 2,
        "model": {"pretrained": tiny_sd_path, "dtype": "float32", "device": "cpu"},
        "sampling": {"num_steps": 4, "batch_size": 4, "num_batches_per_epoch": 2},
        "training": {
            "batch_size": 4,
            "gradient_accumulation_steps": 1,
            "learning_rate": 1e-2,
            "clip_range": 0.1,
        },
        "stat_tracking": {"enabled": False},
        "prompts": {"set": "list", "items": ["a cat", "a dog"]},
        "cluster": {
            "redis_url": REDIS_URL,
            "torch_threads": 1,
            "stream_max_backlog": 8,
            "lag0_starvation_s": 10,
        },
        "logging": {"images_per_epoch": 0, "tensorboard": False},
    }
    for key, value in sections.items():
        tree.setdefault(key, {}).update(value) if isinstance(value, dict) else tree.__setitem__(key, value)
    return build_config(tree)


def read_ids(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line] if path.exists() else []


def check_ledger(run_dir: Path, num_epochs: int) -> dict[str, list[str]]:
    """used / dropped / unused partition produced; no duplicates; one metrics row and ledger row per epoch."""
    ledger = [json.loads(line) for line in (run_dir / "ledger.jsonl").read_text().splitlines()]
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in ledger] == list(range(num_epochs))
    assert [r["epoch"] for r in metrics] == list(range(num_epochs))
    assert [r["policy_version"] for r in metrics] == list(range(1, num_epochs + 1))
    used = [i for r in ledger for i in r["used"]]
    dropped = [i for r in ledger for i in r["dropped_stale"]]
    produced = read_ids(run_dir / "produced_ids.txt")
    unused = read_ids(run_dir / "unused_ids.txt")
    assert len(used) == len(set(used)), "a trajectory was used in two updates"
    assert len(produced) == len(set(produced))
    assert (
        not (set(used) & set(dropped)) and not (set(used) & set(unused)) and not (set(dropped) & set(unused))
    )
    assert set(used) | set(dropped) | set(unused) == set(produced)
    assert [r["dropped_stale"] for r in metrics] == [len(r["dropped_stale"]) for r in ledger]
    return {"used": used, "dropped": dropped, "produced": produced, "unused": unused}


class Chaos(threading.Thread):
    """Runs `action()` once the run has written `after_rows` metrics rows (`ddpo chaos` injects every kind of fault
    on a schedule; this is one fault at a chosen point)."""

    def __init__(self, run_dir: Path, after_rows: int, action: Callable[[], None]) -> None:
        super().__init__(daemon=True)
        self.run_dir, self.after_rows, self.action = run_dir, after_rows, action
        self.done = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            deadline = time.monotonic() + 600
            metrics = self.run_dir / "metrics.jsonl"
            while time.monotonic() < deadline:
                rows = metrics.read_text().count("\n") if metrics.exists() else 0
                if rows >= self.after_rows:
                    break
                time.sleep(0.2)
            self.action()
        except BaseException as e:  # surfaced by the test
            self.error = e
        finally:
            self.done.set()


def wait_until(condition: Callable[[], object], what: str, timeout_s: float = 300) -> None:
    """Poll `condition` (an event some process reports) until it holds; the timeout only guards against a hang."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up waiting for {what}")
        time.sleep(0.2)


def actor_log_lines(ray_dir: Path, *needles: str) -> list[str]:
    """Lines of the Ray workers' logs (the actors' stderr, where their warnings go) that contain every needle."""
    lines = []
    for log in ray_dir.glob("session_*/logs/worker-*.err"):
        lines += [
            line for line in log.read_text(errors="replace").splitlines() if all(n in line for n in needles)
        ]
    return lines


@pytest.mark.timeout(600)
def test_resume_continues_the_run_through_a_reward_server_outage(
    tiny_sd_path, tmp_path, redis_keys_cleanup, local_ray
):
    """Two calls on one run directory: 2 epochs, then resumed to 6. Rewards come from a jpeg server over HTTP, which
    goes away after the resumed run's first row (three epochs still to sample) and comes back once the sampling actor has seen a batch fail to score
    (its own warning, in its log): the actor retries that batch, the run finishes, nothing is lost."""
    server = SpawnedServer("jpeg", None, [], log_dir=tmp_path).wait_ready()
    http = {
        "mode": "http",
        "servers": {"jpeg": {"urls": [f"http://127.0.0.1:{server.port}"]}},
        "max_retries": 2,
    }
    cfg = dist_config(tiny_sd_path, num_epochs=2, save_every=1, reward=http)
    port = f"127.0.0.1:{server.port}/"

    def outage() -> None:
        server.kill()
        wait_until(
            lambda: actor_log_lines(local_ray, "scoring failed", port), "the sampling actor to see the outage"
        )
        server.start()  # the same port
        server.wait_ready()

    run_dir = make_run_dir(cfg, str(tmp_path / "run"))
    redis_keys_cleanup.append(run_dir)
    try:
        first = run_distributed(cfg, run_dir, progress=False)
        more = cfg.model_copy(update={"num_epochs": 6})
        chaos = Chaos(run_dir, after_rows=3, action=outage)
        chaos.start()
        rows = run_distributed(more, run_dir, progress=False)
        assert chaos.done.wait(5), "the run ended before the outage did"
        assert chaos.error is None, chaos.error
        # the restarted server scored what came after: the retried batch and the rest of the run
        scored = httpx.get(f"http://127.0.0.1:{server.port}/metrics", timeout=10).text
    finally:
        server.stop()
    failures = actor_log_lines(local_ray, "scoring failed", port)
    # each failure: the client's 3 attempts (max_retries 2) used up, then the actor retries the batch
    assert failures and all("after 3 attempts" in f and "retrying the batch" in f for f in failures), failures
    assert metric_value(scored, "ddpo_reward_requests_total", path="/v1/score", status="200") > 0
    # the resumed run continues the first: its rows, then the next epochs and policy versions
    assert rows[:2] == first
    assert [r["epoch"] for r in rows] == [0, 1, 2, 3, 4, 5]
    assert [r["policy_version"] for r in rows] == [1, 2, 3, 4, 5, 6]
    # lag 1 with one actor: the quota lets it sample only what the learner uses in time, so nothing is stale
    assert all(r["dropped_stale"] == 0 and r["policy_lag_max"] <= 1 for r in rows)
    assert any("clipfrac_lag1" in r for r in rows) and all(0 <= r["actor_idle_frac"] <= 1 for r in rows[1:])
    # the accounting spans both calls: the first run's stream is gone, its produced and unused ids are kept
    ids = check_ledger(run_dir, 6)
    assert ids["used"] and len(ids["produced"]) >= 6 * cfg.samples_per_epoch
    # a finished run leaves none of its keys in the (shared) Redis
    run_id = json.loads((run_dir / "run.json").read_text())["run_id"]
    assert not list(redis.Redis.from_url(REDIS_URL).scan_iter(match=f"ddpo:{run_id}:*"))
