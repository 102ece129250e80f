"""Losses against values worked out by hand (clip_range 0.2 so the arithmetic is readable)."""

from __future__ import annotations

import pytest
import torch

from learner.objectives import ddpo_is_loss, ddpo_sf_loss, rwr_loss, rwr_sparse_weights, rwr_weights


def test_ddpo_is_clips_on_both_sides():
    # ratios r = exp(log_prob - old) = [1.5, 0.5, 1.1, 0.7], advantages A = [1, -1, 2, 1], eps = 0.2
    ratio = torch.tensor([1.5, 0.5, 1.1, 0.7])
    old = torch.zeros(4)
    adv = torch.tensor([1.0, -1.0, 2.0, 1.0])
    loss, st = ddpo_is_loss(ratio.log(), old, adv, clip_range=0.2)
    # per sample max(-A r, -A clip(r, 0.8, 1.2)):
    #   r=1.5, A=1 : max(-1.5, -1.2) = -1.2   (clipped above: no credit beyond 1 + eps)
    #   r=0.5, A=-1: max( 0.5,  0.8) =  0.8   (clipped below: no credit beyond 1 - eps)
    #   r=1.1, A=2 : max(-2.2, -2.2) = -2.2   (inside the range)
    #   r=0.7, A=1 : max(-0.7, -0.8) = -0.7   (pessimistic side is unclipped)
    assert loss.item() == pytest.approx((-1.2 + 0.8 - 2.2 - 0.7) / 4, rel=1e-6)
    assert st.clipfrac == pytest.approx(3 / 4)  # 1.5, 0.5 and 0.7 are outside [0.8, 1.2]
    assert st.ratio_mean == pytest.approx((1.5 + 0.5 + 1.1 + 0.7) / 4, rel=1e-6)
    log_r = ratio.log()
    assert st.approx_kl == pytest.approx(0.5 * float((log_r**2).mean()), rel=1e-6)


def test_ddpo_is_gradient_vanishes_where_clipped():
    log_prob = torch.log(torch.tensor([1.5, 1.1])).requires_grad_()
    loss, _ = ddpo_is_loss(log_prob, torch.zeros(2), torch.tensor([1.0, 1.0]), clip_range=0.2)
    loss.backward()
    # d/dlogp of -A r / 2 = -r / 2 inside the range; zero where the clipped branch is active
    assert log_prob.grad.tolist() == pytest.approx([0.0, -1.1 / 2], rel=1e-6)


def test_ddpo_is_on_policy_ratio_one_and_no_clipping():
    lp = torch.tensor([-1.3, -0.2, -2.0])
    loss, st = ddpo_is_loss(lp, lp.clone(), torch.tensor([0.5, -1.0, 2.0]), clip_range=1e-4)
    assert loss.item() == pytest.approx(-(0.5 - 1.0 + 2.0) / 3)
    assert st.clipfrac == 0.0 and st.ratio_mean == 1.0 and st.approx_kl == 0.0


def test_ddpo_sf_is_minus_advantage_weighted_log_prob():
    lp = torch.tensor([-1.0, -2.0]).requires_grad_()
    loss, _ = ddpo_sf_loss(lp, torch.tensor([-1.0, -2.5]), torch.tensor([2.0, -1.0]))
    # -(2 * -1 + -1 * -2) / 2 = -(-2 + 2) / 2 = 0
    assert loss.item() == pytest.approx(0.0)
    loss.backward()
    assert lp.grad.tolist() == pytest.approx([-1.0, 0.5])  # -A / B


def test_rwr_weights_standardise_then_softmax_rescaled_to_mean_one():
    # rewards [0, 2]: mean 1, population std 1 -> z = [-1, 1] (to 1e-6: std + eps)
    # softmax(z / 1) = [e^-1, e^1] / (e^-1 + e^1) = [0.119203, 0.880797]; times N = 2 -> [0.238406, 1.761594]
    w = rwr_weights(torch.tensor([0.0, 2.0]), temperature=1.0)
    assert w.tolist() == pytest.approx([0.238406, 1.761594], rel=1e-5)
    # temperature 0.5: softmax([-2, 2]) = [e^-2, e^2] / (e^-2 + e^2) = [0.017986, 0.982014] -> [0.0359724, 1.9640276]
    assert rwr_weights(torch.tensor([0.0, 2.0]), 0.5).tolist() == pytest.approx(
        [0.0359724, 1.9640276], rel=1e-5
    )
    # standardised: the same weights for kB-sized and score-sized rewards of the same shape
    assert torch.allclose(rwr_weights(torch.tensor([10.0, 30.0]), 1.0), w, rtol=1e-5)


def test_rwr_sparse_keeps_samples_at_or_above_the_percentile_with_equal_weights():
    # r = [5, 1, 4, 2, 3], q = 60: sorted [1, 2, 3, 4, 5], position 0.6 x 4 = 2.4 -> 3 + 0.4 x (4 - 3) = 3.4
    # kept: 5 and 4; weights N / kept = 5 / 2 = 2.5 on them, 0 elsewhere
    w = rwr_sparse_weights(torch.tensor([5.0, 1.0, 4.0, 2.0, 3.0]), percentile=60)
    assert w.tolist() == pytest.approx([2.5, 0.0, 2.5, 0.0, 0.0])
    # a tie at the threshold is kept (>=, as the JAX code's mask)
    assert rwr_sparse_weights(torch.tensor([1.0, 2.0, 2.0]), percentile=50).tolist() == pytest.approx(
        [0, 1.5, 1.5]
    )


def test_rwr_loss_is_weighted_mse():
    pred = torch.zeros(2, 1, 2, 2)
    target = torch.stack([torch.full((1, 2, 2), 1.0), torch.full((1, 2, 2), 2.0)])  # mse per sample 1 and 4
    loss = rwr_loss(pred, target, torch.tensor([0.5, 1.5]))
    assert loss.item() == pytest.approx((0.5 * 1 + 1.5 * 4) / 2)
