"""The records that cross boundaries: a sampled batch (sampler -> scorer) and a scored sample (-> learner).

Shapes use B = batch, T = denoising steps, C/h/w = latent channels/height/width, H/W = image height/width.

WIRE FORMAT

Wire format for tensors that cross process boundaries: safetensors bytes with JSON metadata, never pickle.

A payload is a standard safetensors buffer (loadable by ``safetensors.torch.load``) whose ``__metadata__`` header
holds three string entries:

- ``ddpo.schema``: the schema version (``SCHEMA_VERSION``); a decoder refuses any other version;
- ``ddpo.kind``: ``"trajectory"`` (one ``ScoredTrajectory``) or ``"tensors"`` (e.g. a LoRA state dict);
- ``ddpo.meta``: a JSON object (prompt, reward, ids, policy version, reward info; or free metadata for tensors).

Both directions handle the safetensors layout (8-byte little-endian header length, JSON header, raw tensor bytes)
directly, because copies dominate the cost of an SD 1.5 trajectory (1.7 MB) next to a loopback Redis round trip:
``safetensors.torch.save`` copies every tensor twice where one ``bytes.join`` suffices, and decoding can return
tensors that view the payload itself (``copy=False``) instead of freshly allocated, page-faulting memory.
The decoder validates the header as strictly as the safetensors library; tests check both against it.
"""

from __future__ import annotations

import json
import logging
import math
import struct
import sys
import uuid
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Trajectory:
    """One sampled batch with everything needed to recompute its log-probabilities."""

    latents: torch.Tensor  # [B, T+1, C, h, w]  x_T, x_{T-1}, ..., x_0 (index i is the input of step i)
    log_probs: torch.Tensor  # [B, T] float32, log pi(x_{i+1} | x_i, c) of the sampled step
    timesteps: torch.Tensor  # [T] the scheduler timestep of each step: long (DDIM) or float32 (flow models)
    images: torch.Tensor  # [B, 3, H, W] float in [0, 1], decoded x_0
    prompts: list[str]  # [B]
    # [B] the samples of one prompt draw share a group id (sampling.group_size)
    group_ids: list[str] = field(default_factory=list)
    # [B, C, h, w] x_0 when the recorded window (sampling.sde_window) ends before the last step
    final_latents: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.prompts)


@dataclass
class ScoredTrajectory:
    """One sample with its reward: the unit that travels through the trajectory stream to the learner."""

    latents: torch.Tensor  # [T+1, C, h, w]
    log_probs: torch.Tensor  # [T] float32
    timesteps: torch.Tensor  # [T] long (DDIM) or float32 (flow models)
    prompt: str
    reward: float
    policy_version: int = 0  # LoRA version that sampled it
    actor_id: str = "local"
    trajectory_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    reward_info: dict[str, Any] = field(default_factory=dict)  # JSON-serialisable per-sample details
    group_id: str = ""  # the prompt draw it belongs to (sampling.group_size); "" = a group of its own
    final_latents: torch.Tensor | None = (
        None  # [C, h, w] x_0 when sampling.sde_window ends before the last step
    )

    @property
    def x0(self) -> torch.Tensor:
        """The final sample x_0 [C, h, w] (the image's latents)."""
        return self.latents[-1] if self.final_latents is None else self.final_latents

    @property
    def group(self) -> str:
        """The sample's group: its group id, or its own trajectory id when it has none."""
        return self.group_id or self.trajectory_id


def split_scored(
    traj: Trajectory,
    rewards: torch.Tensor,
    reward_info: dict[str, list[Any]],
    policy_version: int,
    actor_id: str = "local",
) -> list[ScoredTrajectory]:
    """Batch + rewards [B] + per-sample info lists -> one ScoredTrajectory per sample (tensors on the CPU)."""
    out = []
    latents, log_probs, timesteps = traj.latents.cpu(), traj.log_probs.float().cpu(), traj.timesteps.cpu()
    final = traj.final_latents.cpu() if traj.final_latents is not None else None
    for i, prompt in enumerate(traj.prompts):
        out.append(
            ScoredTrajectory(
                latents=latents[i].clone(),
                log_probs=log_probs[i].clone(),
                timesteps=timesteps.clone(),
                prompt=prompt,
                reward=float(rewards[i]),
                policy_version=policy_version,
                actor_id=actor_id,
                reward_info={k: v[i] for k, v in reward_info.items()},
                group_id=traj.group_ids[i] if traj.group_ids else "",
                final_latents=final[i].clone() if final is not None else None,
            )
        )
    return out


# ---- wire format -------------------------------------------------------------------------------------------------
logger = logging.getLogger(__name__)

if sys.byteorder != "little":  # the safetensors layout is little-endian; we write and view raw memory
    raise ImportError("services.codec needs a little-endian machine")

# Zero-copy decoding views immutable ``bytes``. torch warns once per process that it cannot mark such a tensor
# read-only; trigger that one warning here, silenced, instead of in the middle of a training run.
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    torch.frombuffer(b"\0", dtype=torch.uint8)

SCHEMA_VERSION = 1
KIND_TRAJECTORY = "trajectory"
KIND_TENSORS = "tensors"
LATENT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
TIMESTEP_DTYPES = (torch.int64, torch.float32)  # DDIM's integer timesteps; flow-matching models' float ones


def _timestep_dtype(timesteps: torch.Tensor) -> torch.dtype:
    """float32 for a flow model's float timesteps, int64 for DDIM's."""
    return torch.float32 if timesteps.is_floating_point() else torch.int64


# torch dtype <-> safetensors dtype tag (the subset we send).
_DTYPE_TAGS: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_TAG_DTYPES = {tag: dtype for dtype, tag in _DTYPE_TAGS.items()}
_MAX_HEADER = 100_000_000  # the safetensors library's own limit

Buffer = bytes | bytearray | memoryview


class CodecError(ValueError):
    """A payload that cannot be decoded: corrupt bytes, a missing field, or a wrong kind."""


class SchemaVersionError(CodecError):
    """A payload written with another schema version than this code understands."""


# ---- safetensors layout ---------------------------------------------------------------------------------------


def _serialize(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """Tensors (any device/layout) + string metadata -> safetensors bytes, copying each tensor's data once."""
    cpu = {}
    for name, tensor in tensors.items():
        if tensor.dtype not in _DTYPE_TAGS:
            raise TypeError(f"tensor {name!r} has unsupported dtype {tensor.dtype}")
        cpu[name] = tensor.detach().cpu().contiguous()
    # widest dtypes first: with the 8-byte aligned data start, every tensor is aligned to its element size
    order = sorted(cpu, key=lambda k: -cpu[k].element_size())
    header: dict[str, Any] = {"__metadata__": metadata}
    chunks: list[memoryview] = []
    offset = 0
    for name in order:
        t = cpu[name]
        data = memoryview(t.reshape(-1).view(torch.uint8).numpy())  # zero-copy byte view
        header[name] = {
            "dtype": _DTYPE_TAGS[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + data.nbytes],
        }
        chunks.append(data)
        offset += data.nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)  # pad with spaces like safetensors: data starts 8-aligned
    return b"".join([struct.pack("<Q", len(header_bytes)), header_bytes, *chunks])


def _read_header(payload: Buffer) -> tuple[dict[str, Any], int]:
    """(JSON header, offset where tensor data starts) of a safetensors buffer."""
    if len(payload) < 8:
        raise CodecError(f"payload of {len(payload)} bytes is too short for a safetensors header")
    (n,) = struct.unpack_from("<Q", payload, 0)
    if n > min(len(payload) - 8, _MAX_HEADER):
        raise CodecError(f"safetensors header length {n} exceeds payload size {len(payload)}")
    try:
        header = json.loads(bytes(payload[8 : 8 + n]))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CodecError(f"safetensors header is not valid JSON: {e}") from e
    if not isinstance(header, dict):
        raise CodecError("safetensors header is not a JSON object")
    return header, 8 + n


def _tensors(payload: Buffer, header: dict[str, Any], data_start: int, copy: bool) -> dict[str, torch.Tensor]:
    """Tensors described by ``header``; the spans must tile the data region exactly (no gaps, no overlaps)."""
    data_len = len(payload) - data_start
    out: dict[str, torch.Tensor] = {}
    spans: list[tuple[int, int]] = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _TAG_DTYPES[info["dtype"]]
            shape = [int(d) for d in info["shape"]]
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise CodecError(f"bad header entry for tensor {name!r}: {info!r:.200}") from e
        numel = math.prod(shape)
        itemsize = torch.empty((), dtype=dtype).element_size()
        if min(shape, default=0) < 0 or not 0 <= begin <= end <= data_len or end - begin != numel * itemsize:
            raise CodecError(
                f"tensor {name!r}: shape {shape} {info['dtype']} does not fit bytes [{begin}, {end})"
            )
        spans.append((begin, end))
        if numel == 0:
            out[name] = torch.empty(shape, dtype=dtype)
            continue
        t = torch.frombuffer(payload, dtype=dtype, count=numel, offset=data_start + begin).view(shape)
        out[name] = t.clone() if copy else t
    covered = 0
    for begin, end in sorted(spans):
        if begin != covered:
            raise CodecError(f"tensor data has a gap or overlap at byte {begin} (expected {covered})")
        covered = end
    if covered != data_len:
        raise CodecError(f"tensor data covers {covered} of {data_len} bytes (truncated or padded payload)")
    return out


def _metadata(kind: str, meta: Any) -> dict[str, str]:
    return {"ddpo.schema": str(SCHEMA_VERSION), "ddpo.kind": kind, "ddpo.meta": json.dumps(meta)}


def _deserialize(payload: Buffer, kind: str, copy: bool) -> tuple[dict[str, torch.Tensor], Any]:
    """Safetensors bytes -> (tensors, decoded ``ddpo.meta``), checking schema version and kind."""
    header, data_start = _read_header(payload)
    meta = header.get("__metadata__")
    if not isinstance(meta, dict) or "ddpo.schema" not in meta:
        raise CodecError("payload has no 'ddpo.schema' metadata: not written by services.codec")
    if meta["ddpo.schema"] != str(SCHEMA_VERSION):
        raise SchemaVersionError(
            f"payload schema version {meta['ddpo.schema']!r} != supported version {SCHEMA_VERSION}; "
            "producer and consumer run different code versions"
        )
    if meta.get("ddpo.kind") != kind:
        raise CodecError(f"payload kind is {meta.get('ddpo.kind')!r}, expected {kind!r}")
    try:
        user_meta = json.loads(meta.get("ddpo.meta", "{}"))
    except (TypeError, json.JSONDecodeError) as e:
        raise CodecError(f"payload 'ddpo.meta' is not valid JSON: {e}") from e
    return _tensors(payload, header, data_start, copy), user_meta


# ---- public API -------------------------------------------------------------------------------------------------


def encode_trajectory(t: ScoredTrajectory, latent_dtype: torch.dtype = torch.bfloat16) -> bytes:
    """One scored trajectory -> safetensors bytes; latents cast to ``latent_dtype``, log-probs f32, timesteps i64
    (DDIM's integer timesteps) or f32 (a flow model's, kept exactly).

    Cast latents on the sampling device before moving them to the CPU where possible: it halves the copy, and a
    CPU float32 -> bfloat16 cast is slow on small multi-threaded hosts.
    """
    if latent_dtype not in LATENT_DTYPES:
        raise ValueError(f"latent_dtype must be one of {LATENT_DTYPES}, got {latent_dtype}")
    tensors = {
        "latents": t.latents.detach().to(latent_dtype),  # [T+1, C, h, w]
        "log_probs": t.log_probs.detach().to(torch.float32),  # [T]
        "timesteps": t.timesteps.detach().to(_timestep_dtype(t.timesteps)),  # [T]
    }
    if t.final_latents is not None:  # x_0 after a stochastic window that ends early
        tensors["final_latents"] = t.final_latents.detach().to(latent_dtype)  # [C, h, w]
    meta = {
        "prompt": t.prompt,
        "reward": float(t.reward),
        "policy_version": int(t.policy_version),
        "actor_id": t.actor_id,
        "trajectory_id": t.trajectory_id,
        "reward_info": t.reward_info,
        "group_id": t.group_id,
    }
    return _serialize(tensors, _metadata(KIND_TRAJECTORY, meta))


def decode_trajectory(b: Buffer, copy: bool = True) -> ScoredTrajectory:
    """Bytes from ``encode_trajectory`` -> ScoredTrajectory (latents keep their wire dtype). Raises CodecError.

    ``copy=False`` returns tensors that view ``b`` (no allocation): use it when the caller owns ``b`` and drops it,
    as the trajectory stream does; writing to such tensors writes into ``b``.
    """
    tensors, meta = _deserialize(b, KIND_TRAJECTORY, copy)
    try:
        latents, log_probs, timesteps = tensors["latents"], tensors["log_probs"], tensors["timesteps"]
        traj = ScoredTrajectory(
            latents=latents,  # [T+1, C, h, w]
            log_probs=log_probs,  # [T] float32
            timesteps=timesteps,  # [T] int64 or float32
            prompt=str(meta["prompt"]),
            reward=float(meta["reward"]),
            policy_version=int(meta["policy_version"]),
            actor_id=str(meta["actor_id"]),
            trajectory_id=str(meta["trajectory_id"]),
            reward_info=dict(meta["reward_info"]),
            group_id=str(meta.get("group_id", "")),
            final_latents=tensors.get("final_latents"),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise CodecError(f"trajectory payload lacks or mistypes a field: {e!r}") from e
    t_steps = log_probs.shape[0] if log_probs.ndim == 1 else -1
    if (
        log_probs.dtype != torch.float32
        or timesteps.dtype not in TIMESTEP_DTYPES
        or timesteps.shape != (t_steps,)
        or latents.ndim != 4
        or latents.shape[0] != t_steps + 1
        or (traj.final_latents is not None and traj.final_latents.shape != latents.shape[1:])
    ):
        raise CodecError(
            f"inconsistent trajectory shapes: latents {tuple(latents.shape)}, log_probs "
            f"{tuple(log_probs.shape)} {log_probs.dtype}, timesteps {tuple(timesteps.shape)} {timesteps.dtype}"
        )
    return traj


def encode_tensors(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> bytes:
    """A state dict (dtypes kept) + JSON-serialisable metadata -> safetensors bytes."""
    return _serialize(tensors, _metadata(KIND_TENSORS, meta))


def decode_tensors(b: Buffer, copy: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Bytes from ``encode_tensors`` -> (state dict of CPU tensors, metadata). Raises CodecError.

    ``copy=False`` as in ``decode_trajectory``: the tensors view ``b``.
    """
    tensors, meta = _deserialize(b, KIND_TENSORS, copy)
    if not isinstance(meta, dict):
        raise CodecError(f"tensor payload metadata must be a JSON object, got {type(meta).__name__}")
    return tensors, meta
