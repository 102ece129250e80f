"""The training driver behind `ddpo train` and `python -m services.train` (also as `ray job submit -- ...`).

setup (config, run directory, models) -> train (epochs of SAMPLING then TRAINING) -> cleanup.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
import uuid
from pathlib import Path

import torch
from tqdm.auto import tqdm

from actors.sampler import Sampler, SamplerWorker
from learner.group import LearnerRank
from learner.learner import Learner
from learner.learner_worker import LearnerWorker
from learner.loop import Collected, EpochLoop
from learner.recorder import EpochRecorder
from reward_servers.tiny_models import write_tiny_reward_models
from services.app.infra import prepare_local_ray, ray_cluster, redis_server, reward_servers
from services.artifacts import read_metrics
from services.config import ConfigError, TrainConfig, dump_config, load_config
from services.keys import RunKeys
from services.models import load_pipeline, quiet_model_loading
from services.signing import RunSigner, new_run_secret, run_secret_from_env
from services.streams import TrajectoryStream, delete_run_keys, redis_client
from services.tiny_models import write_tiny_sd, write_tiny_sd3, write_tiny_sdxl

logger = logging.getLogger(__name__)


# ---- setup ---------------------------------------------------------------------------------------------------------
def prepare_models(cfg: TrainConfig) -> None:
    """Write the tiny random model where the config asks for one and it is missing."""
    path = Path(cfg.model.pretrained)
    if cfg.model.write_tiny_if_missing and not path.exists():
        logger.info("writing tiny models to %s", path.parent)
        write_tiny_models(path.parent)


def write_tiny_models(out_dir: str | Path) -> Path:
    """`ddpo tiny-models`: every tiny random model under out_dir (sd/, sdxl/, sd3/, llava/, aesthetic/, pickscore/,
    clipscore/)."""
    quiet_model_loading()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_tiny_sd(out / "sd")
    write_tiny_sdxl(out / "sdxl")
    write_tiny_sd3(out / "sd3")
    write_tiny_reward_models(out)
    return out


def make_run_dir(cfg: TrainConfig, run_dir: str | None) -> Path:
    path = Path(run_dir) if run_dir else Path("runs") / f"{cfg.run_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    path.mkdir(parents=True, exist_ok=True)
    (path / "checkpoints").mkdir(exist_ok=True)
    (path / "images").mkdir(exist_ok=True)
    (path / "config.yaml").write_text(dump_config(cfg))
    return path


def banner(cfg: TrainConfig, run_dir: Path) -> str:
    return (
        f"DDPO run {run_dir}: objective={cfg.training.objective} reward={cfg.reward.name} "
        f"samples/epoch={cfg.samples_per_epoch} ({cfg.sampling.batch_size} x {cfg.sampling.num_batches_per_epoch}) "
        f"updates/epoch={cfg.updates_per_epoch} timesteps trained/sample={cfg.trained_steps_per_sample}/"
        f"{cfg.sampling.num_steps} epochs={cfg.num_epochs}"
    )


# ---- train (in process) --------------------------------------------------------------------------------------------
class LocalSource:
    """`cluster.in_process`: the sampler shares the learner's pipeline, so every batch is sampled at the learner's
    current version (policy lag 0) right when the epoch needs it; nothing to acknowledge."""

    def __init__(self, sampler) -> None:
        self.sampler = sampler
        self._busy_s = 0.0
        self._since = time.perf_counter()

    def collect(self, n: int, version: int) -> Collected:
        t0 = time.perf_counter()
        batch = []
        while len(batch) < n:
            batch += self.sampler.sample_scored()
        self._busy_s += time.perf_counter() - t0
        return Collected(batch=batch[:n])

    def open_version(self, version: int) -> None:
        self.sampler.policy_version = version  # the shared pipeline already holds these weights

    def ack(self, ids: list[str]) -> None:
        pass

    def actor_idle_frac(self) -> float | None:
        """The sampler waits while the learner trains: 1 - sampling seconds / wall seconds since the last call."""
        now = time.perf_counter()
        wall, busy = now - self._since, self._busy_s
        self._since, self._busy_s = now, 0.0
        return max(0.0, 1.0 - busy / wall) if wall > 0 else None

    def state_dict(self) -> dict:
        return {
            "prompts": self.sampler.prompt_sampler.state_dict(),
            "noise": self.sampler.generator.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        if "prompts" in state:
            self.sampler.prompt_sampler.load_state_dict(state["prompts"])
            self.sampler.generator.set_state(state["noise"])


def run_local(cfg: TrainConfig, run_dir: Path, progress: bool = True) -> list[dict]:
    """The same epoch loop in one process: sampler and learner share one pipeline. Returns the metrics rows."""
    torch.manual_seed(cfg.seed)
    pipe = load_pipeline(cfg.model, cfg.lora, seed=cfg.seed, perf=cfg.performance)
    sampler = Sampler(cfg, pipeline=pipe)
    learner = Learner(cfg, pipeline=pipe)
    loop = EpochLoop(
        cfg,
        run_dir,
        learner,
        LocalSource(sampler),
        publish=lambda version, weights, rollback: None,  # the pipeline is shared: the weights are in place
        recorder_factory=lambda first_epoch: EpochRecorder(
            cfg, run_dir, learner, {}, resume_epoch=first_epoch
        ),
    )
    bar = tqdm(total=cfg.num_epochs, initial=loop.next_epoch, desc="epochs", disable=not progress)
    loop.run(on_row=lambda row: (_show_row(bar, row), bar.update(1)))
    bar.close()
    return read_metrics(run_dir / "metrics.jsonl")


# ---- train (distributed) ------------------------------------------------------------------------------------------
def _run_id(run_dir: Path) -> str:
    """A run's id (Redis key prefix), stable across --resume."""
    meta = run_dir / "run.json"
    if meta.exists():
        return json.loads(meta.read_text())["run_id"]
    run_id = uuid.uuid4().hex[:12]
    meta.write_text(json.dumps({"run_id": run_id}))
    return run_id


RUN_SECRET_FILE = "run_secret"


def _run_secret(run_dir: Path) -> str:
    """The run secret that signs weights and trajectories (`services.signing`): DDPO_RUN_SECRET when set (a cluster
    job shares it between driver and actors), else the one an earlier call of this run generated (run_secret in the
    run directory, mode 0600: --resume verifies what that call signed), else a new one, written there."""
    from_env = run_secret_from_env()
    if from_env:
        return from_env
    path = run_dir / RUN_SECRET_FILE
    if path.exists():
        return path.read_text().strip()
    secret = new_run_secret()
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
        f.write(secret)
    return secret


def _actor_options(num_cpus: float, num_gpus: float, max_restarts: int) -> dict:
    return {
        "num_cpus": num_cpus,
        "num_gpus": num_gpus,
        "max_restarts": max_restarts,
        "max_task_retries": -1 if max_restarts else 0,  # a restarted actor resumes its loop
    }


def read_ids(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line] if path.exists() else []


def _write_id_ledgers(stream, run_dir: Path, finished: bool) -> None:
    """produced_ids.txt (every trajectory that entered the stream) and unused_ids.txt (produced, but neither used
    nor dropped by the end: sampled after the last update needed them). With ledger.jsonl's used and dropped ids
    they partition the produced set, which the fault tests check. Both files accumulate over --resume: a finished
    run's stream is deleted, so what it produced and left unused is kept from the files of the earlier call."""
    produced = list(dict.fromkeys(read_ids(run_dir / "produced_ids.txt") + stream.produced_ids()))
    ledger = run_dir / "ledger.jsonl"
    consumed = set()
    for line in ledger.read_text().splitlines() if ledger.exists() else []:
        row = json.loads(line)
        consumed.update(row["used"], row["dropped_stale"])
    earlier_unused = read_ids(run_dir / "unused_ids.txt")
    unused = [i for i in dict.fromkeys(earlier_unused + stream.remaining_ids()) if i not in consumed]
    (run_dir / "produced_ids.txt").write_text("".join(i + "\n" for i in produced))
    (run_dir / "unused_ids.txt").write_text("".join(i + "\n" for i in unused))
    if finished:
        stream.delete()


def _show_row(bar, row: dict) -> None:
    """The epoch bar's postfix: the newest reward, throughput and policy lag."""
    bar.set_postfix(reward=f"{row['reward_mean']:.4f}", sps=f"{row['samples_per_s']:.2f}",
                    lag=f"{row['policy_lag_mean']:.2f}", refresh=False)  # fmt: skip


def _update_bar(bar, rows: list[dict]) -> None:
    """Advance the epoch bar to the rows written so far."""
    if len(rows) > bar.n:
        _show_row(bar, rows[-1])
        bar.update(len(rows) - bar.n)


def run_distributed(cfg: TrainConfig, run_dir: Path, progress: bool = True) -> list[dict]:
    """Sampling actors, reward servers and the learner as separate processes. Returns the metrics rows."""
    prepare_local_ray(cfg)
    import ray  # lazily, after prepare_local_ray: Ray reads its single-machine flag at import time

    run_id = _run_id(run_dir)
    secret = _run_secret(run_dir)  # handed to the actors as an argument: never in config, logs or metrics
    cfg_json = cfg.model_dump_json()
    c = cfg.cluster
    metrics_path = run_dir / "metrics.jsonl"
    with (
        redis_server(c.redis_url, run_dir / "redis") as redis_url,
        reward_servers(cfg, run_dir / "logs") as replicas,
        ray_cluster(cfg),
    ):
        r = redis_client(redis_url)
        keys = RunKeys(run_id)
        r.delete(keys.stop, keys.finish)
        # a single learner restarts on its own; a data-parallel group fails together (resume with --resume)
        learner_restarts = -1 if c.num_learners == 1 else 0
        learner = (
            ray.remote(LearnerWorker)
            .options(
                name=f"learner-{run_id}",
                **_actor_options(c.learner_num_cpus, c.learner_num_gpus, learner_restarts),
            )
            .remote(
                cfg_json,
                run_id,
                redis_url,
                str(run_dir.resolve()),
                replicas,
                c.num_learners,
                run_secret=secret,
            )
        )
        ranks, rank_runs = [], []
        if c.num_learners > 1:
            master = ray.get(learner.master_address.remote())
            ranks = [
                ray.remote(LearnerRank)
                .options(
                    name=f"learner-{run_id}-rank{i}",
                    **_actor_options(c.learner_num_cpus, c.learner_num_gpus, 0),
                )
                .remote(cfg_json, i, c.num_learners, master)
                for i in range(1, c.num_learners)
            ]
            rank_runs = [r.run.remote() for r in ranks]
            ray.get(learner.setup.remote(master))
        samplers = [
            ray.remote(SamplerWorker)
            .options(
                name=f"sampler-{run_id}-{i}",
                **_actor_options(c.sampler_num_cpus, c.sampler_num_gpus, c.actor_max_restarts),
            )
            .remote(cfg_json, run_id, redis_url, f"sampler-{i}", replicas, run_secret=secret)
            for i in range(c.num_sampler_actors)
        ]
        sampler_runs = [s.run.remote() for s in samplers]
        learner_run = learner.run.remote()
        bar = tqdm(total=cfg.num_epochs, desc="epochs", disable=not progress)
        completed = False
        try:
            while not ray.wait([learner_run], timeout=1.0)[0]:
                _update_bar(bar, read_metrics(metrics_path))
                done, _ = ray.wait(sampler_runs + rank_runs, timeout=0)
                for ref in done:
                    ray.get(ref)  # a sampler loop that ends before the stop flag has failed for good: raise
            ray.get(learner_run)
            completed = True
            _update_bar(bar, read_metrics(metrics_path))
        finally:
            bar.close()
            r.set(keys.stop, 1)
            ray.wait(sampler_runs, num_returns=len(sampler_runs), timeout=60)
            ray.wait(rank_runs, num_returns=len(rank_runs), timeout=60)
            for actor in [learner, *ranks, *samplers]:
                ray.kill(actor, no_restart=True)
            stream = TrajectoryStream(r, run_id, record_produced=True, signer=RunSigner(secret, run_id))
            _write_id_ledgers(stream, run_dir, finished=completed)
            if completed and not c.keep_redis_keys:  # nothing of a finished run stays in a shared Redis
                delete_run_keys(r, run_id)
    return read_metrics(metrics_path)


# ---- entry points --------------------------------------------------------------------------------------------------
def train(cfg: TrainConfig, run_dir: Path, progress: bool = True) -> list[dict]:
    """setup -> train -> cleanup for a validated config and a prepared run directory."""
    logger.info(banner(cfg, run_dir))
    prepare_models(cfg)
    if cfg.cluster.in_process:
        return run_local(cfg, run_dir, progress=progress)
    return run_distributed(cfg, run_dir, progress=progress)


def _exit_on_sigterm() -> None:
    """SIGTERM (e.g. `kill`, a container stop) unwinds like Ctrl-C: actors, servers, Redis and Ray are stopped."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def main_from_args(args: argparse.Namespace) -> None:
    _exit_on_sigterm()
    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / "config.yaml").exists():
            raise ConfigError(f"--resume {run_dir}: no config.yaml there")
        cfg = load_config(str(run_dir / "config.yaml"), args.overrides)
    else:
        cfg = load_config(args.config, args.overrides)
        run_dir = make_run_dir(cfg, args.run_dir)
    train(cfg, run_dir)
    logger.info("done: %s", run_dir)
