"""What an epoch leaves in the run directory besides checkpoints: the metrics.jsonl row, the sample grid, the held-out
evaluation, the reward curve, TensorBoard; and report.html at the end."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from learner.learner import Learner
from learner.loop import append_jsonl
from services.artifacts import RunArtifacts
from services.config import TrainConfig
from services.diffusion import decode_latents
from services.evaluation import eval_reward_names, evaluate, score_fns_for
from services.images import tensor_to_pil
from services.report import write_report
from services.reward_client import SyncRewardClient
from services.rewards import is_local
from services.trajectory import ScoredTrajectory

logger = logging.getLogger(__name__)


class EpochRecorder:
    def __init__(
        self,
        cfg: TrainConfig,
        run_dir: Path,
        learner: Learner,
        replicas: dict[str, list[str]],
        resume_epoch: int | None = None,
    ) -> None:
        self.cfg, self.run_dir, self.learner = cfg, Path(run_dir), learner
        self.artifacts = RunArtifacts(run_dir, cfg, resume_epoch=resume_epoch)
        self.client = None
        if cfg.evaluation.every and not all(is_local(name) for name in eval_reward_names(cfg)):
            self.client = SyncRewardClient.from_config(cfg.reward, replicas)
        self.score_fns = score_fns_for(cfg, self.client) if cfg.evaluation.every else {}
        self.guard_best: float | None = None
        self.stop_reason: str | None = None  # set when the reward-hacking guard stops the run

    def _eval_due(self, epoch: int) -> bool:
        every = self.cfg.evaluation.every
        return bool(every) and ((epoch + 1) % every == 0 or epoch + 1 == self.cfg.num_epochs)

    def record(self, row: dict, batch: list[ScoredTrajectory]) -> None:
        epoch = row["epoch"]
        if self._eval_due(epoch):
            with self.learner.ema_weights() as ema:  # the EMA's weights when training.ema_decay > 0
                result = evaluate(self.learner.pipe, self.cfg, self.score_fns, epoch)
            row.update(result.metrics())
            if ema:
                row["eval/uses_ema"] = 1.0
            self.artifacts.log_eval(epoch, result)
            self._check_guard(epoch, row)
        append_jsonl(self.run_dir / "metrics.jsonl", row)
        shown = batch[: self.cfg.logging.images_per_epoch]
        images = []
        if shown:
            x0 = torch.stack([t.x0 for t in shown]).to(self.learner.device)
            images = tensor_to_pil(decode_latents(self.learner.pipe, x0))
        self.artifacts.log_epoch(row, images, [t.prompt for t in shown], [t.reward for t in shown])
        self.artifacts.write_curves()

    def _check_guard(self, epoch: int, row: dict) -> None:
        """evaluation.guard: trip when the held-out reward falls more than max_drop below its best so far."""
        guard = self.cfg.evaluation.guard
        if guard is None:
            return
        value = row.get(f"eval/{guard.reward}_mean")
        if value is None:
            return
        if self.guard_best is None or value > self.guard_best:
            self.guard_best = value
        drop = self.guard_best - value
        if drop <= guard.max_drop:
            return
        reason = (
            f"reward-hacking guard: held-out {guard.reward} fell to {value:.4g} at epoch {epoch}, {drop:.4g} below its "
            f"best {self.guard_best:.4g} (evaluation.guard.max_drop={guard.max_drop})"
        )
        row["guard_tripped"] = 1.0
        append_jsonl(self.run_dir / "guard.jsonl", {
            "epoch": epoch, "reward": guard.reward, "value": value, "best": self.guard_best, "drop": drop,
            "max_drop": guard.max_drop, "action": guard.action, "reason": reason,
        })  # fmt: skip
        if guard.action == "stop":
            logger.warning("%s: stopping the run (a checkpoint of this epoch is written)", reason)
            self.stop_reason = reason
        else:
            logger.warning("%s (evaluation.guard.action=warn: going on)", reason)

    def close(self) -> None:
        self.artifacts.close()
        if self.client is not None:
            self.client.close()
        write_report(self.run_dir)
