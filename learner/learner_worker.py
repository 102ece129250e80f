"""The learner of the distributed loop: stream -> epoch batch -> update -> publish -> checkpoint -> ack.

A plain class (the Ray actor is a thin shell). Per epoch:
  1. COLLECT   read `samples_per_epoch` trajectories from the stream (own pending entries first after a restart),
               skipping duplicates (by trajectory_id) and dropping those older than `max_policy_lag` versions
  2. UPDATE    `Learner.train_epoch` (advantages, DDPO-IS/SF or RWR)
  3. PUBLISH   the new LoRA as version N+1 on the weight channel
  4. RECORD    metrics.jsonl row, ledger of used/dropped ids, artifacts; checkpoint every `save_every` epochs
  5. ACK       entries are acknowledged only once the state that used them is checkpointed, so a crash between
               checkpoints replays the same entries into the same epochs (at-least-once, de-duplicated)
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from pathlib import Path

import torch

from learner.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from learner.learner import Learner
from services.config import TrainConfig
from services.infra import redis_client
from services.lora import save_diffusers_lora
from services.streams import Deduplicator, TrajectoryStream, WeightChannel
from services.trajectory import ScoredTrajectory

logger = logging.getLogger(__name__)

CONSUMER = "learner-0"  # a fixed name: after a restart the learner gets its own pending entries back first
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def epoch_metrics_row(
    epoch: int,
    policy_version: int,
    batch: list[ScoredTrajectory],
    seconds: float,
    train_metrics: dict,
    lags: list[int],
    dropped_stale: int,
) -> dict:
    """The metrics.jsonl row of one epoch (shared by the distributed and the in-process loops)."""
    rewards = torch.tensor([t.reward for t in batch], dtype=torch.float64)
    return {
        "epoch": epoch,
        "policy_version": policy_version,
        "reward_mean": float(rewards.mean()),
        "reward_std": float(rewards.std(unbiased=False)),
        "samples": len(batch),
        "samples_per_s": len(batch) / seconds if seconds > 0 else None,
        **train_metrics,
        "policy_lag_mean": sum(lags) / len(lags) if lags else 0.0,
        "policy_lag_max": max(lags, default=0),
        "dropped_stale": dropped_stale,
        "epoch_s": seconds,
        "time": time.time(),
    }


def quiet_model_loading() -> None:
    """No per-component progress bars from diffusers/transformers in actor logs."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def worker_config(cfg_json: str) -> TrainConfig:
    """A Ray worker's config from the driver's JSON; also quiets model loading and sets the torch threads."""
    cfg = TrainConfig.model_validate_json(cfg_json)
    quiet_model_loading()
    if cfg.cluster.torch_threads:
        torch.set_num_threads(cfg.cluster.torch_threads)
    return cfg


class EpochRecorder:
    """What an epoch leaves in the run directory besides checkpoints: the metrics row, the sample grid, held-out
    evaluation, curves, TensorBoard; and report.html at the end."""

    def __init__(
        self,
        cfg: TrainConfig,
        run_dir: Path,
        learner: Learner,
        replicas: dict[str, list[str]],
        resume_epoch: int | None = None,
    ) -> None:
        from actors.reward_client import SyncRewardClient
        from services.artifacts import RunArtifacts
        from services.evaluation import eval_reward_names, score_fns_for

        self.cfg, self.run_dir, self.learner = cfg, run_dir, learner
        self.artifacts = RunArtifacts(run_dir, cfg, resume_epoch=resume_epoch)
        self.client = None
        if cfg.evaluation.every:
            needs_http = any(not n.startswith("jpeg") for n in eval_reward_names(cfg))
            if needs_http:
                self.client = SyncRewardClient.from_config(cfg.reward, replicas)
        self.score_fns = score_fns_for(cfg, self.client) if cfg.evaluation.every else {}

    def _eval_due(self, epoch: int) -> bool:
        every = self.cfg.evaluation.every
        return bool(every) and ((epoch + 1) % every == 0 or epoch + 1 == self.cfg.num_epochs)

    def record(self, row: dict, batch: list[ScoredTrajectory]) -> None:
        from services.diffusion import decode_latents
        from services.evaluation import evaluate
        from services.images import tensor_to_pil

        epoch = row["epoch"]
        if self._eval_due(epoch):
            result = evaluate(self.learner.pipe, self.cfg, self.score_fns, epoch)
            row.update(result.metrics())
            self.artifacts.log_eval(epoch, result)
        append_jsonl(self.run_dir / "metrics.jsonl", row)
        shown = batch[: self.cfg.logging.images_per_epoch]
        images = []
        if shown:
            x0 = torch.stack([t.latents[-1] for t in shown]).to(self.learner.device, self.learner.unet.dtype)
            images = tensor_to_pil(decode_latents(self.learner.pipe, x0))
        self.artifacts.log_epoch(row, images, [t.prompt for t in shown], [t.reward for t in shown])
        self.artifacts.write_curves()

    def close(self) -> None:
        from services.report import write_report

        self.artifacts.close()
        if self.client is not None:
            self.client.close()
        write_report(self.run_dir)


def write_checkpoint(run_dir: Path, epoch: int, learner: Learner, dedup: list[str]) -> Path:
    """checkpoints/epoch_NNNN: learner state + de-duplication ids (safetensors/JSON) and the LoRA in diffusers format."""
    state = {"learner": learner.state_dict(), "dedup": dedup, "epoch": epoch}
    path = save_checkpoint(run_dir, epoch, state)
    save_diffusers_lora(learner.unet, path / "lora")
    return path


def _truncate_jsonl(path: Path, keep) -> None:
    """Keep only the rows for which keep(row) is true (resume drops rows of epochs not in the checkpoint)."""
    if not path.exists():
        return
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows if keep(r)))


def append_jsonl(path: Path, row: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


class LearnerWorker:
    """Runs `num_epochs` epochs of DDPO updates on trajectories from the stream; resumes from its run directory."""

    def __init__(
        self,
        cfg_json: str,
        run_id: str,
        redis_url: str,
        run_dir: str,
        replicas: dict[str, list[str]] | None = None,
        world_size: int = 1,
    ) -> None:
        self.cfg = cfg = worker_config(cfg_json)
        self.world_size = world_size
        self.group = None
        self.replicas = replicas or {}
        self.run_id = run_id
        self.run_dir = Path(run_dir)
        self.redis = redis_client(redis_url)
        self.redis.hset(f"ddpo:{run_id}:pids", CONSUMER, os.getpid())
        self.stream = TrajectoryStream(
            self.redis,
            run_id,
            max_backlog=cfg.cluster.stream_max_backlog,
            min_idle_ms=cfg.cluster.reclaim_idle_ms,
            latent_dtype=_DTYPES[cfg.cluster.latent_dtype],
        )
        self.channel = WeightChannel(self.redis, run_id)
        self.learner = None
        if world_size == 1:
            self.setup()

    def master_address(self) -> str:
        """Rendezvous address of the learner group on this node (data-parallel learners only)."""
        from learner.group import node_address

        return node_address()

    def setup(self, master: str | None = None) -> None:
        """Join the learner group (if data-parallel), build the learner, resume, announce the weights."""
        cfg = self.cfg
        if self.world_size > 1:
            from learner.group import STATE, LearnerGroup, encode_state

            self.group = LearnerGroup(0, self.world_size, master)
        self.learner = Learner(cfg)
        self.dedup = Deduplicator()
        self.next_epoch = 0
        self.unacked: list[str] = []  # entry ids used since the last checkpoint
        self.held: list[tuple[str, ScoredTrajectory]] = []  # read but not yet used (e.g. newer than needed)
        self._resume()
        if self.group is not None:  # the other ranks start from exactly this state
            self.group.send(STATE, encode_state(self.learner.state_dict()))
        self.recorder = EpochRecorder(
            cfg, self.run_dir, self.learner, self.replicas, resume_epoch=self.next_epoch
        )
        # (re)announce the weights this learner holds; after a resume they replace anything published later
        self.channel.publish(self.learner.policy_version, self.learner.policy_weights(), rollback=True)

    # ---- resume -------------------------------------------------------------------------------------------------
    def _resume(self) -> None:
        ckpt = latest_checkpoint(self.run_dir)
        if ckpt is None:
            _truncate_jsonl(self.run_dir / "metrics.jsonl", lambda r: False)
            _truncate_jsonl(self.run_dir / "ledger.jsonl", lambda r: False)
            return
        state = load_checkpoint(ckpt)
        self.learner.load_state_dict(state["learner"])
        self.dedup = Deduplicator.from_list(state["dedup"])
        self.next_epoch = int(state["epoch"]) + 1
        done = self.next_epoch
        _truncate_jsonl(self.run_dir / "metrics.jsonl", lambda r: r["epoch"] < done)
        _truncate_jsonl(self.run_dir / "ledger.jsonl", lambda r: r["epoch"] < done)
        logger.info(
            "learner resumed from %s at epoch %d, policy version %d", ckpt, done, self.learner.policy_version
        )

    # ---- 1. COLLECT ---------------------------------------------------------------------------------------------
    def collect(self, n: int) -> tuple[list[ScoredTrajectory], list[str], list[str], float]:
        """n fresh trajectories; returns (batch, entry ids to ack later, dropped stale ids, seconds waited)."""
        version, max_lag = self.learner.policy_version, self.cfg.cluster.max_policy_lag
        batch: list[ScoredTrajectory] = []
        ids: list[str] = []
        dropped: list[str] = []
        t0 = last_arrival = time.perf_counter()
        while len(batch) < n:
            entries, self.held = self.held, []
            if not entries:
                entries = self.stream.read(CONSUMER, count=n - len(batch), block_ms=500)
            if entries:
                last_arrival = time.perf_counter()
            for entry_id, traj in entries:
                if len(batch) >= n:
                    self.held.append((entry_id, traj))
                    continue
                if self.dedup.seen(traj.trajectory_id):
                    ids.append(entry_id)  # a redelivered duplicate: acknowledge, never train twice
                    continue
                if version - traj.policy_version > max_lag:
                    dropped.append(traj.trajectory_id)
                    ids.append(entry_id)
                    continue
                batch.append(traj)
                ids.append(entry_id)
            if max_lag == 0 and time.perf_counter() - last_arrival > self.cfg.cluster.lag0_starvation_s:
                # claimed quota whose batch never arrived (a crashed actor): let the actors claim it again
                key = f"ddpo:{self.run_id}:quota:{version}"
                self.redis.set(key, len(batch))
                logger.warning("learner: starved; re-opened the sampling quota of version %d", version)
                last_arrival = time.perf_counter()
        return batch, ids, dropped, time.perf_counter() - t0

    # ---- one epoch ----------------------------------------------------------------------------------------------
    def run_epoch(self) -> dict:
        cfg, epoch = self.cfg, self.next_epoch
        t0 = time.perf_counter()
        batch, ids, dropped, wait_s = self.collect(cfg.samples_per_epoch)
        version_before = self.learner.policy_version
        lags = [version_before - t.policy_version for t in batch]
        # 2. UPDATE (every learner rank trains on the same batch, each on its share of the micro-batches)
        if self.group is not None:
            from learner.group import BATCH, encode_batch

            self.group.send(BATCH, encode_batch(batch))
        metrics = self.learner.train_epoch(batch)
        # 3. PUBLISH
        self.channel.publish(self.learner.policy_version, self.learner.policy_weights())
        # 4. RECORD
        seconds = time.perf_counter() - t0
        row = epoch_metrics_row(
            epoch, self.learner.policy_version, batch, seconds, metrics, lags, len(dropped)
        )
        row["collect_wait_s"] = wait_s
        row["learner_ranks"] = self.world_size
        append_jsonl(
            self.run_dir / "ledger.jsonl",
            {
                "epoch": epoch,
                "used": [t.trajectory_id for t in batch],
                "dropped_stale": dropped,
                "actors": dict(Counter(t.actor_id for t in batch)),
            },
        )
        self.recorder.record(row, batch)
        self.unacked += ids
        self.next_epoch += 1
        # 5. checkpoint, then ACK
        if self.next_epoch % cfg.save_every == 0 or self.next_epoch == cfg.num_epochs:
            self.checkpoint(epoch)
        return row

    def checkpoint(self, epoch: int) -> None:
        write_checkpoint(self.run_dir, epoch, self.learner, self.dedup.to_list())
        self.stream.ack(self.unacked)
        self.unacked = []

    def run(self) -> list[dict]:
        """Epochs until `num_epochs`; returns this call's metrics rows."""
        rows = []
        try:
            while self.next_epoch < self.cfg.num_epochs:
                rows.append(self.run_epoch())
        finally:
            if self.group is not None:
                from learner.group import STOP

                self.group.send(STOP)
                self.group.close()
        self.recorder.close()
        return rows

    def progress(self) -> dict:
        return {"epoch": self.next_epoch, "policy_version": self.learner.policy_version}

    def pid(self) -> int:
        return os.getpid()
