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

__all__ = ["RewardResult", "RewardBackend", "TorchReward", "check_scores", "checked_result", "merge_results"]


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


def checked_result(name: str, unit: str, batch_data: torch.Tensor, prompts: Sequence[str],
                   metadata: Optional[Sequence[dict]], score_fn) -> RewardResult:
    """``score_fn(batch_data, prompts, metadata)`` after checking there is one prompt (and one metadata entry) per
    item of ``batch_data`` (``unit``: "images", "clips"), its result as a :class:`RewardResult` with checked ``[B]``
    scores."""
    batch = batch_data.shape[0]
    prompts = list(prompts)
    if len(prompts) != batch:
        raise ValueError(f"reward {name!r} got {len(prompts)} prompts for {batch} {unit}")
    if metadata is not None and len(metadata) != batch:
        raise ValueError(f"reward {name!r} got {len(metadata)} metadata entries for {batch} {unit}")
    result = score_fn(batch_data, prompts, metadata)
    if not isinstance(result, RewardResult):
        result = RewardResult(scores=result)
    return RewardResult(scores=check_scores(result.scores, batch, name), details=dict(result.details))


class RewardBackend(ABC):
    """A scorer: ``score(images, prompts, metadata) -> RewardResult``. Subclasses set ``name`` and ``needs_prompt``
    and implement :meth:`_score`; :meth:`score` checks the inputs and the result."""

    name: str = "reward"
    needs_prompt: bool = False

    def score(self, images: torch.Tensor, prompts: Sequence[str],
              metadata: Optional[Sequence[dict]] = None) -> RewardResult:
        if images.dim() != 4 or images.shape[-1] < 3:
            raise ValueError(f"reward {self.name!r} needs images [B, H, W, C>=3] in [0, 1], got {tuple(images.shape)}")
        return checked_result(self.name, "images", images, prompts, metadata, self._score)

    @abstractmethod
    def _score(self, images: torch.Tensor, prompts: list[str],
               metadata: Optional[Sequence[dict]]) -> RewardResult | torch.Tensor:
        """Scores of a checked batch (a RewardResult, or just the ``[B]`` scores)."""


def merge_results(parts: Sequence[RewardResult]) -> RewardResult:
    """One result from the results of consecutive chunks: scores concatenated, per-sample details concatenated
    (lists and ``[b]`` tensors alike; a detail missing from a chunk is dropped)."""
    scores = torch.cat([torch.as_tensor(p.scores, dtype=torch.float32).reshape(-1).cpu() for p in parts])
    keys = [k for k in parts[0].details if all(k in p.details for p in parts)] if parts else []
    details = {}
    for k in keys:
        values = [p.details[k] for p in parts]
        details[k] = (torch.cat([v.detach().cpu().reshape(-1) for v in values])
                      if all(isinstance(v, torch.Tensor) for v in values) else [x for v in values for x in v])
    return RewardResult(scores=scores, details=details)


class TorchReward(RewardBackend):
    """A reward computed by torch modules.

    ``model`` holds every weight of the scorer as one ``nn.Module`` (eval mode, no gradients), so a host such as
    ComfyUI's model management can move or offload it as one piece; scoring runs on whatever device ``model`` sits
    on at that moment. ``dtype`` is the compute dtype of the towers (preprocessing stays float32). Batches are
    scored in chunks of ``batch_size`` images under ``torch.inference_mode()``.

    Subclasses implement :meth:`_score_batch` for one chunk: ``images`` ``[b, H, W, C]`` float32 in ``[0, 1]`` on
    :attr:`device`.
    """

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype = torch.float32, batch_size: int = 16):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model.eval().requires_grad_(False)
        self.dtype = dtype
        self.batch_size = int(batch_size)

    @property
    def device(self) -> torch.device:
        for tensor in self.model.parameters():
            return tensor.device
        for tensor in self.model.buffers():
            return tensor.device
        return torch.device("cpu")

    def _score(self, images: torch.Tensor, prompts: list[str],
               metadata: Optional[Sequence[dict]]) -> RewardResult:
        device = self.device
        parts = []
        with torch.inference_mode():
            for start in range(0, images.shape[0], self.batch_size):
                stop = start + self.batch_size
                chunk = images[start:stop].to(device=device, dtype=torch.float32)
                meta = None if metadata is None else list(metadata[start:stop])
                result = self._score_batch(chunk, prompts[start:stop], meta)
                parts.append(result if isinstance(result, RewardResult) else RewardResult(scores=result))
        return merge_results(parts)

    @abstractmethod
    def _score_batch(self, images: torch.Tensor, prompts: list[str],
                     metadata: Optional[list[dict]]) -> RewardResult | torch.Tensor:
        """Scores ``[b]`` of one chunk ``images`` ``[b, H, W, C]`` float32 on :attr:`device`."""
