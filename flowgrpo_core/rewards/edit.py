"""Rewards for image editing that read each sample's input image from its ``metadata``.

An edit run's prompt source puts the image a sample was edited from into the sample's metadata as
``metadata["input_image"]``: ``[H, W, 3]`` (or ``[H, W, C>=3]``) float in ``[0, 1]``, ComfyUI's IMAGE layout
without the batch dimension (through a reward server: a base64 PNG string, :func:`.remote.json_metadata`). Rewards
here compare the output with it.

``input_similarity``: ``1 - mean |output - input|`` over the RGB pixels, the input resized (bilinear, no crop) to the
output's size; 1 for an unchanged image, lower the more the edit changed. Weighted against an instruction-following
reward it keeps edits from repainting the whole picture (weight-free, so it also runs in tests and sanity runs).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .base import RewardBackend, RewardResult
from .registry import RewardSpec

__all__ = ["INPUT_IMAGE_KEY", "input_images", "input_similarity", "InputSimilarityReward", "SPECS"]

#: the metadata key holding a sample's input image
INPUT_IMAGE_KEY = "input_image"


def input_images(metadata: Optional[Sequence[dict]], batch: int, reward: str) -> list[torch.Tensor]:
    """The ``[H, W, 3]`` float input image of each of ``batch`` samples; ValueError naming ``reward`` and saying how to
    provide them when the metadata or an image is missing or malformed."""
    how = ("give FlowGRPO Prompt Source edit images (its images input with a vae, or \"image\" paths in the .jsonl "
           "records) and connect its groups to the scoring node")
    if metadata is None:
        raise ValueError(f"reward {reward!r} compares each image with its input image, but the images came without "
                         f"metadata. Fix: {how}")
    out = []
    for i, meta in enumerate(metadata):
        image = meta.get(INPUT_IMAGE_KEY) if isinstance(meta, dict) else None
        if image is None:
            raise ValueError(f"reward {reward!r}: sample {i} has no {INPUT_IMAGE_KEY!r} in its metadata. Fix: {how}")
        if isinstance(image, str):  # through a reward server: a base64 PNG (remote.json_metadata)
            from .remote import decode_images

            try:
                image = decode_images([image])[0]
            except ValueError as e:
                raise ValueError(f"reward {reward!r}: the input image of sample {i} is a string but not a base64 "
                                 f"PNG ({e}). Fix: send it as the flowgrpo reward client does") from None
        image = torch.as_tensor(image)
        if image.dim() != 3 or image.shape[-1] < 3:
            raise ValueError(f"reward {reward!r}: the input image of sample {i} has shape {tuple(image.shape)}, not "
                             "[H, W, C>=3]. Fix: pass one IMAGE [H, W, 3] in [0, 1] per sample")
        out.append(image[..., :3].float())
    return out


def input_similarity(images: torch.Tensor, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """``[B]`` fp32: ``1 - mean |images[b] - inputs[b]|`` over RGB pixels (each input resized bilinearly to the
    image's ``H x W``); ``images`` ``[B, H, W, C>=3]`` in ``[0, 1]``."""
    rgb = images[..., :3].float().clamp(0.0, 1.0).cpu()
    height, width = rgb.shape[1:3]
    scores = []
    for out, ref in zip(rgb, inputs, strict=True):
        ref = ref.detach().cpu().float().clamp(0.0, 1.0)
        if ref.shape[:2] != (height, width):
            ref = torch.nn.functional.interpolate(ref.movedim(-1, 0)[None], size=(height, width), mode="bilinear",
                                                  align_corners=False, antialias=True)[0].movedim(0, -1)
        scores.append(1.0 - (out - ref).abs().mean())
    return torch.stack(scores).float()


class InputSimilarityReward(RewardBackend):
    """:func:`input_similarity` of each image and its ``metadata["input_image"]`` (details: ``input_size``, the
    ``[H, W]`` of each input image before resizing)."""

    name = "input_similarity"

    def _score(self, images: torch.Tensor, prompts: list[str], metadata: Optional[Sequence[dict]]) -> RewardResult:
        inputs = input_images(metadata, images.shape[0], self.name)
        return RewardResult(scores=input_similarity(images, inputs),
                            details={"input_size": [list(t.shape[:2]) for t in inputs]})


def _build(weights, device, dtype) -> InputSimilarityReward:
    return InputSimilarityReward()


SPECS = [RewardSpec(
    name="input_similarity", build=_build, weights_kind=None,
    description="Image editing: 1 - mean absolute pixel difference between each image and its input image "
                "(metadata['input_image'], resized to the image), 0..1; rewards edits that keep the rest of the "
                "picture. Needs FlowGRPO Prompt Source edit images and its groups.",
    source="weight-free")]
