"""JPEG compressibility server: `POST /v1/score` -> `scores` = -jpeg_kb and `jpeg_kb`.

`jpeg_kb` is exactly `services.images.jpeg_kb`: the size in kB (bytes / 1000) of the RGB image re-encoded by
Pillow as JPEG quality 95, the paper's compressibility reward (its negation) and incompressibility reward.
"""

from __future__ import annotations

from fastapi import APIRouter, FastAPI
from PIL import Image
from pydantic import Field

from reward_servers import kit
from services.images import jpeg_kb
from services.reward_api import SERVER_APIS, ImagesRequest, JpegScoreResponse

API = SERVER_APIS["jpeg"]  # the endpoint and bodies of the HTTP contract


class JpegSettings(kit.ServerSettings):
    """JPEG server settings (no model to load)."""

    max_batch_size: int = Field(64, ge=1, description="most images in one batch")


def jpeg_kb_batch(images: list[Image.Image]) -> list[float]:
    """kB of each image as a quality-95 JPEG."""
    return [jpeg_kb(image) for image in images]


def create_app(settings: JpegSettings) -> FastAPI:
    """The jpeg server's app: POST /v1/score plus the kit's endpoints."""
    router = APIRouter(tags=["jpeg"])

    @router.post(API.path, response_model=API.response, responses=kit.V1_ERRORS)
    async def score(body: ImagesRequest, inference: kit.InferenceDep) -> JpegScoreResponse:
        """JPEG size of each image in kB, and its negation as the compressibility score."""
        images = await inference.decode_images(body.images)
        kb = await inference.run(images)
        return JpegScoreResponse(scores=[-k for k in kb], jpeg_kb=kb)

    return kit.create_app(
        settings,
        title="ddpo reward: jpeg",
        description=__doc__ or "",
        load_model=lambda: jpeg_kb_batch,
        router=router,
    )
