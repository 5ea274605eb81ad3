"""GRPO math: advantages, k3 KL, the clipped surrogate and its aggregations, checked against hand numbers and
against the formula written out token by token with Python loops (PPO's case analysis, not the min/clamp form)."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from r1forge.rl.grpo_loss import (dynamic_sampling_filter, group_advantages, grpo_loss, per_token_kl,
                                  zero_std_group_fraction)


# ------------------------------------------------------------------------------------------- advantages
def test_group_advantages_group_scaling_matches_hand_computation():
    rewards = [1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.5]
    got = group_advantages(torch.tensor(rewards), 4, "group")
    expected = []
    for g in range(2):
        group = rewards[4 * g : 4 * g + 4]
        mean, std = sum(group) / 4, statistics.stdev(group)  # unbiased, as TRL
        expected += [(r - mean) / (std + 1e-4) for r in group]
    assert got.tolist() == pytest.approx(expected, rel=1e-6)
    assert got[0].item() == pytest.approx(0.75 / (0.5 + 1e-4), rel=1e-6)  # mean .25, stdev .5


def test_group_advantages_batch_and_none_scaling():
    rewards = [1.0, 0.0, 3.0, 5.0]
    batch_std = statistics.stdev(rewards)
    got = group_advantages(torch.tensor(rewards), 2, "batch")
    assert got.tolist() == pytest.approx([0.5 / (batch_std + 1e-4), -0.5 / (batch_std + 1e-4),
                                          -1.0 / (batch_std + 1e-4), 1.0 / (batch_std + 1e-4)], rel=1e-6)
    assert group_advantages(torch.tensor(rewards), 2, "none").tolist() == [0.5, -0.5, -1.0, 1.0]


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_zero_variance_groups_get_exactly_zero_advantage(scale):
    rewards = torch.tensor([0.1, 0.1, 0.1, 0.7, 0.7, 0.7, 0.0, 1.0, 0.0])
    adv = group_advantages(rewards, 3, scale)
    assert torch.isfinite(adv).all()
    assert adv[:6].tolist() == [0.0] * 6
    assert adv[6:].abs().sum() > 0
    all_same = group_advantages(torch.ones(4), 4, scale)
    assert all_same.tolist() == [0.0] * 4
    assert group_advantages(torch.tensor([3.0, 4.0]), 1, scale).tolist() == [0.0, 0.0]  # G = 1: no NaN


def test_zero_std_fraction_and_dynamic_sampling_filter():
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 2.0, 2.0])
    assert dynamic_sampling_filter(rewards, 2).tolist() == [False, True, False, False]
    assert zero_std_group_fraction(rewards, 2).item() == pytest.approx(0.75)
    assert zero_std_group_fraction(rewards, 4).item() == 0.0


def test_advantage_input_errors_name_the_parameter():
    with pytest.raises(ValueError, match="num_generations"):
        group_advantages(torch.zeros(5), 2)
    with pytest.raises(ValueError, match="scale_rewards"):
        group_advantages(torch.zeros(4), 2, "groups")
    with pytest.raises(ValueError, match="NaN"):
        group_advantages(torch.tensor([0.0, float("nan")]), 2)


# ------------------------------------------------------------------------------------------- KL
def test_k3_kl_value_and_gradient():
    lp = torch.tensor([-1.0, -0.5, -3.0], requires_grad=True)
    ref = torch.tensor([-2.0, -0.5, -1.0])
    kl = per_token_kl(lp, ref)
    expected = [math.exp(-1) + 1 - 1, 0.0, math.exp(2) - 2 - 1]
    assert kl.tolist() == pytest.approx(expected, rel=1e-6)
    (grad,) = torch.autograd.grad(kl.sum(), lp)
    # d/dlp [exp(ref - lp) - (ref - lp) - 1] = 1 - exp(ref - lp)
    assert grad.tolist() == pytest.approx([1 - math.exp(-1), 0.0, 1 - math.exp(2)], rel=1e-6)
    assert (per_token_kl(torch.randn(100), torch.randn(100)) >= 0).all()


# ------------------------------------------------------------------------------------------- the loss
def _hand_example():
    """Two completions, L = 3, second padded after 2 tokens. Ratios chosen so the hand numbers are simple."""
    ratios = [[1.5, 0.5, 1.1], [0.7, 1.3, 1.0]]
    old = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.2, -0.8]])
    lp = (old + torch.tensor(ratios).log()).requires_grad_(True)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    adv = torch.tensor([1.0, -2.0])
    return lp, old, adv, mask


# per-token losses by hand, eps = 0.2: row 0 (A = 1): -min(1.5, 1.2) = -1.2, -0.5, -1.1 (sum -2.8)
# row 1 (A = -2): -min(-1.4, -1.6) = 1.6, -min(-2.6, -2.4) = 2.6 (sum 4.2); 5 real tokens
@pytest.mark.parametrize("loss_type, max_len, expected", [
    ("grpo", None, (-2.8 / 3 + 4.2 / 2) / 2),
    ("bnpo", None, (-2.8 + 4.2) / 5),
    ("dapo", None, (-2.8 + 4.2) / 5),
    ("dr_grpo", 4, (-2.8 + 4.2) / (2 * 4)),
    ("dr_grpo", None, (-2.8 + 4.2) / (2 * 3)),
])
def test_loss_value_by_hand(loss_type, max_len, expected):
    lp, old, adv, mask = _hand_example()
    loss, metrics = grpo_loss(lp, old, adv, mask, loss_type=loss_type, max_completion_length=max_len)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert metrics["clip_ratio/low"].item() == pytest.approx(1 / 5)  # row 1 token 0: rho .7 < .8, A < 0
    assert metrics["clip_ratio/high"].item() == pytest.approx(1 / 5)  # row 0 token 0: rho 1.5 > 1.2, A > 0
    assert metrics["clip_ratio/region"].item() == pytest.approx(2 / 5)
    assert metrics["ratio_mean"].item() == pytest.approx((1.5 + 0.5 + 1.1 + 0.7 + 1.3) / 5, rel=1e-5)
    assert "kl" not in metrics


def test_gradient_by_hand_grpo_clipping_from_both_sides():
    lp, old, adv, mask = _hand_example()
    loss, _ = grpo_loss(lp, old, adv, mask, loss_type="grpo")
    (grad,) = torch.autograd.grad(loss, lp)
    # d(-rho A)/dlp = -rho A on unclipped tokens, then / tokens-in-row / rows; clipped tokens get exactly 0
    expected = [0.0, -0.5 / 3 / 2, -1.1 / 3 / 2,  # row 0 token 0: A > 0 and rho above 1 + eps -> clipped
                0.0, 2.6 / 2 / 2, 0.0]  # row 1 token 0: A < 0 and rho below 1 - eps -> clipped; token 2 padding
    assert grad.flatten().tolist() == pytest.approx(expected, rel=1e-5, abs=1e-7)


def test_unclipped_side_passes_gradient():
    # A > 0 with rho below 1 - eps and A < 0 with rho above 1 + eps are NOT clipped (min picks rho * A)
    old = torch.zeros(2, 1)
    lp = torch.tensor([[math.log(0.5)], [math.log(1.5)]], requires_grad=True)
    adv = torch.tensor([1.0, -1.0])
    loss, metrics = grpo_loss(lp, old, adv, torch.ones(2, 1), loss_type="bnpo")
    (grad,) = torch.autograd.grad(loss, lp)
    assert grad.flatten().tolist() == pytest.approx([-0.5 / 2, 1.5 / 2], rel=1e-6)
    assert metrics["clip_ratio/region"].item() == 0.0


def test_large_epsilon_as_in_r1_stage_one():
    old = torch.zeros(1, 3)
    lp = torch.tensor([[math.log(5.0), math.log(12.0), math.log(0.05)]], requires_grad=True)
    loss, metrics = grpo_loss(lp, old, torch.tensor([1.0]), torch.ones(1, 3), epsilon_low=10, epsilon_high=10,
                              loss_type="bnpo")
    (grad,) = torch.autograd.grad(loss, lp)
    assert loss.item() == pytest.approx(-(5.0 + 11.0 + 0.05) / 3, rel=1e-6)  # only rho = 12 is clipped (at 11)
    assert grad.flatten().tolist() == pytest.approx([-5.0 / 3, 0.0, -0.05 / 3], rel=1e-5)
    assert metrics["clip_ratio/high"].item() == pytest.approx(1 / 3)


def _loss_by_loops(lp, old, adv, mask, ref, beta, eps_low, eps_high, loss_type, max_len):
    """The objective token by token: PPO's case analysis, then each aggregation written out."""
    N, L = len(mask), len(mask[0])
    rows, total, count = [], 0.0, 0
    for i in range(N):
        row_sum, row_count = 0.0, 0
        for t in range(L):
            if mask[i][t] == 0:
                continue
            rho = torch.exp(lp[i, t] - old[i][t])
            a = adv[i]
            if a >= 0:
                surrogate = rho * a if rho.item() <= 1 + eps_high else torch.tensor((1 + eps_high) * a)
            else:
                surrogate = rho * a if rho.item() >= 1 - eps_low else torch.tensor((1 - eps_low) * a)
            term = -surrogate
            if beta:
                d = ref[i][t] - lp[i, t]
                term = term + beta * (torch.exp(d) - d - 1)
            row_sum, row_count = row_sum + term, row_count + 1
        rows.append(row_sum / max(row_count, 1))
        total, count = total + row_sum, count + row_count
    if loss_type == "grpo":
        return sum(rows) / N
    if loss_type in ("bnpo", "dapo"):
        return total / max(count, 1)
    return total / (N * (max_len or L))


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_loss_and_gradient_match_explicit_loops(loss_type, beta):
    g = torch.Generator().manual_seed(0)
    N, L = 6, 7
    old = -torch.rand(N, L, generator=g) * 3
    lp = (old + torch.randn(N, L, generator=g) * 0.4).requires_grad_(True)
    ref = old + torch.randn(N, L, generator=g) * 0.3
    adv = torch.randn(N, generator=g)
    lengths = [7, 3, 5, 1, 6, 7]
    mask = torch.tensor([[1.0 if t < n else 0.0 for t in range(L)] for n in lengths])
    loss, metrics = grpo_loss(lp, old, adv, mask, ref_logprobs=ref, beta=beta, epsilon_low=0.2, epsilon_high=0.28,
                              loss_type=loss_type, max_completion_length=9)
    expected = _loss_by_loops(lp, old.tolist(), adv.tolist(), mask.tolist(), ref.tolist(), beta, 0.2, 0.28,
                              loss_type, 9)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-7)
    (grad,) = torch.autograd.grad(loss, lp)
    (expected_grad,) = torch.autograd.grad(expected, lp)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-7)
    assert 0.0 < metrics["clip_ratio/region"].item() < 1.0  # the example exercises clipping
    d = (ref - lp).detach().tolist()
    kl_by_hand = sum(math.exp(d[i][t]) - d[i][t] - 1 for i in range(N) for t in range(lengths[i])) / sum(lengths)
    assert metrics["kl"].item() == pytest.approx(kl_by_hand, rel=1e-5)


def test_kl_term_value_and_gradient():
    lp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    ref = torch.tensor([[-2.0, -2.0]])
    # A = 0: the loss is beta * token-mean of k3; old = lp.detach() so rho = 1 (and rho * 0 adds no gradient)
    loss, metrics = grpo_loss(lp, lp.detach(), torch.zeros(1), torch.ones(1, 2), ref_logprobs=ref, beta=0.5,
                              loss_type="bnpo")
    assert loss.item() == pytest.approx(0.5 * (math.exp(-1) + 1 - 1 + 0.0) / 2, rel=1e-6)
    assert metrics["kl"].item() == pytest.approx(math.exp(-1) / 2, rel=1e-6)
    (grad,) = torch.autograd.grad(loss, lp)
    assert grad.flatten().tolist() == pytest.approx([0.5 * (1 - math.exp(-1)) / 2, 0.0], abs=1e-7)


def test_padding_values_change_nothing():
    g = torch.Generator().manual_seed(1)
    old = -torch.rand(3, 5, generator=g)
    base_lp = old + 0.3 * torch.randn(3, 5, generator=g)
    ref = old + 0.2 * torch.randn(3, 5, generator=g)
    adv = torch.tensor([1.0, -0.5, 2.0])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]], dtype=torch.bool)

    def run(lp_values, old_values, ref_values):
        lp = lp_values.clone().requires_grad_(True)
        loss, metrics = grpo_loss(lp, old_values, adv, mask, ref_logprobs=ref_values, beta=0.1, loss_type="grpo")
        (grad,) = torch.autograd.grad(loss, lp)
        return loss, grad, metrics

    loss_a, grad_a, metrics_a = run(base_lp, old, ref)
    garbage = ~mask
    junk_lp = torch.where(garbage, torch.full_like(base_lp, 50.0), base_lp)
    junk_old = torch.where(garbage, torch.full_like(old, float("-inf")), old)
    junk_ref = torch.where(garbage, torch.full_like(ref, float("nan")), ref)
    loss_b, grad_b, metrics_b = run(junk_lp, junk_old, junk_ref)
    assert loss_a.item() == loss_b.item()
    torch.testing.assert_close(grad_a, grad_b)
    assert (grad_b[garbage] == 0).all()
    for key in metrics_a:
        assert metrics_a[key].item() == metrics_b[key].item()


def test_on_policy_old_logprobs_none_and_empty_rows():
    lp = torch.tensor([[-1.0, -2.0], [-0.5, -0.5]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0], [0.0, 0.0]])  # an empty completion counts as a sequence with loss 0
    loss, metrics = grpo_loss(lp, None, torch.tensor([2.0, 1.0]), mask, loss_type="grpo")
    assert loss.item() == pytest.approx(-2.0 / 2)
    (grad,) = torch.autograd.grad(loss, lp)
    assert grad.flatten().tolist() == pytest.approx([-2.0 / 2 / 2, -2.0 / 2 / 2, 0.0, 0.0])
    assert metrics["ratio_mean"].item() == 1.0
    empty, _ = grpo_loss(lp, None, torch.tensor([2.0, 1.0]), torch.zeros(2, 2), loss_type="bnpo")
    assert empty.item() == 0.0


def test_per_token_advantages_are_accepted():
    lp, old, adv, mask = _hand_example()
    a, _ = grpo_loss(lp, old, adv, mask, loss_type="bnpo")
    b, _ = grpo_loss(lp, old, adv[:, None].expand(2, 3), mask, loss_type="bnpo")
    assert a.item() == b.item()


def test_loss_input_errors_name_the_parameter():
    lp, old, adv, mask = _hand_example()
    with pytest.raises(ValueError, match="beta"):
        grpo_loss(lp, old, adv, mask, beta=0.1)
    with pytest.raises(ValueError, match="loss_type"):
        grpo_loss(lp, old, adv, mask, loss_type="ppo")
    with pytest.raises(ValueError, match="mask"):
        grpo_loss(lp, old, adv, mask[:, :2])
    with pytest.raises(ValueError, match="advantages"):
        grpo_loss(lp, old, torch.zeros(3), mask)
    with pytest.raises(ValueError, match="max_completion_length"):
        grpo_loss(lp, old, adv, mask, loss_type="dr_grpo", max_completion_length=0)
    with pytest.raises(ValueError, match="epsilon"):
        grpo_loss(lp, old, adv, mask, epsilon_low=-0.1)
