"""The `ddpo` command as a user runs it (subprocesses)."""

from __future__ import annotations

import json
import subprocess
import sys

import yaml

METRIC_KEYS = {"epoch", "policy_version", "reward_mean", "reward_std", "samples", "samples_per_s", "approx_kl",
               "clipfrac", "loss", "policy_lag_mean", "dropped_stale"}  # fmt: skip


def ddpo(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.app.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=600)  # fmt: skip


def test_tiny_models_writes_a_loadable_pipeline(tmp_path):
    out = ddpo("tiny-models", "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "sd")
    assert pipe.unet.config.sample_size == 8 and pipe.tokenizer.model_max_length == 77


def test_train_writes_the_run_directory(tiny_sd_path, tmp_path):
    run = tmp_path / "run"
    out = ddpo("train", "--config", "quickstart", "--run-dir", str(run),
               "--set", f"model.pretrained={tiny_sd_path}", "--set", "num_epochs=2", "--set", "save_every=1",
               "--set", "sampling.num_steps=4", "--set", "sampling.batch_size=4",
               "--set", "training.batch_size=4", "--set", "training.gradient_accumulation_steps=1")  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["num_epochs"] == 2 and cfg["sampling"]["num_steps"] == 4
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1] and [r["policy_version"] for r in rows] == [1, 2]
    assert set(rows[0]) >= METRIC_KEYS
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["epoch_0000", "epoch_0001"]


def test_bad_config_fails_at_start_naming_the_key(tmp_path):
    out = ddpo("train", "--run-dir", str(tmp_path / "r"), "--set", "sampling.eat=1")
    assert out.returncode == 2
    assert "sampling.eat: unknown key" in out.stderr and "Traceback" not in out.stderr
