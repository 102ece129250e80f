"""Short JSON errors: every refusal is `{"detail": "<one line>"}`; never a traceback, never the input echoed."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)

MAX_DETAIL_CHARS = 300
_DESCRIPTIONS = {
    400: "an image is not valid base64 or not a PNG/JPEG/WebP image (the detail names its index)",
    401: "missing or wrong bearer token",
    413: "too many items, body too large or image over the pixel limit",
    422: "wrong types, mismatched list lengths or values out of range",
    429: "queue full; retry after the Retry-After header's seconds",
    500: "the model failed on a batch (a server bug; logged)",
    503: "model not loaded yet",
    504: "the request's deadline passed before its answer was computed",
}


class ErrorBody(BaseModel):
    """Body of every error response."""

    detail: str


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` entries documenting these error codes with the ErrorBody schema."""
    return {code: {"model": ErrorBody, "description": _DESCRIPTIONS[code]} for code in codes}


def error_response(status_code: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail[:MAX_DETAIL_CHARS]}, status_code=status_code, headers=headers)


def _summarize_validation(exc: RequestValidationError) -> str:
    """'images.0: Input should be a valid string; ...' from pydantic's error list, without the inputs."""
    parts = []
    for err in exc.errors()[:3]:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        parts.append(f"{loc}: {err.get('msg', 'invalid')}" if loc else str(err.get("msg", "invalid")))
    more = len(exc.errors()) - 3
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


def install_error_handlers(app: FastAPI) -> None:
    """HTTP errors and validation errors as short JSON; anything unexpected as a logged 500."""

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(422, _summarize_validation(exc))

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal server error")
