"""Cheap image rewards that need no model weights (for demos, tests and sanity runs).

Every reward maps ``images`` ``[B, H, W, C]`` in ``[0, 1]`` (ComfyUI's IMAGE layout, RGB first) to ``[B]`` fp32,
higher is better.

=========================  ===================================================================================
``jpeg_compressibility``   ``-size / 1000``: minus the JPEG size in kB at quality 95 (Flow-GRPO's compression
                           reward; simpler images score higher)
``jpeg_incompressibility`` ``+size / 1000`` (favours detail)
``brightness``             mean of the RGB values
``saturation``             mean over pixels of ``max(R, G, B) - min(R, G, B)``
``redness``                mean of ``R - (G + B) / 2``
=========================  ===================================================================================
"""

from __future__ import annotations

import io
from typing import Callable, Optional, Sequence

import torch

from .base import RewardBackend

__all__ = ["SIMPLE_REWARDS", "simple_reward", "jpeg_size_kb", "SimpleReward"]


def _rgb(images: torch.Tensor) -> torch.Tensor:
    if images.dim() != 4 or images.shape[-1] < 3:
        raise ValueError(f"images must be [B, H, W, C>=3] in [0, 1], got shape {tuple(images.shape)}")
    return images[..., :3].float().clamp(0.0, 1.0)


def jpeg_size_kb(images: torch.Tensor, quality: int = 95) -> torch.Tensor:
    """``[B]`` fp32 JPEG sizes in kB (1000 bytes) of the 8-bit images."""
    from PIL import Image

    pixels = (_rgb(images) * 255.0).round().to(torch.uint8).cpu().numpy()
    sizes = []
    for array in pixels:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000.0)
    return torch.tensor(sizes, dtype=torch.float32)


def _saturation(images: torch.Tensor) -> torch.Tensor:
    rgb = _rgb(images)
    return (rgb.amax(dim=-1) - rgb.amin(dim=-1)).mean(dim=(1, 2))


def _redness(images: torch.Tensor) -> torch.Tensor:
    rgb = _rgb(images)
    return (rgb[..., 0] - 0.5 * (rgb[..., 1] + rgb[..., 2])).mean(dim=(1, 2))


SIMPLE_REWARDS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "jpeg_compressibility": lambda images: -jpeg_size_kb(images),
    "jpeg_incompressibility": jpeg_size_kb,
    "brightness": lambda images: _rgb(images).mean(dim=(1, 2, 3)),
    "saturation": _saturation,
    "redness": _redness,
}


def simple_reward(name: str, images: torch.Tensor) -> torch.Tensor:
    """The reward ``name`` (a key of :data:`SIMPLE_REWARDS`) of ``images`` ``[B, H, W, C]``: ``[B]`` fp32 on CPU."""
    if name not in SIMPLE_REWARDS:
        raise ValueError(f"unknown simple reward {name!r}; choose one of {', '.join(SIMPLE_REWARDS)}")
    return SIMPLE_REWARDS[name](images).float().cpu().reshape(-1)


class SimpleReward(RewardBackend):
    """One of :data:`SIMPLE_REWARDS` as a :class:`RewardBackend` (prompts are not used)."""

    def __init__(self, name: str):
        if name not in SIMPLE_REWARDS:
            raise ValueError(f"unknown simple reward {name!r}; choose one of {', '.join(SIMPLE_REWARDS)}")
        self.name = name

    def _score(self, images: torch.Tensor, prompts: list[str], metadata: Optional[Sequence[dict]]) -> torch.Tensor:
        return simple_reward(self.name, images)
