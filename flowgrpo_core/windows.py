"""Which sampling steps are stochastic (SDE, recording a log-prob) and which of those are trained.

Conventions (math reference section 6 and pitfalls P3, P12):

* ``N`` sampling steps; the sigma grid has ``N + 1`` entries, the last 0; step ``i`` goes ``sigma_i -> sigma_{i+1}``;
* the last step (index ``N - 1``) is always deterministic: never SDE, never trained (a sharp or zero-std Gaussian);
* ``train_mask`` is a subset of ``sde_mask``; steps outside ``sde_mask`` run the ODE and record no log-prob;
* all randomness comes from a local ``torch.Generator`` seeded by ``(run seed, iteration)`` only, so the choice moves
  from one iteration to the next, is the same on every rank and is reproduced on resume (never seeded by rank).

Modes (:class:`StepSelection`):

=================  =============================================================================================
``fraction``       Flow-GRPO: every step but the last is SDE; the first ``floor(N * fraction)`` are trained
                   (capped at ``N - 1``; ``0.99`` -> all but the last).
``fixed_window``   SDE and trained on ``[window_start, window_start + window_size)``, ODE elsewhere.
``random_window``  Flow-GRPO-Fast: start ``k ~ U{lo, ..., hi - w}`` with ``(lo, hi) = window_range`` (default
                   ``(0, N - 1)``), so the window lies in ``[lo, hi)``; steps ``k .. k+w-1`` SDE and trained.
``sliding_window`` MixGRPO: ``W = [c, min(c + w, N - 1))`` with ``c = window_start + stride * p``,
                   ``p = iteration // iters_per_shift``; once ``c`` would pass ``N - 2`` it rolls back to
                   ``window_start`` (so ``p`` runs modulo the number of valid positions). The window is truncated
                   near the end rather than skipped. ``stride = 0`` keeps it at ``window_start``.
``random_subset``  DanceGRPO ``timestep_fraction``: every step but the last is SDE; a random subset of
                   ``floor((N - 1) * fraction)`` of them (or exactly ``num_train``) is trained. DanceGRPO draws a
                   subset per sample; here one subset per iteration is shared by the batch.
=================  =============================================================================================
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from .seeding import iteration_generator

STEP_MODES = ("fraction", "fixed_window", "random_window", "sliding_window", "random_subset")

#: tolerance added before ``floor`` so that e.g. ``100 * 0.29 = 28.999999999999996`` counts as 29.
_FLOOR_TOL = 1e-9


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class StepSelection:
    """Settings of the timestep selection; only the fields used by ``mode`` are read and validated.

    mode:            one of ``STEP_MODES`` (see the module docstring).
    fraction:        ``fraction``: share of the ``N`` steps trained; ``random_subset``: DanceGRPO's ``tau``,
                     share of the ``N - 1`` stochastic steps trained. In ``(0, 1]``.
    window_size:     ``w``, steps per window (``fixed_window``, ``random_window``, ``sliding_window``).
    window_start:    first step of the window (``fixed_window``) or of the sweep (``sliding_window``).
    window_range:    ``(lo, hi)`` for ``random_window``: the window lies in steps ``[lo, hi)``, ``hi <= N - 1``;
                     ``None`` means ``(0, N - 1)``.
    stride:          ``sliding_window``: steps the window moves per shift (1 = overlapping, ``w`` = disjoint, 0 = fixed).
    iters_per_shift: ``sliding_window``: iterations spent at each window position.
    num_train:       ``random_subset``: exact number of trained steps, overriding ``fraction``.
    """

    mode: str = "fraction"
    fraction: float = 0.99
    window_size: int = 2
    window_start: int = 0
    window_range: Optional[tuple[int, int]] = None
    stride: int = 1
    iters_per_shift: int = 25
    num_train: Optional[int] = None

    def __post_init__(self) -> None:
        if self.mode not in STEP_MODES:
            raise ValueError(f"unknown step selection mode {self.mode!r}; choose one of {', '.join(STEP_MODES)}")
        if self.window_range is not None:
            try:
                object.__setattr__(self, "window_range", tuple(self.window_range))
            except TypeError:
                raise ValueError(f"window_range must be a pair (lo, hi) or None, got {self.window_range!r}") from None
        mode = self.mode
        if mode == "fraction" or (mode == "random_subset" and self.num_train is None):
            if not (isinstance(self.fraction, (int, float)) and math.isfinite(self.fraction)
                    and 0 < self.fraction <= 1):
                raise ValueError(f"fraction must lie in (0, 1], got {self.fraction!r}")
        if mode in ("fixed_window", "random_window", "sliding_window"):
            if not (_is_int(self.window_size) and self.window_size >= 1):
                raise ValueError(f"window_size must be an integer >= 1, got {self.window_size!r}")
        if mode in ("fixed_window", "sliding_window"):
            if not (_is_int(self.window_start) and self.window_start >= 0):
                raise ValueError(f"window_start must be an integer >= 0, got {self.window_start!r}")
        if mode == "random_window" and self.window_range is not None:
            rng = self.window_range
            if not (len(rng) == 2 and all(_is_int(v) for v in rng) and 0 <= rng[0] < rng[1]):
                raise ValueError(f"window_range must be a pair of integers (lo, hi) with 0 <= lo < hi, got {rng!r}")
            if rng[1] - rng[0] < self.window_size:
                raise ValueError(f"window_size {self.window_size} is larger than window_range {rng} "
                                 f"(which holds {rng[1] - rng[0]} steps)")
        if mode == "sliding_window":
            if not (_is_int(self.stride) and self.stride >= 0):
                raise ValueError(f"stride must be an integer >= 0, got {self.stride!r}")
            if not (_is_int(self.iters_per_shift) and self.iters_per_shift >= 1):
                raise ValueError(f"iters_per_shift must be an integer >= 1, got {self.iters_per_shift!r}")
        if mode == "random_subset" and self.num_train is not None:
            if not (_is_int(self.num_train) and self.num_train >= 1):
                raise ValueError(f"num_train must be an integer >= 1 or None, got {self.num_train!r}")


@dataclass(frozen=True, eq=False)
class StepPlan:
    """The steps of one iteration.

    sde_mask:   ``[N]`` bool, steps sampled with the SDE that record a log-prob.
    train_mask: ``[N]`` bool, subset of ``sde_mask``: steps whose log-prob is trained.
    Step ``N - 1`` is in neither.
    """

    sde_mask: torch.Tensor
    train_mask: torch.Tensor

    def __post_init__(self) -> None:
        for name in ("sde_mask", "train_mask"):
            m = getattr(self, name)
            if m.dtype != torch.bool or m.dim() != 1:
                raise ValueError(f"{name} must be a 1-D bool tensor, got {m.dtype} of shape {tuple(m.shape)}")
        if self.sde_mask.shape != self.train_mask.shape:
            raise ValueError("sde_mask and train_mask must have the same length N")
        if bool((self.train_mask & ~self.sde_mask).any()):
            raise ValueError("train_mask must be a subset of sde_mask: only SDE steps have a log-prob")
        if bool(self.sde_mask[-1]):
            raise ValueError("the last step must be deterministic: it is never SDE and never trained")
        if not bool(self.train_mask.any()):
            raise ValueError("the plan trains no step")

    @property
    def num_steps(self) -> int:
        """``N``."""
        return self.sde_mask.shape[0]

    @property
    def train_steps(self) -> list[int]:
        """Indices of the trained steps, ascending."""
        return self.train_mask.nonzero().flatten().tolist()

    @property
    def sde_steps(self) -> list[int]:
        """Indices of the SDE steps, ascending."""
        return self.sde_mask.nonzero().flatten().tolist()

    def describe(self) -> str:
        """One line for the log, e.g. ``"N=10 sde=[0-8] train=[2-4]"``."""
        return f"N={self.num_steps} sde=[{_runs(self.sde_steps)}] train=[{_runs(self.train_steps)}]"


def _runs(steps: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2,5"``."""
    parts: list[str] = []
    i = 0
    while i < len(steps):
        j = i
        while j + 1 < len(steps) and steps[j + 1] == steps[j] + 1:
            j += 1
        parts.append(str(steps[i]) if i == j else f"{steps[i]}-{steps[j]}")
        i = j + 1
    return ",".join(parts)


def _mask(num_steps: int, steps) -> torch.Tensor:
    m = torch.zeros(num_steps, dtype=torch.bool)
    m[torch.as_tensor(list(steps), dtype=torch.long)] = True
    return m


def _fraction_count(total: int, fraction: float) -> int:
    return math.floor(total * fraction + _FLOOR_TOL)


def select_steps(selection: StepSelection, num_steps: int, seed: int, iteration: int) -> StepPlan:
    """The :class:`StepPlan` of iteration ``iteration`` for ``num_steps`` sampling steps.

    Deterministic in ``(selection, num_steps, seed, iteration)``; uses no global RNG. Raises ``ValueError`` when
    ``num_steps < 2`` or the settings select no step or reach the last step.
    """
    if not (_is_int(num_steps) and num_steps >= 2):
        raise ValueError(f"need at least 2 sampling steps (the last one is always deterministic), got {num_steps!r}")
    if not _is_int(seed):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    if not (_is_int(iteration) and iteration >= 0):
        raise ValueError(f"iteration must be an integer >= 0, got {iteration!r}")
    n = num_steps
    last = n - 1  # index of the deterministic last step; trainable steps are 0 .. n - 2
    all_but_last = range(last)
    mode = selection.mode
    w = selection.window_size

    if mode == "fraction":
        count = min(_fraction_count(n, selection.fraction), last)
        if count < 1:
            raise ValueError(f"fraction {selection.fraction} of {n} steps selects no step; raise it to >= {1 / n:.3g}")
        sde, train = all_but_last, range(count)

    elif mode == "fixed_window":
        start = selection.window_start
        if start + w > last:
            raise ValueError(f"fixed window [{start}, {start + w}) reaches past step {last - 1}: with {n} steps the "
                             f"last step {last} is deterministic, so start + window_size must be <= {last}")
        sde = train = range(start, start + w)

    elif mode == "random_window":
        lo, hi = selection.window_range if selection.window_range is not None else (0, last)
        if hi > last:
            raise ValueError(f"window_range ({lo}, {hi}) goes beyond step {last - 1}: with {n} steps the last step "
                             f"{last} is deterministic, so hi must be <= {last}")
        if hi - lo < w:
            raise ValueError(f"window_size {w} is larger than window_range ({lo}, {hi}) of {n} steps")
        k = lo + int(torch.randint(0, hi - w - lo + 1, (1,), generator=iteration_generator(seed, iteration, "steps")).item())
        sde = train = range(k, k + w)

    elif mode == "sliding_window":
        start = selection.window_start
        if start > last - 1:
            raise ValueError(f"window_start {start} is past step {last - 1}: with {n} steps the last step {last} "
                             "is deterministic")
        position = iteration // selection.iters_per_shift
        if selection.stride == 0:
            c = start
        else:
            num_positions = (last - 1 - start) // selection.stride + 1  # positions with c <= N - 2
            c = start + selection.stride * (position % num_positions)
        sde = train = range(c, min(c + w, last))

    else:  # random_subset
        if selection.num_train is not None:
            count = selection.num_train
            if count > last:
                raise ValueError(f"num_train {count} is more than the {last} stochastic steps of {n} steps")
        else:
            count = _fraction_count(last, selection.fraction)
            if count < 1:
                raise ValueError(f"fraction {selection.fraction} of the {last} stochastic steps selects no step; "
                                 f"raise it to >= {1 / last:.3g}")
        chosen = torch.randperm(last, generator=iteration_generator(seed, iteration, "steps"))[:count]
        sde, train = all_but_last, chosen.tolist()

    return StepPlan(sde_mask=_mask(n, sde), train_mask=_mask(n, train))
