"""The one epoch loop in its in-process mode: resume without duplicate rows, full fine-tuning checkpoints, and the
quickstart's first update in every base dtype."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from services.app.cli import main as cli_main

SMALL = [
    "cluster.in_process=true",
    "sampling.num_steps=4",
    "sampling.batch_size=8",
    "sampling.num_batches_per_epoch=1",
    "training.batch_size=8",
    "training.gradient_accumulation_steps=1",
    "evaluation.every=0",
    "logging.images_per_epoch=2",
    "logging.tensorboard=false",
    "model.write_tiny_if_missing=false",
]


def train(tiny_sd_path: str, run_dir: Path, *overrides: str, resume: bool = False) -> list[dict]:
    sets = [f"model.pretrained={tiny_sd_path}", *SMALL, *overrides]
    args = ["train", "--resume", str(run_dir)] if resume else ["train", "--run-dir", str(run_dir)]
    cli_main([*args, *[x for s in sets for x in ("--set", s)]])
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_in_process_resume_continues_with_the_next_epoch(tiny_sd_path, tmp_path):
    run = tmp_path / "run"
    rows = train(tiny_sd_path, run, "num_epochs=2", "save_every=1")
    assert [r["epoch"] for r in rows] == [0, 1]
    rows = train(tiny_sd_path, run, "num_epochs=3", resume=True)
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    assert [r["policy_version"] for r in rows] == [1, 2, 3]
    ledger = [json.loads(line) for line in (run / "ledger.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in ledger] == [0, 1, 2]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "epoch_0000",
        "epoch_0001",
        "epoch_0002",
    ]
    assert rows[-1]["actor_idle_frac"] is not None and 0 < rows[-1]["actor_idle_frac"] < 1
    assert rows[-1]["dropped_stale_frac"] == 0.0 and rows[-1]["policy_lag_max"] == 0


def test_full_fine_tuning_checkpoints_the_unet_and_resumes(tiny_sd_path, tmp_path):
    from diffusers import UNet2DConditionModel

    run = tmp_path / "full"
    rows = train(tiny_sd_path, run, "num_epochs=2", "save_every=1", "model.use_lora=false",
                 "training.learning_rate=1e-4")  # fmt: skip
    assert [r["epoch"] for r in rows] == [0, 1] and rows[-1]["grad_norm"] > 0
    ckpt = run / "checkpoints" / "epoch_0001"
    assert not (ckpt / "lora").exists()
    trained = UNet2DConditionModel.from_pretrained(ckpt / "unet")
    base = UNet2DConditionModel.from_pretrained(Path(tiny_sd_path) / "unet")
    moved = [n for n, p in trained.state_dict().items() if not torch.equal(p, base.state_dict()[n])]
    assert moved, "full fine-tuning changed no UNet weight"
    # the learner state does not store the UNet a second time
    assert not any(k.startswith("learner.policy") for k in load_file(ckpt / "tensors.safetensors"))
    rows = train(tiny_sd_path, run, "num_epochs=3", resume=True)
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    resumed = UNet2DConditionModel.from_pretrained(run / "checkpoints" / "epoch_0002" / "unet")
    assert any(not torch.equal(p, trained.state_dict()[n]) for n, p in resumed.state_dict().items())


def _policy(run: Path) -> torch.Tensor:
    """The LoRA after the run's first epoch, as one flat float32 vector (keys in sorted order)."""
    tensors = load_file(run / "checkpoints" / "epoch_0000" / "tensors.safetensors")
    keys = sorted(k for k in tensors if k.startswith("learner.policy."))
    return torch.cat([tensors[k].float().reshape(-1) for k in keys])


@pytest.mark.slow
def test_first_update_points_the_same_way_in_every_base_dtype(tiny_sd_path, tmp_path):
    """`ddpo train --config quickstart --set model.dtype=...` on the CPU: the dtype runs as named (float16 with loss
    scaling), and the LoRA after one epoch moved in the float32 run's direction."""
    from services.config import load_config
    from services.models import load_pipeline, policy_state_dict

    cfg = load_config("quickstart", [f"model.pretrained={tiny_sd_path}"])
    initial = policy_state_dict(load_pipeline(cfg.model, cfg.lora, seed=cfg.seed).unet)
    start = torch.cat([initial[k.removeprefix("learner.policy.")].float().reshape(-1) for k in
                       sorted(f"learner.policy.{k}" for k in initial)])  # fmt: skip
    deltas, rows = {}, {}
    for dtype in ("float32", "bfloat16", "float16"):
        run = tmp_path / dtype
        rows[dtype] = train(tiny_sd_path, run, "num_epochs=1", f"model.dtype={dtype}")[0]
        deltas[dtype] = _policy(run) - start
    assert "grad_scale" in rows["float16"] and rows["float16"]["grad_scale"] > 1
    assert "grad_scale" not in rows["bfloat16"] and "grad_scale" not in rows["float32"]
    for dtype in ("bfloat16", "float16"):
        assert rows[dtype]["skipped_steps"] == 0
        cos = torch.nn.functional.cosine_similarity(deltas[dtype].double(), deltas["float32"].double(), dim=0)
        # Adam's first step is about lr * sign(g) per entry, so this cosine measures sign agreement of every LoRA
        # gradient entry, tiny ones included (bfloat16 keeps 8 mantissa bits: measured 0.88; a random direction: 0)
        assert cos > 0.8, (dtype, float(cos))
