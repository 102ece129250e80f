"""A small random-weight Stable Diffusion, written with fixed seeds, so every path runs offline on a CPU.

`ddpo tiny-models --out DIR` writes it as DIR/sd (UNet + VAE + CLIP text encoder + tokenizer, 64 px), next to the
tiny reward models of `reward_servers.tiny_models` (DIR/llava, DIR/aesthetic).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

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


def build_tiny_sd_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """An SD-1.x-shaped pipeline small enough to sample 50 steps in a fraction of a second on a CPU."""
    torch.manual_seed(seed)
    tokenizer = _tiny_tokenizer()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
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
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 16, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=TINY_RESOLUTION,
    )
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


def write_tiny_sd(out_dir: str | Path, seed: int = 0) -> Path:
    out = Path(out_dir)
    build_tiny_sd_pipeline(seed).save_pretrained(out, safe_serialization=True)
    logger.info("wrote tiny Stable Diffusion pipeline to %s", out)
    return out
