"""ddim_step_with_logprob against an independent computation: diffusers' own DDIM step for the mean and
torch.distributions.Normal for the density."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler

from services.diffusion import ddim_step_with_logprob, sample_trajectory

B, SHAPE = 4, (4, 8, 8)


def make_scheduler(prediction_type: str, steps: int = 10) -> DDIMScheduler:
    s = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type,
    )  # fmt: skip
    s.set_timesteps(steps)
    return s


def reference_log_prob(scheduler, model_output, t: int, sample, prev_sample, eta: float) -> torch.Tensor:
    """Mean from diffusers' DDIMScheduler.step with zero noise; std = eta * sqrt(variance); density by Normal."""
    mean = scheduler.step(
        model_output, t, sample, eta=eta, variance_noise=torch.zeros_like(sample)
    ).prev_sample
    prev_t = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    std = eta * scheduler._get_variance(torch.tensor(t), torch.tensor(prev_t)) ** 0.5
    return torch.distributions.Normal(mean, std).log_prob(prev_sample).mean(dim=(1, 2, 3))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_scalar_timestep_matches_reference(prediction_type, eta):
    scheduler = make_scheduler(prediction_type)
    g = torch.Generator().manual_seed(0)
    for t in scheduler.timesteps.tolist():
        sample = torch.randn(B, *SHAPE, generator=g)
        out = torch.randn(B, *SHAPE, generator=g)
        prev, log_prob = ddim_step_with_logprob(scheduler, out, t, sample, eta=eta, generator=g)
        expected = reference_log_prob(scheduler, out, t, sample, prev, eta)
        assert log_prob.shape == (B,) and log_prob.dtype == torch.float32
        torch.testing.assert_close(log_prob, expected, rtol=1e-5, atol=0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_per_sample_timesteps_match_reference(prediction_type, eta):
    scheduler = make_scheduler(prediction_type)
    g = torch.Generator().manual_seed(1)
    ts = scheduler.timesteps[torch.tensor([0, 3, 9, 5])]  # includes the first and the last step
    sample = torch.randn(B, *SHAPE, generator=g)
    out = torch.randn(B, *SHAPE, generator=g)
    prev, log_prob = ddim_step_with_logprob(scheduler, out, ts, sample, eta=eta, generator=g)
    for i, t in enumerate(ts.tolist()):
        expected = reference_log_prob(scheduler, out[i : i + 1], t, sample[i : i + 1], prev[i : i + 1], eta)
        torch.testing.assert_close(log_prob[i : i + 1], expected, rtol=1e-5, atol=0)


def test_given_prev_sample_is_scored_not_resampled():
    scheduler = make_scheduler("epsilon")
    g = torch.Generator().manual_seed(2)
    sample, out, prev = (torch.randn(B, *SHAPE, generator=g) for _ in range(3))
    t = int(scheduler.timesteps[4])
    got, lp = ddim_step_with_logprob(scheduler, out, t, sample, prev_sample=prev)
    assert torch.equal(got, prev)
    # a 0-d tensor timestep and a [B] tensor of equal timesteps give the same answer as the int
    _, lp0 = ddim_step_with_logprob(scheduler, out, torch.tensor(t), sample, prev_sample=prev)
    _, lpb = ddim_step_with_logprob(scheduler, out, torch.full((B,), t), sample, prev_sample=prev)
    torch.testing.assert_close(lp0, lp, rtol=0, atol=0)
    torch.testing.assert_close(lpb, lp, rtol=1e-6, atol=0)


def test_sampled_prev_matches_diffusers_with_the_same_noise():
    """prev = mean + std * noise: with the same generator state, diffusers' step draws the same noise."""
    scheduler = make_scheduler("epsilon")
    sample, out = torch.randn(B, *SHAPE), torch.randn(B, *SHAPE)
    t = int(scheduler.timesteps[2])
    ours, _ = ddim_step_with_logprob(
        scheduler, out, t, sample, eta=1.0, generator=torch.Generator().manual_seed(7)
    )
    noise = torch.randn(B, *SHAPE, generator=torch.Generator().manual_seed(7))
    ref = scheduler.step(out, t, sample, eta=1.0, variance_noise=noise).prev_sample
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


def test_bad_timestep_shape_and_unset_scheduler_are_errors():
    scheduler = make_scheduler("epsilon")
    x = torch.randn(B, *SHAPE)
    with pytest.raises(ValueError, match="timestep"):
        ddim_step_with_logprob(scheduler, x, torch.tensor([1, 21]), x)
    fresh = DDIMScheduler()
    with pytest.raises(ValueError, match="set_timesteps"):
        ddim_step_with_logprob(fresh, x, 1, x)


def test_sample_trajectory_record_shapes(tiny_sd_path):
    from services.config import ModelConfig
    from services.models import load_pipeline

    pipe = load_pipeline(ModelConfig(pretrained=tiny_sd_path, dtype="float32", device="cpu"))
    traj = sample_trajectory(
        pipe, ["a cat", "a dog"], num_steps=5, generator=torch.Generator().manual_seed(0)
    )
    assert traj.latents.shape == (2, 6, 4, 8, 8)
    assert traj.log_probs.shape == (2, 5) and torch.isfinite(traj.log_probs).all()
    assert traj.timesteps.tolist() == [801, 601, 401, 201, 1]
    assert traj.images.shape == (2, 3, 64, 64) and traj.images.min() >= 0 and traj.images.max() <= 1
    assert traj.prompts == ["a cat", "a dog"]
