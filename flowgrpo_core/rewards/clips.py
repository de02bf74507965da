"""Rewards over video clips: one score per sample from its frames.

* ``clips``: ``[B, T, H, W, C]`` float in ``[0, 1]`` (ComfyUI's IMAGE layout per frame, frames in time order);
* :class:`ClipReward` is the interface a clip scorer implements (motion, temporal consistency, a video model):
  ``score_clips(clips, prompts, metadata) -> RewardResult`` with ``[B]`` scores;
* :class:`FrameMean` turns any image reward (:class:`~.base.RewardBackend`) into a clip reward: the mean of its
  per-frame scores; :func:`clip_reward` picks the one or the other for a scorer;
* :func:`frames_as_clips` regroups an IMAGE batch of ``B * T`` frames (what ComfyUI's VAEDecode gives for a video
  latent) into ``[B, T, H, W, C]``.

An image batch is a clip batch with ``T = 1``, so the same path scores images and videos.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Optional, Sequence

import torch

from .base import RewardBackend, RewardResult, checked_result

__all__ = ["ClipReward", "FrameMean", "clip_reward", "frames_as_clips"]


def frames_as_clips(images: torch.Tensor, samples: Optional[int] = None) -> torch.Tensor:
    """``[B, T, H, W, C]`` from ``images``: a ``[B, T, H, W, C]`` batch as it is; a ``[N, H, W, C]`` batch as
    ``samples`` clips of ``N / samples`` consecutive frames (``samples`` None: ``N`` one-frame clips). ValueError when
    ``N`` is not a multiple of ``samples`` or a 5-D batch holds another number of samples."""
    if images.dim() == 5:
        if samples is not None and images.shape[0] != samples:
            raise ValueError(f"the video batch holds {images.shape[0]} clips, not {samples} samples")
        return images
    if images.dim() != 4:
        raise ValueError(f"images must be [N, H, W, C] or [B, T, H, W, C], got {tuple(images.shape)}")
    n = images.shape[0]
    samples = n if samples is None else int(samples)
    if samples <= 0 or n % samples:
        raise ValueError(f"{n} frames cannot be split into {samples} samples of equal length")
    return images.reshape(samples, n // samples, *images.shape[1:])


class ClipReward(ABC):
    """A scorer of clips: ``score_clips(clips [B, T, H, W, C], prompts (B), metadata) -> RewardResult`` with one
    score per clip. Subclasses set ``name`` / ``needs_prompt`` and implement :meth:`_score_clips`;
    :meth:`score_clips` checks the inputs and the result."""

    name: str = "clip_reward"
    needs_prompt: bool = False

    def score_clips(self, clips: torch.Tensor, prompts: Sequence[str],
                    metadata: Optional[Sequence[dict]] = None) -> RewardResult:
        if clips.dim() != 5 or clips.shape[1] < 1 or clips.shape[-1] < 3:
            raise ValueError(f"reward {self.name!r} needs clips [B, T, H, W, C>=3] in [0, 1], got "
                             f"{tuple(clips.shape)}")
        return checked_result(self.name, "clips", clips, prompts, metadata, self._score_clips)

    @abstractmethod
    def _score_clips(self, clips: torch.Tensor, prompts: list[str],
                     metadata: Optional[Sequence[dict]]) -> RewardResult | torch.Tensor:
        """Scores of a checked clip batch (a RewardResult, or just the ``[B]`` scores)."""


class FrameMean(ClipReward):
    """An image reward as a clip reward: every frame scored with its clip's prompt (and metadata), the clip's score
    the mean over its frames; ``details["frame_scores"]`` holds each clip's per-frame scores."""

    def __init__(self, image_reward: RewardBackend):
        self.image_reward = image_reward
        self.name = image_reward.name
        self.needs_prompt = image_reward.needs_prompt

    def _score_clips(self, clips: torch.Tensor, prompts: list[str],
                     metadata: Optional[Sequence[dict]]) -> RewardResult:
        batch, frames = clips.shape[:2]
        frame_prompts = [p for p in prompts for _ in range(frames)]
        frame_meta = None if metadata is None else [m for m in metadata for _ in range(frames)]
        scores = self.image_reward.score(clips.reshape(batch * frames, *clips.shape[2:]), frame_prompts,
                                         frame_meta).scores.reshape(batch, frames)
        return RewardResult(scores=scores.mean(dim=1), details={"frame_scores": scores.tolist()})


def clip_reward(scorer: ClipReward | RewardBackend) -> ClipReward:
    """``scorer`` as a clip reward: a :class:`ClipReward` as it is, an image reward as :class:`FrameMean`."""
    if isinstance(scorer, ClipReward):
        return scorer
    if isinstance(scorer, RewardBackend):
        return FrameMean(scorer)
    raise TypeError(f"{type(scorer).__name__} is neither a ClipReward nor an image RewardBackend")
