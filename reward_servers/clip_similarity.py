"""CLIP image-text similarity servers, PickScore and CLIPScore: `POST /v1/score` -> one score per (image, prompt).

Both embed the image and its prompt with transformers' `CLIPModel` and take the cosine similarity of the two
projected embeddings; they differ in the weights and in the last line:

- pickscore (Kirstain et al. 2023, "Pick-a-Pic"): score = logit_scale.exp() * cos, the reference code's per-image
  score before its softmax over images, with the model's learned logit scale. Real weights: `yuvalkirstain/PickScore_v1`
  (CLIP ViT-H/14 fine-tuned on human preferences); the reference code takes the processor (tokenizer + image
  processor) from `laion/CLIP-ViT-H-14-laion2B-s32B-b79K`, and so does this server for that model id by default.
- clipscore (Hessel et al. 2021, "CLIPScore"): score = w * max(cos, 0) with w = 2.5; the logit scale plays no part.
  Default weights: `openai/clip-vit-large-patch14` (the paper used ViT-B/32: `--model openai/clip-vit-base-patch32`).
  The prompt is scored as given (the paper's code prefixes captions with "A photo depicts").

Any directory with a CLIPModel, its tokenizer and image processor works too, e.g. the tiny random models that
`ddpo tiny-models` writes to `OUT/pickscore` and `OUT/clipscore`. Every reply also carries the cosine itself.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from fastapi import APIRouter, FastAPI
from PIL import Image
from pydantic import Field

from reward_servers import kit
from services.reward_api import SERVER_APIS, ImagesPromptsRequest, SimilarityScoreResponse

logger = logging.getLogger(__name__)

PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"  # the processor of the reference code
CLIPSCORE_MODEL = "openai/clip-vit-large-patch14"
CLIPSCORE_W = 2.5  # Hessel et al. 2021: rescales cosines (rarely above 0.4) towards [0, 1]

# cos [B], logit_scale [] (CLIP's learned log temperature) -> scores [B]
SimilarityScore = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# ---- the math: paired embeddings -> scores --------------------------------------------------------------------------
def paired_cosine(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """cos(v_i, t_i) of B (image, text) pairs: image_embeds [B, D], text_embeds [B, D] -> [B], in float32."""
    v = image_embeds.float()
    t = text_embeds.float()
    return (v * t).sum(-1) / (torch.linalg.vector_norm(v, dim=-1) * torch.linalg.vector_norm(t, dim=-1))


def pickscore(cos: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """PickScore: exp(logit_scale) * cos, cos [B] -> [B] (the logits of the reference code, per image)."""
    return logit_scale.float().exp() * cos


def clipscore(cos: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """CLIPScore = w * max(cos, 0), w = 2.5 (Hessel et al. 2021, eq. 1), cos [B] -> [B]; the logit scale is unused."""
    return CLIPSCORE_W * cos.clamp(min=0.0)


# ---- settings ---------------------------------------------------------------------------------------------------
class SimilaritySettings(kit.ModelSettings):
    """What both similarity servers take: the CLIP model and, if it lives elsewhere, its processor."""

    processor: str | None = Field(
        None,
        description="hub id or directory of the tokenizer and image processor; default: the model's own",
    )
    max_batch_size: int = Field(32, ge=1, description="most (image, prompt) pairs in one model batch")

    def processor_path(self) -> str:
        """Where the tokenizer and the image processor load from."""
        return self.processor or self.model


class PickScoreSettings(SimilaritySettings):
    """PickScore server settings."""

    model: str = Field(
        PICKSCORE_MODEL,
        description=f"hub id or directory of a CLIPModel (real: {PICKSCORE_MODEL}; tiny: OUT/pickscore of "
        "ddpo tiny-models)",
    )
    processor: str | None = Field(
        None,
        description=f"hub id or directory of the tokenizer and image processor; default: {PICKSCORE_PROCESSOR} for "
        f"{PICKSCORE_MODEL} (as the reference code), else the model's own",
    )

    def processor_path(self) -> str:
        if self.processor is None and self.model == PICKSCORE_MODEL:
            return PICKSCORE_PROCESSOR
        return super().processor_path()


class ClipScoreSettings(SimilaritySettings):
    """CLIPScore server settings."""

    model: str = Field(
        CLIPSCORE_MODEL,
        description=f"hub id or directory of a CLIPModel (real: {CLIPSCORE_MODEL}; tiny: OUT/clipscore of "
        "ddpo tiny-models)",
    )


# ---- the model ------------------------------------------------------------------------------------------------------
def _projected(features: Any) -> torch.Tensor:
    """The projected embedding [B, D] from get_image/text_features (a tensor, or an output whose pooler_output it is
    in newer transformers)."""
    return features if isinstance(features, torch.Tensor) else features.pooler_output


class ClipSimilarityScorer:
    """(image, prompt) pairs -> (score, cosine) with a CLIP model, its tokenizer and image processor."""

    def __init__(
        self,
        clip: Any,
        tokenizer: Any,
        image_processor: Any,
        score: SimilarityScore,
        device: str,
        dtype: torch.dtype,
    ) -> None:
        self.clip = clip.eval()
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.score = score
        self.device = device
        self.dtype = dtype
        # prompts longer than the text encoder's positions are cut (keeping the end-of-text token), as in the
        # reference code's truncation to 77 tokens
        self.max_length = min(tokenizer.model_max_length, clip.config.text_config.max_position_embeddings)

    def embed_images(self, images: list[Image.Image]) -> torch.Tensor:
        """RGB images -> projected image embeddings [B, D]."""
        images = [kit.center_crop_to_aspect(im) for im in images]
        pixel_values = self.image_processor(images=images, return_tensors="pt")[
            "pixel_values"
        ]  # [B, 3, H, W]
        pixel_values = pixel_values.to(self.device, self.dtype)
        return _projected(self.clip.get_image_features(pixel_values=pixel_values))

    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        """Texts -> projected text embeddings [N, D]."""
        enc = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return _projected(
            self.clip.get_text_features(
                input_ids=enc["input_ids"].to(self.device),
                attention_mask=enc["attention_mask"].to(self.device),
            )
        )

    @torch.inference_mode()
    def __call__(self, items: list[tuple[Image.Image, str]]) -> list[tuple[float, float]]:
        prompts = [p for _, p in items]
        unique = list(
            dict.fromkeys(prompts)
        )  # a batch holds several images per prompt: encode each prompt once
        row = {p: i for i, p in enumerate(unique)}
        image_embeds = self.embed_images([im for im, _ in items])  # [B, D]
        text_embeds = self.embed_texts(unique)[[row[p] for p in prompts]]  # [B, D]
        cos = paired_cosine(image_embeds, text_embeds)  # [B]
        scores = self.score(cos, self.clip.logit_scale.detach())  # [B]
        return list(zip(scores.tolist(), cos.tolist(), strict=True))


def load_scorer(settings: SimilaritySettings, score: SimilarityScore) -> ClipSimilarityScorer:
    """CLIPModel from `model`, tokenizer and image processor from `processor_path()`."""
    # lazily: `ddpo serve` imports every server module, and only the served model needs transformers
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    dtype = settings.torch_dtype()
    clip = CLIPModel.from_pretrained(settings.model, dtype=dtype).to(settings.device)
    processor = settings.processor_path()
    tokenizer = AutoTokenizer.from_pretrained(processor)
    image_processor = AutoImageProcessor.from_pretrained(processor)
    logger.info(
        "%s: CLIP %s, processor %s, %s on %s",
        score.__name__,
        settings.model,
        processor,
        dtype,
        settings.device,
    )
    return ClipSimilarityScorer(clip, tokenizer, image_processor, score, settings.device, dtype)


# ---- the apps -------------------------------------------------------------------------------------------------------
def _create_app(settings: SimilaritySettings, kind: str, score: SimilarityScore, about: str) -> FastAPI:
    api = SERVER_APIS[kind]  # the endpoint and bodies of the HTTP contract
    router = APIRouter(tags=[kind])

    @router.post(api.path, response_model=api.response, responses=kit.V1_ERRORS, description=about)
    async def score_pairs(body: ImagesPromptsRequest, inference: kit.InferenceDep) -> SimilarityScoreResponse:
        images = await inference.decode_images(body.images)
        results = await inference.run(list(zip(images, body.prompts, strict=True)))
        return SimilarityScoreResponse(scores=[s for s, _ in results], cosine=[c for _, c in results])

    return kit.create_app(
        settings,
        title=f"ddpo reward: {kind}",
        description=__doc__ or "",
        load_model=lambda: load_scorer(settings, score),
        router=router,
    )


def create_pickscore_app(settings: PickScoreSettings) -> FastAPI:
    """The pickscore server's app: POST /v1/score plus the kit's endpoints."""
    return _create_app(
        settings, "pickscore", pickscore, "PickScore of each image for its prompt: exp(logit_scale) * cos."
    )


def create_clipscore_app(settings: ClipScoreSettings) -> FastAPI:
    """The clipscore server's app: POST /v1/score plus the kit's endpoints."""
    return _create_app(
        settings, "clipscore", clipscore, "CLIPScore of each image for its prompt: 2.5 * max(cos, 0)."
    )
