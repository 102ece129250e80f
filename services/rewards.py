"""Rewards that run inside the sampling process, without HTTP.

Every reward has one signature: ``(images, prompts, metadata) -> (scores, info)`` where ``images`` is a list of
RGB PIL images, ``scores`` is a float32 tensor [B] and ``info`` a dict of per-sample lists (JSON-serialisable).
Rewards behind HTTP servers (aesthetic, prompt alignment) have the same shape in ``actors.reward_client``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image

from services.images import jpeg_kb

RewardFn = Callable[
    [Sequence[Image.Image], Sequence[str], Sequence[dict[str, Any]]], tuple[torch.Tensor, dict]
]


def jpeg_compressibility(
    images: Sequence[Image.Image], prompts: Sequence[str], metadata: Sequence[dict[str, Any]]
) -> tuple[torch.Tensor, dict]:
    """Minus the kB of a quality-95 JPEG: smaller files score higher."""
    kb = [jpeg_kb(im) for im in images]
    return -torch.tensor(kb, dtype=torch.float32), {"jpeg_kb": kb}


def jpeg_incompressibility(
    images: Sequence[Image.Image], prompts: Sequence[str], metadata: Sequence[dict[str, Any]]
) -> tuple[torch.Tensor, dict]:
    """The kB of a quality-95 JPEG: larger files score higher."""
    kb = [jpeg_kb(im) for im in images]
    return torch.tensor(kb, dtype=torch.float32), {"jpeg_kb": kb}


LOCAL_REWARDS: dict[str, RewardFn] = {
    "jpeg_compressibility": jpeg_compressibility,
    "jpeg_incompressibility": jpeg_incompressibility,
}
