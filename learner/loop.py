"""The epoch loop of every run, distributed or in one process (`cluster.in_process`): one code path.

Per epoch:
  1. COLLECT     `samples_per_epoch` trajectories from a `TrajectorySource`: the Redis stream fed by sampling actors
                 (`StreamSource`, below), or a sampler in this process sharing the pipeline
  2. UPDATE      `Learner.train_epoch` (advantages, then DDPO-IS/SF or RWR)
  3. PUBLISH     open the next version's sampling quota, then publish the new policy
  4. RECORD      metrics.jsonl row, ledger.jsonl line, sample grid, held-out evaluation, curves (`EpochRecorder`)
  5. CHECKPOINT  every `save_every` epochs (and after the last); only then are the used entries acknowledged, so a
                 crash between checkpoints replays the same trajectories into the same epochs

Resume: the newest checkpoint in the run directory restores the learner and the source; rows of later epochs in
metrics.jsonl and ledger.jsonl (written by a process that died before checkpointing them) are dropped, so every
epoch has exactly one row.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import redis
import torch

from learner.checkpoint import latest_checkpoint, load_checkpoint, prune_checkpoints, save_checkpoint
from learner.learner import Learner
from services.config import TrainConfig
from services.keys import RunKeys
from services.lora import save_diffusers_lora
from services.quota import SamplingQuota
from services.rewards import TERM_PREFIX
from services.streams import Deduplicator, TrajectoryStream
from services.trajectory import ScoredTrajectory

logger = logging.getLogger(__name__)


@dataclass
class Collected:
    """One epoch's worth of trajectories from a source."""

    batch: list[ScoredTrajectory]
    ack_ids: list[str] = field(default_factory=list)  # source entries to acknowledge once checkpointed
    dropped: list[str] = field(default_factory=list)  # trajectory_ids dropped as older than max_policy_lag
    wait_s: float = 0.0  # seconds spent waiting for trajectories
    forged_trajectories: int = 0  # entries dropped because their MAC did not verify (services.signing)
    forged_weights: int = 0  # weight publications the actors refused as forged since the last collect


class TrajectorySource(Protocol):
    """Where the loop's trajectories come from."""

    def collect(self, n: int, version: int) -> Collected:
        """n trajectories usable by a learner at policy `version` (lag <= cluster.max_policy_lag)."""
        ...

    def open_version(self, version: int) -> None:
        """Called before `version` is published: let samplers produce what the learner will use of it."""
        ...

    def ack(self, ids: list[str]) -> None: ...

    def actor_idle_frac(self) -> float | None:
        """Fraction of the sampling actors' time since the last call spent waiting (quota, rewards, backlog)."""
        ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


Publish = Callable[[int, dict[str, torch.Tensor], bool], None]
"""(version, policy weights, rollback) -> None: make the learner's policy the samplers' policy."""


class EpochLoop:
    """COLLECT -> UPDATE -> PUBLISH -> RECORD -> CHECKPOINT for `num_epochs` epochs, resumable."""

    def __init__(
        self,
        cfg: TrainConfig,
        run_dir: Path,
        learner: Learner,
        source: TrajectorySource,
        publish: Publish,
        recorder_factory: Callable[[int], EpochRecorderLike],
        before_update: Callable[[list[ScoredTrajectory]], None] | None = None,
        finish_requested: Callable[[], bool] = lambda: False,
    ) -> None:
        self.cfg, self.run_dir, self.learner, self.source = cfg, Path(run_dir), learner, source
        self.publish = publish
        self.before_update = before_update  # e.g. send the batch to the other data-parallel ranks
        self.finish_requested = finish_requested  # asked between epochs: end the run early, checkpointed
        self.next_epoch = 0
        self.checkpointed_epoch = -1  # the newest epoch in a checkpoint
        self.unacked: list[str] = []  # entry ids used since the last checkpoint
        self.stop_reason: str | None = None
        self.resume()
        self.recorder = recorder_factory(self.next_epoch)

    # ---- resume ---------------------------------------------------------------------------------------------------
    def resume(self) -> None:
        ckpt = latest_checkpoint(self.run_dir)
        if ckpt is not None:
            state = load_checkpoint(ckpt)
            self.learner.load_state_dict(state["learner"])
            if (ckpt / "unet").is_dir():  # full fine-tuning keeps the UNet in the diffusers format only
                load_unet_weights(self.learner.unet, ckpt / "unet")
            self.source.load_state_dict(state.get("source", {"dedup": state.get("dedup", [])}))
            self.next_epoch = int(state["epoch"]) + 1
            self.checkpointed_epoch = int(state["epoch"])
            logger.info(
                "resumed from %s at epoch %d, policy version %d",
                ckpt,
                self.next_epoch,
                self.learner.policy_version,
            )
        done = self.next_epoch
        for name in ("metrics.jsonl", "ledger.jsonl"):
            _keep_rows(self.run_dir / name, lambda row, done=done: row["epoch"] < done)
        # (re)announce the policy this learner holds; after a resume it replaces anything published later
        self.source.open_version(self.learner.policy_version)
        self.publish(self.learner.policy_version, self.learner.policy_weights(), True)

    # ---- one epoch ------------------------------------------------------------------------------------------------
    def run_epoch(self) -> dict:
        cfg, epoch = self.cfg, self.next_epoch
        t0 = time.perf_counter()
        # 1. COLLECT
        got = self.source.collect(cfg.samples_per_epoch, self.learner.policy_version)
        version_before = self.learner.policy_version
        lags = [version_before - t.policy_version for t in got.batch]
        # 2. UPDATE
        if self.before_update is not None:
            self.before_update(got.batch)
        train_t0 = time.perf_counter()
        metrics = self.learner.train_epoch(got.batch, lags=lags)
        train_s = time.perf_counter() - train_t0
        # 3. PUBLISH
        self.source.open_version(self.learner.policy_version)
        self.publish(self.learner.policy_version, self.learner.policy_weights(), False)
        # 4. RECORD
        seconds = time.perf_counter() - t0
        row = epoch_metrics_row(epoch, self.learner.policy_version, got, seconds, metrics, lags)
        row.update(collect_wait_s=got.wait_s, train_s=train_s, actor_idle_frac=self.source.actor_idle_frac())
        row["learner_ranks"] = self.learner.world_size
        ledger = {
            "epoch": epoch,
            "used": [t.trajectory_id for t in got.batch],
            "dropped_stale": got.dropped,
            "actors": dict(Counter(t.actor_id for t in got.batch)),
        }
        append_jsonl(self.run_dir / "ledger.jsonl", ledger)
        self.recorder.record(row, got.batch)
        self.unacked += got.ack_ids
        self.next_epoch += 1
        # 5. CHECKPOINT, then ACK
        self.stop_reason = getattr(self.recorder, "stop_reason", None)  # the reward-hacking guard tripped
        if self.next_epoch % cfg.save_every == 0 or self.next_epoch == cfg.num_epochs or self.stop_reason:
            self.checkpoint(epoch)
        return row

    def checkpoint(self, epoch: int) -> Path:
        use_lora = self.cfg.model.use_lora
        state = {
            "learner": self.learner.state_dict(include_policy=use_lora),
            "source": self.source.state_dict(),
            "epoch": epoch,
        }
        unet = self.learner.unet

        def write_policy(directory: Path) -> None:
            if use_lora:
                save_diffusers_lora(unet, directory / "lora")
                with self.learner.ema_weights() as ema:
                    if ema:
                        save_diffusers_lora(unet, directory / "lora_ema")
            else:
                unet.save_pretrained(directory / "unet", safe_serialization=True)

        path = save_checkpoint(self.run_dir, epoch, state, write_extra=write_policy)
        prune_checkpoints(self.run_dir, self.cfg.save_keep_last)
        self.source.ack(self.unacked)
        self.unacked = []
        self.checkpointed_epoch = epoch
        return path

    def run(self, on_row: Callable[[dict], None] | None = None) -> list[dict]:
        """Epochs until `num_epochs`, the guard's stop or a finish request (calling `on_row` with each metrics row);
        returns this call's rows. The last epoch run is always in a checkpoint."""
        rows = []
        while self.next_epoch < self.cfg.num_epochs:
            if self.finish_requested():
                logger.info("run finished on request after epoch %d", self.next_epoch - 1)
                break
            rows.append(self.run_epoch())
            if on_row is not None:
                on_row(rows[-1])
            if self.stop_reason:
                logger.warning("run stopped after epoch %d: %s", self.next_epoch - 1, self.stop_reason)
                break
        if self.next_epoch - 1 > self.checkpointed_epoch:
            self.checkpoint(self.next_epoch - 1)
        self.recorder.close()
        return rows


class EpochRecorderLike(Protocol):
    def record(self, row: dict, batch: list[ScoredTrajectory]) -> None: ...

    def close(self) -> None: ...


def epoch_metrics_row(
    epoch: int,
    policy_version: int,
    got: Collected,
    seconds: float,
    train_metrics: dict,
    lags: list[int],
) -> dict:
    """The metrics.jsonl row of one epoch (before evaluation keys are added)."""
    rewards = torch.tensor([t.reward for t in got.batch], dtype=torch.float64)
    used, dropped = len(got.batch), len(got.dropped)
    terms = {  # several reward terms: each term's mean (reward_info["reward/<name>"])
        f"{key}_mean": sum(float(t.reward_info[key]) for t in got.batch) / used
        for key in (got.batch[0].reward_info if got.batch else {})
        if key.startswith(TERM_PREFIX)
    }
    return {
        "epoch": epoch,
        "policy_version": policy_version,
        "reward_mean": float(rewards.mean()),
        "reward_std": float(rewards.std(unbiased=False)),
        **terms,
        "samples": used,
        "samples_per_s": used / seconds if seconds > 0 else None,
        **train_metrics,
        "policy_lag_mean": sum(lags) / len(lags) if lags else 0.0,
        "policy_lag_max": max(lags, default=0),
        "dropped_stale": dropped,
        "dropped_stale_frac": dropped / (used + dropped) if used + dropped else 0.0,
        "forged_trajectories": got.forged_trajectories,
        "forged_weights": got.forged_weights,
        "epoch_s": seconds,
        "time": time.time(),
    }


def load_unet_weights(unet: torch.nn.Module, directory: Path) -> None:
    """Load a diffusers-format UNet directory's weights into `unet` in place (full fine-tuning's resume)."""
    trained = type(unet).from_pretrained(directory, torch_dtype=torch.float32)
    unet.load_state_dict(trained.state_dict())


def _keep_rows(path: Path, keep: Callable[[dict], bool]) -> None:
    """Keep only the JSONL rows for which keep(row) is true (resume drops rows of epochs not in the checkpoint)."""
    if not path.exists():
        return
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows if keep(r)))


def append_jsonl(path: Path, row: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


# ---- the distributed loop's source: the run's Redis stream --------------------------------------------------------
# The distributed loop's trajectory source: the run's Redis stream, fed by the sampling actors.
#
# `collect` reads until it has n fresh trajectories: its own pending entries first (after a restart), duplicates
# acknowledged and skipped (delivery is at-least-once), trajectories older than `max_policy_lag` versions dropped.
# Forged entries (MAC not verifying under the run secret) never reach it: the stream acknowledges them into its
# dead-letter stream, and they count neither as consumed nor against the quota (actors never claimed them).
# Dropped and lost samples are replaced by raising the sampling quota (`services.quota`).
CONSUMER = "learner-0"  # a fixed name: after a restart the learner gets its own pending entries back first


class StreamSource:
    def __init__(self, cfg: TrainConfig, client: redis.Redis, run_id: str, stream: TrajectoryStream) -> None:
        self.cfg = cfg
        self._r = client
        self.run_id = run_id
        self.stream = stream
        self.quota = SamplingQuota(
            client, run_id, cfg.samples_per_epoch, cfg.sampling.batch_size, cfg.cluster.max_policy_lag
        )
        self.dedup = Deduplicator()
        self.consumed = 0  # trajectories used or dropped so far (duplicates excluded)
        self.held: list[tuple[str, ScoredTrajectory]] = []  # read but not needed yet
        self.partial: dict[str, list[tuple[str, ScoredTrajectory]]] = {}  # groups still missing members
        self._actor_times: dict[str, tuple[float, float]] = {}
        self._started = False
        self.forged_weights_seen = 0  # the actors' weights:forged counter at the last collect

    # ---- state ----------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "dedup": self.dedup.to_list(),
            "consumed": self.consumed,
            "forged_weights_seen": self.forged_weights_seen,
        }

    def load_state_dict(self, state: dict) -> None:
        self.dedup = Deduplicator.from_list(state.get("dedup", []))
        self.consumed = int(state.get("consumed", 0))
        self.forged_weights_seen = int(state.get("forged_weights_seen", 0))

    # ---- quota ----------------------------------------------------------------------------------------------------
    def open_version(self, version: int) -> None:
        if not self._started:  # at start or resume: what is in the stream now was claimed already
            self._started = True
            self.quota.reset(self.consumed + self.stream.length())
            self.actor_idle_frac()  # baseline of the actors' clocks
        self.quota.open(version, self.consumed, epochs_left=self.cfg.num_epochs - version)

    # ---- collect --------------------------------------------------------------------------------------------------
    def collect(self, n: int, version: int) -> Collected:
        max_lag = self.cfg.cluster.max_policy_lag
        got = Collected(batch=[])
        forged_before = self.stream.forged
        t0 = last_arrival = time.perf_counter()
        while len(got.batch) < n:
            entries, self.held = self.held, []
            if not entries:
                entries = self.stream.read(CONSUMER, count=n - len(got.batch), block_ms=500)
            if entries:
                last_arrival = time.perf_counter()
            dropped_before = len(got.dropped)
            for entry_id, traj in entries:
                if len(got.batch) >= n:
                    self.held.append((entry_id, traj))
                    continue
                for member_id, member in self._whole_group(entry_id, traj, got):
                    got.ack_ids.append(member_id)
                    if self.dedup.seen(member.trajectory_id):
                        continue  # a redelivered duplicate: acknowledge, never train twice
                    self.consumed += 1
                    if version - member.policy_version > max_lag:
                        got.dropped.append(member.trajectory_id)
                        continue
                    got.batch.append(member)
            self.quota.extend(version, len(got.dropped) - dropped_before)  # replacements for what was dropped
            if time.perf_counter() - last_arrival > self.cfg.cluster.lag0_starvation_s:
                # claimed samples that never arrived (a crashed actor's batch): let the actors claim them again
                self.quota.extend(version, n - len(got.batch))
                logger.warning(
                    "learner: no trajectory for %.0fs; re-opened %d samples of version %d's quota",
                    self.cfg.cluster.lag0_starvation_s, n - len(got.batch), version,
                )  # fmt: skip
                last_arrival = time.perf_counter()
        got.wait_s = time.perf_counter() - t0
        got.forged_trajectories = self.stream.forged - forged_before
        forged_weights = int(self._r.get(RunKeys(self.run_id).weights_forged) or 0)
        got.forged_weights = max(0, forged_weights - self.forged_weights_seen)
        self.forged_weights_seen = forged_weights
        return got

    def _whole_group(
        self, entry_id: str, traj: ScoredTrajectory, got: Collected
    ) -> list[tuple[str, ScoredTrajectory]]:
        """The entries of traj's group once all `sampling.group_size` of them have arrived, else [] (the group waits,
        across epochs if need be: an epoch never holds part of a group). Group size 1: the entry itself."""
        size = self.cfg.sampling.group_size
        if size == 1 or not traj.group_id:
            return [(entry_id, traj)]
        members = self.partial.setdefault(traj.group_id, [])
        if any(m.trajectory_id == traj.trajectory_id for _, m in members):
            got.ack_ids.append(entry_id)  # the same sample delivered twice while its group waits
            return []
        members.append((entry_id, traj))
        if len(members) < size:
            return []
        return self.partial.pop(traj.group_id)

    def ack(self, ids: list[str]) -> None:
        self.stream.ack(ids)

    # ---- what the actors did --------------------------------------------------------------------------------------
    def actor_idle_frac(self) -> float | None:
        """1 - (sampling seconds / wall seconds) summed over the actors since the last call; None without data."""
        busy = wall = 0.0
        for actor, raw in self._r.hgetall(RunKeys(self.run_id).actor_time).items():
            now = json.loads(raw)
            b, w = float(now["busy_s"]), float(now["wall_s"])
            pb, pw = self._actor_times.get(actor, (0.0, 0.0))
            if w < pw:  # a restarted actor: its clock started again
                pb, pw = 0.0, 0.0
            busy, wall = busy + b - pb, wall + w - pw
            self._actor_times[actor] = (b, w)
        return max(0.0, 1.0 - busy / wall) if wall > 0 else None
