"""A data-parallel learner group: N ranks with torch.distributed (NCCL on GPUs, gloo on CPUs).

Rank 0 is the `LearnerWorker` (stream, weights, checkpoints). Every epoch it sends the epoch's batch to the other
ranks over a gloo side channel; every rank then runs `Learner.train_epoch`, which splits the micro-batches across
ranks and sums gradients before each optimizer step, so all ranks hold identical weights. At start rank 0 sends
its full learner state (fresh or resumed), so the other ranks need no shared filesystem. Payloads are safetensors
bytes (no pickle).
"""

from __future__ import annotations

import json
import logging
import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from learner.checkpoint import flatten_state, unflatten_state
from learner.learner import Learner
from services.models import worker_config
from services.trajectory import ScoredTrajectory, decode_trajectory, encode_trajectory

logger = logging.getLogger(__name__)

STOP, STATE, BATCH = 0, 1, 2


def node_address() -> str:
    """host:port on this node for rank 0's rendezvous (the node's IP as Ray sees it, a free port)."""
    # lazily: the driver imports this module before it prepares a local Ray, and Ray reads that setting at import
    import ray

    ip = ray.util.get_node_ip_address()
    with socket.socket() as s:
        s.bind((ip, 0))
        return f"{ip}:{s.getsockname()[1]}"


class LearnerGroup:
    """Membership in the learner process group plus a gloo channel for rank 0's messages."""

    def __init__(self, rank: int, world_size: int, master: str, timeout_s: float = 1800) -> None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(
            backend, init_method=f"tcp://{master}", rank=rank, world_size=world_size,
            timeout=timedelta(seconds=timeout_s),
        )  # fmt: skip
        self.rank, self.world_size = rank, world_size
        self.channel = dist.new_group(backend="gloo") if backend != "gloo" else dist.group.WORLD
        logger.info("learner rank %d/%d joined (%s) at %s", rank, world_size, backend, master)

    def send(self, kind: int, payload: bytes = b"") -> None:
        """Rank 0: broadcast one message."""
        header = torch.tensor([kind, len(payload)], dtype=torch.int64)
        dist.broadcast(header, src=0, group=self.channel)
        if payload:
            dist.broadcast(torch.frombuffer(bytearray(payload), dtype=torch.uint8), src=0, group=self.channel)

    def recv(self) -> tuple[int, bytes]:
        """Other ranks: receive rank 0's next message."""
        header = torch.empty(2, dtype=torch.int64)
        dist.broadcast(header, src=0, group=self.channel)
        kind, size = int(header[0]), int(header[1])
        if not size:
            return kind, b""
        data = torch.empty(size, dtype=torch.uint8)
        dist.broadcast(data, src=0, group=self.channel)
        return kind, data.numpy().tobytes()

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


_SKELETON = "__skeleton__"  # the JSON structure travels as a uint8 tensor beside the state's tensors


def encode_state(state: dict) -> bytes:
    """A learner state dict (tensors, numbers, strings, nested) -> safetensors bytes."""
    skeleton, tensors = flatten_state(state)
    tensors[_SKELETON] = torch.frombuffer(bytearray(json.dumps(skeleton).encode()), dtype=torch.uint8)
    return st_save(tensors)


def decode_state(payload: bytes) -> dict:
    tensors = st_load(payload)
    skeleton = json.loads(tensors.pop(_SKELETON).numpy().tobytes())
    return unflatten_state(skeleton, tensors)


def encode_batch(batch: list[ScoredTrajectory]) -> bytes:
    """Trajectories (latents in their own dtype: lossless) as length-prefixed codec payloads."""
    parts = [encode_trajectory(t, t.latents.dtype) for t in batch]
    lengths = torch.tensor([len(p) for p in parts], dtype=torch.int64)
    return len(parts).to_bytes(8, "little") + lengths.numpy().tobytes() + b"".join(parts)


def decode_batch(payload: bytes) -> list[ScoredTrajectory]:
    count = int.from_bytes(payload[:8], "little")
    lengths = torch.frombuffer(bytearray(payload[8 : 8 + 8 * count]), dtype=torch.int64).tolist()
    out, offset = [], 8 + 8 * count
    for n in lengths:
        out.append(decode_trajectory(payload[offset : offset + n]))
        offset += n
    return out


class LearnerRank:
    """Ranks 1..N-1: receive rank 0's state once, then train on each epoch's batch until told to stop."""

    def __init__(self, cfg_json: str, rank: int, world_size: int, master: str) -> None:
        self.cfg_json, self.rank, self.world_size, self.master = cfg_json, rank, world_size, master

    def pid(self) -> int:
        return os.getpid()

    def run(self) -> int:
        """Returns the number of epochs trained."""
        cfg = worker_config(self.cfg_json)
        group = LearnerGroup(self.rank, self.world_size, self.master)
        epochs = 0
        try:
            learner = Learner(cfg)
            while True:
                kind, payload = group.recv()
                if kind == STOP:
                    return epochs
                if kind == STATE:
                    learner.load_state_dict(decode_state(payload))
                elif kind == BATCH:
                    batch = decode_batch(payload)
                    # the same lags as rank 0 (its version and this rank's move together): the per-lag statistics
                    # are summed over ranks, so every rank must hold the same lag groups
                    lags = [learner.policy_version - t.policy_version for t in batch]
                    learner.train_epoch(batch, lags=lags)
                    epochs += 1
        finally:
            group.close()
