"""Every fast path against the plain path on the tiny model: same trajectories and log-probs (to the precision
of the path), the same update."""

from __future__ import annotations

import pytest
import torch

from actors.sampler import Sampler
from learner.learner import Learner
from services.models import load_pipeline


def trajectory(cfg, **performance):
    cfg = cfg.model_copy(update={"performance": cfg.performance.model_copy(update=performance)})
    sampler = Sampler(cfg, pipeline=load_pipeline(cfg.model, cfg.lora, seed=cfg.seed, perf=cfg.performance))
    return sampler.sample(prompts=["a cat", "a dog"], generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize(
    "performance",
    [
        {"channels_last": True},
        # inductor compiles the UNet on the CPU: about a minute on 2 cores
        pytest.param({"compile_unet": True, "channels_last": True}, marks=pytest.mark.slow),
    ],
    ids=["channels_last", "compile"],
)
def test_fast_paths_match_the_plain_sampler(tiny_train_config, performance):
    cfg = tiny_train_config(sampling={"num_steps": 3})
    plain = trajectory(cfg)
    fast = trajectory(cfg, **performance)
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


def test_all_timesteps_in_one_forward_take_the_same_step(tiny_train_config):
    """performance.timesteps_per_forward batches a micro-batch's trained timesteps into one forward/backward: the
    weights do not change between them, so every optimizer step's gradient (and the epoch's metrics) are those of
    one timestep at a time, up to float32 summation order. Over two epochs, so that the second one's ratios are off
    1, some are clipped, and the KL term (scaled like the loss) is not zero."""
    cfg = tiny_train_config(
        sampling={"num_steps": 5},
        training={"learning_rate": 1e-2, "kl_coef": 0.5, "gradient_accumulation_steps": 2},
    )
    batch = Sampler(cfg, pipeline=load_pipeline(cfg.model, cfg.lora, seed=cfg.seed)).sample_scored()
    grads, metrics = [], []
    for per in (1, 2, 0):  # one at a time; chunks of 2, 2, 1 (unequal); all 5 at once
        c = cfg.model_copy(
            update={"performance": cfg.performance.model_copy(update={"timesteps_per_forward": per})}
        )
        learner = Learner(c)
        seen = []
        step = learner.optim.step

        def recording_step(step=step, seen=seen, optim=learner.optim):
            seen.append(torch.cat([g.reshape(-1) for g in optim.unscaled_gradients() if g is not None]))
            return step()

        learner.optim.step = recording_step
        metrics.append([learner.train_epoch(batch), learner.train_epoch(batch)])
        grads.append(seen)
    assert len(grads[0]) == 2 and grads[0][1].norm() > 0
    for other in grads[1:]:
        assert len(other) == len(grads[0])
        for g, ref in zip(other, grads[0], strict=True):
            assert (g - ref).norm() <= 1e-5 * ref.norm(), float((g - ref).norm() / ref.norm())
    assert metrics[0][1]["kl_to_base"] > 0 and metrics[0][1]["ratio_mean"] != 1.0
    for epochs in metrics[1:]:
        assert epochs[0]["ratio_first_step"] == 1.0
        for m, ref in zip(epochs, metrics[0], strict=True):
            for key in ("clipfrac", "ratio_mean", "approx_kl", "kl_to_base", "loss"):
                assert abs(m[key] - ref[key]) <= 1e-5 * max(1.0, abs(ref[key])), key
