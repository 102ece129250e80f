"""`ddpo sample`: render images with our sampler from a base model of any family (sd, sdxl, sd3, detected from its
model_index.json) and, optionally, a diffusers-format LoRA.

Image i uses its own generator seeded with `seed + i`, so it is reproduced alone by stock diffusers:

    pipe = StableDiffusionPipeline.from_pretrained(MODEL)       # its scheduler must be DDIM (SD 1.5 ships PNDM):
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)   # (SDXL: StableDiffusionXLPipeline, same)
    pipe.load_lora_weights(LORA)
    pipe(prompt, num_inference_steps=STEPS, guidance_scale=G, eta=ETA, generator=torch.Generator().manual_seed(seed + i))

SD3 (--eta 0: the flow ODE, the stock pipeline's Euler sampler; without T5 pass text_encoder_3=None, tokenizer_3=None):

    pipe = StableDiffusion3Pipeline.from_pretrained(MODEL)
    pipe.load_lora_weights(LORA)
    pipe(prompt, num_inference_steps=STEPS, guidance_scale=G, generator=torch.Generator().manual_seed(seed + i))
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from services.config import ModelConfig
from services.evaluation import render_samples
from services.images import tensor_to_pil
from services.lora import load_inference_pipeline

logger = logging.getLogger(__name__)


def run_sample(args: argparse.Namespace) -> list[Path]:
    """The `ddpo sample` command: writes OUT/sample_NNN_seedS.png and OUT/samples.json; returns the PNG paths."""
    if args.lora is not None and not Path(args.lora).exists():
        raise FileNotFoundError(f"--lora {args.lora}: no such file or directory")
    model = ModelConfig(pretrained=args.model, device=args.device, dtype=args.dtype)
    pipe = load_inference_pipeline(model, args.lora)
    seeds = [args.seed + i for i in range(args.n)]
    images = render_samples(
        pipe, args.prompt, seeds, args.steps, args.guidance, args.eta, args.negative_prompt
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (seed, image) in enumerate(zip(seeds, tensor_to_pil(images), strict=True)):
        path = out / f"sample_{i:03d}_seed{seed}.png"
        image.save(path)
        paths.append(path)
    manifest = {
        "model": args.model,
        "lora": args.lora,
        "prompt": args.prompt,
        "negative_prompt": args.negative_prompt,
        "seeds": seeds,
        "num_steps": args.steps,
        "guidance_scale": args.guidance,
        "eta": args.eta,
        "dtype": args.dtype,
        "files": [p.name for p in paths],
    }
    (out / "samples.json").write_text(json.dumps(manifest, indent=1))
    logger.info("wrote %d images to %s", len(paths), out)
    return paths
