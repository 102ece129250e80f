"""Model presets of the benchmarks: `tiny` (the CPU test model), `sd15` (SD 1.5's architecture, random weights), and
`sdxl` / `sd3` (SDXL base's and SD 3.5 Medium's architectures, random weights: bench/families.py).

`sd15` is built from SD 1.5's published configs in code, with no download, so its cost is the real model's:

| part         | config                                                                      | parameters |
| ------------ | --------------------------------------------------------------------------- | ---------- |
| UNet         | block_out_channels (320, 640, 1280, 1280), 2 layers/block, cross-attn 768   | 859.5 M    |
| text encoder | CLIP ViT-L/14 text tower: 12 layers, width 768, 77 tokens, quick_gelu       | 123.1 M    |
| VAE          | block_out_channels (128, 256, 512, 512), 2 layers/block, latent 4, f = 8    | 83.7 M     |
| scheduler    | DDIM, scaled-linear betas 0.00085 -> 0.012, leading spacing, steps_offset 1 | -          |

The tokenizer is the tiny model's character-level CLIP tokenizer: prompts are padded to 77 tokens either way, so
the text encoder's cost is SD's. Also shared by the benchmarks: `machine()` (where a benchmark ran, one JSON
object) and `parse_fast` (the `--fast` spec of the fast path that the sampler and learner benchmarks compare with
their eager baseline).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import diffusers
import torch
import yaml
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from bench.families import build_family_pipeline
from services import models
from services.config import TrainConfig, build_config
from services.diffusion import policy_for
from services.models import DTYPES, resolve_device  # noqa: F401  (re-exported for the benchmarks)
from services.tiny_models import SD1_SCHEDULER, _tiny_tokenizer, build_tiny_sd_pipeline


@dataclass(frozen=True)
class Shapes:
    """Default workload of a preset (every benchmark can override each field)."""

    resolution: int  # image side in pixels (latents are resolution / 8)
    num_steps: int  # DDIM steps T
    batch_size: int  # images per sampler batch / samples per learner epoch
    eta: float = 1.0  # DDIM eta, or the flow SDE's noise level


PRESETS: dict[str, Shapes] = {
    "tiny": Shapes(resolution=64, num_steps=20, batch_size=8),
    "sd15": Shapes(resolution=512, num_steps=50, batch_size=8),  # the paper's SD 1.5 setting
    "sdxl": Shapes(resolution=1024, num_steps=50, batch_size=2),  # configs/sdxl_aesthetic.yaml
    "sd3": Shapes(
        resolution=512, num_steps=10, batch_size=4, eta=0.7
    ),  # configs/sd35_pickscore.yaml (Flow-GRPO)
}

SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    downsample_padding=1,
    mid_block_scale_factor=1,
    act_fn="silu",
    norm_num_groups=32,
    norm_eps=1e-5,
    cross_attention_dim=768,
    attention_head_dim=8,
    flip_sin_to_cos=True,
    freq_shift=0,
)
SD15_TEXT = dict(
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
SD15_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
    scaling_factor=0.18215,
)
SD15_SCHEDULER = SD1_SCHEDULER


def default_dtype(device: torch.device) -> str:
    """The eager baseline's weight dtype: fp16 on a GPU (the issue's "fp16 eager"), fp32 on a CPU."""
    return "float16" if device.type == "cuda" else "float32"


@contextlib.contextmanager
def _quiet_diffusers() -> Iterator[None]:
    """Silence diffusers' warning on `.to(dtype)` of a model not made by from_pretrained (ours have no fp32-only
    modules)."""
    verbosity = diffusers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers.utils.logging.set_verbosity(verbosity)


def build_sd15_pipeline(
    device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0
) -> StableDiffusionPipeline:
    """SD 1.5's architecture with random weights, created directly on `device` (no host round trip on a GPU)."""
    device = torch.device(device)
    torch.manual_seed(seed)
    with torch.device(device), _quiet_diffusers():
        unet = UNet2DConditionModel(**SD15_UNET).to(dtype)
        text_encoder = CLIPTextModel(CLIPTextConfig(**SD15_TEXT)).to(dtype)
        vae = AutoencoderKL(**SD15_VAE).to(dtype)
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=_tiny_tokenizer(),
        unet=unet,
        scheduler=DDIMScheduler(**SD15_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_pipeline(
    preset: str, device: torch.device, dtype: torch.dtype, seed: int = 0
) -> StableDiffusionPipeline:
    """A frozen, eval-mode pipeline of `preset` on `device` in `dtype` (attach a LoRA with services.models)."""
    if preset == "sd15":
        pipe = build_sd15_pipeline(device, dtype, seed)
    elif preset in ("sdxl", "sd3"):
        pipe = build_family_pipeline(preset, device, dtype, seed)
    elif preset == "tiny":
        with _quiet_diffusers():
            pipe = build_tiny_sd_pipeline(seed).to(device, dtype)
    else:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    pipe.set_progress_bar_config(disable=True)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.requires_grad_(False).eval()
    return pipe


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that a wall clock read after it measures the work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine(device: torch.device | None = None) -> dict:
    """Where a benchmark ran: host, library versions and, on a GPU, the card."""
    info = {
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_avg_1m": round(os.getloadavg()[0], 2),  # other work on the host while the benchmark ran
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "device": str(device) if device is not None else "cpu",
    }
    if device is not None and device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info |= {
            "gpu": props.name,
            "gpu_memory_GiB": round(props.total_memory / 2**30, 1),
            "cuda": torch.version.cuda,
        }
    return info


# ---- the fast path each benchmark compares with its eager baseline --------------------------------------------------
# Per device type: the base weights' dtype plus `performance.*` switches of TrainConfig (services.config).
DEFAULT_FAST = {
    "cuda": "dtype=bfloat16,autocast=bf16,compile_unet=true,channels_last=true,fused_adamw=true",
    "cpu": "compile_unet=true",  # measured on the tiny model: bf16 autocast is slower there, channels-last even
}


@dataclass(frozen=True)
class FastPath:
    dtype: str  # base weight dtype, a key of DTYPES
    performance: dict  # TrainConfig.performance fields


def fast_path_unsupported() -> str | None:
    """Why this checkout cannot run a fast path (no `performance` config or no services.models.apply_fast_paths),
    or None when it can."""
    if "performance" not in TrainConfig.model_fields:
        return "services.config.TrainConfig has no `performance` section"
    if not hasattr(models, "apply_fast_paths") or not hasattr(models, "autocast"):
        return "services.models has no apply_fast_paths/autocast"
    return None


def parse_fast(spec: str, device: torch.device, eager_dtype: str) -> FastPath | None:
    """`--fast`: 'none', 'default' (DEFAULT_FAST for the device) or 'key=value,...' with `dtype` and any
    `performance.*` field, e.g. 'dtype=bfloat16,autocast=bf16,compile_unet=true'."""
    if spec == "none":
        return None
    if spec == "default":
        spec = DEFAULT_FAST["cuda" if device.type == "cuda" else "cpu"]
    fields = {}
    for item in filter(None, spec.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--fast expects key=value pairs, got {item!r}")
        fields[key.strip()] = yaml.safe_load(value)
    dtype = fields.pop("dtype", eager_dtype)
    if dtype not in DTYPES:
        raise ValueError(f"--fast dtype={dtype!r}: choose from {sorted(DTYPES)}")
    return FastPath(dtype=dtype, performance=fields)


def spec_of(fast: FastPath | None) -> str | None:
    """FastPath -> the `--fast` spec string that recreates it (for the JSON config)."""
    if fast is None:
        return None

    def text(value: object) -> str:  # YAML scalars, as parse_fast reads them
        return str(value).lower() if isinstance(value, bool) else str(value)

    return ",".join([f"dtype={fast.dtype}", *(f"{k}={text(v)}" for k, v in fast.performance.items())])


@contextlib.contextmanager
def matmul_flags(flags: tuple[bool, bool]) -> Iterator[None]:
    """Run with (cuda.matmul.allow_tf32, cudnn.allow_tf32) = flags: `apply_fast_paths` sets them process-wide, and
    the eager baseline in the same process must run with the flags it had before."""
    saved = tf32_flags()
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def tf32_flags() -> tuple[bool, bool]:
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


# ---- the harness the sampler and learner benchmarks share ----------------------------------------------------------
def add_workload_args(p: argparse.ArgumentParser) -> None:
    """The flags both model benchmarks take: preset, device, eager dtype, shapes, LoRA, threads and `--fast`."""
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="eager weights (fp16 GPU, fp32 CPU)")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps T (preset default)")
    p.add_argument("--resolution", type=int, default=None, help="image side in pixels (preset default)")
    p.add_argument("--guidance", type=float, default=5.0, help="CFG scale (> 1: two UNet branches per step)")
    p.add_argument("--lora-rank", type=int, default=4)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: 1 on CPU)")
    p.add_argument(
        "--fast", default="default", help="fast path: default, none, or k=v,... (dtype, performance.*)"
    )


@dataclass(frozen=True)
class Setup:
    device: torch.device
    dtype: str  # the eager baseline's weight dtype
    fast: FastPath | None  # None: no fast path in this run, for the reason in `why_no_fast`
    why_no_fast: str | None


def setup(args: argparse.Namespace) -> Setup:
    """Fill the preset's default shapes into `args`; pick the device, threads, eager dtype and fast path."""
    shapes = PRESETS[args.preset]
    args.steps = args.steps or shapes.num_steps
    args.resolution = args.resolution or shapes.resolution
    device = resolve_device(args.device)
    if args.threads or device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    dtype = args.dtype or default_dtype(device)
    fast = parse_fast(args.fast, device, dtype)
    why_no_fast = fast_path_unsupported() if fast is not None else "disabled with --fast none"
    return Setup(device, dtype, None if why_no_fast else fast, why_no_fast)


def pipeline_with_lora(preset: str, cfg: TrainConfig, fast: FastPath | None) -> StableDiffusionPipeline:
    """A fresh pipeline of `preset` as `cfg.model` says (device, dtype), the LoRA of `cfg.lora` attached and, for a
    fast path, `cfg.performance` applied."""
    pipe = build_pipeline(preset, torch.device(cfg.model.device), DTYPES[cfg.model.dtype], seed=0)
    models.add_lora(policy_for(pipe).denoiser, cfg.lora, seed=0)
    if fast is not None:
        models.apply_fast_paths(pipe, cfg.performance)
    return pipe


def alternating_rounds(
    loops: dict[str, Callable[[], object]],
    flags: dict[str, tuple[bool, bool]],
    device: torch.device,
    *,
    rounds: int,
    iters: int = 1,
    warmup: int = 1,
) -> dict[str, list[float]]:
    """Seconds per round of each loop: `warmup` untimed calls each, then `rounds` rounds of `iters` calls each,
    in alternating order (A B, B A, ...) so that drift of the machine falls on both sides. Each loop runs under its
    TF32 `flags`, with the device's queue drained before and after."""

    def timed(name: str, n: int) -> float:
        with matmul_flags(flags[name]):
            synchronize(device)
            t0 = time.perf_counter()
            for _ in range(n):
                loops[name]()
            synchronize(device)
            return time.perf_counter() - t0

    for name in loops:
        timed(name, warmup)
    seconds: dict[str, list[float]] = {name: [] for name in loops}
    order = list(loops)
    for r in range(rounds):
        for name in order if r % 2 == 0 else order[::-1]:
            seconds[name].append(timed(name, iters))
    return seconds


def median_ratio(seconds: dict[str, list[float]], ours: str, base: str) -> float:
    """Median over rounds of base time / our time (> 1: ours is faster)."""
    return round(statistics.median(b / o for o, b in zip(seconds[ours], seconds[base], strict=True)), 3)


PROMPTS = ["a photo of a cat", "a dog riding a bike", "a painting of a horse", "a bird on a branch"]


def workload_config(
    args: argparse.Namespace,
    device: torch.device,
    dtype: str,
    performance: dict | None,
    *,
    batch_size: int,
    **sections: dict,
) -> TrainConfig:
    """The TrainConfig of a benchmark's workload: the common flags (`add_workload_args`) with `batch_size` images
    per sampling batch, the benchmark's own `sections` merged over them, and the fast path's `performance`."""
    tree: dict = {
        "seed": 0,
        "model": {"pretrained": f"bench:{args.preset}", "dtype": dtype, "device": str(device)},
        "lora": {"rank": args.lora_rank},
        "sampling": {
            "num_steps": args.steps,
            "batch_size": batch_size,
            "guidance_scale": args.guidance,
            "eta": PRESETS[args.preset].eta,
            "resolution": args.resolution,
        },
        "prompts": {"set": "list", "items": PROMPTS},
    }
    for name, fields in sections.items():
        tree[name] = {**tree.get(name, {}), **fields}
    if performance:
        tree["performance"] = performance
    return build_config(tree)
