"""Benchmark presets `sdxl` and `sd3`: SDXL base 1.0's and SD 3.5 Medium's architectures with random weights.

Built from the published configs in code, with no download, so their cost is the real models':

| preset | part           | config                                                                          |
| ------ | -------------- | ------------------------------------------------------------------------------- |
| sdxl   | UNet           | blocks (320, 640, 1280), transformer layers (1, 2, 10), cross-attn 2048, text_time |
|        | text encoders  | CLIP ViT-L/14 text (12 x 768) + OpenCLIP bigG text (32 x 1280, projection 1280)  |
|        | VAE            | (128, 256, 512, 512), latent 4, scaling 0.13025                                  |
| sd3    | transformer    | MMDiT-X: 24 layers, 24 heads x 64, patch 2, latent 16, dual attention in 0-12, RMS qk-norm |
|        | text encoders  | CLIP-L + CLIP-G with projections (pooled 2048); T5-XXL left out (zeros, as the stock |
|        |                | pipeline without it): its 4.8 B parameters are counted but not built             |
|        | VAE            | (128, 256, 512, 512), latent 16, scaling 1.5305, shift 0.0609                    |

`parameter_counts(preset)` instantiates every part on the meta device (no memory, no weights) and counts.
The tokenizers are the tiny models' character-level CLIP tokenizer (prompts are padded to 77 tokens either way).
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from services.tiny_models import SD1_SCHEDULER, _tiny_tokenizer

CLIP_L = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=768,
    bos_token_id=0,  # the tiny tokenizer's special ids
    eos_token_id=1,
    pad_token_id=1,
)
CLIP_G = dict(CLIP_L, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
              hidden_act="gelu", projection_dim=1280)  # fmt: skip
T5_XXL = dict(vocab_size=32128, d_model=4096, d_ff=10240, d_kv=64, num_layers=24, num_heads=64,
              feed_forward_proj="gated-gelu", is_encoder_decoder=False)  # fmt: skip
VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    norm_num_groups=32,
)
SDXL_UNET = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,  # 1280 pooled + 6 x 256 time ids
)
SDXL_VAE = dict(VAE, latent_channels=4, scaling_factor=0.13025, sample_size=1024)
SD35M_TRANSFORMER = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=24,
    attention_head_dim=64,
    num_attention_heads=24,
    joint_attention_dim=4096,
    caption_projection_dim=1536,
    pooled_projection_dim=2048,
    pos_embed_max_size=384,
    dual_attention_layers=tuple(range(13)),
    qk_norm="rms_norm",
)
SD35M_VAE = dict(VAE, latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609, sample_size=1024,
                 use_quant_conv=False, use_post_quant_conv=False)  # fmt: skip


def _parts(preset: str) -> dict[str, object]:
    """Every model part of the preset (on the current default device)."""
    if preset == "sdxl":
        return {
            "unet": UNet2DConditionModel(**SDXL_UNET),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**CLIP_L)),
            "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G)),
            "vae": AutoencoderKL(**SDXL_VAE),
        }
    if preset == "sd3":
        return {
            "transformer": SD3Transformer2DModel(**SD35M_TRANSFORMER),
            "text_encoder": CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_L)),
            "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G)),
            "vae": AutoencoderKL(**SD35M_VAE),
        }
    raise ValueError(f"unknown family preset {preset!r}; choose from sdxl, sd3")


def parameter_counts(preset: str) -> dict[str, int]:
    """Parameters of each part of the preset, counted on meta-device models (nothing allocated, nothing downloaded);
    sd3 also counts the T5-XXL encoder it does not build."""
    with torch.device("meta"):
        parts = _parts(preset)
        if preset == "sd3":
            parts["text_encoder_3 (not built)"] = T5EncoderModel(T5Config(**T5_XXL))
    return {name: _count(part) for name, part in parts.items()}


def _count(model: torch.nn.Module) -> int:
    """Parameters, a tied copy counted once (as published counts do): T5's encoder.embed_tokens is its `shared`
    embedding, whether or not this process's transformers state tied the two on the meta device (a test session's
    earlier models left it untied once: 4,894 M instead of 4,762 M)."""
    tied = set(getattr(model, "_tied_weights_keys", None) or {})
    return sum(p.numel() for n, p in model.named_parameters() if n not in tied)


def build_family_pipeline(preset: str, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """The preset's stock diffusers pipeline with random weights, created on `device` directly in `dtype` (no float32
    copy first: SDXL's parts are 13 GB in float32)."""
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            parts = {name: part.to(dtype) for name, part in _parts(preset).items()}
    finally:
        torch.set_default_dtype(default)
    if preset == "sdxl":
        return StableDiffusionXLPipeline(
            **parts,
            tokenizer=_tiny_tokenizer(),
            tokenizer_2=_tiny_tokenizer(),
            scheduler=DDIMScheduler(**SD1_SCHEDULER),  # SDXL's betas; DDIM is the policy's step
            force_zeros_for_empty_prompt=True,
        )
    return StableDiffusion3Pipeline(
        **parts,
        tokenizer=_tiny_tokenizer(),
        tokenizer_2=_tiny_tokenizer(),
        text_encoder_3=None,
        tokenizer_3=None,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
    )
