"""The sampling side: `Sampler` (a plain class: prompts -> trajectories with log-probs -> scores) and `SamplerWorker`,
the sampling actor of the distributed loop (the Ray actor is a thin shell the driver creates; a test can drive it).

SamplerWorker, per batch:
  1. WEIGHTS   apply the newest published policy (never in the middle of a batch), then claim the batch from the
               sampling quota (`services.quota`): nothing is sampled that the learner could not use within
               `max_policy_lag` versions; when the quota is used up, wait for the next version
  2. SAMPLE    one batch of trajectories with log-probs under the applied version (`services.diffusion`)
  3. SCORE     hand the images to the reward (`services.reward_client.Scorer`: in this process or over HTTP) and go on
               sampling; at most `max_inflight_batches` batches are being scored at once
  4. STREAM    scored batches go to the Redis trajectory stream (waiting while the backlog is full)
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import logging
import os
import time
import uuid
import zlib
from collections import deque
from dataclasses import dataclass

import torch

from services.config import TrainConfig
from services.diffusion import policy_for, sample_trajectory
from services.images import tensor_to_pil
from services.keys import RunKeys
from services.models import DTYPES, autocast, load_pipeline, load_policy_state_dict, worker_config
from services.prompts import PromptSampler
from services.quota import SamplingQuota
from services.reward_client import RewardRequestError, Scorer
from services.signing import RunSigner
from services.streams import Backpressure, TrajectoryStream, WeightChannel, WeightSubscriber, redis_client
from services.trajectory import ScoredTrajectory, Trajectory, split_scored

logger = logging.getLogger(__name__)


def actor_seed(seed: int, actor_id: str) -> int:
    """A stable per-actor seed (zlib.crc32, unlike hash(), does not change between processes)."""
    return (seed * 1_000_003 + zlib.crc32(actor_id.encode())) % 2**63


class Sampler:
    """Samples batches of trajectories under the current policy version and scores them with a local reward."""

    def __init__(
        self,
        cfg: TrainConfig,
        pipeline=None,
        actor_id: str = "local",
        scorer: Scorer | None = None,
    ) -> None:
        self.cfg = cfg
        self.actor_id = actor_id
        self.pipe = (
            pipeline
            if pipeline is not None
            else load_pipeline(cfg.model, cfg.lora, seed=cfg.seed, perf=cfg.performance)
        )
        self.denoiser = policy_for(self.pipe).denoiser  # the UNet or transformer that the LoRA adapts
        seed = actor_seed(cfg.seed, actor_id)
        self.prompt_sampler = PromptSampler(cfg.prompts, seed)
        self.generator = torch.Generator(device=self.denoiser.device).manual_seed(seed)
        self._scorer = scorer
        self.policy_version = 0

    def load_policy(self, version: int, weights: dict[str, torch.Tensor]) -> None:
        """Apply a new LoRA version (call between batches, never during one)."""
        load_policy_state_dict(self.denoiser, weights)
        self.policy_version = version

    def sample(
        self, prompts: list[str] | None = None, generator: torch.Generator | None = None
    ) -> Trajectory:
        """One batch of `sampling.batch_size` trajectories (prompts drawn from the prompt set unless given).

        With `sampling.group_size` k, batch_size / k prompts are drawn and each is sampled k times in a row; the k
        samples share a group id."""
        s = self.cfg.sampling
        k = s.group_size
        group_ids: list[str] = []
        if prompts is None:
            draws = self.prompt_sampler.sample(s.batch_size // k)
            prompts = [p for p in draws for _ in range(k)]
            if k > 1:
                group_ids = [gid for gid in (uuid.uuid4().hex for _ in draws) for _ in range(k)]
        with autocast(self.cfg.performance, self.denoiser.device):
            traj = sample_trajectory(
                self.pipe,
                prompts,
                num_steps=s.num_steps,
                guidance_scale=s.guidance_scale,
                eta=s.eta,
                negative_prompt=s.negative_prompt,
                generator=generator or self.generator,
                resolution=s.resolution,
                latent_dtype=DTYPES[self.cfg.cluster.latent_dtype],
                sde_window=s.sde_window,
            )
        traj.group_ids = group_ids
        return traj

    @property
    def scorer(self) -> Scorer:
        """The run's reward (made on first use: a sampler that only samples needs none)."""
        if self._scorer is None:
            self._scorer = Scorer(self.cfg.reward)
        return self._scorer

    def score(self, traj: Trajectory) -> tuple[torch.Tensor, dict]:
        """Rewards [B] and per-sample info of a batch (waits for them)."""
        scores, info = self.scorer.score(tensor_to_pil(traj.images), traj.prompts, [{} for _ in traj.prompts])
        return torch.as_tensor(scores, dtype=torch.float32), info

    def sample_scored(self) -> list[ScoredTrajectory]:
        """Sample one batch and score it: the whole sampling side of DDPO, without Ray or a stream."""
        traj = self.sample()
        rewards, info = self.score(traj)
        return split_scored(traj, rewards, info, self.policy_version, self.actor_id)


# ---- the sampling actor of the distributed loop --------------------------------------------------------------------
@dataclass
class _InFlight:
    traj: Trajectory
    version: int
    future: cf.Future
    attempts: int = 1


class SamplerWorker:
    """Produces scored trajectories into the run's stream until the run's stop flag is set."""

    def __init__(
        self,
        cfg_json: str,
        run_id: str,
        redis_url: str,
        actor_id: str,
        replicas: dict[str, list[str]],
        run_secret: str | None = None,
    ) -> None:
        """`run_secret` (else DDPO_RUN_SECRET): the actor signs its trajectories and refuses weight versions whose
        signature does not verify (`services.signing`); neither set: signing off."""
        self.cfg = cfg = worker_config(cfg_json)
        signer = RunSigner.for_run(run_id, run_secret)
        self.actor_id = actor_id
        self.run_id = run_id
        self.keys = RunKeys(run_id)
        self.redis = redis_client(redis_url)
        self.redis.hset(self.keys.pids, actor_id, os.getpid())
        self.stream = TrajectoryStream(
            self.redis,
            run_id,
            max_backlog=cfg.cluster.stream_max_backlog,
            latent_dtype=DTYPES[cfg.cluster.latent_dtype],
            record_produced=True,
            signer=signer,
        )
        self.weights = WeightSubscriber(WeightChannel(self.redis, run_id, signer=signer))
        self.quota = SamplingQuota(
            self.redis, run_id, cfg.samples_per_epoch, cfg.sampling.batch_size, cfg.cluster.max_policy_lag
        )
        self.started = time.perf_counter()
        self.scorer = Scorer(cfg.reward, replicas)
        self.sampler = Sampler(cfg, actor_id=actor_id, scorer=self.scorer)
        self.inflight: deque[_InFlight] = deque()
        self.stats = {"batches": 0, "samples": 0, "sample_s": 0.0, "stream_wait_s": 0.0, "weight_loads": 0}

    # ---- control ----------------------------------------------------------------------------------------------
    def pid(self) -> int:
        return os.getpid()

    def stopped(self) -> bool:
        return bool(self.redis.exists(self.keys.stop))

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
        self.redis.hset(self.keys.actor_time, self.actor_id, json.dumps(times))

    # ---- 3. SCORE ----------------------------------------------------------------------------------------------
    def _submit_scoring(self, traj: Trajectory) -> cf.Future:
        return self.scorer.submit(tensor_to_pil(traj.images), traj.prompts, [{} for _ in traj.prompts])

    # ---- 4. STREAM ---------------------------------------------------------------------------------------------
    def _finish(self, item: _InFlight) -> None:
        """Stream a scored batch, or resubmit it if scoring failed transiently (nothing is lost)."""
        try:
            scores, info = item.future.result()
        except RewardRequestError as err:
            if err.status is not None and 400 <= err.status < 500 and err.status != 429:
                logger.error("%s: reward rejected a batch (%s); dropping it", self.actor_id, err)
                return
            self._resubmit(item, err)
            return
        except (OSError, TimeoutError, RuntimeError) as err:
            self._resubmit(item, err)
            return
        records = split_scored(item.traj, torch.as_tensor(scores), info, item.version, self.actor_id)
        t0 = time.perf_counter()
        pending = records
        while pending:
            try:
                self.stream.add_many(pending, block_s=1.0)
                pending = []
            except Backpressure as bp:
                pending = pending[len(bp.added_ids) :]
                if self.stopped():
                    break
        self.stats["stream_wait_s"] += time.perf_counter() - t0
        self.stats["samples"] += len(records) - len(pending)

    def _resubmit(self, item: _InFlight, err: Exception) -> None:
        delay = min(30.0, 2.0**item.attempts)
        logger.warning("%s: scoring failed (%s); retrying the batch in %.0fs", self.actor_id, err, delay)
        time.sleep(delay)
        item.future = self._submit_scoring(item.traj)
        item.attempts += 1
        self.inflight.appendleft(item)

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
        self.scorer.close()
        self.weights.close()
