"""Image preprocessing for reward models, on tensors (no PIL round trip).

``images`` are ComfyUI IMAGE ``[B, H, W, C]`` in ``[0, 1]``; every function here returns ``[B, 3, S, S]`` float32
(channels first, RGB), ready for a vision tower.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD", "to_nchw", "normalize", "resize_longest_and_pad",
           "resize_shortest_and_center_crop", "resize_squash"]

#: OpenAI CLIP's normalisation (also used by open_clip ViT-H-14, PickScore, ImageReward's BLIP).
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def to_nchw(images: torch.Tensor) -> torch.Tensor:
    """``[B, H, W, C>=3]`` -> ``[B, 3, H, W]`` float32 (RGB; extra channels dropped)."""
    return images[..., :3].permute(0, 3, 1, 2).float()


def normalize(x: torch.Tensor, mean: Sequence[float] = OPENAI_CLIP_MEAN,
              std: Sequence[float] = OPENAI_CLIP_STD) -> torch.Tensor:
    """``(x - mean) / std`` per channel of ``x`` ``[B, 3, H, W]``."""
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


def _resize(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bicubic, antialiased resize of ``x`` ``[B, 3, H, W]``, clamped back to ``[0, 1]``."""
    if (x.shape[-2], x.shape[-1]) == (height, width):
        return x
    return F.interpolate(x, size=(height, width), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)


def resize_squash(images: torch.Tensor, size: int, mean: Sequence[float] = OPENAI_CLIP_MEAN,
                  std: Sequence[float] = OPENAI_CLIP_STD) -> torch.Tensor:
    """Plain resize to ``size x size`` (bicubic, aspect ratio not kept), then normalise with ``mean``/``std``."""
    return normalize(_resize(to_nchw(images), size, size), mean, std)


def resize_longest_and_pad(images: torch.Tensor, size: int, mean: Sequence[float] = OPENAI_CLIP_MEAN,
                           std: Sequence[float] = OPENAI_CLIP_STD) -> torch.Tensor:
    """HPSv2's evaluation transform: scale so the longest side is ``size`` (bicubic, antialiased, not clamped:
    torchvision's tensor resize, which hpsv2 runs after ``ToTensor``), zero-pad centred to ``size x size`` (the odd
    pixel goes right/bottom), then normalise with ``mean``/``std`` (padding happens first, so pads are
    ``-mean/std``).

    Equal to hpsv2's transform on 8-bit images, with one deliberate difference: hpsv2 skips resizing *and padding*
    when the longest side already equals ``size``, so a non-square image of that size stays non-square (and its
    ViT then fails on it); here it is padded like any other."""
    x = to_nchw(images)
    h, w = x.shape[-2:]
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
    top, left = (size - nh) // 2, (size - nw) // 2
    x = F.pad(x, (left, size - nw - left, top, size - nh - top), value=0.0)
    return normalize(x, mean, std)


def resize_shortest_and_center_crop(images: torch.Tensor, size: int, mean: Sequence[float] = OPENAI_CLIP_MEAN,
                                    std: Sequence[float] = OPENAI_CLIP_STD) -> torch.Tensor:
    """CLIP's transform: scale so the shortest side is ``size`` (bicubic), centre-crop ``size x size``,
    normalise with ``mean``/``std``."""
    x = to_nchw(images)
    h, w = x.shape[-2:]
    # the long side is truncated, as CLIPImageProcessor and torchvision do (rounding moves the crop half a pixel)
    nh, nw = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
    x = _resize(x, nh, nw)
    top, left = (nh - size) // 2, (nw - size) // 2
    return normalize(x[..., top:top + size, left:left + size], mean, std)
