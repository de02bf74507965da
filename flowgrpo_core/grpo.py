"""The GRPO objective: group-relative advantages, the clipped surrogate loss, the KL to the reference, metrics.

Conventions (math reference sections 5.1-5.3; Flow-GRPO arXiv 2505.05470, DanceGRPO arXiv 2505.07818):

* a batch holds ``B`` samples; samples generated from the same prompt share a group label ``g(i)``;
* ``A_i = (r_i - mean_{g(i)} r) / (std + eps)``, with ``std`` either global over the batch (Flow-GRPO ``global_std``)
  or per group, ``ddof`` 0 (Flow-GRPO tracker, ``eps = 1e-4``) or 1 (DanceGRPO, ``eps = 1e-8``);
  a group whose rewards are all equal gets ``A = 0`` exactly;
* ``log_prob`` is the per-element *mean* Gaussian log-density of one step (see ``sde.py``), shape ``[B]``,
  so ``ratio = exp(log_prob - old_log_prob)`` stays near 1 and the clip ranges are ~1e-4;
* the loss is minimised: ``L = mean(max(-A * ratio, -A * clip(ratio, 1 - lo, 1 + hi)))``.

Reward statistics run in float64 on the CPU (rewards are a handful of numbers); log-prob, loss and KL math in fp32.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence, Union

import torch

from .sde import SDE_KINDS, max_value, per_sample

STD_MODES = ("global", "group")
AGGREGATION_MODES = ("weighted_sum", "normalize_then_weight")
#: how several rewards become one advantage (:func:`multi_reward_advantages`)
ADVANTAGE_MODES = ("weighted_sum", "advantage_sum")
KL_FORMS = ("exact", "reference")

ClipRange = Union[float, Sequence[float]]


@dataclass
class AdvantageResult:
    """Result of :func:`group_advantages`.

    advantages:      ``[B]`` fp32, clipped to ``+-clip``; exactly 0 for samples of zero-variance groups.
    group_mean:      ``[B]`` fp32, the mean reward of each sample's group.
    group_std:       ``[B]`` fp32, the std each sample was divided by (before ``+ eps``): the batch std broadcast
                     for ``std_mode="global"``, the group's std for ``"group"``.
    zero_std_groups: number of groups whose rewards are all equal (they carry no learning signal).
    zero_std_ratio:  fraction of *samples* that belong to such groups.
    """

    advantages: torch.Tensor
    group_mean: torch.Tensor
    group_std: torch.Tensor
    zero_std_groups: int
    zero_std_ratio: float


# ----------------------------------------------------------------------------------------------------------------
# reward statistics (float64, CPU)


def _rewards_f64(rewards: torch.Tensor, name: str = "reward") -> torch.Tensor:
    """``rewards`` as a float64 CPU vector ``[B]``; raises on a wrong shape or a non-finite value."""
    r = torch.as_tensor(rewards).detach()
    if r.dim() != 1 or r.numel() == 0:
        raise ValueError(f"{name} must be a non-empty 1-D tensor [B] (one value per sample), got shape {tuple(r.shape)}")
    if r.dtype == torch.bool or r.is_complex():
        raise ValueError(f"{name} must hold real numbers, got dtype {r.dtype}")
    r = r.to(device="cpu", dtype=torch.float64)
    bad = (~torch.isfinite(r)).nonzero().flatten().tolist()
    if bad:
        i = bad[0]
        what = "NaN" if math.isnan(r[i].item()) else "inf"
        more = f" (also samples {bad[1:]})" if len(bad) > 1 else ""
        raise ValueError(f"{name} for sample {i} is {what}{more}: check the reward node; it must return a finite "
                         "number for every image")
    return r


def _group_index(group_ids: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Map arbitrary integer labels ``[B]`` to ``(inverse [B] in 0..G-1, counts [G])``; every group needs >= 2 members."""
    g = torch.as_tensor(group_ids).detach()
    if g.dtype == torch.bool or g.is_floating_point() or g.is_complex():
        raise ValueError(f"group_ids must be an integer tensor (e.g. a LongTensor of prompt indices), got {g.dtype}")
    if g.dim() != 1 or g.shape[0] != batch:
        raise ValueError(f"group_ids has shape {tuple(g.shape)} but there are {batch} rewards; give one label per sample")
    labels, inverse, counts = torch.unique(g.cpu().long(), return_inverse=True, return_counts=True)
    small = (counts < 2).nonzero().flatten().tolist()
    if small:
        detail = ", ".join(f"group {labels[k].item()} has {counts[k].item()}" for k in small)
        raise ValueError(f"group size must be >= 2: GRPO compares samples of the same prompt ({detail} sample(s)); "
                         "generate several images per prompt")
    return inverse, counts


def _group_zscore(r: torch.Tensor, inverse: torch.Tensor, counts: torch.Tensor, std_mode: str, eps: float,
                  ddof: int, std_floor: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float64 ``(z [B], mean [B], std [B], zero_variance_group [G])`` for rewards ``r [B]``."""
    num_groups = counts.numel()
    n = counts.to(torch.float64)
    mean_g = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, inverse, r) / n
    deviation = r - mean_g[inverse]
    r_max = torch.full((num_groups,), -math.inf, dtype=torch.float64).scatter_reduce_(0, inverse, r, "amax")
    r_min = torch.full((num_groups,), math.inf, dtype=torch.float64).scatter_reduce_(0, inverse, r, "amin")
    zero_variance = r_max == r_min
    if std_mode == "group":
        sum_sq = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, inverse, deviation.square())
        std = torch.sqrt(sum_sq / (n - ddof))[inverse]
    else:
        std = r.std(correction=ddof).expand_as(r)
    z = deviation / (std.clamp_min(std_floor) + eps)
    z = torch.where(zero_variance[inverse], torch.zeros_like(z), z)
    return z, mean_g[inverse], std, zero_variance


def _check_norm_settings(std_mode: str, eps: float, ddof: int) -> None:
    if std_mode not in STD_MODES:
        raise ValueError(f"std_mode must be one of {STD_MODES}, got {std_mode!r}")
    if ddof not in (0, 1):
        raise ValueError(f"ddof must be 0 (Flow-GRPO) or 1 (DanceGRPO), got {ddof!r}")
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")


def group_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, std_mode: str = "global", eps: float = 1e-4,
                     ddof: int = 0, clip: Optional[float] = 5.0, std_floor: float = 0.0) -> AdvantageResult:
    """Group-relative advantages ``A_i = (r_i - mean_{g(i)}) / (std + eps)``, computed in float64.

    Args:
        rewards: ``[B]`` one scalar reward per sample, any real dtype and device; all must be finite.
        group_ids: ``[B]`` integer labels, equal for samples of the same prompt (need not be contiguous or sorted);
            every group needs at least 2 samples.
        std_mode: ``"global"`` divides by the std of all ``B`` rewards (Flow-GRPO ``global_std``),
            ``"group"`` by the std of the sample's group.
        eps: added to the std (1e-4 Flow-GRPO; 1e-8 DanceGRPO).
        ddof: 0 (population std, Flow-GRPO's tracker) or 1 (unbiased, DanceGRPO).
        clip: advantages are clamped to ``[-clip, clip]``; ``None`` disables clipping.
        std_floor: the std is raised to at least this value, in reward units (pitfall P13: with per-group std, a
            group whose rewards differ by a hair would otherwise get advantages of +-1 from noise); 0 disables it.

    A group whose rewards are all equal gets advantage exactly 0 (never NaN, whatever ``eps``) and is counted in
    ``zero_std_groups`` / ``zero_std_ratio``. Returned tensors are fp32 on ``rewards.device``.
    """
    _check_norm_settings(std_mode, eps, ddof)
    if clip is not None and not (clip > 0):
        raise ValueError(f"clip must be > 0 or None, got {clip!r}")
    r = _rewards_f64(rewards)
    inverse, counts = _group_index(group_ids, r.shape[0])
    if not (math.isfinite(std_floor) and std_floor >= 0):
        raise ValueError(f"std_floor must be a finite number >= 0, got {std_floor!r}")
    z, mean, std, zero_variance = _group_zscore(r, inverse, counts, std_mode, eps, ddof, std_floor)
    if clip is not None:
        z = z.clamp(-clip, clip)
    device = torch.as_tensor(rewards).device
    zero_samples = int(counts[zero_variance].sum().item())
    return AdvantageResult(
        advantages=z.to(device=device, dtype=torch.float32),
        group_mean=mean.to(device=device, dtype=torch.float32),
        group_std=std.to(device=device, dtype=torch.float32),
        zero_std_groups=int(zero_variance.sum().item()),
        zero_std_ratio=zero_samples / r.shape[0],
    )


def aggregate_rewards(rewards: Mapping[str, torch.Tensor], weights: Mapping[str, float],
                      group_ids: Optional[torch.Tensor] = None, mode: str = "weighted_sum", eps: float = 1e-4,
                      ddof: int = 0) -> torch.Tensor:
    """Combine several rewards ``{name: [B]}`` into one ``[B]`` fp32 reward, to be passed to :func:`group_advantages`.

    ``"weighted_sum"``:          ``r_i = sum_k w_k * r_k,i`` on the raw rewards (``group_ids`` unused). Rewards on
                                 different scales dominate one another (pitfall P14).
    ``"normalize_then_weight"``: ``r_i = sum_k w_k * z_k,i`` where ``z_k`` is reward ``k`` z-scored within each group
                                 (``(r - mean_g) / (std_g + eps)``, std per group with ``ddof``, 0 for zero-variance
                                 groups), GDPO-style. Invariant (up to ``eps``) to rescaling a reward by ``c > 0``.

    Every reward needs exactly one finite weight and vice versa.
    """
    if mode not in AGGREGATION_MODES:
        raise ValueError(f"mode must be one of {AGGREGATION_MODES}, got {mode!r}")
    if not rewards:
        raise ValueError("no rewards given: connect at least one reward")
    missing = [k for k in rewards if k not in weights]
    if missing:
        raise ValueError(f"no weight for reward(s) {missing}: give one weight per reward")
    unknown = [k for k in weights if k not in rewards]
    if unknown:
        raise ValueError(f"weight(s) given for unknown reward(s) {unknown}; rewards are {list(rewards)}")
    for name, w in weights.items():
        if not math.isfinite(float(w)):
            raise ValueError(f"weight for reward {name!r} must be finite, got {w!r}")
    if all(float(w) == 0.0 for w in weights.values()):
        raise ValueError("all reward weights are 0: the combined reward would carry no signal")

    columns = {name: _rewards_f64(r, name=f"reward {name!r}") for name, r in rewards.items()}
    sizes = {name: c.shape[0] for name, c in columns.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"rewards have different batch sizes {sizes}; each must give one value per sample")
    batch = next(iter(sizes.values()))
    if mode == "normalize_then_weight":
        if group_ids is None:
            raise ValueError("mode 'normalize_then_weight' needs group_ids")
        _check_norm_settings("group", eps, ddof)
        inverse, counts = _group_index(group_ids, batch)
        columns = {name: _group_zscore(c, inverse, counts, "group", eps, ddof)[0] for name, c in columns.items()}
    elif group_ids is not None:
        g = torch.as_tensor(group_ids)
        if g.dim() != 1 or g.shape[0] != batch:
            raise ValueError(f"group_ids has shape {tuple(g.shape)} but there are {batch} rewards")

    total = torch.zeros(batch, dtype=torch.float64)
    for name, c in columns.items():
        total += float(weights[name]) * c
    device = torch.as_tensor(next(iter(rewards.values()))).device
    return total.to(device=device, dtype=torch.float32)


def multi_reward_advantages(rewards: Mapping[str, torch.Tensor], weights: Mapping[str, float],
                            group_ids: torch.Tensor, mode: str = "weighted_sum", std_mode: str = "global",
                            eps: float = 1e-4, ddof: int = 0, clip: Optional[float] = 5.0,
                            std_floor: float = 0.0) -> AdvantageResult:
    """Advantages ``[B]`` from several rewards ``{name: [B]}`` with weights ``w_k``.

    ``"weighted_sum"`` (Flow-GRPO):  ``A = norm(sum_k w_k r_k)``, the raw rewards summed, then normalised once.
    ``"advantage_sum"`` (DanceGRPO, MixGRPO's ``advantage_aggr``): ``A = sum_k w_k norm(r_k)``, each reward
    normalised on its own (so its scale does not matter), then summed.

    ``norm`` is :func:`group_advantages` with ``std_mode``, ``eps``, ``ddof`` and ``std_floor`` and no clip; the final
    advantages are clipped to ``+-clip``. ``group_mean``, ``group_std`` and the zero-std counts describe the weighted
    total ``sum_k w_k r_k`` in both modes.
    """
    if mode not in ADVANTAGE_MODES:
        raise ValueError(f"mode must be one of {ADVANTAGE_MODES}, got {mode!r}")
    total = aggregate_rewards(rewards, weights, mode="weighted_sum")  # also checks names, weights and sizes
    combined = group_advantages(total, group_ids, std_mode=std_mode, eps=eps, ddof=ddof,
                                clip=clip if mode == "weighted_sum" else None, std_floor=std_floor)
    if mode == "weighted_sum":
        return combined
    adv = torch.zeros_like(combined.advantages, dtype=torch.float64)
    for name, r in rewards.items():
        part = group_advantages(r, group_ids, std_mode=std_mode, eps=eps, ddof=ddof, clip=None, std_floor=std_floor)
        adv += float(weights[name]) * part.advantages.double()
    if clip is not None:
        adv = adv.clamp(-clip, clip)
    return dataclasses.replace(combined, advantages=adv.to(combined.advantages.dtype))


# ----------------------------------------------------------------------------------------------------------------
# policy loss (fp32, differentiable in log_prob)


def _clip_bounds(clip_range: ClipRange) -> tuple[float, float]:
    """``clip_range`` as ``(lo, hi)``: the ratio is clipped to ``[1 - lo, 1 + hi]``."""
    if isinstance(clip_range, (int, float)):
        lo = hi = float(clip_range)
    else:
        pair = tuple(clip_range)
        if len(pair) != 2:
            raise ValueError(f"clip_range must be a float or a (lo, hi) pair, got {clip_range!r}")
        lo, hi = float(pair[0]), float(pair[1])
    if not (0 < lo < 1 and math.isfinite(hi) and hi > 0):
        raise ValueError(f"clip_range must satisfy 0 < lo < 1 and hi > 0 (ratio clipped to [1-lo, 1+hi]), "
                         f"got lo={lo}, hi={hi}")
    return lo, hi


def _check_same_shape(**tensors: torch.Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"shapes must match: {shapes}")


def clipped_surrogate_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
                           clip_range: ClipRange, adv_clip: Optional[float] = 5.0) -> torch.Tensor:
    """PPO/GRPO clipped surrogate, a scalar fp32 loss to minimise.

    ``L = mean(max(-A * ratio, -A * clip(ratio, 1 - lo, 1 + hi)))`` with ``ratio = exp(log_prob - old_log_prob)``.

    Args:
        log_prob: ``[B]`` current-policy log-prob of one trained step (carries the gradient).
        old_log_prob: ``[B]`` rollout log-prob of the same step (treated as a constant).
        advantages: ``[B]`` (treated as a constant), first clamped to ``+-adv_clip`` (``None``: no clamp).
        clip_range: ``eps`` (symmetric, ratio in ``[1-eps, 1+eps]``) or ``(lo, hi)`` (ratio in ``[1-lo, 1+hi]``).

    At ``ratio = 1`` the gradient wrt ``log_prob`` is ``-A / B``. Where the clipped term is the larger one
    (``A > 0, ratio > 1+hi`` or ``A < 0, ratio < 1-lo``) the gradient is 0.
    """
    lo, hi = _clip_bounds(clip_range)
    _check_same_shape(log_prob=log_prob, old_log_prob=old_log_prob, advantages=advantages)
    if adv_clip is not None and not (adv_clip > 0):
        raise ValueError(f"adv_clip must be > 0 or None, got {adv_clip!r}")
    lp = log_prob.float()
    old = old_log_prob.detach().to(device=lp.device, dtype=torch.float32)
    a = advantages.detach().to(device=lp.device, dtype=torch.float32)
    if adv_clip is not None:
        a = a.clamp(-adv_clip, adv_clip)
    ratio = torch.exp(lp - old)
    unclipped = -a * ratio
    clipped = -a * ratio.clamp(1.0 - lo, 1.0 + hi)
    return torch.maximum(unclipped, clipped).mean()


def kl_to_reference(mean: torch.Tensor, ref_mean: torch.Tensor, std: torch.Tensor, delta=None, form: str = "exact",
                    kind: Optional[str] = None) -> torch.Tensor:
    """KL(N(mean, std^2) || N(ref_mean, std^2)) of one step, reduced to ``[B]`` fp32.

    Both Gaussians share ``std``, so per element ``KL = (mean - ref_mean)^2 / (2 std^2)``.

    ``form="exact"``:     the per-element mean of that KL (kind ignored).
    ``form="reference"``: Flow-GRPO's scaled form, for comparability with its beta values:
                          flow_sde / dance_sde divide by ``2 g^2`` with ``g = std / sqrt(-delta)`` (the noise scale
                          without ``sqrt(-delta)``), i.e. ``exact * (-delta)``; cps uses the full std, i.e. ``exact``.

    Args:
        mean: ``[B, ...]`` policy mean (carries the gradient).
        ref_mean: ``[B, ...]`` reference (adapter-disabled) mean; detached.
        std: ``[B, 1, ..., 1]`` (or broadcastable to ``mean``) step std from ``sde_mean_std``; detached.
        delta: ``sigma_next - sigma < 0``, float or ``[B]``; needed for the reference form of flow_sde / dance_sde.
        kind: ``"flow_sde"``, ``"dance_sde"``, ``"cps"`` or ``"ode"``; needed for ``form="reference"``.

    Samples (or elements) with ``std == 0`` contribute 0.
    """
    if form not in KL_FORMS:
        raise ValueError(f"form must be one of {KL_FORMS}, got {form!r}")
    if kind is not None and kind not in SDE_KINDS:
        raise ValueError(f"unknown SDE kind {kind!r}; choose one of {', '.join(SDE_KINDS)}")
    if form == "reference" and kind is None:
        raise ValueError("form='reference' needs kind (the reference scaling differs between flow_sde/dance_sde and cps)")
    _check_same_shape(mean=mean, ref_mean=ref_mean)
    if mean.dim() < 2:
        raise ValueError(f"mean must be [B, ...] with at least one non-batch dim, got shape {tuple(mean.shape)}")
    mu = mean.float()
    mu_ref = ref_mean.detach().to(device=mu.device, dtype=torch.float32)
    s = std.detach().to(device=mu.device, dtype=torch.float32)
    try:
        torch.broadcast_shapes(s.shape, mu.shape)
    except RuntimeError:
        raise ValueError(f"std shape {tuple(s.shape)} does not broadcast to mean shape {tuple(mu.shape)}") from None
    positive = s > 0
    safe_s = torch.where(positive, s, torch.ones_like(s))
    elementwise = (mu - mu_ref).square() / (2 * safe_s.square())
    elementwise = torch.where(positive, elementwise, torch.zeros_like(elementwise))
    kl = elementwise.flatten(1).mean(dim=1)
    if form == "reference" and kind in ("flow_sde", "dance_sde"):
        if delta is None:
            raise ValueError(f"form='reference' with kind {kind!r} needs delta = sigma_next - sigma")
        if max_value(delta) >= 0:  # a float is checked on the host; a tensor costs one device sync
            raise ValueError("delta = sigma_next - sigma must be < 0 (sigmas decrease)")
        kl = kl * (-per_sample(delta, mu, "delta").reshape(-1))
    return kl


# ----------------------------------------------------------------------------------------------------------------
# logging


@torch.no_grad()
def policy_metrics(log_prob: torch.Tensor, old_log_prob: torch.Tensor, clip_range: ClipRange) -> dict[str, float]:
    """Diagnostics of one trained step (no grad); ``log_prob`` and ``old_log_prob`` are ``[B]``.

    approx_kl:           ``0.5 * mean((log_prob - old_log_prob)^2)``
    clipfrac:            fraction of samples with ratio outside ``[1 - lo, 1 + hi]`` (= clipfrac_high + clipfrac_low)
    clipfrac_high / low: fractions with ratio ``> 1 + hi`` / ``< 1 - lo``
    ratio_mean / min / max, log_ratio_abs_max (``max |log ratio|``; ~0 before the first update: on-policy check)
    """
    lo, hi = _clip_bounds(clip_range)
    _check_same_shape(log_prob=log_prob, old_log_prob=old_log_prob)
    log_ratio = log_prob.float() - old_log_prob.to(device=log_prob.device, dtype=torch.float32)
    ratio = torch.exp(log_ratio)
    high = (ratio > 1.0 + hi).float().mean()
    low = (ratio < 1.0 - lo).float().mean()
    return {
        "approx_kl": (0.5 * log_ratio.square().mean()).item(),
        "clipfrac": (high + low).item(),
        "clipfrac_high": high.item(),
        "clipfrac_low": low.item(),
        "ratio_mean": ratio.mean().item(),
        "ratio_min": ratio.min().item(),
        "ratio_max": ratio.max().item(),
        "log_ratio_abs_max": log_ratio.abs().max().item(),
    }
