"""ASGI middleware: a request-body byte limit and per-request Prometheus metrics.

Both are plain ASGI (no BaseHTTPMiddleware) so that the body limit applies while the body streams in, before
anything is parsed, and so that the metrics see every status, including the limit's own 413.
"""

from __future__ import annotations

import time
from collections.abc import Collection

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from reward_servers.kit.errors import error_response
from reward_servers.kit.metrics import Metrics


class BodyLimitMiddleware:
    """Answers 413 to a request body over `max_body_bytes`, without buffering more than the limit.

    The rest of an oversized body is read and thrown away (up to another `max_body_bytes`) so that the client gets
    to read the 413 instead of a reset connection.
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        more_body = True
        while more_body:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            more_body = message.get("more_body", False)
            size += len(body)
            if size > self.max_body_bytes:
                await self._drain(receive, more_body, budget=self.max_body_bytes)
                response = error_response(
                    413, f"request body is over the limit of {self.max_body_bytes} bytes"
                )
                await response(scope, receive, send)
                return
            chunks.append(body)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    @staticmethod
    async def _drain(receive: Receive, more_body: bool, budget: int) -> None:
        while more_body and budget > 0:
            message = await receive()
            if message["type"] != "http.request":
                return
            budget -= len(message.get("body", b""))
            more_body = message.get("more_body", False)


class RequestMetricsMiddleware:
    """Counts requests by path and status and observes their latency.

    Paths outside `known_paths` are counted as "other" so that scanners cannot blow up label cardinality.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics, known_paths: Collection[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.known_paths = frozenset(known_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        path = scope["path"] if scope["path"] in self.known_paths else "other"
        try:
            await self.app(scope, receive, send_with_status)
        finally:
            self.metrics.observe_request(path, status, time.perf_counter() - started)
