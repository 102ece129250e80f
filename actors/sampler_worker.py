"""A sampling worker of the distributed loop: sample -> (score in flight) -> stream, applying new LoRA versions
between batches. A plain class: the Ray actor is a thin shell created by the driver, and a test can drive it.

Per batch:
  1. WEIGHTS   apply the newest published LoRA (never in the middle of a batch), then claim the batch from the
               sampling quota (`services.quota`): nothing is sampled that the learner could not use within
               `max_policy_lag` versions; when the quota is used up, wait for the next version
  2. SAMPLE    one batch of trajectories with log-probs under the applied version
  3. SCORE     hand the images to the reward (HTTP client or a local thread) and go on sampling; at most
               `max_inflight_batches` batches are being scored at once
  4. STREAM    scored batches go to the Redis trajectory stream (waiting while the backlog is full)
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import logging
import os
import time
from collections import deque
from dataclasses import dataclass

import torch

from actors.reward_client import RewardRequestError, SyncRewardClient
from actors.sampler import Sampler
from learner.learner_worker import worker_config
from learner.stream_source import actor_time_key
from services.images import tensor_to_pil
from services.infra import redis_client
from services.models import DTYPES
from services.quota import SamplingQuota
from services.streams import Backpressure, TrajectoryStream, WeightChannel, WeightSubscriber
from services.trajectory import Trajectory, split_scored

logger = logging.getLogger(__name__)


def run_keys(run_id: str) -> dict[str, str]:
    """Redis keys of a run's control plane (the data plane's keys live in services.streams):
    stop = set when the run is over; quota:V = samples claimed for policy version V (max_policy_lag 0);
    pids = hash actor_id -> process id (for operators, and for fault tests)."""
    return {"stop": f"ddpo:{run_id}:stop", "quota": f"ddpo:{run_id}:quota:", "pids": f"ddpo:{run_id}:pids"}


@dataclass
class _InFlight:
    traj: Trajectory
    version: int
    future: cf.Future
    attempts: int = 1


class SamplerWorker:
    """Produces scored trajectories into the run's stream until the run's stop flag is set."""

    def __init__(
        self, cfg_json: str, run_id: str, redis_url: str, actor_id: str, replicas: dict[str, list[str]]
    ) -> None:
        self.cfg = cfg = worker_config(cfg_json)
        self.actor_id = actor_id
        self.run_id = run_id
        self.keys = run_keys(run_id)
        self.redis = redis_client(redis_url)
        self.redis.hset(self.keys["pids"], actor_id, os.getpid())
        self.stream = TrajectoryStream(
            self.redis,
            run_id,
            max_backlog=cfg.cluster.stream_max_backlog,
            latent_dtype=DTYPES[cfg.cluster.latent_dtype],
            record_produced=True,
        )
        self.weights = WeightSubscriber(WeightChannel(self.redis, run_id))
        self.quota = SamplingQuota(
            self.redis, run_id, cfg.samples_per_epoch, cfg.sampling.batch_size, cfg.cluster.max_policy_lag
        )
        self.started = time.perf_counter()
        self.sampler = Sampler(cfg, actor_id=actor_id)
        if cfg.reward.mode == "http":
            self.client = SyncRewardClient.from_config(cfg.reward, replicas)
            self.local_pool = None
        else:
            self.client = None
            self.local_pool = cf.ThreadPoolExecutor(1, thread_name_prefix="local-reward")
        self.inflight: deque[_InFlight] = deque()
        self.stats = {"batches": 0, "samples": 0, "sample_s": 0.0, "stream_wait_s": 0.0, "weight_loads": 0}

    # ---- control ----------------------------------------------------------------------------------------------
    def pid(self) -> int:
        return os.getpid()

    def stopped(self) -> bool:
        return bool(self.redis.exists(self.keys["stop"]))

    # ---- 1. WEIGHTS --------------------------------------------------------------------------------------------
    def apply_newest_weights(self) -> None:
        update = self.weights.poll()
        if update is not None:
            version, state = update
            self.sampler.load_policy(version, state)
            self.stats["weight_loads"] += 1
            logger.info("%s: applied policy version %d", self.actor_id, version)

    def claim_quota(self) -> bool:
        """Reserve batch_size samples of the current version's quota, or wait (a short while) for the next version.
        Returns True when a batch may be sampled now."""
        if self.quota.claim(self.sampler.policy_version):
            return True
        update = self.weights.wait(timeout_s=0.5, poll_s=0.1)
        if update is not None:
            self.sampler.load_policy(*update)
            self.stats["weight_loads"] += 1
        return False

    def report_time(self) -> None:
        """Cumulative sampling and wall seconds, for the learner's actor_idle_frac."""
        times = {"busy_s": self.stats["sample_s"], "wall_s": time.perf_counter() - self.started}
        self.redis.hset(actor_time_key(self.run_id), self.actor_id, json.dumps(times))

    # ---- 3. SCORE ----------------------------------------------------------------------------------------------
    def _submit_scoring(self, traj: Trajectory) -> cf.Future:
        images = tensor_to_pil(traj.images)
        metadata = [{} for _ in traj.prompts]
        if self.client is not None:
            return self.client.submit(self.cfg.reward.name, images, traj.prompts, metadata)
        return self.local_pool.submit(self.sampler.reward_fn, images, traj.prompts, metadata)

    # ---- 4. STREAM ---------------------------------------------------------------------------------------------
    def _finish(self, item: _InFlight) -> bool:
        """Stream a scored batch; False if scoring failed transiently and was resubmitted (nothing is lost)."""
        try:
            scores, info = item.future.result()
        except RewardRequestError as err:
            if err.status is not None and 400 <= err.status < 500 and err.status != 429:
                logger.error("%s: reward rejected a batch (%s); dropping it", self.actor_id, err)
                return True
            return self._resubmit(item, err)
        except (OSError, TimeoutError, RuntimeError) as err:
            return self._resubmit(item, err)
        records = split_scored(item.traj, torch.as_tensor(scores), info, item.version, self.actor_id)
        t0 = time.perf_counter()
        while True:
            try:
                self.stream.add_many(records, block_s=1.0)
                break
            except Backpressure as bp:
                records = records[len(bp.added_ids) :]
                if self.stopped():
                    return True
        self.stats["stream_wait_s"] += time.perf_counter() - t0
        self.stats["samples"] += len(records)
        return True

    def _resubmit(self, item: _InFlight, err: Exception) -> bool:
        delay = min(30.0, 2.0**item.attempts)
        logger.warning("%s: scoring failed (%s); retrying the batch in %.0fs", self.actor_id, err, delay)
        time.sleep(delay)
        item.future = self._submit_scoring(item.traj)
        item.attempts += 1
        self.inflight.appendleft(item)
        return False

    def _drain(self, block: bool) -> None:
        """Stream finished batches in order; with block, wait until there is room for one more in flight."""
        limit = self.cfg.cluster.max_inflight_batches
        while self.inflight and (self.inflight[0].future.done() or (block and len(self.inflight) >= limit)):
            self._finish(self.inflight.popleft())

    # ---- the loop ----------------------------------------------------------------------------------------------
    def run(self, max_batches: int | None = None) -> dict:
        """Sample until the stop flag (or `max_batches`); returns counters."""
        while not self.stopped() and (max_batches is None or self.stats["batches"] < max_batches):
            self.apply_newest_weights()
            if not self.claim_quota():
                self._drain(block=False)
                self.report_time()
                continue
            t0 = time.perf_counter()
            traj = self.sampler.sample()
            self.stats["sample_s"] += time.perf_counter() - t0
            self.stats["batches"] += 1
            self.inflight.append(_InFlight(traj, self.sampler.policy_version, self._submit_scoring(traj)))
            self._drain(block=True)
            self.report_time()
        while self.inflight and not self.stopped():
            self._finish(self.inflight.popleft())
        return dict(self.stats)

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
        if self.local_pool is not None:
            self.local_pool.shutdown(wait=False)
        self.weights.close()
