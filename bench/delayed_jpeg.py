"""The delayed jpeg reward server of `bench.latency_hiding`: the jpeg API, `POST /v1/score {"images"} -> {"scores",
"jpeg_kb"}` with `jpeg_kb = services.images.jpeg_kb`, plus `asyncio.sleep(delay)` per request.

A module of its own so that its uvicorn process imports only FastAPI, Pillow and services.images (not the sampler's
diffusers stack): the benchmark starts two of them.
"""

from __future__ import annotations

import asyncio
import base64
import io
import os

from fastapi import FastAPI
from PIL import Image
from pydantic import BaseModel

from services.images import jpeg_kb

DELAY_ENV = "DDPO_BENCH_REWARD_DELAY_S"
_delay = asyncio.sleep  # the added latency of the delayed server (tests record it instead of waiting)


class ScoreRequest(BaseModel):
    images: list[str]
    """base64 PNG/JPEG/WebP images."""


def delayed_jpeg_app(delay_s: float) -> FastAPI:
    """The jpeg reward API with `delay_s` of added latency per request (the event loop stays free meanwhile)."""
    app = FastAPI(title=f"bench jpeg reward (+{delay_s} s per request)")

    def decode_and_score(images_b64: list[str]) -> list[float]:
        return [jpeg_kb(Image.open(io.BytesIO(base64.b64decode(b)))) for b in images_b64]

    @app.get("/readyz")
    async def readyz() -> dict:
        return {"status": "ready"}

    @app.post("/v1/score")
    async def score(body: ScoreRequest) -> dict:
        await _delay(delay_s)
        kb = await asyncio.to_thread(decode_and_score, body.images)
        return {"scores": [-k for k in kb], "jpeg_kb": kb}

    return app


def app_from_env() -> FastAPI:
    """uvicorn --factory entry point: the delay comes from DDPO_BENCH_REWARD_DELAY_S."""
    return delayed_jpeg_app(float(os.environ.get(DELAY_ENV, "0")))
