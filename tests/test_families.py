"""Model families (sd, sdxl, sd3) behind one policy interface: the flow SDE step against float64 by hand, the
on-policy ratio per family, the exported LoRA in stock diffusers, the codec's float timesteps, evaluation, presets,
gradient checkpointing."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline, StableDiffusionXLPipeline
from PIL import Image

from actors.sampler import Sampler
from learner.learner import Learner
from services.config import LoraConfig, ModelConfig, dump_config, load_config
from services.diffusion import (
    SD3Policy,
    SDPolicy,
    SDXLPolicy,
    flow_sde_step_with_logprob,
    policy_for,
    sample_trajectory,
    step_log_prob,
)
from services.evaluation import render_samples
from services.lora import WEIGHT_NAME, save_diffusers_lora
from services.models import detect_family, load_pipeline
from services.trajectory import ScoredTrajectory, decode_trajectory, encode_trajectory

STOCK = {"sdxl": StableDiffusionXLPipeline, "sd3": StableDiffusion3Pipeline}
STEPS, GUIDANCE, SEED = 6, 4.5, 11


# ---- the flow SDE step --------------------------------------------------------------------------------------------
def _flow_scheduler(num_steps: int = 10) -> FlowMatchEulerDiscreteScheduler:
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    scheduler.set_timesteps(num_steps)
    return scheduler


def _reference_step(sigmas: list[float], i: int, x, v, prev, a: float):
    """Flow-GRPO's step in float64, written from the formulas (not from our code): returns (mean, std, log_prob)."""
    sigma, sigma_next = sigmas[i], sigmas[i + 1]
    dt = sigma_next - sigma
    denominator = 1 - (sigmas[1] if sigma == 1 else sigma)
    std_t = a * math.sqrt(sigma / denominator)
    mean = x * (1 + std_t**2 / (2 * sigma) * dt) + v * (1 + std_t**2 * (1 - sigma) / (2 * sigma)) * dt
    std = std_t * math.sqrt(-dt)
    log_density = -((prev - mean) ** 2) / (2 * std**2) - math.log(std) - 0.5 * math.log(2 * math.pi)
    return mean, std, log_density.mean(dim=(1, 2, 3))


@pytest.mark.parametrize(
    "i", [0, 1, 5, 9]
)  # 0: sigma = 1 (the second sigma in the denominator); 9: sigma_next = 0
def test_flow_sde_step_matches_float64_by_hand(i):
    scheduler = _flow_scheduler()
    sigmas = scheduler.sigmas.double().tolist()
    g = torch.Generator().manual_seed(i)
    x, v = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = scheduler.timesteps[i].expand(3)  # [B] float timesteps
    prev, log_prob = flow_sde_step_with_logprob(
        scheduler, v, t, x, 0.7, generator=torch.Generator().manual_seed(5)
    )
    mean, std, expected = _reference_step(sigmas, i, x.double(), v.double(), prev.double(), 0.7)
    # the draw is mean + std * noise with the generator's standard normal noise
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float32).double()
    torch.testing.assert_close(prev.double(), mean + std * noise, rtol=0, atol=1e-5)
    assert log_prob.dtype == torch.float32 and log_prob.shape == (3,)
    torch.testing.assert_close(log_prob.double(), expected, rtol=0, atol=1e-4)
    # a given prev_sample is scored, not redrawn
    other = prev + 0.1
    same, scored = flow_sde_step_with_logprob(scheduler, v, t, x, 0.7, prev_sample=other)
    assert same is other
    torch.testing.assert_close(scored.double(), _reference_step(sigmas, i, x.double(), v.double(), other.double(), 0.7)[2],
                               rtol=0, atol=1e-4)  # fmt: skip


def test_flow_sde_step_noise_level_zero_is_the_schedulers_euler_step():
    scheduler = _flow_scheduler()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    for i, t in enumerate(scheduler.timesteps):
        v = torch.randn(2, 4, 8, 8, generator=g)
        ours, _ = flow_sde_step_with_logprob(scheduler, v, t, x, noise_level=0.0)
        euler = _flow_scheduler()
        euler._step_index = i
        expected = euler.step(v, t, x).prev_sample
        torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)
        x = ours


def test_noise_level_zero_is_refused_for_training(tiny_models):
    pipe = load_pipeline(ModelConfig(pretrained=str(tiny_models / "sd3"), dtype="float32", device="cpu"))
    policy = policy_for(pipe)
    scheduler = pipe.scheduler
    scheduler.set_timesteps(4)
    cond = policy.encode_prompts(["a cat"])
    x = torch.randn(1, 4, 8, 8)
    with pytest.raises(ValueError, match="no policy"):
        step_log_prob(
            policy.denoiser, scheduler, x, x, scheduler.timesteps[:1], cond, cond, 1.0, 0.0, policy=policy
        )
    with pytest.raises(Exception, match="sampling.eta"):
        load_config("quickstart-sd3", ["sampling.eta=0"])


# ---- families: detection, tiny models, ratio 1 -----------------------------------------------------------------
@pytest.mark.parametrize("family,policy", [("sd", SDPolicy), ("sdxl", SDXLPolicy), ("sd3", SD3Policy)])
def test_family_is_detected_from_model_index_and_picks_its_policy(tiny_models, family, policy):
    model = ModelConfig(pretrained=str(tiny_models / family), dtype="float32", device="cpu")
    assert detect_family(model) == family
    index = json.loads((tiny_models / family / "model_index.json").read_text())
    assert index["_class_name"] == {"sd": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline",
                                    "sd3": "StableDiffusion3Pipeline"}[family]  # fmt: skip
    pipe = load_pipeline(model, LoraConfig(rank=2))
    assert isinstance(policy_for(pipe), policy)
    trainable = [n for n, p in policy_for(pipe).denoiser.named_parameters() if p.requires_grad]
    assert trainable and all("lora" in n for n in trainable)


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_ratio_is_exactly_one_before_the_first_update(tiny_models, tiny_train_config, family):
    cfg = tiny_train_config(
        model={"pretrained": str(tiny_models / family)},
        sampling={"num_steps": 4, "eta": 0.7},
        training={"learning_rate": 1e-2, "clip_range": 1e-4, "kl_coef": 0.04},
    )
    cfg.training.gradient_accumulation_steps = cfg.samples_per_epoch // cfg.training.batch_size
    pipe = load_pipeline(cfg.model, cfg.lora, seed=cfg.seed)
    sampler, learner = Sampler(cfg, pipeline=pipe), Learner(cfg, pipeline=pipe)
    batch = sampler.sample_scored()
    expected_dtype = torch.float32 if family == "sd3" else torch.int64
    assert batch[0].timesteps.dtype == expected_dtype
    # every recorded step recomputed by the learner's path: ratio 1
    embeds = learner.policy.encode_prompts([t.prompt for t in batch])
    neg = learner._negative_embeds.expand_as(embeds)
    latents = torch.stack([t.latents for t in batch])
    old = torch.stack([t.log_probs for t in batch])
    with torch.no_grad():
        for i in range(cfg.sampling.num_steps):
            ts = torch.stack([t.timesteps[i] for t in batch])
            new, kl = step_log_prob(learner.unet, learner.scheduler, latents[:, i], latents[:, i + 1], ts, embeds,
                                    neg, cfg.sampling.guidance_scale, cfg.sampling.eta, reference=learner.reference,
                                    policy=learner.policy)  # fmt: skip
            torch.testing.assert_close(torch.exp(new - old[:, i]), torch.ones_like(new), rtol=0, atol=1e-4)
            assert float(kl.abs().max()) < 1e-8  # the LoRA's B is zero: policy == reference
    # through the codec (float timesteps for sd3) and one DDPO-IS update: first ratio 1, nothing clipped
    batch = [decode_trajectory(encode_trajectory(t, torch.float32)) for t in batch]
    metrics = learner.train_epoch(batch)
    assert abs(metrics["ratio_first_step"] - 1.0) < 1e-4 and metrics["clipfrac"] == 0.0
    assert metrics["grad_norm"] > 0 and metrics["kl_to_base"] is not None


def test_codec_keeps_float_timesteps():
    t = ScoredTrajectory(latents=torch.zeros(3, 4, 2, 2), log_probs=torch.zeros(2),
                         timesteps=torch.tensor([1000.0, 960.1293]), prompt="p", reward=1.0)  # fmt: skip
    decoded = decode_trajectory(encode_trajectory(t, torch.float32))
    assert decoded.timesteps.dtype == torch.float32 and torch.equal(decoded.timesteps, t.timesteps)


# ---- the exported LoRA in the stock pipeline -------------------------------------------------------------------
def _perturbed(path: str, seed: int = 0):
    pipe = load_pipeline(
        ModelConfig(pretrained=path, dtype="float32", device="cpu"), LoraConfig(rank=4, alpha=8.0)
    )
    g = torch.Generator().manual_seed(seed)
    for name, p in policy_for(pipe).denoiser.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.3
    return pipe


def _stock(family: str, path: str):
    absent = {"text_encoder_3": None, "tokenizer_3": None} if family == "sd3" else {}
    pipe = STOCK[family].from_pretrained(path, **absent)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _stock_image(pipe, seed: int) -> torch.Tensor:
    kwargs = {"eta": 0.0} if isinstance(pipe, StableDiffusionXLPipeline) else {}
    return pipe("a cat", num_inference_steps=STEPS, guidance_scale=GUIDANCE, output_type="pt",
                generator=torch.Generator().manual_seed(seed), **kwargs).images  # fmt: skip


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_stock_pipeline_with_exported_lora_reproduces_ddpo_sample(tiny_models, tmp_path, family):
    from services.app.cli import main

    path = str(tiny_models / family)
    trained = _perturbed(path)
    lora_dir = save_diffusers_lora(policy_for(trained).denoiser, tmp_path / "lora")
    assert (lora_dir / WEIGHT_NAME).is_file()
    stock = _stock(family, path)
    base = _stock_image(stock, SEED)
    stock.load_lora_weights(str(lora_dir))
    expected = torch.cat([_stock_image(stock, s) for s in (SEED, SEED + 1)])  # [2, 3, 64, 64]
    assert (expected[:1] - base).abs().max() > 0.05  # the LoRA changes the image
    ours = render_samples(trained, "a cat", [SEED, SEED + 1], STEPS, GUIDANCE, eta=0.0)
    assert (ours - expected).abs().max() < 1e-3
    out = tmp_path / "sample"
    main(["sample", "--model", path, "--lora", str(lora_dir), "--prompt", "a cat", "--n", "2", "--seed", str(SEED),
          "--steps", str(STEPS), "--guidance", str(GUIDANCE), "--eta", "0", "--device", "cpu", "--out", str(out)])  # fmt: skip
    manifest = json.loads((out / "samples.json").read_text())
    pngs = np.stack([np.asarray(Image.open(out / f)) for f in manifest["files"]]) / 255.0  # [2, H, W, 3]
    assert np.abs(pngs - expected.permute(0, 2, 3, 1).numpy()).max() <= 0.5 / 255 + 1e-3


def test_sdxl_empty_negative_prompt_is_zeros_as_in_the_stock_pipeline(tiny_models):
    pipe = load_pipeline(ModelConfig(pretrained=str(tiny_models / "sdxl"), dtype="float32", device="cpu"))
    assert pipe.config.force_zeros_for_empty_prompt
    neg = policy_for(pipe).encode_negative("")
    assert not neg.hidden.any() and not neg.pooled.any()
    assert policy_for(pipe).encode_negative("blurry").hidden.abs().sum() > 0


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_ddpo_eval_takes_any_family(tiny_models, tiny_train_config, tmp_path, family):
    from services.app.cli import main

    cfg = tiny_train_config(
        model={"pretrained": str(tiny_models / family)},
        sampling={"num_steps": 4},
        evaluation={"prompts": ["a fox"], "num_per_prompt": 2, "num_steps": 3},
    )
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(dump_config(cfg))
    save_diffusers_lora(
        policy_for(_perturbed(cfg.model.pretrained)).denoiser, run / "checkpoints" / "epoch_0001" / "lora"
    )
    main(["eval", str(run)])
    result = json.loads((run / "eval" / "epoch_0001.json").read_text())
    assert result["seeds"] == [2024, 2025] and len(result["scores"]["jpeg_compressibility"]) == 2


# ---- sampling window and memory ----------------------------------------------------------------------------------
def test_sd3_window_records_only_its_steps_and_is_deterministic_outside(tiny_models):
    pipe = load_pipeline(ModelConfig(pretrained=str(tiny_models / "sd3"), dtype="float32", device="cpu"))
    full = sample_trajectory(pipe, ["a cat"], num_steps=6, guidance_scale=1.0, eta=0.0,
                             generator=torch.Generator().manual_seed(0))  # fmt: skip
    window = sample_trajectory(pipe, ["a cat"], num_steps=6, guidance_scale=1.0, eta=0.7, sde_window=(1, 3),
                               generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert (
        window.latents.shape[1] == 3 and window.log_probs.shape == (1, 2) and window.final_latents is not None
    )
    torch.testing.assert_close(window.latents[:, 0], full.latents[:, 1])  # the ODE's steps before the window
    torch.testing.assert_close(window.timesteps, full.timesteps[1:3])


@pytest.mark.parametrize("family", ["sd", "sd3"])
def test_gradient_checkpointing_gives_the_same_gradients(tiny_models, tiny_train_config, family):
    grads = []
    for checkpointing in (False, True):
        cfg = tiny_train_config(model={"pretrained": str(tiny_models / family)}, sampling={"num_steps": 3},
                                performance={"gradient_checkpointing": checkpointing})  # fmt: skip
        pipe = load_pipeline(cfg.model, cfg.lora, seed=cfg.seed)
        for name, p in policy_for(
            pipe
        ).denoiser.named_parameters():  # B != 0: every LoRA matrix gets a gradient
            if "lora_B" in name:
                p.data = torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.1
        learner = Learner(cfg, pipeline=pipe)
        assert learner.unet.is_gradient_checkpointing == checkpointing
        batch = Sampler(cfg, pipeline=pipe).sample()
        embeds = learner.policy.encode_prompts(batch.prompts)
        learner.unet.train()
        log_prob, _ = step_log_prob(learner.unet, learner.scheduler, batch.latents[:, 1], batch.latents[:, 2],
                                    batch.timesteps[1].expand(len(batch)), embeds,
                                    learner._negative_embeds.expand_as(embeds), cfg.sampling.guidance_scale,
                                    cfg.sampling.eta, policy=learner.policy)  # fmt: skip
        log_prob.sum().backward()
        grads.append([p.grad.clone() for p in learner.params])
    assert all(g.abs().sum() > 0 for g in grads[0])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


# ---- presets -------------------------------------------------------------------------------------------------------
def test_family_presets_keep_the_literatures_settings():
    sd35 = load_config("sd35_pickscore")
    assert sd35.model.pretrained == "stabilityai/stable-diffusion-3.5-medium" and sd35.model.family == "sd3"
    assert (sd35.sampling.num_steps, sd35.evaluation.num_steps, sd35.sampling.eta) == (10, 40, 0.7)
    assert sd35.sampling.group_size == 24 and sd35.stat_tracking.resolved_mode == "group"
    assert sd35.training.kl_coef == 0.04 and sd35.lora.rank == 32 and sd35.sampling.guidance_scale == 4.5
    assert sd35.reward.name == "pickscore"
    sdxl = load_config("sdxl_aesthetic")
    assert sdxl.model.pretrained == "stabilityai/stable-diffusion-xl-base-1.0" and sdxl.model.family == "sdxl"
    assert sdxl.reward.name == "aesthetic" and sdxl.sampling.resolution == 1024
    assert sdxl.performance.gradient_checkpointing and sd35.performance.gradient_checkpointing
    for preset in ("quickstart-sdxl", "quickstart-sd3"):
        cfg = load_config(preset)
        assert cfg.model.write_tiny_if_missing and cfg.model.device == "cpu"


def test_bench_family_presets_have_the_real_architectures_parameter_counts():
    """`ddpo bench sampler|learner --preset sdxl|sd3` build these; counted on the meta device (nothing allocated).
    Published sizes: SDXL base UNet 2.6 B, CLIP-L text 123 M, OpenCLIP bigG text 695 M; SD 3.5 Medium MMDiT-X 2.2 B
    (2.5 B with its text-embedding layers), T5-XXL encoder 4.8 B."""
    from bench.families import parameter_counts
    from bench.learner import parse_args as learner_args
    from bench.sampler import parse_args as sampler_args

    sdxl, sd3 = parameter_counts("sdxl"), parameter_counts("sd3")
    assert round(sdxl["unet"] / 1e6) == 2567 and round(sdxl["text_encoder_2"] / 1e6) == 695
    assert round(sd3["transformer"] / 1e6) == 2243 and round(sd3["text_encoder_3 (not built)"] / 1e6) == 4762
    assert learner_args(["--preset", "sdxl"]).micro_batch == 1
    assert sampler_args(["--preset", "sd3"]).batch == 4


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_family_quickstart_learns_within_ten_minutes(tmp_path, family):
    """`ddpo train --config quickstart-<family>` as a user runs it (a subprocess in a fresh directory: local Ray,
    embedded Redis, tiny models written on first use): the quickstart's reward-rise check, in <= 10 minutes."""
    run = tmp_path / "run"
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "services.app.cli", "train", "--config", f"quickstart-{family}",
                          "--run-dir", str(run)], cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                         capture_output=True, text=True, timeout=840)  # fmt: skip
    seconds = time.perf_counter() - t0
    assert out.returncode == 0, out.stderr[-4000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    first = np.mean([r["reward_mean"] for r in rows[:3]])
    last = np.mean([r["reward_mean"] for r in rows[-3:]])
    first_std = np.mean([r["reward_std"] for r in rows[:3]])
    assert last - first >= 2 * first_std, (first, last, first_std)
    assert seconds <= 600, seconds
    assert (run / "checkpoints" / f"epoch_{len(rows) - 1:04d}" / "lora" / WEIGHT_NAME).exists()
