"""The reward backends by name: how each is built from local weights.

A :class:`RewardSpec` names a backend, its default weights (a file or folder name under the reward-model folders,
see ``docs/reward-models.md``) and a ``build(weights, device, dtype)`` function. Backend modules import their heavy
libraries (open_clip, transformers, rapidocr) inside ``build``, so listing the backends costs nothing and a missing
library only fails the backend that needs it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from .base import RewardBackend
from .weights import find_weights

__all__ = ["RewardSpec", "BACKENDS", "register", "build_backend", "MissingDependencyError"]


class MissingDependencyError(ImportError):
    """A backend's library is not installed; the message says what to install."""


@dataclass(frozen=True)
class RewardSpec:
    """``build(weights, device, dtype) -> RewardBackend``; ``weights`` is the resolved path (``None`` when the
    backend needs no weights). ``default_weights`` is looked up in the reward-model folders when no weights entry
    is chosen; ``weights_kind`` is ``"file"``, ``"dir"`` or ``None`` (no weights); ``source`` says where to get
    them."""

    name: str
    build: Callable[[Optional[Path], torch.device, torch.dtype], RewardBackend]
    description: str
    default_weights: Optional[str] = None
    weights_kind: Optional[str] = None
    source: str = ""
    needs_prompt: bool = False


#: name -> spec, in the order backends are offered.
BACKENDS: dict[str, RewardSpec] = {}


def register(spec: RewardSpec) -> RewardSpec:
    """Adds ``spec`` to :data:`BACKENDS` (a later spec with the same name replaces the earlier one)."""
    BACKENDS[spec.name] = spec
    return spec


def build_backend(name: str, weights: Optional[str], folders: Sequence[Path | str],
                  device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> RewardBackend:
    """The backend ``name`` with its weights resolved in ``folders`` (``weights`` empty or ``None``: the spec's
    default). Raises KeyError for an unknown name, :class:`~.weights.MissingWeightsError` naming the folder and
    file when the weights are absent."""
    spec = BACKENDS[name]
    path = None
    if spec.weights_kind is not None:
        path = find_weights(weights or spec.default_weights or "", folders, reward=name, source=spec.source,
                            kind=spec.weights_kind)
    return spec.build(path, torch.device(device), dtype)


def require(module: str, package: str, reward: str):
    """``importlib.import_module(module)``, or :class:`MissingDependencyError` saying ``pip install package``."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingDependencyError(f"reward {reward!r} needs the Python package {package!r} ({e}). Install it "
                                     f"into ComfyUI's Python: python -m pip install {package}") from None


def _register_builtin() -> None:
    """Registers the specs of the pack's backend modules (they import only torch at module level). The package's
    ``__init__`` imports this module before any backend module, so a backend's own ``from .registry import ...``
    finds the names above already defined."""
    import importlib

    for module in _BUILTIN:
        for spec in importlib.import_module(f"{__package__}.{module}").SPECS:
            register(spec)


#: Backend modules, in the order their backends are offered.
_BUILTIN = ("hps", "hf_clip", "aesthetic", "image_reward", "ocr", "geneval", "open_clip_models", "edit")
_register_builtin()
