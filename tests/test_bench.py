"""Benchmarks at `tiny` size with the fewest iterations: each prints one JSON line with its config, the machine and
`ratio`, and what it counts adds up. No time is asserted. (data-plane and weights: tests/test_streams.py.)"""

from __future__ import annotations

import json

import pytest
import redis
import torch

REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture(autouse=True)
def keep_torch_threads():
    """Benchmarks set torch's thread count for their process; give the rest of the session its own back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def printed_json(capsys: pytest.CaptureFixture[str], result: dict) -> dict:
    """The benchmark's stdout is one JSON line, equal to what main() returned."""
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    printed = json.loads(lines[0])
    assert printed == json.loads(json.dumps(result))
    assert "ratio" in printed and "config" in printed
    assert {"platform", "cpus", "torch", "device"} <= set(printed["machine"])
    return printed


def no_keys_left(run_id: str) -> bool:
    return not list(redis.Redis.from_url(REDIS_URL).scan_iter(match=f"ddpo:{run_id}:*", count=1000))


# ---- presets and the dispatcher ------------------------------------------------------------------------------------
def test_sd15_preset_has_sd15_parameter_counts() -> None:
    from bench.sd15 import build_sd15_pipeline

    pipe = build_sd15_pipeline("meta", torch.float16)  # architecture only: no memory, no init cost
    counts = {
        n: sum(p.numel() for p in getattr(pipe, n).parameters()) for n in ("unet", "text_encoder", "vae")
    }
    # SD 1.5's published sizes (runwayml/stable-diffusion-v1-5): UNet 859.52 M, CLIP ViT-L/14 text 123.06 M, VAE 83.65 M
    assert counts == {"unet": 859_520_964, "text_encoder": 123_060_480, "vae": 83_653_863}
    assert next(pipe.unet.parameters()).dtype == torch.float16
    assert pipe.vae_scale_factor == 8 and pipe.unet.config.sample_size * 8 == 512


def test_parse_fast_specs() -> None:
    from bench.sd15 import parse_fast, spec_of

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert parse_fast("none", cpu, "float32") is None
    fast = parse_fast("default", cuda, "float16")
    assert fast.dtype == "bfloat16" and fast.performance["compile_unet"] is True
    fast = parse_fast("autocast=bf16,channels_last=true", cpu, "float32")
    assert fast.dtype == "float32" and fast.performance == {"autocast": "bf16", "channels_last": True}
    assert parse_fast(spec_of(fast), cpu, "float16") == fast
    with pytest.raises(ValueError, match="key=value"):
        parse_fast("compile_unet", cpu, "float32")


def test_dispatch_table_and_preset_stripping() -> None:
    import importlib

    from bench.cli import BENCHES, _without_preset, run_bench

    for name, bench in BENCHES.items():  # every row names a module with main(argv)
        assert callable(importlib.import_module(f"bench.{bench.module}").main), name
    assert _without_preset(["--preset", "tiny", "--n", "3", "--preset=sd15"]) == ["--n", "3"]
    with pytest.raises(ValueError, match="unknown benchmark"):
        run_bench("nope", [])


def test_delayed_jpeg_app_scores_like_the_jpeg_reward_after_the_delay(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from fastapi.testclient import TestClient
    from PIL import Image

    from bench.delayed_jpeg import delayed_jpeg_app
    from services.images import encode_image, jpeg_kb

    delays: list[float] = []

    async def record(delay_s: float) -> None:  # the delay is recorded, not waited out
        delays.append(delay_s)

    monkeypatch.setattr("bench.delayed_jpeg._delay", record)
    image = Image.new("RGB", (32, 32), (200, 30, 30))
    with TestClient(delayed_jpeg_app(0.2)) as client:
        assert client.get("/readyz").status_code == 200
        assert delays == []  # readiness is not delayed
        reply = client.post("/v1/score", json={"images": [encode_image(image, fmt="PNG")]})
    assert reply.status_code == 200
    assert reply.json() == {"scores": [-jpeg_kb(image)], "jpeg_kb": [jpeg_kb(image)]}
    assert delays == [0.2]  # one added delay per scoring request


# ---- each benchmark, smallest size ---------------------------------------------------------------------------------
@pytest.mark.timeout(300)
def test_sampler_bench_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    from bench import sampler
    from bench.sd15 import fast_path_unsupported

    argv = [
        "--preset",
        "tiny",
        "--batch",
        "2",
        "--steps",
        "2",
        "--rounds",
        "1",
        "--iters",
        "1",
        "--warmup",
        "1",
    ]
    out = printed_json(capsys, sampler.main([*argv, "--fast", "channels_last=true"]))
    assert out["bench"] == "sampler" and out["config"]["steps"] == 2
    for key in ("recording_images_per_s", "bare_images_per_s", "unet_only_images_per_s", "ratio"):
        assert out[key] > 0
    if fast_path_unsupported() is None:
        assert out["fast_path"] == "dtype=float32,channels_last=true" and out["fast_vs_eager"] > 0
    else:
        assert out["fast_vs_eager"] is None and out["fast_path_note"]


@pytest.mark.timeout(300)
def test_learner_bench_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    from bench import learner

    argv = ["--samples", "2", "--micro-batch", "2", "--steps", "2", "--rounds", "1", "--warmup", "1"]
    out = printed_json(capsys, learner.main([*argv, "--fast", "none"]))
    assert out["bench"] == "learner" and out["eager_samples_per_s"] > 0
    assert out["ratio"] is None and out["fast_path"] is None  # no fast path asked for: nothing to compare
    assert len(out["round_seconds"]["eager"]) == 1


@pytest.mark.timeout(300)
def test_latency_hiding_bench_smoke(capsys: pytest.CaptureFixture[str], tiny_sd_path: str) -> None:
    from bench import latency_hiding

    argv = ["--delay-s", "0.2", "--batch", "2", "--steps", "2", "--batches", "4", "--rounds", "1"]
    argv += ["--model", tiny_sd_path]
    out = printed_json(capsys, latency_hiding.main([*argv, "--warmup", "1", "--max-inflight", "3"]))
    assert out["ratio"] > 0 and out["config"]["max_inflight_batches"] == 3
    # warm-up + measured batches, every one scored through its server and streamed
    assert out["streamed_samples"] == {"no_delay": 10, "delayed": 10}
    assert out["machine"]["redis_server"]
    assert all(no_keys_left(run_id) for run_id in out["config"]["run_ids"].values())


@pytest.mark.timeout(600)
@pytest.mark.usefixtures("local_ray")  # the session's Ray (conftest.py): the distributed run joins it
def test_e2e_bench_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    from bench import e2e

    argv = ["--epochs", "2", "--samples", "4", "--batch", "4", "--micro-batch", "4", "--steps", "2"]
    out = printed_json(capsys, e2e.main(argv))
    assert out["distributed"]["samples_trained"] == 8 and out["in_process"]["samples_trained"] == 8
    assert out["ratio"] > 0 and out["samples_per_s_per_unit"] > 0
    assert no_keys_left(out["distributed"]["run_id"])
