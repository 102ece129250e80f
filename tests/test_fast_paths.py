"""Every fast path against the plain path on the tiny model: same trajectories and log-probs (to the precision
of the path), the same update."""

from __future__ import annotations

import torch

from actors.sampler import Sampler
from learner.learner import Learner
from services.models import load_pipeline


def trajectory(cfg, **performance):
    cfg = cfg.model_copy(update={"performance": cfg.performance.model_copy(update=performance)})
    sampler = Sampler(cfg, pipeline=load_pipeline(cfg.model, cfg.lora, seed=cfg.seed, perf=cfg.performance))
    return sampler.sample(prompts=["a cat", "a dog"], generator=torch.Generator().manual_seed(5))


def test_compile_and_channels_last_match_the_plain_sampler(tiny_train_config):
    cfg = tiny_train_config(sampling={"num_steps": 3})
    plain = trajectory(cfg)
    fast = trajectory(cfg, compile_unet=True, channels_last=True)
    torch.testing.assert_close(fast.latents, plain.latents, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fast.log_probs, plain.log_probs, rtol=1e-4, atol=1e-4)


def test_bf16_autocast_stays_close_to_the_plain_sampler(tiny_train_config):
    cfg = tiny_train_config(sampling={"num_steps": 3})
    plain = trajectory(cfg)
    bf16 = trajectory(cfg, autocast="bf16")
    # bf16 keeps ~3 significant digits in the UNet (errors compound over steps and CFG's extrapolation);
    # the log-prob math itself stays float32
    rel = (bf16.latents - plain.latents).abs().max() / plain.latents.abs().max()
    assert rel < 0.05, f"bf16 latents differ by {rel:.3%} of their range"
    assert (bf16.log_probs - plain.log_probs).abs().max() < 0.05
    assert bf16.log_probs.dtype == torch.float32


def test_fused_adamw_takes_the_same_step(tiny_train_config):
    cfg = tiny_train_config(training={"learning_rate": 1e-2})
    batch = Sampler(cfg, pipeline=load_pipeline(cfg.model, cfg.lora, seed=cfg.seed)).sample_scored()
    weights = []
    for fused in (False, True):
        c = cfg.model_copy(update={"performance": cfg.performance.model_copy(update={"fused_adamw": fused})})
        learner = Learner(c)
        learner.train_epoch(batch)
        weights.append(learner.policy_weights())
    for k in weights[0]:
        # the fused kernel orders its float32 arithmetic differently: ~1e-6 on a 1e-2 step
        torch.testing.assert_close(weights[1][k], weights[0][k], rtol=1e-4, atol=1e-5)
