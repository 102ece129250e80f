"""Small random-weight pipelines of every model family, written with fixed seeds, so every path runs offline on a CPU.

`ddpo tiny-models --out DIR` writes them next to the tiny reward models of `reward_servers.tiny_models` (DIR/llava,
DIR/aesthetic, ...):
- DIR/sd:   StableDiffusionPipeline (UNet + VAE + CLIP text encoder + tokenizer, DDIM), 64 px;
- DIR/sdxl: StableDiffusionXLPipeline (UNet with text_time added conditioning, two CLIP text encoders, the second
            with a projection, DDIM), 64 px;
- DIR/sd3:  StableDiffusion3Pipeline (MMDiT transformer, two CLIP text encoders with projections, no T5, VAE with a
            shift factor, FlowMatchEulerDiscreteScheduler with SD3's shift 3), 64 px.
Each loads with its stock pipeline's from_pretrained.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

logger = logging.getLogger(__name__)

TINY_RESOLUTION = 64  # pixels; latents are 4 x 8 x 8
# SD 1.x's noise schedule (scaled-linear betas, leading spacing, offset 1), for every model built from configs
SD1_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
)


def _tiny_tokenizer() -> CLIPTokenizer:
    """A character-level CLIP BPE tokenizer: printable ASCII, each with an end-of-word variant, no merges."""
    chars = [chr(c) for c in range(33, 127)]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in chars:
        vocab[ch] = len(vocab)
    for ch in chars:
        vocab[ch + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def _tiny_clip_config(tokenizer: CLIPTokenizer, projection_dim: int | None = None) -> CLIPTextConfig:
    """A 2-layer, 32-wide CLIP text encoder (with a text projection of projection_dim when given)."""
    extra = {"projection_dim": projection_dim} if projection_dim is not None else {}
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        **extra,
    )


def _tiny_vae(**kwargs) -> AutoencoderKL:
    """A 4-level VAE (scale factor 8) with 4 latent channels, 8-16 channels wide."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 16, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=TINY_RESOLUTION,
        **kwargs,
    )


def build_tiny_sd_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """An SD-1.x-shaped pipeline small enough to sample 50 steps in a fraction of a second on a CPU."""
    torch.manual_seed(seed)
    tokenizer = _tiny_tokenizer()
    text_encoder = CLIPTextModel(_tiny_clip_config(tokenizer))
    unet = UNet2DConditionModel(
        sample_size=TINY_RESOLUTION // 8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    vae = _tiny_vae()
    scheduler = DDIMScheduler(**SD1_SCHEDULER)
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


class _DropAbsentComponentNotice(logging.Filter):
    """diffusers warns "self.text_encoder_3=None of type <class 'NoneType'> cannot be saved." for each component a
    pipeline is built without: the tiny SD3 has no T5 by design, so the notice says nothing to a user."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "=None of type <class 'NoneType'> cannot be saved" not in record.getMessage()


def _write_pipeline(pipeline, out_dir: str | Path, what: str) -> Path:
    out = Path(out_dir)
    notices = logging.getLogger("diffusers.pipelines.pipeline_utils")
    drop = _DropAbsentComponentNotice()
    notices.addFilter(drop)
    try:
        pipeline.save_pretrained(out, safe_serialization=True)
    finally:
        notices.removeFilter(drop)
    logger.info("wrote tiny %s pipeline to %s", what, out)
    return out


def write_tiny_sd(out_dir: str | Path, seed: int = 0) -> Path:
    return _write_pipeline(build_tiny_sd_pipeline(seed), out_dir, "Stable Diffusion")


TINY_TIME_EMBED_DIM = (
    8  # SDXL's addition_time_embed_dim (256 in SDXL base), one embedding per add_time_ids entry
)


def build_tiny_sdxl_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    """An SDXL-shaped pipeline: two text encoders (the second with a 32-d projection: the pooled embedding), a UNet
    conditioned on both encoders' concatenated hidden states (64-d) and on text_time added embeddings (pooled
    text + 6 add_time_ids), DDIM with SD's schedule (SDXL's betas are the same)."""
    torch.manual_seed(seed)
    tokenizer = _tiny_tokenizer()
    text_encoder = CLIPTextModel(_tiny_clip_config(tokenizer))
    text_encoder_2 = CLIPTextModelWithProjection(_tiny_clip_config(tokenizer, projection_dim=32))
    unet = UNet2DConditionModel(
        sample_size=TINY_RESOLUTION // 8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64,  # 32 + 32: both encoders' hidden states
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=TINY_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=32 + 6 * TINY_TIME_EMBED_DIM,  # pooled text + 6 time ids
        norm_num_groups=8,
    )
    return StableDiffusionXLPipeline(
        vae=_tiny_vae(),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=_tiny_tokenizer(),
        unet=unet,
        scheduler=DDIMScheduler(**SD1_SCHEDULER),
        force_zeros_for_empty_prompt=True,  # as SDXL base: an empty negative prompt is all zeros
    )


def build_tiny_sd3_pipeline(seed: int = 0) -> StableDiffusion3Pipeline:
    """An SD3-shaped pipeline without T5 (text_encoder_3 = None: the stock pipeline then uses zeros for its
    tokens): CLIP-L- and CLIP-G-like encoders with 32-d projections (pooled 64), a 2-layer MMDiT on 2x2 patches of
    4-channel latents, a VAE with a shift factor, and the flow-matching Euler schedule with SD3's shift 3."""
    torch.manual_seed(seed)
    tokenizer = _tiny_tokenizer()
    transformer = SD3Transformer2DModel(
        sample_size=TINY_RESOLUTION // 8,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=64,  # the two CLIPs' hidden states concatenated (T5's width in SD3)
        caption_projection_dim=32,  # = num_attention_heads x attention_head_dim
        pooled_projection_dim=64,  # the two CLIPs' projections concatenated
        pos_embed_max_size=8,
    )
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=_tiny_vae(
            scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False
        ),
        text_encoder=CLIPTextModelWithProjection(_tiny_clip_config(tokenizer, projection_dim=32)),
        tokenizer=tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(_tiny_clip_config(tokenizer, projection_dim=32)),
        tokenizer_2=_tiny_tokenizer(),
        text_encoder_3=None,
        tokenizer_3=None,
    )


def write_tiny_sdxl(out_dir: str | Path, seed: int = 0) -> Path:
    return _write_pipeline(build_tiny_sdxl_pipeline(seed), out_dir, "SDXL")


def write_tiny_sd3(out_dir: str | Path, seed: int = 0) -> Path:
    return _write_pipeline(build_tiny_sd3_pipeline(seed), out_dir, "SD3")
