"""Data-parallel learner: 2 gloo ranks that split the epoch's micro-batches and sum gradients take exactly the
update of 1 rank on the same batch."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from actors.sampler import Sampler
from learner.learner import Learner
from services.app.infra import free_port
from services.config import build_config
from services.models import load_pipeline
from services.trajectory import decode_trajectory, encode_trajectory


def config(tiny_sd_path: str, objective: str):
    return build_config({
        "seed": 3,
        "model": {"pretrained": tiny_sd_path, "dtype": "float32", "device": "cpu"},
        "sampling": {"num_steps": 4, "batch_size": 4, "num_batches_per_epoch": 2},
        # 8 samples, micro-batches of 2, 4 per optimizer step -> one update, 2 micro-batches on each of 2 ranks
        "training": {"objective": objective, "batch_size": 2, "gradient_accumulation_steps": 4,
                     "learning_rate": 1e-2, "clip_range": 0.05},
        "stat_tracking": {"enabled": True, "min_count": 2},
        "prompts": {"set": "list", "items": ["a cat", "a dog"]},
    })  # fmt: skip


def _rank_main(rank: int, world: int, port: int, jobs: list[tuple[str, str, str]]) -> None:
    """One rank: for each (config JSON, batch dir, out dir), one epoch on the batch; rank 0 saves the weights."""
    from services.config import TrainConfig

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for cfg_json, batch_dir, out_dir in jobs:
            cfg = TrainConfig.model_validate_json(cfg_json)
            batch = [decode_trajectory(p.read_bytes()) for p in sorted(Path(batch_dir).iterdir())]
            learner = Learner(cfg)
            assert (learner.rank, learner.world_size) == (rank, world)
            learner.train_epoch(batch)
            if rank == 0:
                torch.save(learner.policy_weights(), os.path.join(out_dir, "lora.pt"))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_match_one_rank(tiny_sd_path, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the ranks run single-threaded: same reduction order inside each kernel
    try:
        _compare_one_and_two_ranks(tiny_sd_path, tmp_path)
    finally:
        torch.set_num_threads(threads)


def _compare_one_and_two_ranks(tiny_sd_path, tmp_path):
    jobs, expected = [], {}
    for objective in ("ddpo_is", "rwr"):
        cfg = config(tiny_sd_path, objective)
        sampler = Sampler(cfg, pipeline=load_pipeline(cfg.model, cfg.lora, seed=cfg.seed))
        batch = sampler.sample_scored() + sampler.sample_scored()
        batch_dir, out_dir = tmp_path / f"batch-{objective}", tmp_path / f"out-{objective}"
        batch_dir.mkdir()
        out_dir.mkdir()
        for i, t in enumerate(batch):  # float32 latents: the ranks get exactly this batch
            (batch_dir / f"{i:03d}.st").write_bytes(encode_trajectory(t, torch.float32))
        single = Learner(cfg)
        local = [decode_trajectory((batch_dir / f"{i:03d}.st").read_bytes()) for i in range(len(batch))]
        single.train_epoch(local)
        expected[objective] = single.policy_weights()
        jobs.append((cfg.model_dump_json(), str(batch_dir), str(out_dir)))
    mp.spawn(_rank_main, args=(2, free_port(), jobs), nprocs=2)  # one process group for both objectives
    for objective, (_, _, out_dir) in zip(expected, jobs, strict=True):
        got = torch.load(Path(out_dir) / "lora.pt", weights_only=True)
        want = expected[objective]
        assert got.keys() == want.keys()
        moved = max(float(v.abs().max()) for k, v in want.items() if "lora_B" in k)
        assert moved > 1e-4, "the update did not move the LoRA: the comparison would be vacuous"
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-5, msg=f"{objective}: {k}")
