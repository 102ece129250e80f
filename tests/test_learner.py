"""The whole algorithm in one process on the tiny model: on-policy invariant, LoRA-only updates, learning."""

from __future__ import annotations

import torch

from actors.sampler import Sampler
from learner.learner import Learner
from services.diffusion import encode_prompts, step_log_prob
from services.models import load_pipeline


def make(cfg):
    pipe = load_pipeline(cfg.model, cfg.lora, seed=cfg.seed)
    return Sampler(cfg, pipeline=pipe), Learner(cfg, pipeline=pipe)


def recomputed_log_probs(cfg, learner, batch) -> torch.Tensor:
    """log pi(x_{t-1} | x_t) [N, T] of every recorded step under the learner's current weights."""
    latents = torch.stack([t.latents for t in batch])
    embeds = encode_prompts(learner.pipe, [t.prompt for t in batch])
    neg = learner._negative_embeds.expand_as(embeds)
    out = []
    with torch.no_grad():
        for i in range(cfg.sampling.num_steps):
            ts = torch.stack([t.timesteps[i] for t in batch])
            lp, _ = step_log_prob(learner.unet, learner.scheduler, latents[:, i], latents[:, i + 1], ts, embeds, neg,
                                  cfg.sampling.guidance_scale, cfg.sampling.eta)  # fmt: skip
            out.append(lp)
    return torch.stack(out, dim=1)


def test_recomputed_log_probs_give_ratio_one_at_every_step(tiny_train_config):
    cfg = tiny_train_config()
    sampler, learner = make(cfg)
    batch = sampler.sample_scored()
    ratio = torch.exp(recomputed_log_probs(cfg, learner, batch) - torch.stack([t.log_probs for t in batch]))
    assert ratio.shape == (len(batch), cfg.sampling.num_steps)
    torch.testing.assert_close(ratio, torch.ones_like(ratio), rtol=0, atol=1e-4)


def test_first_ddpo_is_update_is_unclipped_and_touches_only_lora(tiny_train_config):
    cfg = tiny_train_config(training={"learning_rate": 1e-2, "clip_range": 1e-4})
    sampler, learner = make(cfg)
    base_before = {n: p.detach().clone() for n, p in learner.unet.named_parameters() if "lora" not in n}
    lora_before = {n: p.detach().clone() for n, p in learner.unet.named_parameters() if "lora" in n}
    assert lora_before and all(p.requires_grad for n, p in learner.unet.named_parameters() if "lora" in n)
    assert not any(p.requires_grad for n, p in learner.unet.named_parameters() if "lora" not in n)
    assert not any(p.requires_grad for p in learner.pipe.text_encoder.parameters())
    assert not any(p.requires_grad for p in learner.pipe.vae.parameters())
    # one optimizer step per epoch, so every trained step of the epoch sees the sampling weights
    cfg.training.gradient_accumulation_steps = cfg.samples_per_epoch // cfg.training.batch_size
    metrics = learner.train_epoch(sampler.sample_scored())
    assert metrics["clipfrac"] == 0.0
    assert abs(metrics["ratio_mean"] - 1.0) < 1e-4 and abs(metrics["ratio_first_step"] - 1.0) < 1e-4
    for n, p in learner.unet.named_parameters():
        if "lora" in n:
            continue
        assert torch.equal(p, base_before[n]), f"base weight {n} changed"
    changed = [
        n for n, p in learner.unet.named_parameters() if "lora" in n and not torch.equal(p, lora_before[n])
    ]
    assert changed, "no LoRA weight moved"
    assert learner.policy_version == 1


def test_every_objective_in_the_table_runs_and_reports(tiny_train_config):
    from learner.objectives import OBJECTIVES, PolicyGradient

    for objective in OBJECTIVES:
        # one optimizer step per epoch and no lag: valid for the on-policy DDPO-SF too
        cfg = tiny_train_config(
            training={"objective": objective, "gradient_accumulation_steps": 2, "rwr_percentile": 50},
            cluster={"max_policy_lag": 0},
        )
        sampler, learner = make(cfg)
        m = learner.train_epoch(sampler.sample_scored())
        assert m["loss"] is not None and torch.isfinite(torch.tensor(m["loss"])), objective
        assert (m["approx_kl"] is not None) == isinstance(OBJECTIVES[objective], PolicyGradient)
        assert m["skipped_steps"] == 0 and m["grad_norm"] > 0, objective


def test_one_ddpo_is_update_makes_the_better_samples_more_likely(tiny_train_config):
    """The policy-improvement step itself: after one on-policy update, the importance-weighted objective
    mean_i A_i * mean_t pi_new/pi_old (0 before: the advantages are normalised) is positive, beyond twice its
    standard error over samples. A loss of the wrong sign, advantages that do not reach the loss, or an update
    that misses the trained weights each fail it. (The reward-rise checks of whole runs are the slow quickstart
    tests.)"""
    cfg = tiny_train_config(
        sampling={"num_steps": 10, "batch_size": 16, "num_batches_per_epoch": 2},
        # a small (first-order) step: 3e-3 gains 4 standard errors here; 3e-2 overshoots to 1
        training={
            "learning_rate": 3e-3,
            "clip_range": 0.1,
            "batch_size": 8,
            "gradient_accumulation_steps": 4,
        },
        prompts={"set": "list", "items": ["a cat", "a dog", "a bird", "a fish"]},
    )
    sampler, learner = make(cfg)
    batch = sampler.sample_scored() + sampler.sample_scored()
    rewards = torch.tensor([t.reward for t in batch])
    adv = (rewards - rewards.mean()) / rewards.std(unbiased=False)  # stat_tracking off: batch-normalised
    old = torch.stack([t.log_probs for t in batch])
    metrics = learner.train_epoch(batch)
    assert metrics["ratio_first_step"] == 1.0 and metrics["clipfrac"] == 0.0  # one step, on-policy
    gain = adv * (torch.exp(recomputed_log_probs(cfg, learner, batch) - old).mean(dim=1) - 1)  # [N]
    stderr = gain.std() / len(gain) ** 0.5
    assert gain.mean() > 2 * stderr, f"objective gain {gain.mean():.3g}, standard error {stderr:.3g}"
