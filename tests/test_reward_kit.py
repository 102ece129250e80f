"""The reward-server kit on its own: batcher, image decoding and limits, settings, readiness, load failure."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import hypothesis
import pytest
import uvicorn
from fastapi import APIRouter
from hypothesis import strategies as st
from PIL import Image, ImageFile
from reward_server_utils import REPO, b64, free_port, image_bytes, noise_image, png_b64, png_with_header_size

from reward_servers.kit import (
    DeadlineExceeded,
    DynamicBatcher,
    ImageInputError,
    InferenceFailed,
    QueueFull,
    ServerSettings,
    center_crop_to_aspect,
    create_app,
    decode_image,
    decode_images,
)
from reward_servers.kit.images import decode_base64
from reward_servers.serve import parse_args
from services.reward_api import BASE64_IMAGE_PATTERN

# ---------------------------------------------------------------- batcher


class RecordingModel:
    """Doubles each item and records the batches it saw."""

    def __init__(self, fail_on: int | None = None) -> None:
        self.batches: list[list[int]] = []
        self.fail_on = fail_on

    def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        if self.fail_on in items:
            raise RuntimeError("boom")
        return [2 * x for x in items]


def test_batcher_merges_concurrent_requests_and_keeps_each_answer() -> None:
    model = RecordingModel()

    async def scenario() -> list[list[int]]:
        batcher = DynamicBatcher(model, max_batch_size=8, max_wait_s=0.05, max_queue=100)
        batcher.start()
        # 10 requests of 1..3 items: 20 items in all, so at least 3 batches of at most 8.
        requests = [list(range(100 * r, 100 * r + 1 + r % 3)) for r in range(10)]
        outputs = await asyncio.gather(*(batcher.submit(items, timeout_s=5) for items in requests))
        await batcher.stop()
        assert outputs == [[2 * x for x in items] for items in requests]
        return model.batches

    batches = asyncio.run(scenario())
    assert all(len(b) <= 8 for b in batches)
    assert max(len(b) for b in batches) > 1
    assert sum(len(b) for b in batches) == sum(1 + r % 3 for r in range(10))  # every item ran exactly once


def test_batcher_splits_a_request_larger_than_a_batch() -> None:
    model = RecordingModel()

    async def scenario() -> list[int]:
        batcher = DynamicBatcher(model, max_batch_size=4, max_wait_s=0.0, max_queue=100)
        batcher.start()
        out = await batcher.submit(list(range(10)), timeout_s=5)
        await batcher.stop()
        return out

    assert asyncio.run(scenario()) == [2 * x for x in range(10)]
    assert [len(b) for b in model.batches] == [4, 4, 2]


def test_batcher_holds_a_lone_request_for_company_and_runs_a_full_batch_at_once() -> None:
    model = RecordingModel()

    async def scenario() -> None:
        # max_wait_s far longer than the test: only a full batch can start the model
        batcher = DynamicBatcher(model, max_batch_size=2, max_wait_s=600, max_queue=100)
        batcher.start()
        first = asyncio.create_task(batcher.submit([1], timeout_s=600))
        for _ in range(20):  # the collector runs on this loop: let it see the request
            await asyncio.sleep(0)
        assert model.batches == [] and batcher.queue_depth == 1  # held, waiting for a second item
        second = await asyncio.wait_for(batcher.submit([2], timeout_s=600), 30)
        assert second == [4] and await first == [2]
        await batcher.stop()

    asyncio.run(scenario())
    assert model.batches == [[1, 2]]  # the two requests went out together


def test_batcher_sends_a_lone_request_alone_once_max_wait_has_passed() -> None:
    model = RecordingModel()

    async def scenario() -> list[int]:
        batcher = DynamicBatcher(model, max_batch_size=64, max_wait_s=0.05, max_queue=100)
        batcher.start()
        out = await asyncio.wait_for(batcher.submit([1], timeout_s=600), 30)  # not a full batch, sent anyway
        await batcher.stop()
        return out

    assert asyncio.run(scenario()) == [2]
    assert model.batches == [[1]]


def test_batcher_full_queue_raises_queue_full_with_retry_after() -> None:
    async def scenario() -> None:
        batcher = DynamicBatcher(RecordingModel(), max_batch_size=64, max_wait_s=0.3, max_queue=5)
        batcher.start()
        first = asyncio.create_task(batcher.submit([1, 2, 3], timeout_s=5))
        await asyncio.sleep(0.01)
        with pytest.raises(QueueFull) as info:
            await batcher.submit([4, 5, 6], timeout_s=5)
        assert info.value.retry_after_s >= 1
        assert await batcher.submit([4, 5], timeout_s=5) == [8, 10]  # exactly fills the queue
        assert await first == [2, 4, 6]
        await batcher.stop()

    asyncio.run(scenario())


def test_batcher_deadline_drops_items_before_they_reach_the_model() -> None:
    model = RecordingModel()

    async def scenario() -> None:
        batcher = DynamicBatcher(model, max_batch_size=64, max_wait_s=0.3, max_queue=100)
        batcher.start()
        with pytest.raises(DeadlineExceeded):
            await batcher.submit([7, 8], timeout_s=0.05)
        assert batcher.queue_depth == 0
        assert await batcher.submit([1], timeout_s=5) == [2]
        await batcher.stop()

    asyncio.run(scenario())
    assert model.batches == [[1]]


def test_batcher_model_failure_fails_only_that_batch() -> None:
    async def scenario() -> None:
        batcher = DynamicBatcher(RecordingModel(fail_on=13), max_batch_size=4, max_wait_s=0.0, max_queue=100)
        batcher.start()
        with pytest.raises(InferenceFailed):
            await batcher.submit([13], timeout_s=5)
        assert await batcher.submit([1, 2], timeout_s=5) == [2, 4]
        await batcher.stop()

    asyncio.run(scenario())


# ---------------------------------------------------------------- image decoding


def test_decode_accepts_png_jpeg_webp_and_data_urls() -> None:
    image = noise_image(0)
    for fmt in ("PNG", "JPEG", "WEBP"):
        decoded = decode_image(b64(image_bytes(image, fmt)), max_pixels=10**6)
        assert decoded.mode == "RGB" and decoded.size == image.size
    decoded = decode_image("data:image/png;base64," + png_b64(image), max_pixels=10**6)
    assert decoded.tobytes() == image.tobytes()  # PNG is lossless


# A base64 string of a few bytes, behind one of several prefixes, with one character put in somewhere.
wire_strings = st.builds(
    lambda prefix, payload, insert, at: prefix + payload[:at] + insert + payload[at:],
    st.sampled_from(["", "data:image/png;base64,", "data:image/svg+xml;base64,", "data:text/plain;base64,",
                     "data:image/png,", "data:;base64,"]),
    st.binary(max_size=10).map(lambda raw: b64(raw)),
    st.sampled_from(["", "", "=", "==", "A", "AB", "\n", " ", "-", "_", "%", ":", "é"]),
    st.integers(0, 20),
)  # fmt: skip


@hypothesis.settings(
    max_examples=200, deadline=None, database=None, suppress_health_check=list(hypothesis.HealthCheck)
)
@hypothesis.given(
    st.one_of(wire_strings, st.from_regex(BASE64_IMAGE_PATTERN, fullmatch=True), st.text(max_size=12))
)
def test_the_schema_pattern_matches_exactly_the_strings_the_servers_decode(data: str) -> None:
    """The OpenAPI document's image pattern and the servers' decoder are two implementations of one rule: a
    request that is valid by the schema is decodable, and a string the schema refuses is a 400."""
    try:
        decode_base64(data)
        decodable = True
    except ImageInputError:
        decodable = False
    assert (re.fullmatch(BASE64_IMAGE_PATTERN, data) is not None) == decodable


@pytest.mark.parametrize(
    ("data", "status", "words"),
    [
        ("not base64!", 400, "not valid base64"),
        (
            "\n".join([png_b64(noise_image(1))[:76], png_b64(noise_image(1))[76:]]),
            400,
            "base64",
        ),  # MIME-wrapped
        (b64(b"hello, not an image"), 400, "not a PNG, JPEG or WebP image"),
        (b64(image_bytes(noise_image(1), "GIF")), 400, "not a PNG, JPEG or WebP image"),
        (b64(image_bytes(noise_image(1), "PNG")[:60]), 400, "PNG, JPEG or WebP"),  # truncated
        ("data:image/png,abc", 400, "data URL"),
        (png_b64(noise_image(1, size=(200, 100))), 413, "over the limit"),
    ],
)
def test_decode_refuses_bad_images_naming_the_index(data: str, status: int, words: str) -> None:
    with pytest.raises(ImageInputError) as info:
        decode_images([png_b64(noise_image(0)), data], max_pixels=150 * 100)
    assert info.value.status_code == status
    assert str(info.value).startswith("images[1]: ") and words in str(info.value)


def test_pixel_limit_is_checked_on_the_header_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    decoded: list[tuple[int, int]] = []
    load = ImageFile.ImageFile.load

    def recording_load(image: ImageFile.ImageFile):  # every pixel decode of a PNG/JPEG/WebP goes through here
        decoded.append(image.size)
        return load(image)

    monkeypatch.setattr(ImageFile.ImageFile, "load", recording_load)
    decode_image(png_b64(noise_image(0)), max_pixels=4096 * 4096)
    seen = len(decoded)
    assert seen > 0  # the recorder sees a decode
    bomb = b64(png_with_header_size(100_000, 100_000))  # 10^10 pixels, 30 GB if decoded
    with pytest.raises(ImageInputError) as info:
        decode_image(bomb, max_pixels=4096 * 4096)
    assert info.value.status_code == 413
    assert len(decoded) == seen  # the bomb was refused on its header: none of its pixels were decoded
    small_bomb = b64(png_with_header_size(5000, 5000))  # under Pillow's own bomb limit: refused by ours
    with pytest.raises(ImageInputError, match="5000x5000 pixels is over the limit"):
        decode_image(small_bomb, max_pixels=4096 * 4096)
    assert len(decoded) == seen


def test_request_pixel_budget_is_checked_before_decoding_any_image() -> None:
    images = [png_b64(noise_image(i, (100, 100))) for i in range(3)]
    assert len(decode_images(images, max_pixels=10_000, max_total_pixels=30_000)) == 3
    with pytest.raises(ImageInputError) as info:
        decode_images(
            [*images, b64(png_with_header_size(100, 100))], max_pixels=10_000, max_total_pixels=30_000
        )
    assert info.value.status_code == 413 and "40000 pixels in all" in str(info.value)


def test_center_crop_to_aspect_bounds_elongated_images_only() -> None:
    assert center_crop_to_aspect(Image.new("RGB", (10_000, 1))).size == (4, 1)
    assert center_crop_to_aspect(Image.new("RGB", (3, 900))).size == (3, 12)
    square = Image.new("RGB", (64, 48))
    assert center_crop_to_aspect(square) is square


# ---------------------------------------------------------------- settings


def test_settings_flags_override_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DDPO_REWARD_PORT", "9100")
    monkeypatch.setenv("DDPO_REWARD_MAX_BATCH_SIZE", "5")
    monkeypatch.setenv("DDPO_REWARD_AUTH_TOKEN", "s3cret")
    monkeypatch.setenv("DDPO_REWARD_LAYER", "3")
    kind, settings = parse_args(["bertscore", "--max-batch-size", "7", "--model", "/models/minilm"])
    assert kind.settings_cls.__name__ == "BertScoreSettings"
    assert (settings.port, settings.max_batch_size, settings.model, settings.layer) == (
        9100,
        7,
        "/models/minilm",
        3,
    )
    assert settings.host == "127.0.0.1"
    assert settings.auth_token is not None and settings.auth_token.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(settings)


@pytest.mark.parametrize(
    "argv",
    [
        ["jpeg", "--max-batch-size", "0"],
        ["jpeg", "--port", "http"],
        ["llava", "--device", "tpu"],
        ["jpeg", "--model", "x"],  # the jpeg server has no model
        ["jpeg", "--auth-token", "x"],  # tokens come from the environment only
        ["nonsense"],
    ],
)
def test_bad_flags_exit_with_usage_error(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as info:
        parse_args(argv)
    assert info.value.code == 2


# ---------------------------------------------------------------- readiness and load failure


def test_readyz_is_503_until_the_model_is_loaded() -> None:
    release = threading.Event()

    def slow_load() -> Callable[[list[int]], list[int]]:
        release.wait(30)
        return lambda items: [len(items)] * len(items)

    app = create_app(ServerSettings(), title="t", description="", load_model=slow_load, router=APIRouter())
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(100):
            if server.started:
                break
            time.sleep(0.05)
        assert httpx.get(url + "/healthz").status_code == 200
        not_ready = httpx.get(url + "/readyz")
        assert not_ready.status_code == 503 and not_ready.json() == {"detail": "model is loading"}
        release.set()
        for _ in range(100):
            if httpx.get(url + "/readyz").status_code == 200:
                break
            time.sleep(0.05)
        assert httpx.get(url + "/readyz").json() == {"status": "ready"}
        assert "ddpo_reward_ready 1.0" in httpx.get(url + "/metrics").text
    finally:
        release.set()
        server.should_exit = True
        thread.join(timeout=10)


def test_server_process_exits_nonzero_when_the_model_cannot_load(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "reward_servers.serve",
            "bertscore",
            "--port",
            str(free_port()),
            "--model",
            str(missing),
        ],
        cwd=REPO,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert "model failed to load" in result.stderr


def test_rgba_images_are_decoded_to_rgb_exactly() -> None:
    image = noise_image(3, mode="RGBA")
    decoded = decode_image(png_b64(image), max_pixels=10**6)
    assert decoded.tobytes() == image.convert("RGB").tobytes()
