"""The arithmetic the GPU presets run, on a CPU: their base dtype, SD 1.5's latent size and their accumulation divisor.

The compressibility preset back-propagates loss / (16 micro-batches x 50 timesteps) through a UNet whose log-prob
is a mean over 4 x 64 x 64 latent elements. In float16 that gradient underflows without loss scaling; these tests
compute two timesteps of the real learner path at full shape (`bench.precision`, which `ddpo bench precision` runs
on a GPU at SD 1.5's architecture) and compare the LoRA gradients with float32's.
"""

from __future__ import annotations

import pytest
import torch

from bench.precision import cosine, lora_gradient, preset_config, transitions
from learner.learner import Learner, needs_loss_scaling


def preset(tiny_sd_path: str, dtype: str):
    return preset_config(tiny_sd_path, dtype, "cpu")


@pytest.fixture(scope="module")
def sample(tiny_sd_path):
    """One sample's (x_t, x_{t-1}) at two of the preset's steps, drawn from the float32 policy at 4 x 64 x 64."""
    return transitions(tiny_sd_path, "cpu")


@pytest.fixture(scope="module")
def float32_gradient(tiny_sd_path, sample):
    return lora_gradient(tiny_sd_path, "float32", "cpu", sample)


def test_loss_scaling_is_on_exactly_when_a_float16_forward_is_trained(tiny_sd_path):
    assert needs_loss_scaling(preset(tiny_sd_path, "float16"))
    assert not needs_loss_scaling(preset(tiny_sd_path, "bfloat16"))
    assert not needs_loss_scaling(preset(tiny_sd_path, "float32"))
    autocast = preset(tiny_sd_path, "float32").model_copy(deep=True)
    autocast.performance.autocast = "fp16"
    assert needs_loss_scaling(autocast)


@pytest.mark.slow
def test_float16_base_gradient_matches_float32_with_loss_scaling(tiny_sd_path, sample, float32_gradient):
    fp16 = lora_gradient(tiny_sd_path, "float16", "cpu", sample)
    zeros32, zeros16 = int((float32_gradient == 0).sum()), int((fp16 == 0).sum())
    assert cosine(fp16, float32_gradient) >= 0.99
    assert zeros16 <= zeros32, (zeros16, zeros32)
    # the reason: without the scale the same gradient flushes to zero in float16
    unscaled = lora_gradient(tiny_sd_path, "float16", "cpu", sample, loss_scaling=False)
    assert int((unscaled == 0).sum()) > 0.5 * unscaled.numel() > zeros32
    assert cosine(unscaled, float32_gradient) < 0.5


@pytest.mark.slow  # bfloat16 convolutions at 4 x 64 x 64 are slow on a CPU: about a minute on 2 cores
def test_bfloat16_base_gradient_matches_float32(tiny_sd_path, sample, float32_gradient):
    bf16 = lora_gradient(tiny_sd_path, "bfloat16", "cpu", sample)
    assert cosine(bf16, float32_gradient) >= 0.95
    assert int((bf16 == 0).sum()) <= int((float32_gradient == 0).sum())


def test_a_non_finite_step_is_skipped_counted_and_backs_the_scale_off(tiny_train_config):
    from learner.learner import ScaledOptimizer

    cfg = tiny_train_config(model={"dtype": "float16"})
    w = torch.nn.Parameter(torch.ones(3))
    opt = ScaledOptimizer([w], cfg, torch.device("cpu"))
    assert opt.loss_scaling and opt.scale == 2.0**16
    opt.backward((w * float("inf")).sum())
    result = opt.step()
    assert result.skipped and opt.skipped_steps == 1
    assert torch.equal(w.detach(), torch.ones(3))  # nothing changed
    assert opt.scale == 2.0**15  # backed off
    opt.backward((w * 2.0).sum())
    result = opt.step()
    assert not result.skipped and result.grad_norm == pytest.approx(2 * 3**0.5)  # unscaled before clipping
    assert not torch.equal(w.detach(), torch.ones(3))


def test_loss_scale_is_checkpointed_and_survives_resume(tiny_train_config, tmp_path):
    from learner.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint

    cfg = tiny_train_config(model={"dtype": "float16"})
    learner = Learner(cfg)
    assert learner.optim.loss_scaling
    learner.optim.backward(learner.params[0].float().sum() * float("inf"))  # an overflow: the scale backs off
    assert learner.optim.step().skipped and learner.optim.scale == 2.0**15
    save_checkpoint(tmp_path, 0, learner.state_dict())
    resumed = Learner(cfg)
    assert resumed.optim.scale == 2.0**16
    resumed.load_state_dict(load_checkpoint(latest_checkpoint(tmp_path)))
    assert resumed.optim.scale == 2.0**15


def test_an_epoch_without_gradient_warns_what_to_check(tiny_train_config, caplog):
    from actors.sampler import Sampler

    cfg = tiny_train_config()
    learner = Learner(cfg)
    batch = Sampler(cfg, pipeline=learner.pipe).sample_scored()
    for t in batch:
        t.reward = 1.0  # every reward equal: every advantage is 0
    with caplog.at_level("WARNING", logger="learner.learner"):
        metrics = learner.train_epoch(batch)
    assert metrics["grad_norm"] == 0.0
    assert "gradient norm was 0" in caplog.text and "advantage_abs_mean" in caplog.text
