"""Shared fixtures: offline hub, small thread count, and the tiny random-weight models written once per session."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# local Ray clusters of the tests keep every socket on 127.0.0.1 (Ray's single-machine mode; see services/infra.py)
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_sd_path(tmp_path_factory) -> str:
    """A tiny Stable Diffusion pipeline written by the same code as `ddpo tiny-models` (DIR/sd)."""
    from services.tiny_models import write_tiny_sd

    return str(write_tiny_sd(tmp_path_factory.mktemp("tiny") / "sd"))


@pytest.fixture
def tiny_train_config(tiny_sd_path):
    """A factory of small, valid TrainConfigs on the tiny model; keyword sections override the defaults."""
    from services.config import build_config

    def make(**sections) -> object:
        tree = {
            "seed": 0,
            "model": {"pretrained": tiny_sd_path, "dtype": "float32", "device": "cpu"},
            "sampling": {"num_steps": 8, "batch_size": 4, "num_batches_per_epoch": 1},
            "training": {"batch_size": 2, "gradient_accumulation_steps": 1},
            "stat_tracking": {"enabled": False},
            "prompts": {"set": "list", "items": ["a cat", "a dog"]},
        }
        for key, value in sections.items():
            if isinstance(value, dict):
                tree.setdefault(key, {}).update(value)
            else:
                tree[key] = value
        return build_config(tree)

    return make
