"""One reverse step of a flow-matching sampler, with the Gaussian log-density of the step taken.

Conventions (Flow-GRPO, arXiv 2505.05470; DanceGRPO, arXiv 2505.07818; CPS, arXiv 2509.05952):

* forward process ``x_sigma = (1 - sigma) * x0 + sigma * eps``; ``sigma = 1`` is pure noise;
* the network predicts the velocity ``v = eps - x0``; ``x0_hat = x - sigma * v`` is the predicted clean
  sample and ``x1_hat = x + (1 - sigma) * v`` the predicted noise;
* a step goes from ``sigma`` to ``sigma_next < sigma``; ``delta = sigma_next - sigma < 0``;
* every stochastic step draws ``prev_sample = mean + std * xi`` with ``xi ~ N(0, I)``, and its ``log_prob``
  is the exact Gaussian log-density of ``prev_sample`` averaged over all non-batch elements (shape ``[B]``).
  The mean convention is what the reference clip ranges (1e-4, 1e-5) assume.

All arithmetic runs in fp32 whatever the dtype of ``sample`` and ``velocity`` (bf16 overflows in the mean).
A sampled ``prev_sample`` is returned in ``sample.dtype`` and its log-prob is evaluated on that rounded
value, so replaying a stored trajectory gives exactly the rollout's log-prob.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch

SDE_KINDS = ("flow_sde", "dance_sde", "cps", "euler_ancestral", "ode")
#: kinds whose noise level is an angle-like share in [0, 1]
BOUNDED_LEVEL_KINDS = ("cps", "euler_ancestral")
CPS_LOG_PROB_FORMS = ("exact", "reference")

Scalar = Union[float, torch.Tensor]

#: sigma within this absolute distance of 1 counts as the first (pure-noise) step of Flow-SDE.
SIGMA_ONE_ATOL = 1e-5

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


@dataclass
class SDEStepOutput:
    """Result of :func:`sde_step`.

    prev_sample: ``[B, ...]`` in ``sample.dtype``, the sample at ``sigma_next``.
    log_prob:    ``[B]`` fp32, mean over non-batch elements of ``log N(prev_sample; mean, std^2)``;
                 0 for samples whose ``std`` is 0 (a deterministic step has no density).
    mean:        ``[B, ...]`` fp32, the mean of the step's Gaussian.
    std:         ``[B, 1, ..., 1]`` fp32, the standard deviation actually added at this step.
    """

    prev_sample: torch.Tensor
    log_prob: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor


def per_sample(value: Scalar, like: torch.Tensor, name: str) -> torch.Tensor:
    """``value`` (a float, a 0-d tensor or a ``[B]`` tensor) as fp32 ``[B, 1, ..., 1]`` broadcastable to ``like``.

    A Python number becomes a fill on ``like``'s device (no host-to-device copy, which would wait for the device).
    """
    if isinstance(value, (int, float)):
        return torch.full((like.shape[0], *([1] * (like.dim() - 1))), float(value), dtype=torch.float32,
                          device=like.device)
    t = torch.as_tensor(value, dtype=torch.float32, device=like.device)
    if t.dim() == 0:
        t = t.expand(like.shape[0])
    t = t.reshape(-1)
    if t.shape[0] != like.shape[0]:
        raise ValueError(f"{name} has {t.shape[0]} values for a batch of {like.shape[0]}; give a scalar or one per sample")
    return t.view(-1, *([1] * (like.dim() - 1)))


def min_value(v: Scalar) -> float:
    """The smallest value of a float or tensor (a tensor on a device costs one sync)."""
    return float(v.min()) if isinstance(v, torch.Tensor) else float(v)


def max_value(v: Scalar) -> float:
    """The largest value of a float or tensor (a tensor on a device costs one sync)."""
    return float(v.max()) if isinstance(v, torch.Tensor) else float(v)


def check_noise_level(kind: str, noise_level: Scalar) -> None:
    """Raise a ValueError for an unknown kind or a noise level outside its range (>= 0; <= 1 for cps and
    euler_ancestral, whose eta is a share of the noise). Plain floats are checked without touching a device."""
    if kind not in SDE_KINDS:
        raise ValueError(f"unknown SDE kind {kind!r}: sde_kind must be one of {', '.join(SDE_KINDS)}")
    if min_value(noise_level) < 0:
        raise ValueError("noise_level must be >= 0")
    if kind in BOUNDED_LEVEL_KINDS and max_value(noise_level) > 1:
        raise ValueError(f"{kind} takes a noise level (eta) in [0, 1]")


def _check_step(kind: str, sigma: Scalar, sigma_next: Scalar, noise_level: Scalar) -> None:
    """Validate a step's kind, sigmas and noise level (plain floats are checked without touching a device)."""
    check_noise_level(kind, noise_level)
    if min_value(sigma) <= 0 or max_value(sigma) > 1 + SIGMA_ONE_ATOL or min_value(sigma_next) < 0:
        raise ValueError("sigmas must lie in [0, 1] with the current sigma > 0 (flow convention, sigma = 1 is noise)")
    if max_value(sigma_next - sigma) >= 0:
        raise ValueError("sigma_next must be strictly below sigma: the sigma grid must decrease strictly "
                         "(a repeated or reversed sigma gives a zero-variance step)")


def velocity_from_denoised(sample: torch.Tensor, denoised: torch.Tensor, sigma: Scalar) -> torch.Tensor:
    """ComfyUI's flow models return the denoised ``x0_hat = x - sigma * v``; recover ``v = (x - x0_hat) / sigma`` in fp32.

    ``sigma`` must be > 0 (the current sigma of a step never is 0). A Python number is checked; a tensor is not
    (the check would wait for the device on every model call): its caller guarantees it, as the validated
    :class:`~flowgrpo_core.rollout.RolloutSpec` grid does.
    """
    if isinstance(sigma, (int, float)) and not sigma > 0:
        raise ValueError("velocity_from_denoised needs sigma > 0; the current sigma of a step is never 0")
    s = per_sample(sigma, sample, "sigma")
    return (sample.float() - denoised.float()) / s


def denoised_from_velocity(sample: torch.Tensor, velocity: torch.Tensor, sigma: Scalar) -> torch.Tensor:
    """Inverse of :func:`velocity_from_denoised`: ``x0_hat = x - sigma * v`` in fp32."""
    return sample.float() - per_sample(sigma, sample, "sigma") * velocity.float()


def gaussian_log_prob(value: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Mean over non-batch elements of ``log N(value; mean, std^2)`` -> ``[B]`` fp32.

    Where ``std`` is 0 the result is 0 (not NaN or inf): a deterministic transition has no density.
    """
    std = std.float()
    if std.numel() in (1, value.shape[0]):  # one std per sample: reduce the squares first, then the per-sample terms
        std_b = std.reshape(-1).expand(value.shape[0])
        positive = std_b > 0
        safe = torch.where(positive, std_b, torch.ones_like(std_b))
        sq = (value.float() - mean.float()).square().flatten(1).mean(dim=1)
        log_prob = -0.5 * sq / safe.square() - torch.log(safe) - _HALF_LOG_2PI
        return torch.where(positive, log_prob, torch.zeros_like(log_prob))
    positive = std > 0
    safe_std = torch.where(positive, std, torch.ones_like(std))
    z = (value.float() - mean.float()) / safe_std
    elementwise = -0.5 * z.square() - torch.log(safe_std) - _HALF_LOG_2PI
    elementwise = torch.where(positive, elementwise, torch.zeros_like(elementwise))
    return elementwise.flatten(1).mean(dim=1)


def sde_mean_std(kind: str, sample: torch.Tensor, velocity: torch.Tensor, sigma: Scalar, sigma_next: Scalar,
                 noise_level: Scalar) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``[B, ...]`` and std ``[B, 1, ...]`` (both fp32) of the transition ``sigma -> sigma_next``.

    flow_sde  (Flow-GRPO):  g = a * sqrt(sigma / (1 - sigma~)), sigma~ = sigma_next at sigma = 1, else sigma;
                            mean = x + delta * (v + g^2 / (2 sigma) * x1_hat);  std = g * sqrt(-delta)
    dance_sde (DanceGRPO):  the same with constant g = eta
    cps       (CPS):        std = sigma_next * sin(eta pi / 2);
                            mean = (1 - sigma_next) * x0_hat + sigma_next * cos(eta pi / 2) * x1_hat
    euler_ancestral (ComfyUI's sampler on flow models, s_noise = 1), eta in [0, 1]:
                            sigma_d = sigma_next * (1 + (sigma_next / sigma - 1) * eta);
                            mean = (1 - sigma_next) / (1 - sigma_d) * (sigma_d / sigma * x + (1 - sigma_d / sigma) * x0_hat);
                            std = sqrt(sigma_next^2 - sigma_d^2 (1 - sigma_next)^2 / (1 - sigma_d)^2)
    ode       (Euler):      mean = x + delta * v;  std = 0

    At ``noise_level = 0`` every kind reduces to the Euler step.
    """
    _check_step(kind, sigma, sigma_next, noise_level)
    x = sample.float()
    v = velocity.float()
    if v.shape != x.shape:
        raise ValueError(f"velocity shape {tuple(v.shape)} does not match sample shape {tuple(x.shape)}")
    s = per_sample(sigma, x, "sigma")
    s_next = per_sample(sigma_next, x, "sigma_next")
    a = per_sample(noise_level, x, "noise_level")
    delta = s_next - s

    if kind == "ode":
        return x + delta * v, torch.zeros_like(s)
    if kind == "euler_ancestral":
        ratio = s_next / s
        s_down = s_next * (1 + (ratio - 1) * a)
        keep = (1 - s_next) / (1 - s_down)
        mean = keep * ((s_down / s) * x + (1 - s_down / s) * (x - s * v))
        return mean, torch.sqrt((s_next.square() - (s_down * keep).square()).clamp_min(0.0))
    if kind == "cps":
        angle = a * (math.pi / 2)
        x0_hat = x - s * v
        x1_hat = x + (1 - s) * v
        return (1 - s_next) * x0_hat + s_next * torch.cos(angle) * x1_hat, s_next * torch.sin(angle)

    if kind == "flow_sde":
        at_one = torch.isclose(s, torch.ones_like(s), rtol=0.0, atol=SIGMA_ONE_ATOL)
        s_tilde = torch.where(at_one, s_next, s)
        g = a * torch.sqrt(s / (1 - s_tilde))
    else:  # dance_sde
        g = a
    x1_hat = x + (1 - s) * v
    mean = x + delta * (v + g.square() / (2 * s) * x1_hat)
    return mean, g * torch.sqrt(-delta)


def sde_step(kind: str, sample: torch.Tensor, velocity: torch.Tensor, sigma: Scalar, sigma_next: Scalar,
             noise_level: Scalar, prev_sample: Optional[torch.Tensor] = None,
             generator: Optional[torch.Generator] = None, cps_log_prob: str = "exact") -> SDEStepOutput:
    """Take (or, given ``prev_sample``, evaluate) one step ``sigma -> sigma_next``.

    Args:
        kind: ``"flow_sde"``, ``"dance_sde"``, ``"cps"``, ``"euler_ancestral"`` or ``"ode"``.
        sample: ``x`` at ``sigma``, ``[B, ...]`` in any float dtype.
        velocity: the model's ``v`` at ``(x, sigma)``, same shape.
        sigma, sigma_next: floats, 0-d tensors or ``[B]`` tensors, ``1 >= sigma > sigma_next >= 0``.
        noise_level: ``a`` for flow_sde, ``eta`` for dance_sde, cps and euler_ancestral (float or ``[B]``);
            ignored by ode.
        prev_sample: when given, nothing is sampled and the log-prob of this sample is returned (replay).
        generator: ``torch.Generator`` on ``sample.device`` for the step noise.
        cps_log_prob: ``"exact"`` (Gaussian log-density) or ``"reference"``, the constant-free
            ``-mean((prev_sample - mean)^2)`` of the Flow-GRPO/CPS code, for comparability with those runs.
    """
    if cps_log_prob not in CPS_LOG_PROB_FORMS:
        raise ValueError(f"cps_log_prob must be one of {CPS_LOG_PROB_FORMS}, got {cps_log_prob!r}")
    mean, std = sde_mean_std(kind, sample, velocity, sigma, sigma_next, noise_level)
    if prev_sample is None:
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=torch.float32)
        prev_sample = (mean + std * noise).to(sample.dtype)
    elif prev_sample.shape != mean.shape:
        raise ValueError(f"prev_sample shape {tuple(prev_sample.shape)} does not match sample shape {tuple(mean.shape)}")
    if kind == "cps" and cps_log_prob == "reference":
        log_prob = -(prev_sample.float() - mean).square().flatten(1).mean(dim=1)
    else:
        log_prob = gaussian_log_prob(prev_sample, mean, std)
    return SDEStepOutput(prev_sample=prev_sample, log_prob=log_prob, mean=mean, std=std)
