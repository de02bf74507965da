"""The LAION aesthetic predictor v2 ("improved aesthetic predictor", ``sac+logos+ava1-l14-linearMSE.pth``).

score = head(e), ``e`` the L2-normalised projected image embedding of OpenAI CLIP ViT-L/14 (768-d), ``head`` the
predictor's MLP::

    Linear(768, 1024), Dropout(0.2), Linear(1024, 128), Dropout(0.2), Linear(128, 64), Dropout(0.1),
    Linear(64, 16), Linear(16, 1)

with no activations (upstream's ReLUs are commented out), so in eval mode the head is one affine map. The score is
the raw output, on a ~1-10 scale (flow_grpo's convention); no prompt is used; no details.

Files (under ``models/reward_models/``): the head (``.pth`` read with ``weights_only=True``, or ``.safetensors``;
keys ``layers.{0,2,4,6,7}.{weight,bias}``) and, NEXT TO IT, the CLIP backbone folder ``clip-vit-large-patch14``
(a transformers ``save_pretrained`` folder, as for ``clip_score``). The head input size follows the backbone's
``projection_dim``. Only the vision tower and its projection are kept (the text tower is dropped after loading).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .base import TorchReward
from .hf_clip import CLIP_L14_SOURCE, ClipImageConfig, load_clip_model, read_image_config
from .registry import RewardSpec
from .weights import find_weights, load_state_dict, load_strict

__all__ = ["AestheticHead", "AestheticModel", "AestheticReward", "load_aesthetic_head", "build_aesthetic",
           "AESTHETIC_HEAD", "AESTHETIC_BACKBONE", "AESTHETIC_SOURCE", "SPECS"]

AESTHETIC_HEAD = "sac+logos+ava1-l14-linearMSE.pth"
AESTHETIC_BACKBONE = "clip-vit-large-patch14"
AESTHETIC_SOURCE = ("https://github.com/christophschuhmann/improved-aesthetic-predictor (the head file; put the "
                    f"CLIP ViT-L/14 folder '{AESTHETIC_BACKBONE}' from {CLIP_L14_SOURCE} next to it)")


class AestheticHead(nn.Module):
    """The predictor's MLP (``layers`` as upstream, so state-dict keys match): ``[N, in_features]`` -> ``[N]``."""

    def __init__(self, in_features: int = 768):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(in_features, 1024), nn.Dropout(0.2), nn.Linear(1024, 128),
                                    nn.Dropout(0.2), nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16),
                                    nn.Linear(16, 1))

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.layers(embeddings).squeeze(-1)


class AestheticModel(nn.Module):
    """Every weight of the scorer: CLIP's vision tower, its projection and the head."""

    def __init__(self, vision_model: nn.Module, visual_projection: nn.Module, head: AestheticHead):
        super().__init__()
        self.vision_model, self.visual_projection, self.head = vision_model, visual_projection, head

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``pixel_values`` ``[B, 3, S, S]`` -> scores ``[B]`` float32 (head in its own dtype)."""
        pooled = self.vision_model(pixel_values=pixel_values).pooler_output
        embedding = nn.functional.normalize(self.visual_projection(pooled).float(), dim=-1)
        head_dtype = self.head.layers[0].weight.dtype
        return self.head(embedding.to(head_dtype)).float()


class AestheticReward(TorchReward):
    """The aesthetic predictor's raw score (~1-10) of each image."""

    name = "aesthetic"
    needs_prompt = False

    def __init__(self, model: AestheticModel, image_config: ClipImageConfig, dtype: torch.dtype = torch.float32,
                 batch_size: int = 16):
        super().__init__(model, dtype, batch_size)
        self.image_config = image_config

    def _score_batch(self, images: torch.Tensor, prompts: list[str],
                     metadata: Optional[list[dict]]) -> torch.Tensor:
        return self.model(self.image_config(images).to(self.dtype))


def load_aesthetic_head(path: Path, in_features: int = 768) -> AestheticHead:
    """The head in ``path`` (``.pth``/``.pt`` via ``weights_only=True``, or ``.safetensors``), float32, strict:
    a file of another shape raises :class:`~.weights.WeightsFormatError` naming the mismatching keys."""
    head = AestheticHead(in_features)
    load_strict(head, load_state_dict(path), "aesthetic", Path(path))
    return head


def build_aesthetic(weights: Optional[Path], device: torch.device, dtype: torch.dtype) -> AestheticReward:
    """The predictor from the head file ``weights`` and the backbone folder ``clip-vit-large-patch14`` next to it
    (:class:`~.weights.MissingWeightsError` naming that folder when it is absent)."""
    weights = Path(weights)
    backbone = find_weights(AESTHETIC_BACKBONE, [weights.parent], reward="aesthetic", source=CLIP_L14_SOURCE,
                            kind="dir")
    clip = load_clip_model(backbone, torch.device("cpu"), dtype, "aesthetic", CLIP_L14_SOURCE)
    head = load_aesthetic_head(weights, int(clip.config.projection_dim))
    model = AestheticModel(clip.vision_model, clip.visual_projection, head).to(device)  # the text tower is dropped
    image_config = read_image_config(backbone, int(clip.config.vision_config.image_size))
    return AestheticReward(model, image_config, dtype)


SPECS = [
    RewardSpec("aesthetic", build_aesthetic,
               "LAION aesthetic predictor v2 (MLP on CLIP ViT-L/14 image embeddings): raw score, about 1-10",
               default_weights=AESTHETIC_HEAD, weights_kind="file", source=AESTHETIC_SOURCE, needs_prompt=False),
]
