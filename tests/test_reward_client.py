"""Reward client against real FastAPI/uvicorn stub servers on 127.0.0.1: retries, balancing, composition."""

from __future__ import annotations

import asyncio
import base64
import io
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from PIL import Image

from services.images import jpeg_kb
from services.reward_api import ImagesRequest
from services.reward_client import RewardClient, RewardRequestError, SyncRewardClient
from services.rewards import ALIGNMENT_MAX_NEW_TOKENS, ALIGNMENT_QUESTION, jpeg_compressibility

Handler = Callable[[str, dict[str, Any]], dict[str, Any]]


class Stub:
    """A real HTTP server whose next replies can be scripted failures; records every call."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.failures: list[tuple[int, dict[str, str]]] = []  # (status, headers) to answer before succeeding
        self.calls: list[tuple[str, dict[str, Any], dict[str, str]]] = []  # (path, body, headers)
        self.delay_s = 0.0
        self.gate: threading.Event | None = None  # when set by a test: replies wait until it is set
        app = FastAPI()

        @app.post("/{path:path}")
        async def any_post(path: str, request: Request) -> JSONResponse:
            body = await request.json()
            self.calls.append(("/" + path, body, dict(request.headers)))
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            while self.gate is not None and not self.gate.is_set():
                await asyncio.sleep(0.01)
            if self.failures:
                status, headers = self.failures.pop(0)
                return JSONResponse({"detail": f"scripted {status}"}, status_code=status, headers=headers)
            return JSONResponse(self.handler("/" + path, body))

        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self._server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True
        )

    def start(self) -> Stub:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("stub server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._sock.close()


def scores_by_count(path: str, body: dict[str, Any]) -> dict[str, Any]:
    n = len(body["images"])
    return {"scores": [float(i) for i in range(n)], "jpeg_kb": [float(i) for i in range(n)]}


@pytest.fixture()
def make_stub() -> Iterator[Callable[..., Stub]]:
    stubs: list[Stub] = []

    def make(handler: Handler = scores_by_count) -> Stub:
        stubs.append(Stub(handler).start())
        return stubs[-1]

    yield make
    for s in stubs:
        s.stop()


def dead_url() -> str:
    """A loopback URL where nothing listens (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def fast_client(replicas: dict[str, list[str]], **kw: Any) -> RewardClient:
    defaults = {
        "timeout_s": 5.0,
        "max_retries": 3,
        "backoff_base_s": 0.01,
        "backoff_max_s": 0.05,
        "cooldown_s": 5.0,
    }
    return RewardClient(replicas, **(defaults | kw))


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout=30))


B64 = ["aGVsbG8=", "d29ybGQ="]  # images are opaque strings to the transport


async def jpeg(c: RewardClient, images_b64: list[str] = B64):
    return await c.call("jpeg", ImagesRequest(images=images_b64))


async def aesthetic(c: RewardClient, images_b64: list[str] = B64) -> list[float]:
    return (await c.call("aesthetic", ImagesRequest(images=images_b64))).scores


@pytest.fixture
def backoff_sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The delays the client asks to wait between attempts (recorded, not slept: checks on events, not clocks)."""
    requested: list[float] = []

    async def sleep(delay: float) -> None:
        requested.append(delay)

    monkeypatch.setattr("services.reward_client._backoff_sleep", sleep)
    return requested


def test_retries_5xx_then_succeeds(make_stub: Callable[..., Stub]) -> None:
    stub = make_stub()
    stub.failures = [(503, {}), (500, {})]

    async def go() -> dict[str, list[float]]:
        async with fast_client({"jpeg": [stub.url]}) as c:
            return await jpeg(c)

    assert run(go()).jpeg_kb == [0.0, 1.0]
    assert len(stub.calls) == 3


def test_gives_up_after_max_retries_with_clear_error(make_stub: Callable[..., Stub]) -> None:
    stub = make_stub()
    stub.failures = [(503, {})] * 10

    async def go() -> None:
        async with fast_client({"jpeg": [stub.url]}, max_retries=2) as c:
            await jpeg(c)

    with pytest.raises(RewardRequestError, match="after 3 attempts.*503.*scripted 503") as e:
        run(go())
    assert e.value.status == 503
    assert len(stub.calls) == 3


def test_no_retry_for_400(make_stub: Callable[..., Stub]) -> None:
    stub = make_stub()
    stub.failures = [(400, {})]

    async def go() -> None:
        async with fast_client({"jpeg": [stub.url, stub.url]}) as c:
            await jpeg(c)

    with pytest.raises(RewardRequestError, match="400: scripted 400") as e:
        run(go())
    assert e.value.status == 400 and e.value.server_message == "scripted 400"
    assert len(stub.calls) == 1


def test_429_honours_retry_after(make_stub: Callable[..., Stub], backoff_sleeps: list[float]) -> None:
    stub = make_stub()
    stub.failures = [(429, {"Retry-After": "1"})]

    async def go() -> list[float]:
        async with fast_client({"aesthetic": [stub.url]}) as c:
            return await aesthetic(c)

    assert run(go()) == [0.0, 1.0]
    assert backoff_sleeps == [1.0]  # the server's Retry-After, not the client's 0.01-0.05 s backoff
    assert len(stub.calls) == 2


def test_dead_replica_fails_over_and_cools_down(
    make_stub: Callable[..., Stub], backoff_sleeps: list[float], monkeypatch: pytest.MonkeyPatch
) -> None:
    stub = make_stub()
    dead = dead_url()
    now = [1000.0]  # the client's clock, moved by the test: cooldowns are checked on events, not waited out
    monkeypatch.setattr("services.reward_client._now", lambda: now[0])

    async def go() -> tuple[dict[str, int], dict[str, int]]:
        async with fast_client({"jpeg": [dead, stub.url]}, cooldown_s=30.0) as c:
            for _ in range(6):
                assert (await jpeg(c)).scores == [0.0, 1.0]
            first = c.calls("jpeg")
            now[0] += 31.0  # cooldown over: the dead replica is tried again, then avoided again
            for _ in range(4):
                await jpeg(c)
            return first, c.calls("jpeg")

    first, later = run(go())
    assert first[dead] <= 1 and first[stub.url] == 6  # tried at most once, then on cooldown
    assert later[dead] - first[dead] <= 1 and later[stub.url] == 10
    assert all(
        delay == 0.0 for delay in backoff_sleeps
    )  # failing over to a healthy replica does not back off


def test_timeout_is_retried_on_another_replica(make_stub: Callable[..., Stub]) -> None:
    slow, fast = make_stub(), make_stub()
    slow.delay_s = 1.0

    async def go() -> None:
        async with fast_client({"jpeg": [slow.url, fast.url]}, timeout_s=0.2) as c:
            for _ in range(3):
                assert (await jpeg(c)).scores == [0.0, 1.0]

    run(go())
    assert len(slow.calls) <= 1 and len(fast.calls) == 3  # timed out once, then on cooldown


def test_all_replicas_dead_raises_after_retries() -> None:
    async def go() -> None:
        async with fast_client({"jpeg": [dead_url(), dead_url()]}, max_retries=2) as c:
            await jpeg(c)

    with pytest.raises(RewardRequestError, match="after 3 attempts.*ConnectError") as e:
        run(go())
    assert e.value.status is None


def test_balancing_spreads_requests_across_replicas(make_stub: Callable[..., Stub]) -> None:
    a, b = make_stub(), make_stub()

    async def go() -> None:
        async with fast_client({"jpeg": [a.url, b.url]}) as c:
            for _ in range(10):  # sequential: round-robin between idle replicas
                await jpeg(c)
            a.delay_s = b.delay_s = 0.05
            await asyncio.gather(*(jpeg(c) for _ in range(20)))  # concurrent: least in flight

    run(go())
    assert len(a.calls) == 15 and len(b.calls) == 15


def test_large_batches_are_split_and_reassembled(make_stub: Callable[..., Stub]) -> None:
    stub = make_stub(lambda path, body: {"scores": [float(len(s)) for s in body["images"]]})
    images = ["x" * i for i in range(1, 8)]

    async def go() -> list[float]:
        async with fast_client({"aesthetic": [stub.url]}, max_batch=3) as c:
            return await aesthetic(c, images)

    assert run(go()) == [float(i) for i in range(1, 8)]
    assert sorted(len(body["images"]) for _, body, _ in stub.calls) == [1, 3, 3]


def test_wrong_length_reply_is_an_error(make_stub: Callable[..., Stub]) -> None:
    stub = make_stub(lambda path, body: {"scores": [1.0]})

    async def go() -> None:
        async with fast_client({"aesthetic": [stub.url]}) as c:
            await aesthetic(c)

    with pytest.raises(RewardRequestError, match="list of 2"):
        run(go())


def test_auth_token_is_sent(make_stub: Callable[..., Stub]) -> None:
    stub = make_stub()

    async def go() -> None:
        async with fast_client({"jpeg": [stub.url]}, auth_token="s3cret") as c:
            await jpeg(c)

    run(go())
    assert stub.calls[0][2]["authorization"] == "Bearer s3cret"


def test_client_from_config_sends_the_token_of_the_configured_variable(
    make_stub: Callable[..., Stub], monkeypatch: pytest.MonkeyPatch, backoff_sleeps: list[float]
) -> None:
    """Every part of a run that scores over HTTP (sampling actors, the learner's evaluation, `ddpo eval`) builds its
    client from the reward config: the token comes from `reward.auth_token_env`, retries and timeout from there."""
    from services.config import RewardConfig

    stub = make_stub(lambda path, body: {"scores": [1.0] * len(body["images"])})
    reward = RewardConfig(
        name="aesthetic", mode="http", timeout_s=0.5, max_retries=1, auth_token_env="MY_TOKEN"
    )
    monkeypatch.setenv("MY_TOKEN", "s3cret")
    with SyncRewardClient.from_config(reward, {"aesthetic": [stub.url]}) as client:
        client.score("aesthetic", images(1), ["a"], [{}], timeout_s=10)
    monkeypatch.setenv("MY_TOKEN", "")  # empty: no token, not "Bearer "
    with SyncRewardClient.from_config(reward, {"aesthetic": [stub.url]}) as client:
        client.score("aesthetic", images(1), ["a"], [{}], timeout_s=10)
    assert [call[2].get("authorization") for call in stub.calls] == ["Bearer s3cret", None]
    # a replica that never answers: each attempt ends at the config's 0.5 s timeout (the client's default is 60 s,
    # longer than this call may take), and max_retries 1 makes two attempts
    stub.gate = threading.Event()
    try:
        with (
            SyncRewardClient.from_config(reward, {"aesthetic": [stub.url]}) as client,
            pytest.raises(RewardRequestError, match="after 2 attempts.*ReadTimeout"),
        ):
            client.score("aesthetic", images(1), ["a"], [{}], timeout_s=20)
    finally:
        stub.gate.set()
    assert len(stub.calls) == 2 + 2 and len(backoff_sleeps) == 1


def images(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)) for _ in range(n)]


def decode_b64(s: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(s))).convert("RGB")


def test_prompt_alignment_composition(make_stub: Callable[..., Stub]) -> None:
    llava = make_stub(lambda path, body: {"answers": [[f"answer {i}"] for i in range(len(body["images"]))]})
    bert = make_stub(
        lambda path, body: {
            "precision": [0.5] * len(body["candidates"]),
            "recall": [0.1 * (i + 1) for i in range(len(body["candidates"]))],
            "f1": [0.9] * len(body["candidates"]),
        }
    )
    prompts = ["a cat", "a dog on a bike"]

    async def go() -> tuple[list[float], dict[str, list]]:
        async with fast_client({"llava": [llava.url], "bertscore": [bert.url]}) as c:
            return await c.score("prompt_alignment", images(2), prompts, [{}, {}])

    scores, info = run(go())
    assert scores == [0.1, 0.2] and info["answers"] == ["answer 0", "answer 1"]
    ((path, body, _),) = llava.calls
    assert path == "/v1/answer" and body["max_new_tokens"] == ALIGNMENT_MAX_NEW_TOKENS
    assert body["questions"] == [["Answer concisely: what is going on in this image?"]] * 2
    assert ALIGNMENT_QUESTION == "Answer concisely: what is going on in this image?"
    assert decode_b64(body["images"][0]).size == (16, 16)
    ((path, body, _),) = bert.calls
    assert path == "/v1/score"
    assert body == {
        "candidates": ["answer 0", "answer 1"],
        "references": ["The image contains a cat", "The image contains a dog on a bike"],
    }


def test_jpeg_rewards_match_local_reward_exactly(make_stub: Callable[..., Stub]) -> None:
    def jpeg_server(path: str, body: dict[str, Any]) -> dict[str, Any]:
        kb = [jpeg_kb(decode_b64(s)) for s in body["images"]]
        return {"scores": [-k for k in kb], "jpeg_kb": kb}

    stub = make_stub(jpeg_server)
    ims = images(3)

    async def go() -> tuple[Any, Any]:
        async with fast_client({"jpeg": [stub.url]}) as c:
            return (
                await c.score("jpeg_compressibility", ims, ["p"] * 3, [{}] * 3),
                await c.score("jpeg_incompressibility", ims, ["p"] * 3, [{}] * 3),
            )

    (comp, comp_info), (incomp, _) = run(go())
    local, local_info = jpeg_compressibility(ims, ["p"] * 3, [{}] * 3)
    assert comp_info["jpeg_kb"] == local_info["jpeg_kb"]  # lossless (PNG) upload: the same bytes get measured
    assert comp == [-k for k in local_info["jpeg_kb"]] and local == pytest.approx(comp)
    assert incomp == [-s for s in comp]


def test_unknown_reward_and_missing_kind_are_refused() -> None:
    async def go(name: str) -> None:
        async with fast_client({"jpeg": ["http://127.0.0.1:9"]}) as c:
            await c.score(name, images(1), ["p"], [{}])

    with pytest.raises(ValueError, match="unknown reward 'nope'"):
        run(go("nope"))
    with pytest.raises(ValueError, match="no replicas configured for reward server 'aesthetic'"):
        run(go("aesthetic"))


def test_sync_wrapper_submits_without_blocking(make_stub: Callable[..., Stub]) -> None:
    stub = make_stub(lambda path, body: {"scores": [7.0] * len(body["images"])})
    stub.gate = threading.Event()  # the server holds its reply until the test lets it go
    with SyncRewardClient({"aesthetic": [stub.url]}, timeout_s=30.0) as client:
        future = client.submit("aesthetic", images(2), ["a", "b"], [{}, {}])
        assert not future.done()  # submit returned while the request is in flight: the caller keeps working
        stub.gate.set()
        scores, info = future.result(timeout=10)
        assert scores == [7.0, 7.0] and info["aesthetic"] == [7.0, 7.0]
        assert client.score("aesthetic", images(1), ["a"], [{}], timeout_s=10)[0] == [7.0]
