"""The step math of flowgrpo_core.sde: reductions to Euler, exact log-densities, marginals, edge cases."""

import math

import pytest
import torch

from flowgrpo_core.sde import (SDE_KINDS, denoised_from_velocity, gaussian_log_prob, sde_mean_std, sde_step,
                               velocity_from_denoised)

STOCHASTIC = ("flow_sde", "dance_sde", "cps", "euler_ancestral")


def flux_sigmas(num_steps: int, mu: float = 1.15) -> list[float]:
    """FLUX-style time shift sigma(t) = e^mu / (e^mu + 1/t - 1) on t = linspace(1, 0, N+1); ends at exactly 0."""
    out = []
    for t in torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64).tolist():
        out.append(0.0 if t == 0 else math.exp(mu) / (math.exp(mu) + 1.0 / t - 1.0))
    return out


def random_step_inputs(seed=0, shape=(4, 3, 8, 8), dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype), torch.randn(shape, generator=g).to(dtype)


@pytest.mark.parametrize("kind", STOCHASTIC)
def test_noise_level_zero_equals_ode_on_every_step(kind):
    sigmas = flux_sigmas(10)
    x, v = random_step_inputs()
    for i in range(10):  # includes sigma = 1 (first step) and sigma_next = 0 (last step)
        ode = sde_step("ode", x, v, sigmas[i], sigmas[i + 1], 0.0)
        out = sde_step(kind, x, v, sigmas[i], sigmas[i + 1], 0.0, generator=torch.Generator().manual_seed(i))
        euler = x + (sigmas[i + 1] - sigmas[i]) * v
        assert (out.prev_sample - ode.prev_sample).abs().max() <= 1e-6
        assert (out.mean - euler).abs().max() <= 1e-6
        assert torch.all(out.std == 0)
        assert torch.isfinite(out.log_prob).all() and torch.all(out.log_prob == 0)


@pytest.mark.parametrize("kind,noise_level", [("flow_sde", 0.7), ("dance_sde", 0.3), ("cps", 0.8),
                                              ("euler_ancestral", 1.0)])
def test_log_prob_is_the_exact_gaussian_density(kind, noise_level):
    sigmas = flux_sigmas(10)
    x, v = random_step_inputs(1)
    g = torch.Generator().manual_seed(5)
    for i in range(10):
        out = sde_step(kind, x, v, sigmas[i], sigmas[i + 1], noise_level, generator=g)
        if kind in ("cps", "euler_ancestral") and sigmas[i + 1] == 0:  # no noise is injected into the last step
            assert torch.all(out.std == 0) and torch.all(out.log_prob == 0)
            continue
        assert torch.all(out.std > 0)
        ref = torch.distributions.Normal(out.mean.double(), out.std.double()).log_prob(out.prev_sample.double())
        expected = ref.flatten(1).mean(dim=1)
        assert (out.log_prob.double() - expected).abs().max() <= 1e-5, (kind, i)
        # the sample really comes from that Gaussian: standardised residuals are ~N(0, 1)
        z = (out.prev_sample - out.mean) / out.std
        assert abs(z.mean()) < 0.1 and abs(z.std() - 1) < 0.1


def test_reference_step_sizes_match_the_math_notes():
    """Flow-SDE injects exactly `a` at sigma = 1; CPS std = sigma' sin(eta pi/2); Dance std = eta sqrt(-delta)."""
    sig = [1.0, 0.96, 0.7]
    x, v = random_step_inputs(2)
    assert torch.allclose(sde_step("flow_sde", x, v, sig[0], sig[1], 0.7).std, torch.tensor(0.7), atol=1e-6)
    g = 0.7 * math.sqrt(0.96 / (1 - 0.96))
    assert torch.allclose(sde_step("flow_sde", x, v, sig[1], sig[2], 0.7).std, torch.tensor(g * math.sqrt(0.26)), atol=1e-6)
    assert torch.allclose(sde_step("cps", x, v, 0.96, 0.7, 0.8).std, torch.tensor(0.7 * math.sin(0.4 * math.pi)), atol=1e-6)
    assert torch.allclose(sde_step("dance_sde", x, v, 0.96, 0.7, 0.3).std, torch.tensor(0.3 * math.sqrt(0.26)), atol=1e-6)


def test_cps_mean_and_reference_log_prob():
    x, v = random_step_inputs(3)
    s, s_next, eta = 0.6, 0.45, 0.8
    x0_hat, x1_hat = x - s * v, x + (1 - s) * v
    out = sde_step("cps", x, v, s, s_next, eta, generator=torch.Generator().manual_seed(0))
    expected = (1 - s_next) * x0_hat + s_next * math.cos(eta * math.pi / 2) * x1_hat
    assert (out.mean - expected).abs().max() <= 1e-6
    ref = sde_step("cps", x, v, s, s_next, eta, prev_sample=out.prev_sample, cps_log_prob="reference")
    assert torch.allclose(ref.log_prob, -(out.prev_sample - out.mean).square().flatten(1).mean(1))
    assert not torch.allclose(ref.log_prob, out.log_prob)  # the reference form is not a density


def test_sigma_near_one_uses_the_tolerance_not_equality():
    x, v = random_step_inputs(4)
    exact = sde_step("flow_sde", x, v, 1.0, 0.9, 0.7, generator=torch.Generator().manual_seed(0))
    nearly = sde_step("flow_sde", x, v, 1.0 - 1e-7, 0.9, 0.7, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(nearly.log_prob).all() and torch.isfinite(nearly.prev_sample).all()
    assert torch.allclose(exact.std, nearly.std, rtol=1e-5)
    assert torch.allclose(exact.prev_sample, nearly.prev_sample, atol=1e-5)


def test_per_sample_sigmas_match_scalar_calls():
    x, v = random_step_inputs(5)
    sigma = torch.tensor([1.0, 0.8, 0.5, 0.2])
    sigma_next = torch.tensor([0.9, 0.6, 0.3, 0.0])
    level = [0.7, 0.7, 0.5, 0.9]
    for kind in SDE_KINDS:
        batched_mean, batched_std = sde_mean_std(kind, x, v, sigma, sigma_next, torch.tensor(level))
        for b in range(4):
            mean, std = sde_mean_std(kind, x[b:b + 1], v[b:b + 1], float(sigma[b]), float(sigma_next[b]), level[b])
            assert torch.allclose(batched_mean[b:b + 1], mean, atol=1e-6)
            assert torch.allclose(batched_std[b:b + 1], std, atol=1e-7)
    with pytest.raises(ValueError, match="3 values for a batch of 4"):
        sde_mean_std("cps", x, v, torch.tensor([1.0, 0.8, 0.5]), 0.1, 0.5)


def test_bf16_inputs_step_in_fp32_and_replay_exactly():
    x, v = random_step_inputs(6, dtype=torch.bfloat16)
    out = sde_step("flow_sde", x, v, 0.8, 0.7, 0.9, generator=torch.Generator().manual_seed(1))
    assert out.prev_sample.dtype == torch.bfloat16 and out.mean.dtype == torch.float32
    replay = sde_step("flow_sde", x, v, 0.8, 0.7, 0.9, prev_sample=out.prev_sample)
    assert torch.equal(replay.log_prob, out.log_prob)


def test_velocity_denoised_round_trip():
    x, v = random_step_inputs(7)
    sigma = torch.tensor([0.9, 0.5, 0.1, 1.0])
    d = denoised_from_velocity(x, v, sigma)
    assert torch.allclose(velocity_from_denoised(x, d, sigma), v, atol=1e-5)
    with pytest.raises(ValueError, match="sigma > 0"):
        velocity_from_denoised(x, d, 0.0)


@pytest.mark.parametrize("args,match", [
    (("flow_sde", 0.5, 0.5, 0.7), "strictly below"),
    (("flow_sde", 0.5, 0.6, 0.7), "strictly below"),
    (("cps", 0.0, 0.0, 0.7), r"sigma > 0|\[0, 1\]"),
    (("dance_sde", 0.5, 0.4, -0.1), "noise_level"),
    (("euler_a", 0.5, 0.4, 0.1), "unknown SDE kind"),
    (("euler_ancestral", 0.5, 0.4, 1.5), r"\[0, 1\]"),
    (("cps", 0.5, 0.4, 1.2), r"\[0, 1\]"),
])
def test_bad_inputs_raise_clear_errors(args, match):
    x, v = random_step_inputs(8)
    kind, s, s_next, level = args
    with pytest.raises(ValueError, match=match):
        sde_step(kind, x, v, s, s_next, level)


def test_gaussian_log_prob_zero_std_is_zero_not_nan():
    mean = torch.zeros(2, 3)
    std = torch.tensor([[0.0], [1.0]])
    lp = gaussian_log_prob(torch.ones(2, 3), mean, std)
    assert lp[0] == 0 and torch.isclose(lp[1], torch.tensor(-0.5 - 0.5 * math.log(2 * math.pi)))


# --- marginal preservation on Gaussian data, whose velocity field is closed-form -------------------------
# Data x0 ~ N(m, s0^2) per element. Then x_sigma ~ N((1 - sigma) m, (1 - sigma)^2 s0^2 + sigma^2) and the exact
# velocity E[eps - x0 | x_sigma = x] = (sigma - (1 - sigma) s0^2) / var_sigma * (x - mu_sigma) - m.

M, S0 = 0.8, 0.5


def true_marginal(sigma, s0=S0):
    return (1 - sigma) * M, (1 - sigma) ** 2 * s0 ** 2 + sigma ** 2


def exact_velocity(x, sigma, s0=S0):
    mu, var = true_marginal(sigma, s0)
    return (sigma - (1 - sigma) * s0 ** 2) / var * (x - mu) - M


def monte_carlo(kind, level, sigmas, s0=S0, n=20000, seed=0):
    """Yield (sigma_next, sample mean, sample variance) after every step but the deterministic last one."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, generator=g, dtype=torch.float64).float()
    for i in range(len(sigmas) - 2):
        x = sde_step(kind, x, exact_velocity(x, sigmas[i], s0), sigmas[i], sigmas[i + 1], level, generator=g).prev_sample
        yield sigmas[i + 1], x.double().mean().item(), x.double().var().item()


def assert_within_standard_errors(mean, var, mu, true_var, n, z=4.0):
    se_mean, se_var = math.sqrt(true_var / n), true_var * math.sqrt(2.0 / n)
    assert abs(mean - mu) < z * se_mean, (mean, mu)
    assert abs(var - true_var) < z * se_var, (var, true_var)


@pytest.mark.parametrize("kind,level", [("flow_sde", 0.7), ("dance_sde", 0.3)])
def test_sde_samples_match_the_true_marginal_at_every_step(kind, level):
    """Flow-SDE and Dance-SDE discretise the marginal-preserving reverse SDE: on a fine grid the samples follow
    the data's marginal at every step. Flow-SDE's first step (sigma = 1) always adds variance a^4/4 whatever the
    grid (its std is exactly `a`, see the next test), and the excess decays over the following steps, so steps
    from sigma = 0.9 down are compared."""
    sigmas = torch.linspace(1, 0, 1001, dtype=torch.float64).tolist()
    checked = 0
    for sigma, mean, var in monte_carlo(kind, level, sigmas):
        if kind == "flow_sde" and sigma > 0.9:
            continue
        assert_within_standard_errors(mean, var, *true_marginal(sigma), n=20000)
        checked += 1
    assert checked > 890


def test_flow_sde_first_step_variance_excess_is_a4_over_4():
    """(derived) At sigma = 1 with a single Gaussian-noise input, Flow-SDE's output variance exceeds sigma'^2 by
    k (k + 2(1 - sigma')) with k = a^2 / 2, independent of the step size."""
    a, s1 = 0.7, 0.999
    x = torch.tensor([[0.0], [1.0]])
    mean, std = sde_mean_std("flow_sde", x, exact_velocity(x, 1.0, 0.0), 1.0, s1, a)
    slope = (mean[1] - mean[0]).item()
    k = a * a / 2
    excess = slope ** 2 + std[0].item() ** 2 - s1 ** 2
    assert excess == pytest.approx(k * (k + 2 * (1 - s1)), rel=1e-3)


def test_cps_preserves_the_marginal_of_deterministic_data_on_a_coarse_grid():
    """CPS keeps the coefficients of x0 and noise exact: with exact x0 predictions (here a point mass, s0 = 0)
    every step lands on the true marginal, on any grid."""
    for sigma, mean, var in monte_carlo("cps", 0.8, flux_sigmas(10), s0=0.0):
        assert_within_standard_errors(mean, var, *true_marginal(sigma, 0.0), n=20000)


@pytest.mark.parametrize("kind,level", [("flow_sde", 0.7), ("dance_sde", 0.3), ("cps", 0.8)])
def test_every_kind_keeps_the_marginal_mean_on_a_coarse_grid(kind, level):
    for sigma, mean, var in monte_carlo(kind, level, flux_sigmas(10)):
        mu, true_var = true_marginal(sigma)
        assert abs(mean - mu) < 4 * math.sqrt(true_var / 20000)


def test_euler_ancestral_is_a_cps_family_gaussian():
    """(derived, grpo-math 2.5) mean = (1 - s')x0_hat + c x1_hat with c^2 + std^2 = s'^2; eta = 1 gives s_d = s'^2/s."""
    x, v = random_step_inputs(9)
    s, s_next = 0.8, 0.6
    for eta in (0.3, 1.0):
        mean, std = sde_mean_std("euler_ancestral", x, v, s, s_next, eta)
        x0_hat, x1_hat = x - s * v, x + (1 - s) * v
        c = torch.sqrt(torch.tensor(s_next ** 2) - std.flatten()[0] ** 2)
        assert torch.allclose(mean, (1 - s_next) * x0_hat + c * x1_hat, atol=1e-5)
    s_d = s_next ** 2 / s
    keep = (1 - s_next) / (1 - s_d)
    assert torch.allclose(sde_mean_std("euler_ancestral", x, v, s, s_next, 1.0)[1].flatten()[0],
                          torch.tensor((s_next ** 2 - (s_d * keep) ** 2) ** 0.5), atol=1e-6)
