"""The learner of the distributed loop: the epoch loop (`learner.loop.EpochLoop`) on the run's Redis stream, publishing
on the weight channel. A plain class; the Ray actor is a thin shell created by the driver, and a test can drive it.
With data-parallel learners this is rank 0: it also sends the state and each epoch's batch to the other ranks.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from learner.group import BATCH, STATE, STOP, LearnerGroup, encode_batch, encode_state, node_address
from learner.learner import Learner
from learner.loop import CONSUMER, EpochLoop, StreamSource
from learner.recorder import EpochRecorder
from services.keys import RunKeys
from services.models import DTYPES, worker_config
from services.signing import RunSigner
from services.streams import TrajectoryStream, WeightChannel, redis_client

logger = logging.getLogger(__name__)


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
        run_secret: str | None = None,
    ) -> None:
        """`run_secret` (else DDPO_RUN_SECRET): the learner signs the weights it publishes and drops trajectories
        whose MAC does not verify (`services.signing`); neither set: signing off."""
        self.cfg = cfg = worker_config(cfg_json)
        signer = RunSigner.for_run(run_id, run_secret)
        self.world_size = world_size
        self.group = None
        self.replicas = replicas or {}
        self.run_id = run_id
        self.run_dir = Path(run_dir)
        self.redis = redis_client(redis_url)
        self.redis.hset(RunKeys(run_id).pids, CONSUMER, os.getpid())
        self.stream = TrajectoryStream(
            self.redis,
            run_id,
            max_backlog=cfg.cluster.stream_max_backlog,
            min_idle_ms=cfg.cluster.reclaim_idle_ms,
            latent_dtype=DTYPES[cfg.cluster.latent_dtype],
            signer=signer,
        )
        self.channel = WeightChannel(self.redis, run_id, signer=signer)
        self.loop: EpochLoop | None = None
        if world_size == 1:
            self.setup()

    def master_address(self) -> str:
        """Rendezvous address of the learner group on this node (data-parallel learners only)."""
        return node_address()

    def setup(self, master: str | None = None) -> None:
        """Join the learner group (if data-parallel), build the learner, resume, announce the weights."""
        cfg = self.cfg
        before_update = None
        if self.world_size > 1:
            self.group = LearnerGroup(0, self.world_size, master)
            group = self.group

            def before_update(batch) -> None:  # every rank trains on the same batch, each on its share
                group.send(BATCH, encode_batch(batch))

        learner = Learner(cfg)
        source = StreamSource(cfg, self.redis, self.run_id, self.stream)
        self.loop = EpochLoop(
            cfg,
            self.run_dir,
            learner,
            source,
            publish=lambda version, weights, rollback: self.channel.publish(
                version, weights, rollback=rollback
            ),
            recorder_factory=lambda first_epoch: EpochRecorder(
                cfg, self.run_dir, learner, self.replicas, resume_epoch=first_epoch
            ),
            before_update=before_update,
            finish_requested=lambda: bool(self.redis.exists(RunKeys(self.run_id).finish)),
        )
        if self.group is not None:  # the other ranks start from exactly this (fresh or resumed) state
            self.group.send(STATE, encode_state(learner.state_dict()))

    @property
    def learner(self) -> Learner:
        return self.loop.learner

    @property
    def next_epoch(self) -> int:
        return self.loop.next_epoch

    def run_epoch(self) -> dict:
        return self.loop.run_epoch()

    def run(self) -> list[dict]:
        """Epochs until `num_epochs`; returns this call's metrics rows."""
        try:
            return self.loop.run()
        finally:
            if self.group is not None:
                self.group.send(STOP)
                self.group.close()

    def progress(self) -> dict:
        return {"epoch": self.loop.next_epoch, "policy_version": self.loop.learner.policy_version}

    def pid(self) -> int:
        return os.getpid()
