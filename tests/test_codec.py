"""Trajectory/tensor codec: exact round trips, interop with the safetensors library, clear errors."""

from __future__ import annotations

import json
import struct
import warnings

import pytest
import safetensors.torch
import torch

from services.trajectory import (
    SCHEMA_VERSION,
    CodecError,
    SchemaVersionError,
    ScoredTrajectory,
    decode_tensors,
    decode_trajectory,
    encode_tensors,
    encode_trajectory,
)


def make_traj(t_steps: int = 5, seed: int = 0) -> ScoredTrajectory:
    g = torch.Generator().manual_seed(seed)
    return ScoredTrajectory(
        latents=torch.randn(t_steps + 1, 4, 8, 8, generator=g),  # [T+1, C, h, w] float32
        log_probs=torch.randn(t_steps, generator=g),  # [T]
        timesteps=torch.arange(t_steps * 100, 0, -100),  # [T]
        prompt="a cat riding a bike ✓",
        reward=-12.375,
        policy_version=7,
        actor_id="actor-3",
        reward_info={"jpeg_kb": 12.375, "answers": ["a cat"]},
    )


def assert_same_fields(a: ScoredTrajectory, b: ScoredTrajectory) -> None:
    for name in ("prompt", "reward", "policy_version", "actor_id", "trajectory_id", "reward_info"):
        assert getattr(a, name) == getattr(b, name), name


def test_fp32_round_trip_is_exact() -> None:
    t = make_traj()
    d = decode_trajectory(encode_trajectory(t, latent_dtype=torch.float32))
    assert d.latents.dtype == torch.float32 and torch.equal(d.latents, t.latents)
    assert d.log_probs.dtype == torch.float32 and torch.equal(d.log_probs, t.log_probs)
    assert d.timesteps.dtype == torch.int64 and torch.equal(d.timesteps, t.timesteps)
    assert_same_fields(t, d)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_latents_equal_cast(dtype: torch.dtype) -> None:
    t = make_traj()
    t.log_probs = t.log_probs.double()  # log-probs are always sent as float32
    d = decode_trajectory(encode_trajectory(t, latent_dtype=dtype))
    assert d.latents.dtype == dtype and torch.equal(d.latents, t.latents.to(dtype))
    assert d.log_probs.dtype == torch.float32 and torch.equal(d.log_probs, t.log_probs.float())
    assert_same_fields(t, d)


def test_decoded_tensors_are_writable_copies() -> None:
    payload = encode_trajectory(make_traj(), latent_dtype=torch.float32)
    d = decode_trajectory(payload)
    d.latents.zero_()  # must not touch the payload bytes
    assert not torch.equal(decode_trajectory(payload).latents, d.latents)


def test_zero_copy_decode_views_the_payload() -> None:
    t = make_traj()
    payload = bytearray(encode_trajectory(t, latent_dtype=torch.float32))
    d = decode_trajectory(payload, copy=False)
    assert torch.equal(d.latents, t.latents) and torch.equal(d.log_probs, t.log_probs)
    d.latents.zero_()  # documented: the tensors are views of the buffer
    assert torch.equal(decode_trajectory(payload).latents, torch.zeros_like(t.latents))
    # views of immutable bytes work too (the trajectory stream decodes Redis replies this way), without warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        d = decode_trajectory(bytes(encode_trajectory(t)), copy=False)
    assert torch.equal(d.latents, t.latents.bfloat16())


def test_payload_is_standard_safetensors() -> None:
    t = make_traj()
    loaded = safetensors.torch.load(encode_trajectory(t, latent_dtype=torch.float32))
    assert torch.equal(loaded["latents"], t.latents) and torch.equal(loaded["timesteps"], t.timesteps)
    # and the library's own bytes decode with our decoder
    sd = {"a.lora_A": torch.randn(4, 16), "a.lora_B": torch.zeros(16, 4, dtype=torch.bfloat16)}
    meta = {
        "ddpo.schema": str(SCHEMA_VERSION),
        "ddpo.kind": "tensors",
        "ddpo.meta": json.dumps({"version": 3}),
    }
    tensors, m = decode_tensors(safetensors.torch.save(sd, meta))
    assert m == {"version": 3} and all(torch.equal(tensors[k], sd[k]) for k in sd)


def test_tensors_round_trip_keeps_dtypes_and_meta() -> None:
    sd = {
        "w": torch.randn(3, 5),
        "h": torch.randn(2, 2).half(),
        "i": torch.arange(4, dtype=torch.int32),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
        "mask": torch.tensor([True, False]),
        "strided": torch.randn(4, 6)[:, ::2],  # non-contiguous input is packed
    }
    tensors, meta = decode_tensors(encode_tensors(sd, {"version": 11, "note": "x"}))
    assert meta == {"version": 11, "note": "x"}
    assert set(tensors) == set(sd)
    for k, v in sd.items():
        assert tensors[k].dtype == v.dtype and torch.equal(tensors[k], v), k


def _replace_meta(payload: bytes, key: str, value: str) -> bytes:
    """Rewrite one __metadata__ entry of a safetensors buffer (keeping the data offsets valid)."""
    (n,) = struct.unpack_from("<Q", payload, 0)
    header = json.loads(payload[8 : 8 + n])
    header["__metadata__"][key] = value
    hb = json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    return struct.pack("<Q", len(hb)) + hb + payload[8 + n :]


def test_schema_version_mismatch_is_a_clear_error() -> None:
    payload = _replace_meta(encode_trajectory(make_traj()), "ddpo.schema", str(SCHEMA_VERSION + 1))
    with pytest.raises(SchemaVersionError, match="schema version"):
        decode_trajectory(payload)


def test_wrong_kind_and_corruption_raise_codec_error() -> None:
    with pytest.raises(CodecError, match="kind"):
        decode_trajectory(encode_tensors({"x": torch.ones(2)}, {}))
    payload = encode_trajectory(make_traj())
    with pytest.raises(CodecError):
        decode_trajectory(payload[: len(payload) // 2])  # truncated
    with pytest.raises(CodecError):
        decode_trajectory(b"not a payload at all")
    with pytest.raises(CodecError):
        decode_trajectory(b"\xff" * 8 + b"{}")
    with pytest.raises(CodecError, match="ddpo.schema"):
        decode_trajectory(safetensors.torch.save({"x": torch.ones(1)}))


def test_header_that_does_not_tile_the_data_is_rejected() -> None:
    payload = encode_tensors({"a": torch.ones(4), "b": torch.ones(4)}, {})
    (n,) = struct.unpack_from("<Q", payload, 0)
    header = json.loads(payload[8 : 8 + n])
    header["b"]["data_offsets"] = header["a"]["data_offsets"]  # overlap + a gap
    hb = json.dumps(header).encode()
    with pytest.raises(CodecError, match="gap or overlap"):
        decode_tensors(struct.pack("<Q", len(hb)) + hb + payload[8 + n :])
    with pytest.raises(CodecError, match="covers"):
        decode_tensors(payload + b"\0" * 8)  # trailing bytes


def test_inconsistent_shapes_are_rejected() -> None:
    t = make_traj()
    t.timesteps = t.timesteps[:-1]
    with pytest.raises(CodecError, match="inconsistent"):
        decode_trajectory(encode_trajectory(t))


def test_bad_latent_dtype_is_refused() -> None:
    with pytest.raises(ValueError, match="latent_dtype"):
        encode_trajectory(make_traj(), latent_dtype=torch.int8)
