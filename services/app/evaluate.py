"""`ddpo eval RUN_DIR`: (re)compute the held-out evaluation of a run's checkpoints from its directory."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

from services.artifacts import write_eval_files
from services.config import ConfigError, TrainConfig, load_config
from services.evaluation import (
    EvalResult,
    checkpoint_dirs,
    checkpoint_epoch,
    eval_prompts_and_seeds,
    eval_reward_names,
    evaluate,
    policy_dir,
    score_fns_for,
)
from services.lora import load_inference_pipeline, load_policy_into_pipeline
from services.reward_client import SyncRewardClient
from services.rewards import is_local

logger = logging.getLogger(__name__)


def reward_client_for(cfg: TrainConfig) -> SyncRewardClient | None:
    """A SyncRewardClient on the configured server URLs, or None when every evaluated reward is local.

    Spawned servers of the training run are gone after it: give their URLs with --set reward.servers.KIND.urls=[..].
    """
    if all(is_local(name) for name in eval_reward_names(cfg)):
        return None
    replicas = {kind: list(server.urls) for kind, server in cfg.reward.servers.items() if server.urls}
    if not replicas:
        raise ConfigError(
            "evaluation needs reward servers but reward.servers has no urls; "
            "add --set reward.servers.KIND.urls=[http://HOST:PORT]"
        )
    return SyncRewardClient.from_config(cfg.reward, replicas)


def evaluate_run(
    run_dir: str | Path,
    checkpoints: Sequence[str] | None = None,
    overrides: Sequence[str] | None = None,
    progress: bool = True,
) -> list[EvalResult]:
    """(Re)compute the held-out evaluation of a run's checkpoints: eval/epoch_NNNN.json + images/eval_epoch_NNNN.png.

    The run's config.yaml (plus `overrides`, e.g. evaluation.prompts or reward server URLs) fixes the prompts, seeds,
    sampler settings and rewards. TensorBoard and metrics.jsonl are left as training wrote them.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"not a run directory (no config.yaml): {run_dir}")
    cfg = load_config(str(run_dir / "config.yaml"), list(overrides or []))
    eval_prompts_and_seeds(cfg)  # fail on a missing prompt list before loading anything
    dirs = checkpoint_dirs(run_dir, checkpoints)
    pipe = load_inference_pipeline(cfg.model)
    client = reward_client_for(cfg)
    results = []
    try:
        score_fns = score_fns_for(cfg, client)
        for path in dirs:
            load_policy_into_pipeline(pipe, policy_dir(path))
            result = evaluate(pipe, cfg, score_fns, checkpoint_epoch(path), progress=progress)
            json_path, grid_path = write_eval_files(run_dir, result)
            logger.info("evaluated %s: %s (%s, %s)", path.name, result.metrics(), json_path, grid_path)
            results.append(result)
    finally:
        if client is not None:
            client.close()
    return results


def run_eval(args: argparse.Namespace) -> list[Path]:
    """The `ddpo eval` command; returns the eval/epoch_NNNN.json paths written."""
    results = evaluate_run(args.run_dir, args.checkpoint, args.overrides)
    return [Path(args.run_dir) / "eval" / f"epoch_{r.epoch:04d}.json" for r in results]
