"""The app factory of every reward server: the model loads in the lifespan, requests go through one batcher.

A server module supplies `load_model() -> run_batch` (called once, on a thread) and a router with its /v1
endpoints; the factory adds health, readiness, metrics, auth (declared in the OpenAPI document only when the server has
a token), the body limit and short JSON errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import metadata
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Header, HTTPException, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from PIL import Image
from pydantic import BaseModel

from reward_servers.kit.auth import auth_route_options
from reward_servers.kit.batcher import DeadlineExceeded, DynamicBatcher, InferenceFailed, QueueFull
from reward_servers.kit.errors import error_response, error_responses, install_error_handlers
from reward_servers.kit.images import ImageInputError, decode_images
from reward_servers.kit.metrics import Metrics
from reward_servers.kit.middleware import BodyLimitMiddleware, RequestMetricsMiddleware
from reward_servers.kit.settings import ServerSettings

logger = logging.getLogger(__name__)

T = TypeVar("T")
RunBatch = Callable[[list[Any]], list[Any]]
LoadModel = Callable[[], RunBatch]

TIMEOUT_HEADER = "X-Request-Timeout-Ms"
V1_ERRORS = error_responses(400, 413, 422, 429, 500, 503, 504)  # and 401 when the server has a token


@dataclass
class Inference:
    """What a /v1 handler needs for one request: limits, the loaded model, the batcher and the deadline."""

    settings: ServerSettings
    model: Any  # what load_model returned: the batch function, plus whatever else the server's handlers use
    batcher: DynamicBatcher
    deadline: float  # time.monotonic() past which the answer is 504

    def check_count(self, count: int, noun: str = "images") -> None:
        """413 when a request carries more than `max_items` images (or text pairs)."""
        if count > self.settings.max_items:
            raise HTTPException(
                413, f"{count} {noun} is over the limit of {self.settings.max_items} per request"
            )

    async def decode_images(self, data: Sequence[str]) -> list[Image.Image]:
        """Count check, then base64 -> RGB images on a thread; 400/413 naming the first bad index."""
        self.check_count(len(data))
        try:
            return await asyncio.to_thread(
                decode_images,
                data,
                max_pixels=self.settings.max_pixels,
                max_total_pixels=self.settings.max_request_pixels,
            )
        except ImageInputError as exc:
            raise HTTPException(exc.status_code, str(exc)) from None

    async def run(self, items: Sequence[Any]) -> list[Any]:
        """The model's outputs for `items`, in order, computed in shared batches."""
        try:
            return await self.batcher.submit(items, timeout_s=self.deadline - time.monotonic())
        except QueueFull as exc:
            raise HTTPException(429, "queue full", headers={"Retry-After": str(exc.retry_after_s)}) from None
        except DeadlineExceeded:
            raise HTTPException(504, "deadline passed before the answer was computed") from None
        except InferenceFailed as exc:
            raise HTTPException(500, str(exc)) from None


async def get_inference(
    request: Request,
    x_request_timeout_ms: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> Inference:
    """503 until the model is loaded; the deadline is the server's request_timeout_s or the client's shorter one."""
    started = time.monotonic()
    state = request.app.state
    if state.batcher is None:
        detail = "model failed to load" if state.load_error else "model is loading"
        raise HTTPException(503, detail, headers={"Retry-After": "5"})
    timeout_s = state.settings.request_timeout_s
    if x_request_timeout_ms is not None:
        try:
            client_s = float(x_request_timeout_ms) / 1000.0
        except ValueError:
            client_s = math.nan
        if not math.isfinite(client_s) or client_s <= 0:
            raise HTTPException(422, f"{TIMEOUT_HEADER} must be a positive number of milliseconds")
        timeout_s = min(timeout_s, client_s)
    return Inference(state.settings, state.model, state.batcher, started + timeout_s)


InferenceDep = Annotated[Inference, Depends(get_inference)]


class StatusBody(BaseModel):
    status: str


def _health_router() -> APIRouter:
    router = APIRouter(tags=["health"])

    @router.get("/healthz", response_model=StatusBody, summary="liveness: the process serves HTTP")
    async def healthz() -> StatusBody:
        return StatusBody(status="alive")

    @router.get(
        "/readyz",
        response_model=StatusBody,
        responses=error_responses(503),
        summary="readiness: 200 once the model is loaded, 503 before",
    )
    async def readyz(request: Request) -> StatusBody | JSONResponse:
        state = request.app.state
        if state.batcher is not None:
            return StatusBody(status="ready")
        if state.load_error:
            return error_response(503, f"model failed to load: {state.load_error}")
        return error_response(503, "model is loading")

    @router.get(
        "/metrics",
        response_class=PlainTextResponse,
        responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
        summary="Prometheus metrics",
    )
    async def metrics(request: Request) -> PlainTextResponse:
        m: Metrics = request.app.state.metrics
        return PlainTextResponse(m.render(), media_type=m.content_type)

    return router


async def _in_daemon_thread(fn: Callable[[], T]) -> T:
    """Run `fn` on a daemon thread: a shutdown during a long model load does not wait for the load to finish."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: Any, exc: BaseException | None) -> None:
        if future.done():
            return
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)

    def target() -> None:
        try:
            result, exc = fn(), None
        except BaseException as e:  # handed to the awaiting task, which logs it
            result, exc = None, e
        with contextlib.suppress(RuntimeError):  # the loop closed while the model was loading
            loop.call_soon_threadsafe(settle, result, exc)

    threading.Thread(target=target, name="model-loader", daemon=True).start()
    return await future


async def _load_model(app: FastAPI, load_model: LoadModel) -> None:
    state = app.state
    settings: ServerSettings = state.settings
    started = time.monotonic()
    try:
        model = await _in_daemon_thread(load_model)
    except Exception as exc:
        logger.exception("model failed to load")
        state.load_error = f"{type(exc).__name__}: {exc}"[:200]
        if state.on_load_failure is not None:
            state.on_load_failure()
        return
    batcher = DynamicBatcher(
        model,
        max_batch_size=settings.max_batch_size,
        max_wait_s=settings.max_wait_ms / 1000.0,
        max_queue=settings.max_queue,
        observer=state.metrics,
    )
    batcher.start()
    state.model, state.batcher = model, batcher
    state.metrics.ready.set(1)
    logger.info("model loaded in %.1fs; ready", time.monotonic() - started)


def _version() -> str:
    try:
        return metadata.version("ddpo")
    except metadata.PackageNotFoundError:
        return "0.0.0"


def create_app(
    settings: ServerSettings, *, title: str, description: str, load_model: LoadModel, router: APIRouter
) -> FastAPI:
    """A FastAPI app serving `router` (behind auth) plus /healthz, /readyz and /metrics.

    `app.state.on_load_failure` (set by the runner, None in tests) is called when `load_model` raises, so that the
    process can exit instead of staying up unready.
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loading = asyncio.create_task(_load_model(app, load_model), name="model-load")
        try:
            yield
        finally:
            loading.cancel()
            if app.state.batcher is not None:
                await app.state.batcher.stop()

    app = FastAPI(title=title, description=description, version=_version(), lifespan=lifespan)
    app.state.settings = settings
    app.state.metrics = Metrics()
    app.state.model = None
    app.state.batcher = None
    app.state.load_error = None
    app.state.on_load_failure = None
    install_error_handlers(app)
    health = _health_router()
    app.include_router(health)
    app.include_router(router, **auth_route_options(settings.auth_token))
    known_paths = [getattr(route, "path", "") for route in (*health.routes, *router.routes)]
    known_paths += [url for url in (app.openapi_url, app.docs_url, app.redoc_url) if url]
    # The last middleware added is the outermost: metrics must see the body limit's 413s.
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=settings.max_body_bytes)
    app.add_middleware(RequestMetricsMiddleware, metrics=app.state.metrics, known_paths=known_paths)
    return app
