"""Loading the diffusion pipeline (hub id or local directory) of any model family, with its sampling scheduler
(DDIM for sd/sdxl, the flow-matching Euler schedule for sd3) and a LoRA on its denoiser (UNet or transformer).

The same code loads `stable-diffusion-v1-5/stable-diffusion-v1-5`, `stabilityai/stable-diffusion-xl-base-1.0` or
`stabilityai/stable-diffusion-3.5-medium` on a cluster and the tiny models of `ddpo tiny-models` here.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Any

import diffusers
import torch
import transformers
from diffusers import DiffusionPipeline
from peft import LoraConfig as PeftLoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from services.config import LoraConfig, ModelConfig, PerformanceConfig, TrainConfig
from services.diffusion import FAMILIES, family_of_pipeline_class, policy_for

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
"""Config dtype names -> torch dtypes (model.dtype, cluster.latent_dtype)."""


def quiet_model_loading() -> None:
    """No per-component progress bars from diffusers/transformers in worker logs."""
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def worker_config(cfg_json: str) -> TrainConfig:
    """A Ray worker's config from the driver's JSON; also quiets model loading and sets the torch threads."""
    cfg = TrainConfig.model_validate_json(cfg_json)
    quiet_model_loading()
    if cfg.cluster.torch_threads:
        torch.set_num_threads(cfg.cluster.torch_threads)
    return cfg


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def model_index(model: ModelConfig) -> dict[str, Any]:
    """The pipeline's model_index.json (a local directory's, or the hub's: one small file, or the local cache
    when offline)."""
    local = Path(model.pretrained)
    if local.exists():
        return json.loads((local / "model_index.json").read_text())
    return dict(DiffusionPipeline.load_config(model.pretrained, revision=model.revision))


def detect_family(model: ModelConfig) -> str:
    """model.family, else the family of the pipeline class in model_index.json (`_class_name`)."""
    if model.family is not None:
        return model.family
    return family_of_pipeline_class(model_index(model)["_class_name"])


def load_pipeline(
    model: ModelConfig,
    lora: LoraConfig | None = None,
    seed: int = 0,
    perf: PerformanceConfig | None = None,
) -> Any:
    """The family's diffusers pipeline with its sampling scheduler, frozen base weights, and (if model.use_lora) a
    trainable LoRA on the denoiser (UNet or transformer).

    Base weights are in `model.dtype` on every device (a CPU runs float16 and bfloat16 too, only slower); LoRA
    weights, and the denoiser of full fine-tuning, in float32.
    """
    device = resolve_device(model.device)
    dtype = DTYPES[model.dtype]
    local = Path(model.pretrained).exists()
    index = model_index(model)
    family = FAMILIES[model.family or family_of_pipeline_class(index["_class_name"])]
    # components saved as absent ([null, null], e.g. SD3 without T5) are passed as None, as the stock loader needs
    absent = {name: None for name, spec in index.items() if isinstance(spec, list) and spec == [None, None]}
    pipe = family.pipeline_class.from_pretrained(
        model.pretrained,
        revision=None if local else model.revision,
        dtype=dtype,
        **{**absent, **dict(family.load_kwargs)},
    )
    if not isinstance(pipe.scheduler, family.scheduler_class):
        pipe.scheduler = family.scheduler_class.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.requires_grad_(False)
    with _without_cpu_half_warning():
        pipe.to(device)
    denoiser = policy_for(pipe).denoiser
    if model.use_lora:
        add_lora(denoiser, lora or LoraConfig(), seed=seed)
    else:
        denoiser.to(torch.float32).requires_grad_(True)
    if perf is not None:
        apply_fast_paths(pipe, perf)
    return pipe


class _DropCpuHalfWarning(logging.Filter):
    """diffusers warns that float16 pipelines "cannot run" on a CPU; with torch >= 2.1 they do (slowly), and the
    dtype a config names is the dtype that runs, so that warning would only mislead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "cannot run with `cpu` device" not in record.getMessage()


@contextlib.contextmanager
def _without_cpu_half_warning():
    log = logging.getLogger("diffusers.pipelines.pipeline_utils")
    drop = _DropCpuHalfWarning()
    log.addFilter(drop)
    try:
        yield
    finally:
        log.removeFilter(drop)


def add_lora(unet: torch.nn.Module, lora: LoraConfig, seed: int = 0) -> None:
    """Attach a peft LoRA to the UNet's attention projections; only its weights require grad (float32).

    The B matrices start at zero, so the adapted UNet equals the base UNet until the first update.
    """
    config = PeftLoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha if lora.alpha is not None else lora.rank,
        init_lora_weights="gaussian",
        target_modules=list(lora.target_modules),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet.add_adapter(config)
    for p in unet.parameters():
        if p.requires_grad:
            p.data = p.data.float()


def trainable_parameters(unet: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in unet.parameters() if p.requires_grad]


def policy_state_dict(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights that define the policy beyond the frozen base: LoRA tensors (or the full UNet), on the CPU."""
    state = get_peft_model_state_dict(unet) if getattr(unet, "peft_config", None) else unet.state_dict()
    return {k: v.detach().cpu().clone() for k, v in state.items()}


def load_policy_state_dict(unet: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Inverse of `policy_state_dict` (in place, between batches)."""
    if getattr(unet, "peft_config", None):
        result = set_peft_model_state_dict(unet, state)
        unexpected = getattr(result, "unexpected_keys", None)
        if unexpected:
            raise ValueError(f"LoRA state has unexpected keys, e.g. {unexpected[:3]}")
    else:
        unet.load_state_dict(state)


def apply_fast_paths(pipe: Any, perf: PerformanceConfig) -> None:
    """Channels-last and torch.compile on the denoiser, TF32, as configured (in place; after
    the LoRA is attached, so that loading new LoRA weights into the parameters needs no recompilation)."""
    denoiser = policy_for(pipe).denoiser
    if perf.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if perf.channels_last:
        denoiser.to(memory_format=torch.channels_last)
    if perf.compile_unet:
        denoiser.compile(mode=perf.compile_mode)


def autocast(perf: PerformanceConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """The configured mixed-precision context for forwards on `device` (a no-op for autocast: none)."""
    if perf.autocast == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if perf.autocast == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)
