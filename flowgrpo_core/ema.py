"""Exponential moving average (EMA) of the LoRA weights, with Flow-GRPO's schedule.

The EMA keeps an fp32 *shadow* copy ``s`` of each trainable tensor ``p`` (LoRA ``lora_up`` / ``lora_down``
matrices, any shapes). After optimizer update ``n`` (0-based: ``n = 0`` is the first update of the run) it moves

    s <- s + (1 - d_n) * (p - s)          only when (n + 1) % update_every == 0

with ``d_n = min(decay, (1 + n) / (10 + n))`` when ``warmup`` is on (Flow-GRPO's ``EMAModuleWrapper``: a short
memory early on, ``decay`` later; Flow-GRPO uses ``decay = 0.9``, ``update_every = 8``) and ``d_n = decay`` when it
is off. ``n`` is the global update index, so the schedule survives a resume unchanged.

The shadow is used for evaluation and export through :meth:`LoraEMA.swapped_in`, a scope that always restores the
live weights, exception or not (pitfall P9: an EMA swap that is not undone silently trains the EMA weights).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Mapping, Union

import torch

__all__ = ["LoraEMA"]

Device = Union[str, torch.device, None]


def _validated(decay: float, update_every: int) -> tuple[float, int]:
    decay, update_every = float(decay), int(update_every)
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
    if update_every < 1:
        raise ValueError(f"EMA update_every must be >= 1, got {update_every}")
    return decay, update_every


class LoraEMA:
    """EMA of a dict of named tensors (module doc for the formula).

    ``params``: name -> tensor at creation (the shadow starts as fp32 clones of them). ``decay`` in ``[0, 1)``,
    ``update_every >= 1``, ``device``: where the shadow lives (None: each parameter's own device).
    """

    def __init__(self, params: Mapping[str, torch.Tensor], decay: float, update_every: int = 1,
                 warmup: bool = True, device: Device = None) -> None:
        if not params:
            raise ValueError("EMA needs at least one parameter")
        self.decay, self.update_every = _validated(decay, update_every)
        self.warmup = bool(warmup)
        self.num_updates = 0
        with torch.no_grad():
            self.shadow: dict[str, torch.Tensor] = {
                str(k): v.detach().to(device=v.device if device is None else device, dtype=torch.float32,
                                      copy=True)
                for k, v in params.items()}

    # ------------------------------------------------------------------------------------------- update
    def decay_at(self, n: int) -> float:
        """``d_n`` of the module doc for the 0-based update index ``n``."""
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    def step(self, params: Mapping[str, torch.Tensor], n: int) -> bool:
        """Fold ``params`` (the weights after update ``n``, 0-based) into the shadow when ``(n + 1) % update_every
        == 0``; returns whether it did. ValueError when the names or shapes differ from the shadow's."""
        self._check(params, "step")
        if (int(n) + 1) % self.update_every != 0:
            return False
        one_minus_d = 1.0 - self.decay_at(int(n))
        with torch.no_grad():
            for name, s in self.shadow.items():
                p = params[name].detach().to(device=s.device, dtype=torch.float32)
                s.add_(one_minus_d * (p - s))
        self.num_updates += 1
        return True

    def _check(self, tensors: Mapping[str, Any], what: str) -> None:
        missing, extra = set(self.shadow) - set(tensors), set(tensors) - set(self.shadow)
        if missing or extra:
            raise ValueError(f"EMA {what}: parameter names differ from the EMA's (missing {sorted(missing)[:5]}, "
                             f"unexpected {sorted(extra)[:5]}); the EMA belongs to another LoRA")
        for name, s in self.shadow.items():
            value = tensors[name]
            if not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(s.shape):
                shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(f"EMA {what}: {name!r} is {shape}, the EMA holds {tuple(s.shape)}; the EMA belongs "
                                 "to another LoRA (other rank or targets)")

    # ------------------------------------------------------------------------------------------- use
    @contextmanager
    def swapped_in(self, params: Mapping[str, torch.Tensor]) -> Iterator[None]:
        """Within the scope ``params`` hold the EMA weights (copied in place, each keeping its dtype and device);
        on exit, normal or by exception, they get their exact previous values back."""
        self._check(params, "swap")
        with torch.no_grad():
            live = {name: p.detach().clone() for name, p in params.items()}
            try:
                for name, p in params.items():
                    p.copy_(self.shadow[name])
                yield
            finally:
                for name, p in params.items():
                    p.copy_(live[name])

    def copy(self) -> dict[str, torch.Tensor]:
        """The shadow as new CPU fp32 tensors (e.g. to save the EMA LoRA)."""
        return {name: s.detach().to("cpu", copy=True) for name, s in self.shadow.items()}

    # ------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """``{"decay", "update_every", "warmup", "num_updates", "shadow": {name: fp32 tensor}}``: plain JSON and
        tensors (``flowgrpo_core.checkpoint.encode_tree`` stores it). The shadow tensors are copies."""
        return {"decay": self.decay, "update_every": self.update_every, "warmup": self.warmup,
                "num_updates": self.num_updates,
                "shadow": {name: s.detach().clone() for name, s in self.shadow.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` bit for bit into this EMA (same names and shapes required: ValueError)."""
        for key in ("decay", "update_every", "warmup", "num_updates", "shadow"):
            if key not in state:
                raise ValueError(f"EMA state has no {key!r}; expected the keys of LoraEMA.state_dict()")
        shadow = state["shadow"]
        if not isinstance(shadow, Mapping):
            raise ValueError(f"EMA state 'shadow' is a {type(shadow).__name__}, expected name -> tensor")
        self._check(shadow, "load")
        self.decay, self.update_every = _validated(state["decay"], state["update_every"])
        self.warmup, self.num_updates = bool(state["warmup"]), int(state["num_updates"])
        with torch.no_grad():
            for name, s in self.shadow.items():
                s.copy_(shadow[name])

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any], device: Device = None) -> "LoraEMA":
        """A new EMA holding ``state`` (a :meth:`state_dict`), its shadow on ``device`` (None: where the tensors
        of ``state`` are)."""
        shadow = state.get("shadow") if isinstance(state, Mapping) else None
        if not isinstance(shadow, Mapping) or not shadow or \
                not all(isinstance(v, torch.Tensor) for v in shadow.values()):
            raise ValueError("EMA state has no 'shadow' tensors; expected the keys of LoraEMA.state_dict()")
        ema = cls(shadow, state.get("decay", 0.0), state.get("update_every", 1), device=device)
        ema.load_state_dict(state)
        return ema
