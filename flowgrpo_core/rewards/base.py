"""The reward interface every scorer implements (local models, weight-free statistics, a remote reward server).

Conventions:

* ``images``: ComfyUI's IMAGE layout, ``[B, H, W, C]`` float in ``[0, 1]``, RGB first (extra channels ignored);
* ``prompts``: ``B`` strings (the prompt each image was sampled for); ``metadata``: ``B`` dicts or ``None``;
* the result's ``scores`` are ``[B]`` float32 on the CPU, higher is better, all finite; ``details`` holds named
  per-sample extras (raw cosines, OCR text, ...) for metrics and debugging.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch

__all__ = ["RewardResult", "RewardBackend", "check_scores"]


@dataclass(frozen=True)
class RewardResult:
    """``scores`` ``[B]`` float32 CPU; ``details``: name -> per-sample values (lists or ``[B]`` tensors)."""

    scores: torch.Tensor
    details: dict[str, Any] = field(default_factory=dict)


def check_scores(scores: Any, batch: int, name: str) -> torch.Tensor:
    """``scores`` (a ``[B]`` tensor or a sequence of numbers) as ``[B]`` float32 CPU; ValueError naming the reward
    when the count is wrong or a score is NaN or infinite."""
    try:
        values = torch.as_tensor(scores, dtype=torch.float32).detach().cpu().reshape(-1)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"reward {name!r} returned scores that are not numbers: {e}") from None
    if values.numel() != batch:
        raise ValueError(f"reward {name!r} returned {values.numel()} scores for {batch} images")
    bad = [i for i, v in enumerate(values.tolist()) if not math.isfinite(v)]
    if bad:
        raise ValueError(f"reward {name!r} returned NaN or infinite scores for samples {bad}")
    return values


class RewardBackend(ABC):
    """A scorer: ``score(images, prompts, metadata) -> RewardResult``. Subclasses set ``name`` and ``needs_prompt``
    and implement :meth:`_score`; :meth:`score` checks the inputs and the result."""

    name: str = "reward"
    needs_prompt: bool = False

    def score(self, images: torch.Tensor, prompts: Sequence[str],
              metadata: Optional[Sequence[dict]] = None) -> RewardResult:
        if images.dim() != 4 or images.shape[-1] < 3:
            raise ValueError(f"reward {self.name!r} needs images [B, H, W, C>=3] in [0, 1], got {tuple(images.shape)}")
        batch = images.shape[0]
        prompts = list(prompts)
        if len(prompts) != batch:
            raise ValueError(f"reward {self.name!r} got {len(prompts)} prompts for {batch} images")
        if metadata is not None and len(metadata) != batch:
            raise ValueError(f"reward {self.name!r} got {len(metadata)} metadata entries for {batch} images")
        result = self._score(images, prompts, metadata)
        if not isinstance(result, RewardResult):
            result = RewardResult(scores=result)
        return RewardResult(scores=check_scores(result.scores, batch, self.name), details=dict(result.details))

    @abstractmethod
    def _score(self, images: torch.Tensor, prompts: list[str],
               metadata: Optional[Sequence[dict]]) -> RewardResult | torch.Tensor:
        """Scores of a checked batch (a RewardResult, or just the ``[B]`` scores)."""
