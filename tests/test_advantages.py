"""Per-prompt stat tracking and advantage clipping against hand-computed values."""

from __future__ import annotations

import pytest
import torch

from learner.objectives import PerPromptStatTracker, batch_advantages, clip_advantages

EPS = 1e-6


def test_per_prompt_normalisation_once_buffers_are_full():
    tracker = PerPromptStatTracker(buffer_size=4, min_count=2)
    adv = tracker.update(["a", "a", "b", "b"], [1.0, 3.0, 10.0, 30.0])
    # prompt a: mean 2, std 1 -> [-1, 1]; prompt b: mean 20, std 10 -> [-1, 1]
    assert adv.tolist() == pytest.approx([-1 / (1 + EPS), 1 / (1 + EPS), -10 / (10 + EPS), 10 / (10 + EPS)])


def test_fallback_to_batch_stats_under_min_count():
    tracker = PerPromptStatTracker(buffer_size=4, min_count=3)
    adv = tracker.update(["a", "a", "b", "b"], [1.0, 3.0, 10.0, 30.0])
    # neither prompt has 3 rewards: batch mean 11, std sqrt(((10)^2 + 8^2 + 1 + 19^2) / 4) = sqrt(131.5)
    std = 131.5**0.5
    assert adv.tolist() == pytest.approx([(r - 11) / (std + EPS) for r in [1.0, 3.0, 10.0, 30.0]], rel=1e-6)
    # second batch: a has 3 rewards now (1, 3, 5): mean 3, std sqrt(8/3); new prompt c falls back to this batch
    adv2 = tracker.update(["a", "c"], [5.0, 7.0])
    std_a = (8 / 3) ** 0.5
    assert adv2[0].item() == pytest.approx(2 / (std_a + EPS), rel=1e-6)
    assert adv2[1].item() == pytest.approx((7 - 6) / (1 + EPS), rel=1e-6)  # batch [5, 7]: mean 6, std 1


def test_ring_buffer_forgets_old_rewards():
    tracker = PerPromptStatTracker(buffer_size=2, min_count=2)
    tracker.update(["a", "a"], [100.0, 200.0])
    adv = tracker.update(["a", "a"], [1.0, 3.0])  # buffer keeps only (1, 3)
    assert adv.tolist() == pytest.approx([-1 / (1 + EPS), 1 / (1 + EPS)])


def test_state_dict_round_trip_continues_identically():
    a = PerPromptStatTracker(buffer_size=3, min_count=2)
    a.update(["x", "y", "x"], [1.0, 2.0, 4.0])
    b = PerPromptStatTracker(buffer_size=1, min_count=1)
    b.load_state_dict(a.state_dict())
    nxt = (["x", "y", "y"], [0.5, 1.5, 9.0])
    assert torch.equal(a.update(*nxt), b.update(*nxt))
    assert a.state_dict() == b.state_dict()


def test_batch_advantages_and_clipping():
    adv = batch_advantages(torch.tensor([0.0, 2.0]))
    assert adv.tolist() == pytest.approx([-1 / (1 + EPS), 1 / (1 + EPS)])
    clipped = clip_advantages(torch.tensor([-7.0, -2.0, 0.0, 3.0, 9.0]), 5.0)
    assert clipped.tolist() == [-5.0, -2.0, 0.0, 3.0, 5.0]


def test_length_mismatch_is_an_error():
    with pytest.raises(ValueError, match="2 prompts but 3 rewards"):
        PerPromptStatTracker().update(["a", "b"], [1.0, 2.0, 3.0])
