"""The distributed loop's trajectory source: the run's Redis stream, fed by the sampling actors.

`collect` reads until it has n fresh trajectories: its own pending entries first (after a restart), duplicates
acknowledged and skipped (delivery is at-least-once), trajectories older than `max_policy_lag` versions dropped.
Dropped and lost samples are replaced by raising the sampling quota (`services.quota`).
"""

from __future__ import annotations

import json
import logging
import time

import redis

from learner.loop import Collected
from services.config import TrainConfig
from services.quota import SamplingQuota
from services.streams import Deduplicator, TrajectoryStream
from services.trajectory import ScoredTrajectory

logger = logging.getLogger(__name__)

CONSUMER = "learner-0"  # a fixed name: after a restart the learner gets its own pending entries back first


def actor_time_key(run_id: str) -> str:
    """Hash actor_id -> JSON {"busy_s", "wall_s"}: each sampling actor's cumulative sampling and total seconds."""
    return f"ddpo:{run_id}:actor_time"


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
        self._actor_times: dict[str, tuple[float, float]] = {}
        self._started = False

    # ---- state ----------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"dedup": self.dedup.to_list(), "consumed": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        self.dedup = Deduplicator.from_list(state.get("dedup", []))
        self.consumed = int(state.get("consumed", 0))

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
                got.ack_ids.append(entry_id)
                if self.dedup.seen(traj.trajectory_id):
                    continue  # a redelivered duplicate: acknowledge, never train twice
                self.consumed += 1
                if version - traj.policy_version > max_lag:
                    got.dropped.append(traj.trajectory_id)
                    continue
                got.batch.append(traj)
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
        return got

    def ack(self, ids: list[str]) -> None:
        self.stream.ack(ids)

    # ---- what the actors did --------------------------------------------------------------------------------------
    def actor_idle_frac(self) -> float | None:
        """1 - (sampling seconds / wall seconds) summed over the actors since the last call; None without data."""
        busy = wall = 0.0
        for actor, raw in self._r.hgetall(actor_time_key(self.run_id)).items():
            now = json.loads(raw)
            b, w = float(now["busy_s"]), float(now["wall_s"])
            pb, pw = self._actor_times.get(actor, (0.0, 0.0))
            if w < pw:  # a restarted actor: its clock started again
                pb, pw = 0.0, 0.0
            busy, wall = busy + b - pb, wall + w - pw
            self._actor_times[actor] = (b, w)
        return max(0.0, 1.0 - busy / wall) if wall > 0 else None
