"""Checkpoints without pickle: tensors in safetensors, everything else in JSON.

Layout: RUN_DIR/checkpoints/epoch_NNNN/{tensors.safetensors, state.json} plus what `write_extra` adds (the policy
in the diffusers format: `lora/`, or `unet/` under full fine-tuning). Everything is written to a temporary
directory that is renamed into place last, so a crash never leaves a half-written "newest" checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

logger = logging.getLogger(__name__)

_TENSOR = "__tensor__"


def flatten_state(
    obj: Any, prefix: str = "", tensors: dict[str, torch.Tensor] | None = None
) -> tuple[Any, dict]:
    """Nested dicts/lists with tensors -> (JSON skeleton with {"__tensor__": key} leaves, {key: tensor})."""
    tensors = {} if tensors is None else tensors
    if isinstance(obj, torch.Tensor):
        key = prefix or "root"
        tensors[key] = obj.detach().cpu().contiguous()
        return {_TENSOR: key}, tensors
    if isinstance(obj, dict):
        skeleton = {"__dict__": [[k, flatten_state(v, f"{prefix}.{k}" if prefix else str(k), tensors)[0]]
                                 for k, v in obj.items()]}  # fmt: skip
        return skeleton, tensors
    if isinstance(obj, list | tuple):
        return [flatten_state(v, f"{prefix}.{i}", tensors)[0] for i, v in enumerate(obj)], tensors
    return obj, tensors


def unflatten_state(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of `flatten_state` (dict keys keep their type: ints stay ints, as optimizer states need)."""
    if isinstance(skeleton, dict) and _TENSOR in skeleton:
        return tensors[skeleton[_TENSOR]]
    if isinstance(skeleton, dict) and "__dict__" in skeleton:
        return {k: unflatten_state(v, tensors) for k, v in skeleton["__dict__"]}
    if isinstance(skeleton, list):
        return [unflatten_state(v, tensors) for v in skeleton]
    return skeleton


def save_checkpoint(
    run_dir: str | Path, epoch: int, state: dict, write_extra: Callable[[Path], None] | None = None
) -> Path:
    """Write `state` (and whatever `write_extra(directory)` writes) as checkpoints/epoch_{epoch:04d} atomically;
    returns its path."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"epoch_{epoch:04d}"
    tmp = root / f".tmp_epoch_{epoch:04d}_{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    skeleton, tensors = flatten_state(state)
    save_file(tensors, str(tmp / "tensors.safetensors"))
    if write_extra is not None:
        write_extra(tmp)
    (tmp / "state.json").write_text(json.dumps(skeleton))  # last: a directory with state.json is complete
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    logger.info("checkpoint written: %s", final)
    return final


def prune_checkpoints(run_dir: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` complete checkpoints (0 keeps all); returns the deleted paths."""
    if keep_last <= 0:
        return []
    root = Path(run_dir) / "checkpoints"
    found = sorted(p for p in root.glob("epoch_*") if (p / "state.json").exists())
    doomed = found[:-keep_last]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    root = Path(run_dir) / "checkpoints"
    found = sorted(p for p in root.glob("epoch_*") if (p / "state.json").exists())
    return found[-1] if found else None


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    tensors = load_file(str(path / "tensors.safetensors"))
    return unflatten_state(json.loads((path / "state.json").read_text()), tensors)
