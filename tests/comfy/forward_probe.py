"""A probe on a ComfyUI diffusion model: what every forward of the network saw (tests only).

:class:`ForwardProbe` installs *global* forward hooks (``torch.nn.modules.module.register_module_forward_hook``) for
the duration of a ``with`` block, so it instruments ComfyUI's own network, not the pack, and it would also see a
forward of any *copy* of the network (every call records the id of the module that ran). For each forward of a module
of the watched network's class it records a :class:`Forward`: the phase the test was in, the timestep the network got
(ComfyUI passes ``model_sampling.timestep(sigma)``; SD3's ``ModelSamplingDiscreteFlow`` / ``CONST`` gives
``sigma * multiplier``, multiplier 1000), whether gradients were on, the batch, whether the FlowGRPO LoRA adapters were
active (installed in the Linear layers' ``weight_function`` *and* ``enabled``; ``lora_disabled`` clears ``enabled``),
the inputs and the output. It also counts the calls of the transformer blocks and of the modules inside them (a
checkpointed block recomputes its inner modules in backward without calling the block again).

Usage::

    probe = ForwardProbe(train_model, adapters=lora_adapters(train_model))
    with probe:                      # hooks installed
        with probe.phase("rollout"):
            ...run the rollout node...
    probe.step_of(call, spec.sigmas) # -> index i of the step sigma_i -> sigma_{i+1} the call computed
"""

from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

import torch
from torch import nn

__all__ = ["Forward", "ForwardProbe"]


def _copy(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return dict(value)
    return value


@dataclass
class Forward:
    """One forward of the diffusion network.

    phase:      the probe's phase when it ran (e.g. ``"rollout"``, ``"update"``).
    module_id:  ``id`` of the network object that ran.
    timestep:   ``[b]`` the timestep input (``sigma * multiplier`` for SD3).
    batch:      ``b``, the batch of ``x``.
    grad:       ``torch.is_grad_enabled()`` during the forward.
    lora:       True: every FlowGRPO adapter installed and enabled; False: none active; None: some.
    x, kwargs:  the inputs (``context``, ``y``, ... copied); ``output``: ``[b, C, H, W]``.
    weight_ptr: ``data_ptr()`` of the watched base weight (the first adapted Linear's) at that moment.
    """

    phase: str
    module_id: int
    timestep: torch.Tensor
    batch: int
    grad: bool
    lora: Optional[bool]
    x: torch.Tensor
    kwargs: dict
    output: torch.Tensor
    weight_ptr: int

    @property
    def context(self) -> torch.Tensor:
        return self.kwargs["context"]


class ForwardProbe:
    """Records the forwards of ``patcher.model.diffusion_model`` (and of any module of its class) while active."""

    def __init__(self, patcher: Any, adapters: Sequence[nn.Module] = ()):
        self.diffusion_model = patcher.model.diffusion_model
        self.model_sampling = patcher.get_model_object("model_sampling")
        self.adapters = list(adapters)
        self.adapted = self._adapted_modules(patcher)
        if self.adapters and len(self.adapted) != len(self.adapters):
            raise ValueError("every adapter must wrap one Linear weight of the diffusion model")
        self.watched = self.adapted[0][0] if self.adapted else None
        self.blocks = [b for child in self.diffusion_model.children() if isinstance(child, nn.ModuleList)
                       for b in child]
        self._block_ids = {id(b) for b in self.blocks}
        self._inner_ids = {id(m) for b in self.blocks for m in b.modules() if m is not b}
        self.calls: list[Forward] = []
        #: (phase, "block" | "inner", grad) -> number of module calls
        self.counts: Counter = Counter()
        self._phase: Optional[str] = None
        self._handle = None

    def _adapted_modules(self, patcher: Any) -> list[tuple[nn.Module, nn.Module]]:
        """``(Linear module, adapter)`` for every adapter, from the patcher's weight-wrapper keys."""
        wanted = {id(a) for a in self.adapters}
        pairs = []
        for key, fns in patcher.weight_wrapper_patches.items():
            path = key.removeprefix("diffusion_model.").removesuffix(".weight")
            for fn in fns:
                if id(fn) in wanted:
                    pairs.append((self.diffusion_model.get_submodule(path), fn))
        return pairs

    # ------------------------------------------------------------------ recording
    def __enter__(self) -> "ForwardProbe":
        self._handle = torch.nn.modules.module.register_module_forward_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._handle.remove()
        self._handle = None

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Record the forwards run inside the context under ``name`` (outside any phase nothing is recorded)."""
        previous, self._phase = self._phase, name
        try:
            yield
        finally:
            self._phase = previous

    def lora_state(self) -> Optional[bool]:
        """True when every adapter is installed in its Linear's ``weight_function`` and enabled, False when none."""
        if not self.adapted:
            return False
        active = [bool(a.enabled) and any(f is a for f in getattr(m, "weight_function", ())) for m, a in self.adapted]
        return True if all(active) else (False if not any(active) else None)

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if self._phase is None:
            return
        key = id(module)
        if key in self._block_ids or key in self._inner_ids:
            kind = "block" if key in self._block_ids else "inner"
            self.counts[(self._phase, kind, torch.is_grad_enabled())] += 1
            return
        if not isinstance(module, type(self.diffusion_model)):
            return
        x, timestep = args[0], args[1] if len(args) > 1 else kwargs["timesteps"]
        self.calls.append(Forward(
            phase=self._phase, module_id=key, timestep=timestep.detach().float().cpu().clone(),
            batch=int(x.shape[0]), grad=torch.is_grad_enabled(), lora=self.lora_state(), x=x.detach().clone(),
            kwargs={k: _copy(v) for k, v in kwargs.items()}, output=output.detach().clone(),
            weight_ptr=self.watched.weight.data_ptr() if self.watched is not None else 0))

    # ------------------------------------------------------------------ reading
    def of(self, phase: str) -> list[Forward]:
        return [c for c in self.calls if c.phase == phase]

    def step_of(self, call: Forward, sigmas: Sequence[float]) -> int:
        """Index ``i`` such that the call's timestep is ``model_sampling.timestep(sigmas[i])`` (every sample of the
        call at the same one); -1 when it matches no step of the grid (the last sigma, 0, is never a step)."""
        grid = self.model_sampling.timestep(torch.tensor(list(sigmas)[:-1], dtype=torch.float32)).float()
        t = call.timestep.reshape(-1)
        if not bool((t == t[0]).all()):
            return -1
        gap = (grid - t[0]).abs()
        i = int(gap.argmin())
        return i if float(gap[i]) <= 1e-5 * max(1.0, float(grid[i].abs())) else -1

    def steps(self, calls: Sequence[Forward], sigmas: Sequence[float]) -> list[int]:
        return [self.step_of(c, sigmas) for c in calls]
