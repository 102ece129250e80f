"""The denoiser's LoRA in the diffusers format, so stock diffusers (and tools that read its files) reproduce our images.

    save_diffusers_lora(denoiser, DIR)  ->  DIR/pytorch_lora_weights.safetensors
    StableDiffusionPipeline.from_pretrained(base, scheduler=DDIMScheduler...).load_lora_weights(DIR)
    (likewise StableDiffusionXLPipeline, and StableDiffusion3Pipeline for a transformer's LoRA)

Keys are peft's names under the component's prefix (`unet.<module>.lora_A.weight` / `lora_B.weight`, or
`transformer.` for SD3), the format `load_lora_weights` reads for attention and convolution modules alike
(converting to the older `lora.down`/`lora.up` names renames only attention modules, and a file mixing both formats
loses the attention LoRAs in the stock loader). The LoRA scale alpha / r is folded into
the up (B) matrices and the file's adapter metadata says lora_alpha = r, so every loader -- diffusers with or
without reading the metadata, and tools that assume alpha = rank when no alpha is stored -- applies exactly
W + (alpha / r) B A. Our LoRA is a float32 peft adapter named "default" (`services.models.add_lora`); loading it back
under that name lets `services.models.policy_state_dict` read it again.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from diffusers import (
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict

from services.config import ModelConfig
from services.diffusion import policy_for
from services.models import load_pipeline

logger = logging.getLogger(__name__)

ADAPTER_NAME = "default"  # peft's name for the adapter `services.models.add_lora` attaches
WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' default file name for load_lora_weights(dir)
# denoiser class -> (the pipeline whose LoRA mixin writes it, the component name)
LORA_WRITERS: dict[type, tuple[type, str]] = {
    UNet2DConditionModel: (StableDiffusionPipeline, "unet"),  # SD and SDXL read the same unet.* keys
    SD3Transformer2DModel: (StableDiffusion3Pipeline, "transformer"),
}


def folded_lora_state_dict(
    unet: torch.nn.Module, adapter_name: str = ADAPTER_NAME
) -> dict[str, torch.Tensor]:
    """peft state dict of the adapter (keys `<module>.lora_A.weight` [r, in], `lora_B.weight` [out, r]) with each
    module's scaling (alpha / r, or alpha / sqrt(r) for rsLoRA) multiplied into its B matrix; float32 on the CPU."""
    state = get_peft_model_state_dict(unet, adapter_name=adapter_name)
    folded = {k: v.detach().to("cpu", torch.float32).clone() for k, v in state.items()}
    for name, module in unet.named_modules():
        if isinstance(module, LoraLayer) and adapter_name in module.scaling:
            key = f"{name}.lora_B.weight"
            if key not in folded:
                raise ValueError(f"LoRA module {name} has no {key} in the adapter state")
            folded[key] *= module.scaling[adapter_name]
    return folded


def save_diffusers_lora(unet: torch.nn.Module, out_dir: str | Path, adapter_name: str = ADAPTER_NAME) -> Path:
    """Write the denoiser's (UNet's or SD3 transformer's) peft LoRA as DIR/pytorch_lora_weights.safetensors in the
    diffusers LoRA format; returns DIR."""
    writer = next((w for cls, w in LORA_WRITERS.items() if isinstance(unet, cls)), None)
    if writer is None:
        raise ValueError(f"no diffusers LoRA format known for a {type(unet).__name__}")
    pipeline_class, component = writer
    peft_config = getattr(unet, "peft_config", {}).get(adapter_name)
    if peft_config is None:
        raise ValueError(
            f"the UNet has no peft adapter {adapter_name!r} (full fine-tuning has no LoRA to export)"
        )
    if getattr(peft_config, "use_dora", False):
        raise ValueError("DoRA adapters are not supported by save_diffusers_lora")
    metadata = peft_config.to_dict()
    # alpha / r is already in B: declare alpha = r for every module so loaders apply a scale of exactly 1.
    metadata.update(
        lora_alpha=peft_config.r,
        alpha_pattern=dict(peft_config.rank_pattern),
        use_rslora=False,
        init_lora_weights=True,
        inference_mode=True,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    layers = folded_lora_state_dict(unet, adapter_name)
    pipeline_class.save_lora_weights(
        out,
        **{
            f"{component}_lora_layers": layers,
            f"{component}_lora_adapter_metadata": metadata,
        },
        weight_name=WEIGHT_NAME,
        safe_serialization=True,
    )
    logger.info("diffusers LoRA written: %s", out / WEIGHT_NAME)
    return out


def load_lora_into_pipeline(pipeline, path: str | Path, adapter_name: str = ADAPTER_NAME) -> None:
    """Load a diffusers-format LoRA (a directory or a .safetensors file) into the pipeline's denoiser as
    `adapter_name`.

    An adapter of that name already present is deleted first, so checkpoints can be swapped in one pipeline.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"LoRA not found: {path}")
    if adapter_name in getattr(policy_for(pipeline).denoiser, "peft_config", {}):
        pipeline.delete_adapters(adapter_name)
    kwargs = {"weight_name": path.name} if path.is_file() else {}
    source = path.parent if path.is_file() else path
    pipeline.load_lora_weights(str(source), adapter_name=adapter_name, **kwargs)


def load_policy_into_pipeline(pipeline, path: str | Path) -> None:
    """A checkpoint's policy into the pipeline: a diffusers LoRA (directory or file), or a full denoiser directory
    (`unet/` of full fine-tuning: a `config.json` beside the weights) whose weights replace the pipeline's."""
    path = Path(path)
    if (path / "config.json").exists():
        denoiser = policy_for(pipeline).denoiser
        trained = type(denoiser).from_pretrained(path, torch_dtype=denoiser.dtype)
        denoiser.load_state_dict(trained.state_dict())
        return
    load_lora_into_pipeline(pipeline, path)


def load_inference_pipeline(model: ModelConfig, lora: str | Path | None = None):
    """The base pipeline of `model` (its sampling scheduler, frozen, in model.dtype) plus, if given, a checkpoint's
    policy: a diffusers-format LoRA, or the `unet/` of full fine-tuning."""
    pipe = load_pipeline(model.model_copy(update={"use_lora": False}))
    # load_pipeline(use_lora=False) prepares full fine-tuning (float32, trainable denoiser): undo that for inference.
    denoiser = policy_for(pipe).denoiser
    denoiser.requires_grad_(False)
    if denoiser.dtype != pipe.vae.dtype:
        denoiser.to(pipe.vae.dtype)
    if lora is not None:
        load_policy_into_pipeline(pipe, lora)
    return pipe
