"""The exported LoRA in a stock diffusers pipeline reproduces our sampler (`ddpo sample`) for the same seed."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image
from safetensors import safe_open

from services.config import LoraConfig, ModelConfig
from services.evaluation import render_samples
from services.lora import (
    WEIGHT_NAME,
    folded_lora_state_dict,
    load_inference_pipeline,
    load_lora_into_pipeline,
    save_diffusers_lora,
)
from services.models import load_pipeline, policy_state_dict

RANK, ALPHA = 4, 8.0  # alpha != rank: the export must carry the scale alpha / r = 2
STEPS, GUIDANCE, SEED = 6, 5.0, 7


def perturbed_lora_pipeline(tiny_sd_path: str, seed: int = 0, scale: float = 0.3) -> StableDiffusionPipeline:
    """Our training pipeline (peft LoRA, rank 4, alpha 8) with random non-zero B matrices, so the LoRA matters."""
    pipe = load_pipeline(
        ModelConfig(pretrained=tiny_sd_path, dtype="float32", device="cpu"),
        LoraConfig(rank=RANK, alpha=ALPHA),
    )
    g = torch.Generator().manual_seed(seed)
    for name, p in pipe.unet.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=g) * scale  # [out, r]
    return pipe


def _stock(tiny_sd_path: str) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(
        tiny_sd_path, safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _stock_images(pipe: StableDiffusionPipeline, prompt: str, seeds: list[int], eta: float) -> torch.Tensor:
    """[len(seeds), 3, H, W] in [0, 1], one stock-diffusers call per seed."""
    out = [
        pipe(prompt, num_inference_steps=STEPS, guidance_scale=GUIDANCE, eta=eta,
             generator=torch.Generator().manual_seed(s), output_type="pt").images
        for s in seeds
    ]  # fmt: skip
    return torch.cat(out)


def test_stock_diffusers_with_exported_lora_reproduces_ddpo_sample(tiny_sd_path, tmp_path):
    from services.app.cli import main

    trained = perturbed_lora_pipeline(tiny_sd_path)
    lora_dir = save_diffusers_lora(trained.unet, tmp_path / "lora")
    stock = _stock(tiny_sd_path)
    assert type(stock.scheduler).__name__ == "DDIMScheduler"  # the tiny model ships DDIM (SD 1.5 ships PNDM)
    base = _stock_images(stock, "a cat", [SEED], eta=0.0)
    stock.load_lora_weights(str(lora_dir))
    seeds = [SEED, SEED + 1]
    for eta in (0.0, 1.0):
        expected = _stock_images(stock, "a cat", seeds, eta)  # [2, 3, 64, 64]
        if eta == 0.0:  # the LoRA really changes the image: the comparisons are not base against base
            assert (expected[:1] - base).abs().max() > 0.05
        # 1. the training pipeline itself (peft LoRA with alpha / r = 2 applied at run time)
        ours = render_samples(trained, "a cat", seeds, STEPS, GUIDANCE, eta)
        assert (ours - expected).abs().max() < 1e-3, eta
        # 2. `ddpo sample` with the exported LoRA: PNGs, so allow one uint8 level where rounding flips
        out = tmp_path / f"sample_eta{eta}"
        main(["sample", "--model", tiny_sd_path, "--lora", str(lora_dir), "--prompt", "a cat", "--n", "2",
              "--seed", str(SEED), "--steps", str(STEPS), "--guidance", str(GUIDANCE), "--eta", str(eta),
              "--device", "cpu", "--out", str(out)])  # fmt: skip
        manifest = json.loads((out / "samples.json").read_text())
        assert manifest["seeds"] == seeds
        pngs = np.stack([np.asarray(Image.open(out / f)) for f in manifest["files"]]) / 255.0  # [2, H, W, 3]
        diff = np.abs(pngs - expected.permute(0, 2, 3, 1).numpy())
        assert diff.max() <= 0.5 / 255 + 1e-3, eta  # PNG rounding (half a level) + the 1e-3 tolerance


def test_export_folds_alpha_and_round_trips_under_our_adapter_name(tiny_sd_path, tmp_path):
    trained = perturbed_lora_pipeline(tiny_sd_path, seed=1)
    lora_dir = save_diffusers_lora(trained.unet, tmp_path / "lora")
    with safe_open(str(lora_dir / WEIGHT_NAME), "pt") as f:
        keys = list(f.keys())
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert all(k.startswith("unet.") and (".lora_A." in k or ".lora_B." in k) for k in keys), keys[:3]
    assert meta["unet.r"] == RANK and meta["unet.lora_alpha"] == RANK  # scale 2 lives in the up matrices
    original = policy_state_dict(trained.unet)
    folded = folded_lora_state_dict(trained.unet)
    # hand check: B is multiplied by alpha / r = 8 / 4 = 2, A is unchanged
    key_b = next(k for k in original if k.endswith("lora_B.weight"))
    key_a = key_b.replace("lora_B", "lora_A")
    torch.testing.assert_close(folded[key_b], 2 * original[key_b])
    torch.testing.assert_close(folded[key_a], original[key_a])

    pipe = load_inference_pipeline(
        ModelConfig(pretrained=tiny_sd_path, device="cpu", dtype="float32"), lora_dir
    )
    reloaded = policy_state_dict(pipe.unet)  # reads adapter "default": the name round-trips
    assert reloaded.keys() == original.keys()
    for k in reloaded:
        torch.testing.assert_close(reloaded[k], folded[k])
    assert not any(p.requires_grad for p in pipe.unet.parameters())
    # swapping in another checkpoint's LoRA replaces the adapter instead of stacking a second one
    other = save_diffusers_lora(perturbed_lora_pipeline(tiny_sd_path, seed=2).unet, tmp_path / "other")
    load_lora_into_pipeline(pipe, other / WEIGHT_NAME)
    assert list(pipe.unet.peft_config) == ["default"]
    assert not torch.equal(policy_state_dict(pipe.unet)[key_b], reloaded[key_b])


def test_full_finetuning_has_no_lora_to_export(tiny_sd_path, tmp_path):
    pipe = load_pipeline(ModelConfig(pretrained=tiny_sd_path, dtype="float32", device="cpu", use_lora=False))
    with pytest.raises(ValueError, match="no peft adapter"):
        save_diffusers_lora(pipe.unet, tmp_path / "lora")


def test_stock_loader_takes_every_lora_module_attention_and_convolutions(tiny_sd_path, tmp_path):
    """The quickstart's LoRA targets attention projections and convolutions: the stock loader must apply all of them
    (a file mixing key formats once made it keep the convolutions and silently drop every attention LoRA)."""
    from peft.utils import get_peft_model_state_dict

    targets = ["to_q", "to_k", "to_v", "to_out.0", "conv_in", "conv1", "conv2", "conv_out"]
    pipe = load_pipeline(ModelConfig(pretrained=tiny_sd_path, dtype="float32", device="cpu"),
                         LoraConfig(rank=4, alpha=8, target_modules=targets), seed=0)  # fmt: skip
    with torch.no_grad():
        for name, p in pipe.unet.named_parameters():
            if "lora_B" in name:
                p.normal_()
    save_diffusers_lora(pipe.unet, tmp_path / "lora")
    ours = folded_lora_state_dict(pipe.unet)
    stock = StableDiffusionPipeline.from_pretrained(tiny_sd_path, safety_checker=None)
    stock.load_lora_weights(str(tmp_path / "lora"))
    theirs = get_peft_model_state_dict(stock.unet, adapter_name=next(iter(stock.unet.peft_config)))
    assert set(theirs) == set(ours) and any(".attn1." in k for k in theirs)
    for key, value in ours.items():
        torch.testing.assert_close(theirs[key].float(), value)
