"""HPSv2 and HPSv2.1 (Human Preference Score v2, Wu et al. 2023) on open_clip.

Model: open_clip ``ViT-H-14`` (:data:`HPS_ARCH`) with every weight from the official HPS checkpoint
(``HPS_v2_compressed.pt`` / ``HPS_v2.1_compressed.pt`` from https://huggingface.co/xswu/HPSv2, a full
``{"state_dict": ...}`` in fp16, read with ``torch.load(weights_only=True)``; a ``.safetensors`` conversion with the
same keys works too). The LAION base weights that hpsv2 loads first are not needed: the HPS file replaces all of them.

Score: the raw cosine ``cos(f_img, f_txt)`` of the L2-normalised image and prompt embeddings (no logit scale, no
x100; typically 0.2-0.35), as flow_grpo and DanceGRPO train on it. The HPSv2 benchmark reports 100x this.

Preprocessing (hpsv2's ``light_augmentation`` evaluation transform): scale the longest side to the model's image
size (224) with bicubic, antialiased resizing, zero-pad centred to a square, OpenAI CLIP normalisation
(:func:`~.preprocess.resize_longest_and_pad`). Prompts: open_clip's CLIP BPE tokenizer (lower-cased, cleaned,
77 tokens, truncated with EOT). On 8-bit images this equals the reference ``hpsv2.img_score.score`` to float32
rounding, except that images whose longest side is already 224 but are not square are padded here, where hpsv2
leaves them non-square and fails.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from .open_clip_models import OpenClipReward, build_open_clip, image_size_of
from .preprocess import resize_longest_and_pad
from .registry import RewardSpec, require

__all__ = ["HPS_ARCH", "HPS_SOURCE", "load_hps", "SPECS"]

#: open_clip architecture of the HPS checkpoints (tests set a tiny registered architecture instead).
HPS_ARCH = "ViT-H-14"
HPS_SOURCE = "https://huggingface.co/xswu/HPSv2"


def load_hps(path: Path | str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
             arch: Optional[str] = None, name: str = "hpsv2", batch_size: int = 16) -> OpenClipReward:
    """The HPS scorer with the weights file ``path`` on ``device`` in ``dtype``. ``arch`` is the open_clip
    architecture name (default :data:`HPS_ARCH`, read at call time)."""
    arch = arch or HPS_ARCH
    model = build_open_clip(arch, Path(path), name)
    tokenizer = require("open_clip", "open_clip_torch>=3,<4", name).get_tokenizer(arch)
    size = image_size_of(model)
    return OpenClipReward(name, model.to(device=device, dtype=dtype), tokenizer,
                          lambda images: resize_longest_and_pad(images, size), dtype=dtype, batch_size=batch_size)


def _builder(name: str):
    def build(weights: Optional[Path], device: torch.device, dtype: torch.dtype) -> OpenClipReward:
        return load_hps(weights, device, dtype, name=name)

    return build


SPECS = [
    RewardSpec(name="hpsv2", build=_builder("hpsv2"),
               description="HPSv2 human preference score (open_clip ViT-H-14): raw image-prompt cosine.",
               default_weights="HPS_v2_compressed.pt", weights_kind="file", source=HPS_SOURCE, needs_prompt=True),
    RewardSpec(name="hpsv2.1", build=_builder("hpsv2.1"),
               description="HPSv2.1 human preference score (open_clip ViT-H-14): raw image-prompt cosine.",
               default_weights="HPS_v2.1_compressed.pt", weights_kind="file", source=HPS_SOURCE, needs_prompt=True),
]
