"""Wire images -> PIL, refusing anything that should not reach a model.

An image on the wire is a base64 string of PNG, JPEG or WebP bytes, optionally behind a `data:` URL prefix: exactly
the strings that the schema's `services.reward_api.BASE64_IMAGE_PATTERN` matches. Pixel limits (per image and per
request) are checked on the headers, before any pixel is decoded, so decompression bombs cost nothing.
"""

from __future__ import annotations

import binascii
import io
import re
import warnings
from collections.abc import Sequence

from PIL import Image

from services.reward_api import DATA_URL_PREFIX_PATTERN

ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP")


class ImageInputError(ValueError):
    """A wire image that is refused; `status_code` is 400 (not an image) or 413 (too large)."""

    def __init__(self, message: str, status_code: int = 400) -> None:
        super().__init__(message)
        self.status_code = status_code


_DATA_URL_PREFIX = re.compile(DATA_URL_PREFIX_PATTERN)


def decode_base64(data: str) -> bytes:
    """The bytes of a wire image: strict base64 (padded, no whitespace), optionally behind a
    `data:image/<type>;base64,` prefix. Accepts exactly the strings that the schema's BASE64_IMAGE_PATTERN matches."""
    if data.startswith("data:"):
        prefix = _DATA_URL_PREFIX.match(data)
        if prefix is None:
            raise ImageInputError("data URL must be of the form data:image/<type>;base64,<payload>")
        data = data[prefix.end() :]
    try:
        raw = binascii.a2b_base64(data, strict_mode=True)
    except ValueError:  # binascii.Error, or a str that is not ASCII
        raise ImageInputError("not valid base64") from None
    if len(data) != 4 * -(-len(raw) // 3):  # strict mode still takes padding past the last group ("AAAA=")
        raise ImageInputError("not valid base64")
    return raw


def open_image(data: str, *, max_pixels: int) -> Image.Image:
    """Base64 PNG/JPEG/WebP -> a PIL image whose header is read and checked, its pixels not yet decoded."""
    raw = decode_base64(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(raw), formats=ACCEPTED_FORMATS)
    except Image.DecompressionBombError:
        raise ImageInputError(f"image is over the limit of {max_pixels} pixels", 413) from None
    except Exception:  # Pillow raises many types (OSError, SyntaxError, struct.error, ...) on corrupt data
        raise ImageInputError("not a PNG, JPEG or WebP image") from None
    width, height = image.size
    if width * height > max_pixels:
        raise ImageInputError(f"{width}x{height} pixels is over the limit of {max_pixels}", 413)
    return image


def load_rgb(image: Image.Image) -> Image.Image:
    """Decode the pixels of an opened image, as RGB."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image.load()
            return image.convert("RGB")
    except Exception:  # truncated or corrupt pixel data
        raise ImageInputError("not a decodable PNG, JPEG or WebP image") from None


def decode_image(data: str, *, max_pixels: int) -> Image.Image:
    """Base64 PNG/JPEG/WebP -> RGB PIL image. Raises ImageInputError (400 or 413)."""
    return load_rgb(open_image(data, max_pixels=max_pixels))


def decode_images(
    data: Sequence[str], *, max_pixels: int, max_total_pixels: int | None = None
) -> list[Image.Image]:
    """Decode every image; a refusal names the index, e.g. 'images[3]: not valid base64'.

    Every header is checked (per image, then the request's total) before any image's pixels are decoded.
    """
    opened = []
    for i, item in enumerate(data):
        try:
            opened.append(open_image(item, max_pixels=max_pixels))
        except ImageInputError as exc:
            raise ImageInputError(f"images[{i}]: {exc}", exc.status_code) from None
    total = sum(im.size[0] * im.size[1] for im in opened)
    if max_total_pixels is not None and total > max_total_pixels:
        raise ImageInputError(f"images: {total} pixels in all is over the limit of {max_total_pixels}", 413)
    images = []
    for i, image in enumerate(opened):
        try:
            images.append(load_rgb(image))
        except ImageInputError as exc:
            raise ImageInputError(f"images[{i}]: {exc}", exc.status_code) from None
    return images


def center_crop_to_aspect(image: Image.Image, max_aspect: float = 4.0) -> Image.Image:
    """Crop the long side around the centre so that long/short <= max_aspect.

    CLIP-style processors resize the short side to S before a centre crop to S x S, so a 1 x 10000 image would be
    upscaled to S x 10000*S first. Cropping to a bounded aspect ratio before that keeps the crop the model sees and
    bounds the memory; images with aspect ratio <= max_aspect are returned unchanged.
    """
    width, height = image.size
    short, long = min(width, height), max(width, height)
    if long <= max_aspect * short:
        return image
    keep = max(1, int(max_aspect * short))
    if width > height:
        left = (width - keep) // 2
        return image.crop((left, 0, left + keep, height))
    top = (height - keep) // 2
    return image.crop((0, top, width, top + keep))
