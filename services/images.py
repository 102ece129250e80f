"""Image conversions shared by samplers, local rewards and reward servers.

Tensors are float images in [0, 1] with shape [B, 3, H, W]; wire images are base64 strings of PNG/JPEG/WebP bytes.
"""

from __future__ import annotations

import base64
import io

import numpy as np
import torch
from PIL import Image


def tensor_to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[B, 3, H, W] floats in [0, 1] -> list of RGB PIL images (rounded to uint8 like diffusers does)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must have shape [B, 3, H, W], got {tuple(images.shape)}")
    arr = (
        (images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
    )
    return [Image.fromarray(a, mode="RGB") for a in arr]


def encode_image(image: Image.Image, fmt: str = "JPEG", quality: int = 95) -> str:
    """PIL image -> base64 string of `fmt` bytes (JPEG at `quality`, PNG lossless)."""
    buf = io.BytesIO()
    if fmt.upper() == "JPEG":
        image.convert("RGB").save(buf, format="JPEG", quality=quality)
    else:
        image.save(buf, format=fmt.upper())
    return base64.b64encode(buf.getvalue()).decode("ascii")


def jpeg_kb(image: Image.Image, quality: int = 95) -> float:
    """Size in kB (bytes / 1000) of the RGB image re-encoded by Pillow as JPEG at `quality` (the paper's reward)."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.tell() / 1000.0
