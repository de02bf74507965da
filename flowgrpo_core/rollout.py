"""Rollouts: sample a trajectory with the SDE where the step plan says so, recording per-step log-probs.

A :class:`RolloutSpec` freezes everything that decides the transition density of a step (SDE kind, noise
level, sigma grid, which steps are stochastic, the micro-batch layout, and model-side settings such as CFG
scale or guidance in ``extras``). The trainer replays a :class:`Trajectory` with exactly that spec, so the
first recomputed log-prob ratio of an update is 1 (pitfalls P5 and P8 of the math notes).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Callable, Optional, Sequence

import torch

from .policy import FlowPolicy, index_cond
from .sde import CPS_LOG_PROB_FORMS, SDE_KINDS, sde_step

#: ``callback(step, x_next)`` after every step: previews, progress bars, interrupt checks.
StepCallback = Callable[[int, torch.Tensor], None]


@dataclass(frozen=True)
class RolloutSpec:
    """Immutable description of a rollout; N steps, N+1 sigmas.

    kind:             SDE kind of the stochastic steps (``flow_sde``, ``dance_sde``, ``cps``).
    noise_level:      ``a`` (flow_sde) or ``eta`` (dance_sde, cps).
    sigmas:           N+1 strictly decreasing sigmas, ``sigmas[0] <= 1`` (list, tuple or tensor; stored as a tuple).
    sde_mask:         N flags: step i is stochastic (records a log-prob) or an ODE step (list, tuple or
                      bool tensor, e.g. a :class:`flowgrpo_core.windows.StepPlan` mask; stored as a tuple).
    train_mask:       N flags, a subset of ``sde_mask``: steps whose log-probs the update trains.
    micro_batch_size: samples per model forward (0: the whole batch); replay uses the same layout.
    cps_log_prob:     ``"exact"`` or ``"reference"`` (see :func:`flowgrpo_core.sde.sde_step`).
    extras:           model-side settings as sorted ``(name, value)`` pairs, compared verbatim on replay.
    """

    kind: str
    noise_level: float
    sigmas: tuple[float, ...]
    sde_mask: tuple[bool, ...]
    train_mask: tuple[bool, ...]
    micro_batch_size: int = 0
    cps_log_prob: str = "exact"
    extras: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        # Accept lists, tuples or tensors; store plain tuples so the spec is hashable and compares exactly.
        object.__setattr__(self, "sigmas", tuple(float(v) for v in self.sigmas))
        object.__setattr__(self, "sde_mask", tuple(bool(v) for v in self.sde_mask))
        object.__setattr__(self, "train_mask", tuple(bool(v) for v in self.train_mask))
        object.__setattr__(self, "noise_level", float(self.noise_level))
        if self.kind not in SDE_KINDS or self.kind == "ode":
            raise ValueError(f"rollout kind must be a stochastic SDE kind (flow_sde, dance_sde, cps), got {self.kind!r}")
        if self.cps_log_prob not in CPS_LOG_PROB_FORMS:
            raise ValueError(f"cps_log_prob must be one of {CPS_LOG_PROB_FORMS}")
        n = len(self.sigmas) - 1
        if n < 2:
            raise ValueError("a rollout needs at least 2 steps (3 sigmas)")
        if len(self.sde_mask) != n or len(self.train_mask) != n:
            raise ValueError(f"{n} steps but sde_mask has {len(self.sde_mask)} and train_mask {len(self.train_mask)} flags")
        if any(b >= a for a, b in zip(self.sigmas, self.sigmas[1:])):
            raise ValueError(f"sigmas must decrease strictly (flow convention, 1 = noise, 0 = clean): {self.sigmas}")
        if not 0.0 <= self.sigmas[-1] < self.sigmas[0] <= 1.0 + 1e-5:
            raise ValueError(f"sigmas must lie in [0, 1]: {self.sigmas}")
        if self.sde_mask[-1] or self.train_mask[-1]:
            raise ValueError("the last step is deterministic and never trained (its Gaussian is degenerate)")
        if any(t and not s for s, t in zip(self.sde_mask, self.train_mask)):
            raise ValueError("every trained step must be a stochastic (SDE) step")
        if not any(self.train_mask):
            raise ValueError("the step plan trains no step; widen the window or raise the fraction")
        if self.micro_batch_size < 0:
            raise ValueError("micro_batch_size must be >= 0 (0 means the whole batch)")

    @property
    def num_steps(self) -> int:
        return len(self.sigmas) - 1

    @property
    def train_steps(self) -> list[int]:
        return [i for i, t in enumerate(self.train_mask) if t]

    def step_kind(self, i: int) -> str:
        return self.kind if self.sde_mask[i] else "ode"

    def differences(self, other: "RolloutSpec") -> list[str]:
        """Names of the fields whose values differ from ``other``'s (empty when the specs are equal)."""
        return [f.name for f in fields(self) if getattr(self, f.name) != getattr(other, f.name)]

    def require_same(self, other: "RolloutSpec") -> None:
        """Raise if ``other`` (the settings a replay would use now) differs from this rollout's spec.

        Replaying a rollout under another guidance, CFG scale, sigma grid, noise level or batch layout makes the
        recomputed log-probs those of a different policy (pitfall P8): the ratio is no longer 1 at the first step.
        """
        changed = self.differences(other)
        if changed:
            detail = "; ".join(f"{n}: rollout {getattr(self, n)!r} vs now {getattr(other, n)!r}" for n in changed)
            raise ValueError(f"the update would replay this rollout with different settings ({detail}); "
                             "train on the rollout with the settings it was sampled with, or sample a new rollout")

    def chunks(self, batch_size: int) -> list[slice]:
        """The micro-batches of a batch, in rollout order."""
        size = self.micro_batch_size or batch_size
        return [slice(a, min(a + size, batch_size)) for a in range(0, batch_size, size)]


@dataclass
class Trajectory:
    """A sampled batch.

    latents:   ``[N+1, B, ...]`` in the storage dtype; ``latents[i]`` is the sample at ``sigmas[i]``.
    log_probs: ``[N, B]`` fp32 log-probs of ``latents[i+1]`` given ``latents[i]`` (0 at ODE steps).
    cond:      the conditioning, batch-first (see :func:`flowgrpo_core.policy.index_cond`).
    """

    spec: RolloutSpec
    latents: torch.Tensor
    log_probs: torch.Tensor
    cond: Any

    @property
    def batch_size(self) -> int:
        return self.latents.shape[1]

    @property
    def final(self) -> torch.Tensor:
        """The clean sample at the last sigma, ``[B, ...]``."""
        return self.latents[-1]


def sigma_batch(value: float, like: torch.Tensor) -> torch.Tensor:
    """``value`` repeated for each sample of ``like``: ``[B]`` fp32 on its device (what policies receive)."""
    return torch.full((like.shape[0],), value, dtype=torch.float32, device=like.device)


def replay_step(policy: FlowPolicy, spec: RolloutSpec, i: int, x: torch.Tensor, cond: Any,
                prev_sample: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None):
    """Step ``i`` of ``spec`` on one micro-batch: the policy's velocity, then :func:`sde_step`."""
    sigma, sigma_next = spec.sigmas[i], spec.sigmas[i + 1]
    v = policy.velocity(x, sigma_batch(sigma, x), cond)
    return sde_step(spec.step_kind(i), x, v, sigma, sigma_next, spec.noise_level, prev_sample=prev_sample,
                    generator=generator, cps_log_prob=spec.cps_log_prob)


@torch.no_grad()
def sample_trajectory(policy: FlowPolicy, x_start: torch.Tensor, cond: Any, spec: RolloutSpec,
                      generator: Optional[torch.Generator] = None,
                      callback: Optional[StepCallback] = None) -> Trajectory:
    """Sample ``x_start`` (``[B, ...]``, the sample at ``sigmas[0]``) down the grid of ``spec``.

    Noise is drawn from ``generator`` micro-batch by micro-batch in order, so a seed fixes the trajectory.
    """
    n, batch = spec.num_steps, x_start.shape[0]
    latents = x_start.new_empty((n + 1, *x_start.shape))
    latents[0] = x_start
    log_probs = torch.zeros((n, batch), dtype=torch.float32, device=x_start.device)
    chunks = spec.chunks(batch)
    for i in range(n):
        for chunk in chunks:
            out = replay_step(policy, spec, i, latents[i, chunk], index_cond(cond, chunk), generator=generator)
            latents[i + 1, chunk] = out.prev_sample
            log_probs[i, chunk] = out.log_prob
        if callback is not None:
            callback(i, latents[i + 1])
    return Trajectory(spec=spec, latents=latents, log_probs=log_probs, cond=cond)


@torch.no_grad()
def recompute_log_probs(policy: FlowPolicy, trajectory: Trajectory, steps: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Log-probs ``[len(steps), B]`` of the stored transitions under the current policy (diagnostics, tests)."""
    spec = trajectory.spec
    steps = spec.train_steps if steps is None else list(steps)
    out = torch.zeros((len(steps), trajectory.batch_size), dtype=torch.float32, device=trajectory.latents.device)
    for row, i in enumerate(steps):
        for chunk in spec.chunks(trajectory.batch_size):
            step = replay_step(policy, spec, i, trajectory.latents[i, chunk], index_cond(trajectory.cond, chunk),
                               prev_sample=trajectory.latents[i + 1, chunk])
            out[row, chunk] = step.log_prob
    return out
