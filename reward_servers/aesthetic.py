"""LAION aesthetic predictor server: `POST /v1/score` -> one aesthetic score per image.

The improved aesthetic predictor (github.com/christophschuhmann/improved-aesthetic-predictor), as in the paper: the
CLIP ViT-L/14 image embedding, L2-normalised, through the MLP 768-1024-128-64-16-1.

Where the weights come from:
- `--model DIR` where DIR holds `clip/` (a CLIPModel + image processor) and `mlp.safetensors`: the layout that
  `ddpo tiny-models` writes to `OUT/aesthetic`.
- `--model openai/clip-vit-large-patch14 --mlp PATH/sac+logos+ava1-l14-linearMSE.pth`: the published predictor.
  `.pth` files are read with `torch.load(weights_only=True)` (tensors only, no pickled code); `.safetensors` too.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from fastapi import APIRouter, FastAPI
from PIL import Image
from pydantic import Field
from safetensors.torch import load_file
from torch import nn

from reward_servers import kit
from services.reward_api import SERVER_APIS, ImagesRequest, ScoreResponse

API = SERVER_APIS["aesthetic"]  # the endpoint and bodies of the HTTP contract

logger = logging.getLogger(__name__)

CLIP_SUBDIR = "clip"
MLP_FILE = "mlp.safetensors"


class AestheticSettings(kit.ModelSettings):
    """Aesthetic server settings."""

    model: str = Field(
        "openai/clip-vit-large-patch14",
        description=f"CLIP hub id or directory, or a directory holding {CLIP_SUBDIR}/ and {MLP_FILE}",
    )
    mlp: str | None = Field(
        None,
        description=f"MLP head weights (.safetensors or .pth); default MODEL/{MLP_FILE} when that exists",
    )


class AestheticMLP(nn.Module):
    """The LAION improved-aesthetic MLP; module names match the published state dict (`layers.0.weight`, ...)."""

    def __init__(self, input_dim: int = 768) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_dim, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embed: torch.Tensor) -> torch.Tensor:
        """[B, D] L2-normalised CLIP image embeddings -> [B, 1] scores."""
        return self.layers(embed)


def load_mlp_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of an MLP head from .safetensors or .pth (tensors only: never unpickles code)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_file(path)
    if path.suffix in (".pth", ".pt", ".bin"):
        return torch.load(path, map_location="cpu", weights_only=True)
    raise ValueError(f"MLP weights must be .safetensors or .pth, got {path.name}")


def resolve_weights(settings: AestheticSettings) -> tuple[str, Path]:
    """(CLIP hub id or directory, MLP weights path) from `model` and `mlp`."""
    if settings.mlp is not None:
        return settings.model, Path(settings.mlp)
    bundle = Path(settings.model)
    if (bundle / MLP_FILE).is_file():
        return str(bundle / CLIP_SUBDIR), bundle / MLP_FILE
    raise ValueError(
        f"no MLP weights: pass --mlp PATH (e.g. sac+logos+ava1-l14-linearMSE.pth) or a --model directory "
        f"holding {CLIP_SUBDIR}/ and {MLP_FILE}"
    )


class AestheticScorer:
    """Images -> aesthetic scores with a CLIP model, its image processor and the MLP head."""

    def __init__(self, clip: Any, processor: Any, mlp: AestheticMLP, device: str, dtype: torch.dtype) -> None:
        self.clip = clip.eval()
        self.processor = processor
        self.mlp = mlp.eval()
        self.device = device
        self.dtype = dtype

    @torch.inference_mode()
    def __call__(self, images: list[Image.Image]) -> list[float]:
        images = [kit.center_crop_to_aspect(im) for im in images]
        pixel_values = self.processor(images=images, return_tensors="pt")["pixel_values"]  # [B, 3, H, W]
        pixel_values = pixel_values.to(self.device, self.dtype)
        features = self.clip.get_image_features(pixel_values=pixel_values)
        embed = features if isinstance(features, torch.Tensor) else features.pooler_output  # [B, D]
        embed = embed.float()
        embed = embed / torch.linalg.vector_norm(embed, dim=-1, keepdim=True)  # [B, D]
        return self.mlp(embed).squeeze(1).tolist()  # [B]


def load_scorer(settings: AestheticSettings) -> AestheticScorer:
    """Load CLIP, its processor and the MLP head; the MLP's input size must be CLIP's projection size."""
    # lazily: `ddpo serve` imports every server module, and only the served model needs transformers
    from transformers import AutoImageProcessor, CLIPModel

    clip_id, mlp_path = resolve_weights(settings)
    dtype = settings.torch_dtype()
    clip = CLIPModel.from_pretrained(clip_id, dtype=dtype).to(settings.device)
    processor = AutoImageProcessor.from_pretrained(clip_id)
    state = load_mlp_state_dict(mlp_path)
    input_dim = state["layers.0.weight"].shape[1]
    if input_dim != clip.config.projection_dim:
        raise ValueError(
            f"MLP takes {input_dim}-d embeddings but CLIP projects to {clip.config.projection_dim}"
        )
    mlp = AestheticMLP(input_dim)
    mlp.load_state_dict(state)
    logger.info("aesthetic predictor: CLIP %s, MLP %s, %s on %s", clip_id, mlp_path, dtype, settings.device)
    return AestheticScorer(clip, processor, mlp.to(settings.device), settings.device, dtype)


def create_app(settings: AestheticSettings) -> FastAPI:
    """The aesthetic server's app: POST /v1/score plus the kit's endpoints."""
    router = APIRouter(tags=["aesthetic"])

    @router.post(API.path, response_model=API.response, responses=kit.V1_ERRORS)
    async def score(body: ImagesRequest, inference: kit.InferenceDep) -> ScoreResponse:
        """Aesthetic score of each image (about 1-10 with the published weights)."""
        images = await inference.decode_images(body.images)
        return ScoreResponse(scores=await inference.run(images))

    return kit.create_app(
        settings,
        title="ddpo reward: aesthetic",
        description=__doc__ or "",
        load_model=lambda: load_scorer(settings),
        router=router,
    )
