"""Tests of flowgrpo_core.grpo: advantages, reward aggregation, clipped loss, KL, metrics.

Expected values come from hand algebra or from independent pure-Python / numpy computations in the test.
"""

import math
import statistics

import numpy as np
import pytest
import torch

from flowgrpo_core.grpo import (
    aggregate_rewards,
    clipped_surrogate_loss,
    group_advantages,
    kl_to_reference,
    policy_metrics,
)

# --------------------------------------------------------------------------------------------------------------
# group_advantages


def _reference_advantages(rewards, labels, std_mode, ddof, eps):
    """Independent per-sample loop with the statistics module."""
    stdev = statistics.pstdev if ddof == 0 else statistics.stdev
    out = []
    for r, g in zip(rewards, labels):
        members = [x for x, h in zip(rewards, labels) if h == g]
        std = stdev(rewards) if std_mode == "global" else stdev(members)
        out.append((r - statistics.fmean(members)) / (std + eps))
    return out


def test_advantages_hand_example_per_group():
    # group 0 = {1, 3}: mean 2, pstdev 1, stdev sqrt(2); group 1 = {10, 20, 30}: mean 20, pstdev sqrt(200/3), stdev 10
    rewards = torch.tensor([1.0, 3.0, 10.0, 20.0, 30.0])
    groups = torch.tensor([0, 0, 1, 1, 1])
    a0 = group_advantages(rewards, groups, std_mode="group", eps=0.0, ddof=0, clip=None)
    s = math.sqrt(200 / 3)
    assert torch.allclose(a0.advantages, torch.tensor([-1.0, 1.0, -10 / s, 0.0, 10 / s]), atol=1e-6)
    assert torch.allclose(a0.group_mean, torch.tensor([2.0, 2.0, 20.0, 20.0, 20.0]))
    assert torch.allclose(a0.group_std, torch.tensor([1.0, 1.0, s, s, s]))
    a1 = group_advantages(rewards, groups, std_mode="group", eps=0.0, ddof=1, clip=None)
    r2 = 1 / math.sqrt(2)
    assert torch.allclose(a1.advantages, torch.tensor([-r2, r2, -1.0, 0.0, 1.0]), atol=1e-6)
    assert a1.zero_std_groups == 0 and a1.zero_std_ratio == 0.0


def test_advantages_hand_example_global_std():
    # all rewards {1, 3, 10, 20, 30}: mean 12.8, squared deviations 139.24 + 96.04 + 7.84 + 51.84 + 295.84 = 590.8
    rewards = torch.tensor([1.0, 3.0, 10.0, 20.0, 30.0])
    groups = torch.tensor([0, 0, 1, 1, 1])
    s0 = math.sqrt(590.8 / 5)
    res = group_advantages(rewards, groups, std_mode="global", eps=1e-4, ddof=0, clip=None)
    expected = torch.tensor([-1.0, 1.0, -10.0, 0.0, 10.0], dtype=torch.float64) / (s0 + 1e-4)
    assert torch.allclose(res.advantages.double(), expected, atol=1e-6)
    assert torch.allclose(res.group_std, torch.full((5,), s0))


@pytest.mark.parametrize("std_mode", ["global", "group"])
@pytest.mark.parametrize("ddof,eps", [(0, 1e-4), (1, 1e-8)])
def test_advantages_match_independent_reference(std_mode, ddof, eps):
    # three groups, arbitrary non-contiguous labels, interleaved order
    rewards = [0.31, 0.74, 0.12, 0.55, 0.90, 0.43, 0.28, 0.66, 0.05]
    labels = [17, 4, 17, 900, 4, 900, 17, 4, 900]
    res = group_advantages(torch.tensor(rewards), torch.tensor(labels), std_mode=std_mode, eps=eps, ddof=ddof,
                           clip=None)
    expected = torch.tensor(_reference_advantages(rewards, labels, std_mode, ddof, eps), dtype=torch.float64)
    assert res.advantages.dtype == torch.float32 and res.advantages.shape == (9,)
    assert torch.allclose(res.advantages.double(), expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("std_mode", ["global", "group"])
@pytest.mark.parametrize("eps", [0.0, 1e-8, 1e-4])
def test_zero_variance_group_gives_exact_zero(std_mode, eps):
    # 0.1 is not exactly representable: the float mean of [0.1] * 3 differs from 0.1 by ~1e-17,
    # so a naive (r - mean) / (std + eps) with a tiny std would give garbage rather than 0.
    rewards = torch.tensor([0.1, 0.1, 0.1, 1.0, 2.0, 4.0], dtype=torch.float64)
    groups = torch.tensor([5, 5, 5, 8, 8, 8])
    res = group_advantages(rewards, groups, std_mode=std_mode, eps=eps)
    assert torch.equal(res.advantages[:3], torch.zeros(3))
    assert torch.isfinite(res.advantages).all()
    assert (res.advantages[3:] != 0).all()
    assert res.zero_std_groups == 1
    assert res.zero_std_ratio == pytest.approx(0.5)


def test_all_rewards_equal_global_std_gives_zero():
    res = group_advantages(torch.full((6,), 0.3), torch.tensor([0, 0, 1, 1, 2, 2]), std_mode="global", eps=0.0)
    assert torch.equal(res.advantages, torch.zeros(6))
    assert res.zero_std_groups == 3 and res.zero_std_ratio == 1.0


def test_advantage_clip():
    # one success among 36: z = (35/36) / (sqrt(35)/36) = sqrt(35) ~ 5.92 for the outlier
    rewards = torch.zeros(36)
    rewards[7] = 1.0
    groups = torch.zeros(36, dtype=torch.long)
    free = group_advantages(rewards, groups, std_mode="group", eps=0.0, clip=None)
    assert free.advantages[7].item() == pytest.approx(math.sqrt(35), rel=1e-6)
    clipped = group_advantages(rewards, groups, std_mode="group", eps=0.0)  # default clip 5
    assert clipped.advantages[7].item() == pytest.approx(5.0)
    assert torch.allclose(clipped.advantages[:7], free.advantages[:7])
    tight = group_advantages(rewards, groups, std_mode="group", eps=0.0, clip=0.1)
    assert tight.advantages.abs().max().item() == pytest.approx(0.1)


@pytest.mark.parametrize("bad,word", [(float("nan"), "NaN"), (float("inf"), "inf"), (-float("inf"), "inf")])
def test_non_finite_reward_names_the_sample(bad, word):
    rewards = torch.tensor([0.1, 0.2, bad, 0.4])
    with pytest.raises(ValueError, match=rf"sample 2 is {word}.*reward node"):
        group_advantages(rewards, torch.tensor([0, 0, 1, 1]))


def test_group_of_one_raises():
    with pytest.raises(ValueError, match="group size must be >= 2"):
        group_advantages(torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0, 0, 1]))
    with pytest.raises(ValueError, match="group size must be >= 2"):
        group_advantages(torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0, 0, 1]), std_mode="group", ddof=1)


@pytest.mark.parametrize("kwargs", [
    dict(rewards=torch.tensor([0.1, 0.2, 0.3, 0.4]), group_ids=torch.tensor([0, 0, 1])),
    dict(rewards=torch.tensor([[0.1, 0.2], [0.3, 0.4]]), group_ids=torch.tensor([0, 0])),
    dict(rewards=torch.tensor([0.1, 0.2]), group_ids=torch.tensor([0.0, 0.0])),
    dict(rewards=torch.tensor([0.1, 0.2]), group_ids=torch.tensor([0, 0]), std_mode="batch"),
    dict(rewards=torch.tensor([0.1, 0.2]), group_ids=torch.tensor([0, 0]), ddof=2),
    dict(rewards=torch.tensor([0.1, 0.2]), group_ids=torch.tensor([0, 0]), eps=-1.0),
    dict(rewards=torch.tensor([0.1, 0.2]), group_ids=torch.tensor([0, 0]), clip=0.0),
])
def test_advantage_bad_inputs_raise(kwargs):
    with pytest.raises(ValueError):
        group_advantages(**kwargs)


# --------------------------------------------------------------------------------------------------------------
# aggregate_rewards


def test_weighted_sum():
    rewards = {"a": torch.tensor([1.0, 2.0, 3.0, 4.0]), "b": torch.tensor([10.0, 0.0, 10.0, 0.0])}
    out = aggregate_rewards(rewards, {"a": 0.5, "b": 2.0}, torch.tensor([0, 0, 1, 1]))
    assert torch.allclose(out, torch.tensor([20.5, 1.0, 21.5, 2.0]))


def test_normalize_then_weight_matches_per_reward_group_zscore():
    a = [1.0, 2.0, 4.0, 0.0, 5.0, 1.0]
    b = [100.0, 300.0, 200.0, 50.0, 50.0, 50.0]  # group 1 of b has zero variance -> contributes 0
    labels = [0, 0, 0, 1, 1, 1]
    out = aggregate_rewards({"a": torch.tensor(a), "b": torch.tensor(b)}, {"a": 1.0, "b": 0.25},
                            torch.tensor(labels), mode="normalize_then_weight", eps=1e-4)

    def z(values):
        res = []
        for v, g in zip(values, labels):
            members = [x for x, h in zip(values, labels) if h == g]
            sd = statistics.pstdev(members)
            res.append(0.0 if sd == 0 else (v - statistics.fmean(members)) / (sd + 1e-4))
        return res

    expected = [1.0 * za + 0.25 * zb for za, zb in zip(z(a), z(b))]
    assert torch.allclose(out.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-6)


def test_normalize_then_weight_is_scale_invariant_and_weighted_sum_is_not():
    gen = torch.Generator().manual_seed(3)
    a, b = torch.rand(8, generator=gen), torch.rand(8, generator=gen)
    groups = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1])
    weights = {"a": 0.7, "b": 0.3}
    base = aggregate_rewards({"a": a, "b": b}, weights, groups, mode="normalize_then_weight", eps=1e-10)
    scaled = aggregate_rewards({"a": a, "b": 26.0 * b}, weights, groups, mode="normalize_then_weight", eps=1e-10)
    assert torch.allclose(base, scaled, atol=1e-5)
    raw = aggregate_rewards({"a": a, "b": b}, weights, groups)
    raw_scaled = aggregate_rewards({"a": a, "b": 26.0 * b}, weights, groups)
    assert not torch.allclose(raw, raw_scaled, atol=1e-3)


def test_aggregate_errors():
    r = {"a": torch.tensor([0.1, 0.2]), "b": torch.tensor([0.3, 0.4])}
    g = torch.tensor([0, 0])
    with pytest.raises(ValueError, match="no weight for reward"):
        aggregate_rewards(r, {"a": 1.0}, g)
    with pytest.raises(ValueError, match="unknown reward"):
        aggregate_rewards(r, {"a": 1.0, "b": 1.0, "c": 1.0}, g)
    with pytest.raises(ValueError, match=r"reward 'b' for sample 1 is NaN"):
        aggregate_rewards({"a": r["a"], "b": torch.tensor([0.3, float("nan")])}, {"a": 1.0, "b": 1.0}, g)
    with pytest.raises(ValueError, match="different batch sizes"):
        aggregate_rewards({"a": r["a"], "b": torch.tensor([0.3, 0.4, 0.5])}, {"a": 1.0, "b": 1.0}, g)
    with pytest.raises(ValueError, match="needs group_ids"):
        aggregate_rewards(r, {"a": 1.0, "b": 1.0}, None, mode="normalize_then_weight")
    with pytest.raises(ValueError):
        aggregate_rewards(r, {"a": 1.0, "b": float("nan")}, g)
    with pytest.raises(ValueError):
        aggregate_rewards(r, {"a": 1.0, "b": 1.0}, g, mode="sum")
    with pytest.raises(ValueError):
        aggregate_rewards({}, {}, g)


# --------------------------------------------------------------------------------------------------------------
# clipped_surrogate_loss


def _loss_and_grad(ratios, advantages, clip_range, adv_clip=5.0):
    old = torch.tensor([-1.3, 0.2, 4.0, -0.7, 2.2, 0.0][: len(ratios)], dtype=torch.float32)
    log_prob = (old + torch.log(torch.tensor(ratios, dtype=torch.float32))).requires_grad_(True)
    loss = clipped_surrogate_loss(log_prob, old, torch.tensor(advantages, dtype=torch.float32), clip_range, adv_clip)
    loss.backward()
    return loss, log_prob.grad


def test_gradient_at_ratio_one_is_minus_advantage_over_batch():
    adv = [1.0, -2.0, 0.5, 3.0]
    loss, grad = _loss_and_grad([1.0] * 4, adv, 1e-4)
    assert loss.item() == pytest.approx(-sum(adv) / 4, rel=1e-6)
    assert torch.allclose(grad, -torch.tensor(adv) / 4, atol=1e-6)


def test_symmetric_clip_stops_gradient_only_on_the_clipped_side():
    eps = 0.1
    ratios = [1.5, 0.5, 0.5, 1.5, 1.05]
    adv = [1.0, -1.0, 1.0, -1.0, 2.0]
    loss, grad = _loss_and_grad(ratios, adv, eps)
    b = len(ratios)
    r, a = np.array(ratios), np.array(adv)
    # the pessimistic bound is the clipped one exactly when A > 0 and r > 1+eps, or A < 0 and r < 1-eps
    clipped_active = ((a > 0) & (r > 1 + eps)) | ((a < 0) & (r < 1 - eps))
    expected_grad = np.where(clipped_active, 0.0, -a * r / b)
    assert torch.allclose(grad.double(), torch.from_numpy(expected_grad), atol=1e-6)
    expected_loss = np.mean(np.maximum(-a * r, -a * np.clip(r, 1 - eps, 1 + eps)))
    assert loss.item() == pytest.approx(expected_loss, rel=1e-6)
    assert grad[0] == 0 and grad[1] == 0 and grad[2] != 0 and grad[3] != 0


def test_asymmetric_clip():
    lo, hi = 0.2, 0.05  # ratio clipped to [0.8, 1.05]
    ratios = [1.1, 0.85, 0.75, 1.03]
    adv = [1.0, -1.0, -1.0, 1.0]
    _, grad = _loss_and_grad(ratios, adv, (lo, hi))
    assert grad[0] == 0  # A > 0, ratio above 1 + hi
    assert grad[1].item() == pytest.approx(1.0 * 0.85 / 4, rel=1e-5)  # inside [1 - lo, 1 + hi]
    assert grad[2] == 0  # A < 0, ratio below 1 - lo
    assert grad[3].item() == pytest.approx(-1.03 / 4, rel=1e-5)
    # the same ratio 0.85 is clipped by a symmetric 0.05 range
    _, grad_sym = _loss_and_grad(ratios, adv, 0.05)
    assert grad_sym[1] == 0


def test_advantage_clip_in_loss():
    _, grad = _loss_and_grad([1.0, 1.0], [10.0, -10.0], 1e-4)
    assert torch.allclose(grad, torch.tensor([-5.0, 5.0]) / 2)
    _, grad_free = _loss_and_grad([1.0, 1.0], [10.0, -10.0], 1e-4, adv_clip=None)
    assert torch.allclose(grad_free, torch.tensor([-10.0, 10.0]) / 2)


def test_loss_does_not_differentiate_old_log_prob_or_advantages():
    log_prob = torch.zeros(3, requires_grad=True)
    old = torch.zeros(3, requires_grad=True)
    adv = torch.tensor([1.0, 0.0, -1.0], requires_grad=True)
    clipped_surrogate_loss(log_prob, old, adv, 1e-4).backward()
    assert log_prob.grad is not None and old.grad is None and adv.grad is None


@pytest.mark.parametrize("clip_range", [0.0, -0.1, 1.0, (0.1,), (1.2, 0.1), (0.1, 0.0), (0.1, float("inf"))])
def test_bad_clip_range_raises(clip_range):
    with pytest.raises(ValueError):
        clipped_surrogate_loss(torch.zeros(2), torch.zeros(2), torch.zeros(2), clip_range)


def test_loss_shape_mismatch_raises():
    with pytest.raises(ValueError, match="shapes must match"):
        clipped_surrogate_loss(torch.zeros(2), torch.zeros(3), torch.zeros(2), 1e-4)


# --------------------------------------------------------------------------------------------------------------
# kl_to_reference


def _kl_inputs():
    gen = torch.Generator().manual_seed(11)
    mean = torch.randn(3, 4, 5, 6, generator=gen)
    ref_mean = mean + 0.01 * torch.randn(3, 4, 5, 6, generator=gen)
    std = torch.tensor([0.3, 0.05, 0.7]).view(3, 1, 1, 1)
    delta = torch.tensor([-0.1, -0.05, -0.2])
    return mean, ref_mean, std, delta


def _exact_kl_numpy(mean, ref_mean, std):
    d = (mean.double().numpy() - ref_mean.double().numpy()).reshape(mean.shape[0], -1)
    s = std.double().numpy().reshape(-1)
    return np.array([np.sum(d[b] ** 2) / (2 * s[b] ** 2) / d.shape[1] for b in range(d.shape[0])])


def test_exact_kl_closed_form():
    mean, ref_mean, std, _ = _kl_inputs()
    kl = kl_to_reference(mean, ref_mean, std, form="exact")
    assert kl.shape == (3,) and kl.dtype == torch.float32
    assert np.allclose(kl.double().numpy(), _exact_kl_numpy(mean, ref_mean, std), rtol=1e-5)


@pytest.mark.parametrize("kind", ["flow_sde", "dance_sde"])
def test_reference_kl_divides_by_g_without_sqrt_delta(kind):
    mean, ref_mean, std, delta = _kl_inputs()
    kl = kl_to_reference(mean, ref_mean, std, delta=delta, form="reference", kind=kind)
    g = std.view(-1).double() / torch.sqrt(-delta.double())  # noise scale without sqrt(-delta)
    dmu2 = (mean.double() - ref_mean.double()).square().flatten(1).mean(dim=1)
    assert torch.allclose(kl.double(), dmu2 / (2 * g.square()), rtol=1e-5)
    exact = kl_to_reference(mean, ref_mean, std, form="exact")
    assert torch.allclose(kl, exact * (-delta), rtol=1e-5)
    # a float delta applies to every sample
    kl_float = kl_to_reference(mean, ref_mean, std, delta=-0.1, form="reference", kind=kind)
    assert torch.allclose(kl_float, exact * 0.1, rtol=1e-5)


def test_reference_kl_equals_exact_for_cps():
    mean, ref_mean, std, delta = _kl_inputs()
    ref = kl_to_reference(mean, ref_mean, std, delta=delta, form="reference", kind="cps")
    assert torch.allclose(ref, kl_to_reference(mean, ref_mean, std, form="exact"), rtol=1e-6)


def test_kl_gradient_reaches_mean_not_ref_mean():
    mean, ref_mean, std, delta = _kl_inputs()
    mean.requires_grad_(True)
    ref_mean.requires_grad_(True)
    kl_to_reference(mean, ref_mean, std, delta=delta, form="reference", kind="flow_sde").sum().backward()
    assert ref_mean.grad is None
    assert mean.grad is not None and mean.grad.abs().sum() > 0
    d = mean[0].numel()
    expected = (mean - ref_mean).detach() / std.square() / d * (-delta).view(3, 1, 1, 1)
    assert torch.allclose(mean.grad, expected, rtol=1e-4, atol=1e-9)


def test_kl_zero_std_gives_zero():
    mean, ref_mean, std, delta = _kl_inputs()
    std = std.clone()
    std[1] = 0.0
    mean.requires_grad_(True)
    for form, kind in [("exact", None), ("reference", "flow_sde"), ("reference", "cps")]:
        kl = kl_to_reference(mean, ref_mean, std, delta=delta, form=form, kind=kind)
        assert kl[1].item() == 0.0 and torch.isfinite(kl).all() and (kl[[0, 2]] > 0).all()
    kl.sum().backward()
    assert torch.isfinite(mean.grad).all() and (mean.grad[1] == 0).all()
    ode = kl_to_reference(mean, ref_mean, torch.zeros(3, 1, 1, 1), form="reference", kind="ode")
    assert torch.equal(ode, torch.zeros(3))


def test_kl_bad_inputs_raise():
    mean, ref_mean, std, delta = _kl_inputs()
    with pytest.raises(ValueError, match="needs kind"):
        kl_to_reference(mean, ref_mean, std, form="reference")
    with pytest.raises(ValueError, match="needs delta"):
        kl_to_reference(mean, ref_mean, std, form="reference", kind="flow_sde")
    with pytest.raises(ValueError, match="< 0"):
        kl_to_reference(mean, ref_mean, std, delta=0.1, form="reference", kind="dance_sde")
    with pytest.raises(ValueError):
        kl_to_reference(mean, ref_mean[:2], std)
    with pytest.raises(ValueError):
        kl_to_reference(mean, ref_mean, std, form="x")
    with pytest.raises(ValueError):
        kl_to_reference(mean, ref_mean, std, form="reference", kind="ddim")
    with pytest.raises(ValueError):
        kl_to_reference(mean, ref_mean, torch.ones(2, 1, 1, 1))


# --------------------------------------------------------------------------------------------------------------
# policy_metrics


def test_policy_metrics_constructed_example():
    old = torch.tensor([1.0, -2.0, 0.5, 3.0])
    log_ratio = [0.0, 0.2, -0.3, 0.05]  # ratios 1, 1.221, 0.741, 1.051
    log_prob = (old + torch.tensor(log_ratio)).requires_grad_(True)
    m = policy_metrics(log_prob, old, 0.1)
    assert all(isinstance(v, float) for v in m.values())
    assert m["approx_kl"] == pytest.approx(0.5 * (0.0 + 0.04 + 0.09 + 0.0025) / 4, rel=1e-4)
    assert m["clipfrac_high"] == pytest.approx(0.25)
    assert m["clipfrac_low"] == pytest.approx(0.25)
    assert m["clipfrac"] == pytest.approx(0.5)
    assert m["ratio_min"] == pytest.approx(math.exp(-0.3), rel=1e-5)
    assert m["ratio_max"] == pytest.approx(math.exp(0.2), rel=1e-5)
    assert m["ratio_mean"] == pytest.approx(sum(math.exp(x) for x in log_ratio) / 4, rel=1e-5)
    assert m["log_ratio_abs_max"] == pytest.approx(0.3, rel=1e-5)
    # asymmetric range [0.65, 1.25] contains every ratio
    wide = policy_metrics(log_prob, old, (0.35, 0.25))
    assert wide["clipfrac"] == 0.0


def test_policy_metrics_on_policy():
    lp = torch.randn(5)
    m = policy_metrics(lp, lp.clone(), 1e-5)
    assert m["approx_kl"] == 0.0 and m["clipfrac"] == 0.0 and m["ratio_min"] == m["ratio_max"] == 1.0


def test_std_floor_bounds_advantages_of_near_equal_groups():
    rewards = torch.tensor([0.5, 0.5 + 1e-6, 0.2, 0.9])
    groups = torch.tensor([0, 0, 1, 1])
    noisy = group_advantages(rewards, groups, std_mode="group", eps=1e-8, clip=None)
    assert noisy.advantages[:2].abs().max() > 0.9  # a one-in-a-million gap looks like a full standard deviation
    floored = group_advantages(rewards, groups, std_mode="group", eps=1e-8, clip=None, std_floor=1e-2)
    assert floored.advantages[:2].abs().max() < 1e-3
    # groups with a spread above the floor are unaffected: (0.2 - 0.55) / 0.35 = -1
    assert torch.allclose(floored.advantages[2:], torch.tensor([-1.0, 1.0]), atol=1e-6)
    with pytest.raises(ValueError, match="std_floor"):
        group_advantages(rewards, groups, std_floor=-1.0)


def test_multi_reward_advantages_both_modes_by_hand():
    from flowgrpo_core.grpo import multi_reward_advantages

    groups = torch.tensor([0, 0, 1, 1])
    rewards = {"a": torch.tensor([1.0, 3.0, 2.0, 2.0]), "b": torch.tensor([10.0, 0.0, 5.0, 7.0])}
    weights = {"a": 1.0, "b": 0.5}
    eps = 1e-4
    # weighted_sum: total = a + b/2 = [6, 3, 4.5, 5.5]; group 0: mean 4.5, std 1.5; group 1: mean 5, std 0.5
    ws = multi_reward_advantages(rewards, weights, groups, mode="weighted_sum", std_mode="group", eps=eps)
    expected = torch.tensor([1.5 / (1.5 + eps), -1.5 / (1.5 + eps), -0.5 / (0.5 + eps), 0.5 / (0.5 + eps)])
    torch.testing.assert_close(ws.advantages, expected, rtol=0, atol=1e-6)
    # advantage_sum: a -> group 0 [-1, 1] (std 1), group 1 zero-variance [0, 0]; b -> [1, -1] (std 5), [-1, 1] (std 1)
    adv = multi_reward_advantages(rewards, weights, groups, mode="advantage_sum", std_mode="group", eps=eps)
    a_part = torch.tensor([-1 / (1 + eps), 1 / (1 + eps), 0.0, 0.0])
    b_part = torch.tensor([5 / (5 + eps), -5 / (5 + eps), -1 / (1 + eps), 1 / (1 + eps)])
    torch.testing.assert_close(adv.advantages, a_part + 0.5 * b_part, rtol=0, atol=1e-6)
    assert adv.advantages[0] < 0 < ws.advantages[0], "the modes disagree on who wins group 0"
    # both describe the weighted total's groups; clipping applies to the final sum
    torch.testing.assert_close(adv.group_mean, ws.group_mean)
    clipped = multi_reward_advantages(rewards, {"a": 10.0, "b": 10.0}, groups, mode="advantage_sum",
                                      std_mode="group", eps=eps, clip=5.0)
    assert float(clipped.advantages.abs().max()) == 5.0
    with pytest.raises(ValueError, match="mode must be one of"):
        multi_reward_advantages(rewards, weights, groups, mode="mean")
    with pytest.raises(ValueError, match=r"no weight for reward\(s\) \['b'\]"):
        multi_reward_advantages(rewards, {"a": 1.0}, groups)
