"""The training driver: `ddpo train` and `python -m services.train` (also as `ray job submit -- ...`).

setup (config, run directory, models) -> train (epochs of SAMPLING then TRAINING) -> cleanup.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from services.config import TrainConfig, dump_config, load_config

logger = logging.getLogger(__name__)


# ---- setup ---------------------------------------------------------------------------------------------------------
def prepare_models(cfg: TrainConfig) -> None:
    """Write the tiny random model where the config asks for one and it is missing."""
    path = Path(cfg.model.pretrained)
    if cfg.model.write_tiny_if_missing and not path.exists():
        from services.tiny_models import write_tiny_models

        logger.info("writing tiny models to %s", path.parent)
        write_tiny_models(path.parent)


def make_run_dir(cfg: TrainConfig, run_dir: str | None) -> Path:
    path = Path(run_dir) if run_dir else Path("runs") / f"{cfg.run_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    path.mkdir(parents=True, exist_ok=True)
    (path / "checkpoints").mkdir(exist_ok=True)
    (path / "images").mkdir(exist_ok=True)
    (path / "config.yaml").write_text(dump_config(cfg))
    return path


class MetricsLog:
    """metrics.jsonl: one JSON object per learner epoch, appended and flushed as it happens."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, row: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def rows(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def banner(cfg: TrainConfig, run_dir: Path) -> str:
    return (
        f"DDPO run {run_dir}: objective={cfg.training.objective} reward={cfg.reward.name} "
        f"samples/epoch={cfg.samples_per_epoch} ({cfg.sampling.batch_size} x {cfg.sampling.num_batches_per_epoch}) "
        f"updates/epoch={cfg.updates_per_epoch} timesteps trained/sample={cfg.num_train_timesteps}/"
        f"{cfg.sampling.num_steps} epochs={cfg.num_epochs}"
    )


def epoch_row(epoch: int, version: int, rewards: list[float], seconds: float, train_metrics: dict) -> dict:
    """The metrics.jsonl row of one epoch (keys shared by the in-process and distributed loops)."""
    r = np.asarray(rewards, dtype=np.float64)
    return {
        "epoch": epoch,
        "policy_version": version,
        "reward_mean": float(r.mean()),
        "reward_std": float(r.std()),
        "samples": len(rewards),
        "samples_per_s": len(rewards) / seconds if seconds > 0 else None,
        **train_metrics,
    }


# ---- train (in process) --------------------------------------------------------------------------------------------
def run_local(cfg: TrainConfig, run_dir: Path, progress: bool = True) -> list[dict]:
    """The whole algorithm in one process: sampler and learner share one pipeline. Returns the metrics rows."""
    from tqdm.auto import tqdm

    from actors.sampler import Sampler
    from learner.checkpoint import save_checkpoint
    from learner.learner import Learner
    from services.models import load_pipeline

    torch.manual_seed(cfg.seed)
    pipe = load_pipeline(cfg.model, cfg.lora, seed=cfg.seed)
    sampler = Sampler(cfg, pipeline=pipe)
    learner = Learner(cfg, pipeline=pipe)
    log = MetricsLog(run_dir / "metrics.jsonl")
    rows = []
    bar = tqdm(range(cfg.num_epochs), desc="epochs", disable=not progress)
    for epoch in bar:
        t0 = time.perf_counter()
        # SAMPLING
        batch = []
        for _ in range(cfg.sampling.num_batches_per_epoch):
            batch += sampler.sample_scored()
        # TRAINING
        metrics = learner.train_epoch(batch, progress=progress)
        sampler.policy_version = (
            learner.policy_version
        )  # shared pipeline: the new weights are already in place
        row = epoch_row(
            epoch, learner.policy_version, [t.reward for t in batch], time.perf_counter() - t0, metrics
        )
        row.update({"policy_lag_mean": 0.0, "dropped_stale": 0})
        log.write(row)
        rows.append(row)
        bar.set_postfix(reward=f"{row['reward_mean']:.4f}", kl=f"{row['approx_kl'] or 0:.2e}")
        if (epoch + 1) % cfg.save_every == 0 or epoch + 1 == cfg.num_epochs:
            save_checkpoint(run_dir, epoch, {**learner.state_dict(), "epoch": epoch})
    return rows


# ---- entry points --------------------------------------------------------------------------------------------------
def main_from_args(args: argparse.Namespace) -> None:
    cfg = load_config(args.config, args.overrides)
    run_dir = make_run_dir(cfg, args.run_dir)
    logger.info(banner(cfg, run_dir))
    prepare_models(cfg)
    run_local(cfg, run_dir)
    logger.info("done: %s", run_dir)


def main(argv: list[str] | None = None) -> None:
    from services.cli import main as cli_main

    cli_main(["train", *(argv if argv is not None else __import__("sys").argv[1:])])


if __name__ == "__main__":
    main()
