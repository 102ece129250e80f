"""The jpeg reward server as a real process: exact scores, batching, a full queue, every bad input, auth (every
kind's schema fuzzing is in test_openapi_fuzz.py).

Two processes: `main` (auth on, small limits) and `queue` (a batch that never fills and a 16-item queue, so that
the queue fills deterministically and every queued request waits max_wait_ms = 1.5 s).
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from PIL import Image
from reward_server_utils import (
    ServerProcess,
    b64,
    batches_larger_than_one,
    image_bytes,
    metric_value,
    noise_image,
    png_b64,
    png_with_header_size,
    start_servers,
)

TOKEN = "test-token-123"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MAX_ITEMS = 8
MAX_PIXELS = 256 * 256
MAX_REQUEST_PIXELS = 100_000
MAX_BODY_BYTES = 1_000_000
QUEUE_SIZE = 16


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, ServerProcess]]:
    logs = tmp_path_factory.mktemp("jpeg-logs")
    main = ServerProcess(
        "jpeg",
        *(
            "--max-items",
            str(MAX_ITEMS),
            "--max-pixels",
            str(MAX_PIXELS),
            "--max-request-pixels",
            str(MAX_REQUEST_PIXELS),
        ),
        *("--max-body-bytes", str(MAX_BODY_BYTES), "--max-batch-size", "16", "--max-wait-ms", "20"),
        log_dir=logs,
        env={"DDPO_REWARD_AUTH_TOKEN": TOKEN},
    )
    queue = ServerProcess(
        "jpeg",
        *("--max-batch-size", "64", "--max-wait-ms", "1500", "--max-queue", str(QUEUE_SIZE)),
        log_dir=logs,
    )
    try:
        start_servers(main, queue)
        yield {"main": main, "queue": queue}
    finally:
        main.stop()
        queue.stop()


@pytest.fixture(scope="module")
def main_url(servers: dict[str, ServerProcess]) -> str:
    return servers["main"].url


def pillow_jpeg_kb(encoded: bytes) -> float:
    """Independent of the server: decode, RGB, Pillow JPEG quality 95, bytes / 1000."""
    out = io.BytesIO()
    Image.open(io.BytesIO(encoded)).convert("RGB").save(out, format="JPEG", quality=95)
    return len(out.getvalue()) / 1000


def score(url: str, images: list[str], headers: dict[str, str] | None = None, **kw: Any) -> httpx.Response:
    return httpx.post(
        url + "/v1/score", json={"images": images}, headers=AUTH if headers is None else headers, **kw
    )


def assert_still_serving(url: str) -> None:
    image = noise_image(99)
    r = score(url, [png_b64(image)])
    assert r.status_code == 200
    assert r.json()["jpeg_kb"] == [pillow_jpeg_kb(image_bytes(image))]


def test_jpeg_scores_equal_an_independent_pillow_computation(main_url: str) -> None:
    encoded = [
        image_bytes(noise_image(0, (64, 48)), "PNG"),
        image_bytes(noise_image(1, (17, 90), mode="RGBA"), "PNG"),
        image_bytes(noise_image(2, (33, 33), mode="L"), "PNG"),
        image_bytes(noise_image(3, (40, 30)), "JPEG"),
        image_bytes(noise_image(4, (40, 30)), "WEBP"),
        image_bytes(Image.new("RGB", (128, 128), (200, 30, 30)), "PNG"),
    ]
    wire = [b64(e) for e in encoded]
    wire[0] = "data:image/png;base64," + wire[0]
    r = score(main_url, wire)
    assert r.status_code == 200, r.text
    body = r.json()
    expected = [pillow_jpeg_kb(e) for e in encoded]
    assert body["jpeg_kb"] == expected  # exact
    assert body["scores"] == [-kb for kb in expected]
    assert len(set(expected)) == len(expected)


def test_health_readiness_and_openapi(main_url: str) -> None:
    assert httpx.get(main_url + "/healthz").json() == {"status": "alive"}
    assert httpx.get(main_url + "/readyz").json() == {"status": "ready"}
    spec = httpx.get(main_url + "/openapi.json").json()
    assert set(spec["paths"]) >= {"/v1/score", "/healthz", "/readyz", "/metrics"}
    documented = set(spec["paths"]["/v1/score"]["post"]["responses"])
    assert documented >= {"200", "400", "401", "413", "422", "429", "504"}


async def _score_many(url: str, images: list[Image.Image], headers: dict[str, str]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60) as client:
        return await asyncio.gather(
            *(client.post("/v1/score", json={"images": [png_b64(im)]}) for im in images)
        )


def test_64_concurrent_requests_are_batched_and_each_gets_its_own_answer(main_url: str) -> None:
    before = httpx.get(main_url + "/metrics").text
    images = [noise_image(1000 + i, (40 + i % 7, 30)) for i in range(64)]
    responses = asyncio.run(_score_many(main_url, images, AUTH))
    assert [r.status_code for r in responses] == [200] * 64
    for image, r in zip(images, responses, strict=True):
        assert r.json()["jpeg_kb"] == [pillow_jpeg_kb(image_bytes(image))]
    after = httpx.get(main_url + "/metrics").text
    assert batches_larger_than_one(after) > batches_larger_than_one(before)
    ok = metric_value(after, "ddpo_reward_requests_total", path="/v1/score", status="200")
    assert ok - metric_value(before, "ddpo_reward_requests_total", path="/v1/score", status="200") == 64
    assert metric_value(after, "ddpo_reward_request_duration_seconds_count", path="/v1/score") >= 64
    assert metric_value(after, "ddpo_reward_queue_depth") == 0


def test_full_queue_gives_429_and_no_lost_or_mixed_up_answers(servers: dict[str, ServerProcess]) -> None:
    url = servers["queue"].url
    images = [noise_image(2000 + i) for i in range(QUEUE_SIZE + 8)]
    expected = [pillow_jpeg_kb(image_bytes(im)) for im in images]
    responses = asyncio.run(_score_many(url, images, {}))
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 429}
    # 24 requests reach a 16-item queue within the 1.5 s its batch waits: some are queued, the rest refused.
    assert codes.count(200) >= 1 and codes.count(429) >= 1
    for r in responses:
        if r.status_code == 429:
            assert int(r.headers["Retry-After"]) >= 1
            assert r.json() == {"detail": "queue full"}
    # Retry what was refused: in the end every request has exactly its own answer.
    refused = [i for i, c in enumerate(codes) if c == 429]
    retried = asyncio.run(_score_many(url, [images[i] for i in refused], {}))
    for i, r in zip(refused, retried, strict=True):
        responses[i] = r
    assert [r.json()["jpeg_kb"] for r in responses] == [[kb] for kb in expected]
    metrics = httpx.get(url + "/metrics").text
    assert metric_value(metrics, "ddpo_reward_requests_total", path="/v1/score", status="429") == len(refused)


def test_request_past_its_deadline_gets_504_and_leaves_the_queue(servers: dict[str, ServerProcess]) -> None:
    url = servers["queue"].url
    r = httpx.post(
        url + "/v1/score",
        json={"images": [png_b64(noise_image(5))]},
        headers={"X-Request-Timeout-Ms": "200"},
        timeout=10,
    )
    assert r.status_code == 504
    assert r.json() == {"detail": "deadline passed before the answer was computed"}
    assert metric_value(httpx.get(url + "/metrics").text, "ddpo_reward_queue_depth") == 0
    image = noise_image(6)
    r = httpx.post(url + "/v1/score", json={"images": [png_b64(image)]}, timeout=10)
    assert r.status_code == 200 and r.json()["jpeg_kb"] == [pillow_jpeg_kb(image_bytes(image))]


GOOD = png_b64(noise_image(7))
BAD_INPUTS = {
    # name: (request kwargs for httpx.post, status, words the detail must contain)
    "bad base64 names its index": ({"json": {"images": [GOOD, "%%%not-base64%%%"]}}, 400, "images[1]"),
    "not an image": (
        {"json": {"images": [b64(b"GIF89a but not really")]}},
        400,
        "images[0]: not a PNG, JPEG or WebP image",
    ),
    "unsupported format (GIF)": (
        {"json": {"images": [b64(image_bytes(noise_image(8), "GIF"))]}},
        400,
        "images[0]",
    ),
    "truncated PNG": ({"json": {"images": [GOOD, b64(image_bytes(noise_image(9))[:100])]}}, 400, "images[1]"),
    "too many images": ({"json": {"images": [GOOD] * (MAX_ITEMS + 1)}}, 413, f"limit of {MAX_ITEMS}"),
    "body too large": ({"json": {"images": ["A" * MAX_BODY_BYTES]}}, 413, "body"),
    "too many pixels": (
        {"json": {"images": [png_b64(noise_image(10, (300, 300)))]}},
        413,
        "images[0]: 300x300",
    ),
    "too many pixels in all": (
        {"json": {"images": [png_b64(noise_image(i, (250, 250))) for i in range(2)]}},
        413,
        "125000 pixels in all",
    ),
    "decompression bomb": (
        {"json": {"images": [b64(png_with_header_size(50_000, 50_000))]}},
        413,
        "over the limit",
    ),
    "wrong item type": ({"json": {"images": [GOOD, 42]}}, 422, "images.1"),
    "images not a list": ({"json": {"images": GOOD}}, 422, "images"),
    "missing field": ({"json": {"pictures": [GOOD]}}, 422, "images"),
    "not JSON": (
        {"content": b"{images: [", "headers": {**AUTH, "Content-Type": "application/json"}},
        422,
        "",
    ),
    "bad client deadline": (
        {"json": {"images": [GOOD]}, "headers": {**AUTH, "X-Request-Timeout-Ms": "soon"}},
        422,
        "",
    ),
    "no token": ({"json": {"images": [GOOD]}, "headers": {}}, 401, "bearer token"),
    "wrong token": (
        {"json": {"images": [GOOD]}, "headers": {"Authorization": "Bearer nope"}},
        401,
        "bearer token",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS), ids=list(BAD_INPUTS))
def test_bad_input_is_refused_with_its_status_and_the_server_keeps_serving(main_url: str, case: str) -> None:
    kwargs, status, words = BAD_INPUTS[case]
    kwargs = {"headers": AUTH, **kwargs}
    r = httpx.post(main_url + "/v1/score", timeout=30, **kwargs)
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"detail"} and words in body["detail"]
    assert len(r.content) < 400 and "Traceback" not in r.text
    if status == 401:
        assert r.headers["WWW-Authenticate"] == "Bearer"
    assert_still_serving(main_url)


def test_refusals_are_counted_by_status_in_metrics(main_url: str) -> None:
    score(main_url, ["%%%"])
    score(main_url, [GOOD], headers={})
    metrics = httpx.get(main_url + "/metrics").text
    for status in ("400", "401"):
        assert metric_value(metrics, "ddpo_reward_requests_total", path="/v1/score", status=status) >= 1
