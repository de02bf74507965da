"""The small policy interface the rollout and the trainer work over.

A policy maps ``(x, sigma, cond)`` to the velocity ``v`` of a flow-matching model. The trainable part is an
adapter (a LoRA); with the adapter disabled the same object is the frozen *reference* policy used by the KL
term. ComfyUI models implement this interface in ``nodes/``; plain ``nn.Module`` networks use
:class:`ModulePolicy`.

Conditioning ``cond`` is any nesting of tensors (batch-first), dicts, lists and tuples; :func:`index_cond`
slices it along the batch so that a micro-batch of samples gets its own conditioning.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, ContextManager, Iterable, Iterator, Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class FlowPolicy(Protocol):
    """What the rollout and the trainer need from a model."""

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: Any) -> torch.Tensor:
        """``v`` at ``x`` ``[b, ...]``, ``sigma`` ``[b]`` fp32 in (0, 1], conditioning for the same ``b`` samples."""

    def reference(self) -> ContextManager[None]:
        """Context in which :meth:`velocity` is the frozen reference policy (the adapter disabled)."""

    def trainable_parameters(self) -> Iterable[nn.Parameter]:
        """The parameters the optimizer updates (the adapter's)."""


def index_cond(cond: Any, index: torch.Tensor | slice) -> Any:
    """Select samples ``index`` (a slice or a LongTensor) along the batch dim of every tensor in ``cond``.

    Tensors with a leading batch dim are indexed; dicts, lists and tuples are walked; anything else (floats,
    strings, ``None``) is shared by all samples and returned as is.
    """
    if isinstance(cond, torch.Tensor):
        return cond[index] if cond.dim() > 0 else cond
    if isinstance(cond, dict):
        return {k: index_cond(v, index) for k, v in cond.items()}
    if isinstance(cond, (list, tuple)):
        return type(cond)(index_cond(v, index) for v in cond)
    return cond


def adapters_disabled(module: nn.Module) -> ContextManager[None]:
    """Disable every peft adapter layer inside ``module`` for the duration of the context."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    @contextlib.contextmanager
    def scope() -> Iterator[None]:
        layers = [m for m in module.modules() if isinstance(m, BaseTunerLayer)]
        if not layers:
            raise ValueError("this module has no LoRA/peft adapter to disable; add one with flowgrpo_core.lora.add_lora")
        for layer in layers:
            layer.enable_adapters(False)
        try:
            yield
        finally:
            for layer in layers:
                layer.enable_adapters(True)

    return scope()


class ModulePolicy:
    """A :class:`FlowPolicy` over a plain ``nn.Module`` ``net(x, sigma, cond) -> v`` carrying peft adapters."""

    def __init__(self, net: nn.Module, forward: Callable[..., torch.Tensor] | None = None):
        self.net = net
        self._forward = forward or net

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: Any) -> torch.Tensor:
        return self._forward(x, sigma, cond)

    def reference(self) -> ContextManager[None]:
        return adapters_disabled(self.net)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.net.parameters() if p.requires_grad]
