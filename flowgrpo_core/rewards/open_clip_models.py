"""open_clip scorers: a CLIP model scoring image-prompt agreement by cosine similarity (HPSv2 in :mod:`.hps`, and a
plain open_clip CLIP score here).

Score convention (both backends): the raw cosine

    score = cos(f_img, f_txt) = <f_img / |f_img|, f_txt / |f_txt|>,  in [-1, 1]

with ``f_img = model.encode_image(preprocess(image))`` and ``f_txt = model.encode_text(tokenize(prompt))``. No logit
scale, no clipping: flow_grpo and DanceGRPO train on HPS' raw cosine; for the CLIP score this differs from Hessel et
al.'s ``2.5 * max(cos, 0)`` and torchmetrics' ``100 * max(cos, 0)`` by that affine map only. ``details["cosine"]``
holds the same values.

Weights are read with the pack's safe loaders (safetensors, or ``torch.load(weights_only=True)``) into an open_clip
model built from its architecture config; nothing is downloaded. open_clip itself is imported inside the loaders.

``clip_score_open_clip`` reads an open_clip folder as published on the Hugging Face Hub (``open_clip_config.json``
with ``model_cfg`` and ``preprocess_cfg``, plus ``open_clip_model.safetensors`` or ``open_clip_pytorch_model.bin``),
e.g. https://huggingface.co/laion/CLIP-ViT-H-14-laion2B-s32B-b79K. Its images are preprocessed as its
``preprocess_cfg`` says (size, mean, std; ``resize_mode`` shortest = resize + centre-crop, longest = resize + pad,
squash = plain resize), always with bicubic, antialiased tensor resizing (PIL's resize in open_clip's own transform
differs by about 0.01-0.04 in normalised units).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Optional

import torch

from .base import RewardResult, TorchReward
from .preprocess import (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, resize_longest_and_pad, resize_shortest_and_center_crop,
                         resize_squash)
from .registry import RewardSpec, require
from .weights import (MissingWeightsError, WeightsFormatError, find_weights, load_state_dict, load_strict,
                      read_json)

__all__ = ["OpenClipReward", "build_open_clip", "image_size_of", "load_open_clip_dir", "clip_preprocessor",
           "OPEN_CLIP_SOURCE", "OPEN_CLIP_DEFAULT_DIR", "OPEN_CLIP_WEIGHT_NAMES", "SPECS"]

OPEN_CLIP_SOURCE = "https://huggingface.co/laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
OPEN_CLIP_DEFAULT_DIR = "CLIP-ViT-H-14-laion2B-s32B-b79K"
#: weight file names looked for in an open_clip folder, in this order.
OPEN_CLIP_WEIGHT_NAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")

Preprocess = Callable[[torch.Tensor], torch.Tensor]


class OpenClipReward(TorchReward):
    """Cosine between the open_clip image and text embeddings of each image and its prompt (see the module
    docstring). ``preprocess`` maps IMAGE ``[b, H, W, C]`` to normalised ``[b, 3, S, S]`` float32; ``tokenizer``
    maps a list of prompts to ``[b, L]`` token ids."""

    needs_prompt = True

    def __init__(self, name: str, model: torch.nn.Module, tokenizer: Callable, preprocess: Preprocess,
                 dtype: torch.dtype = torch.float32, batch_size: int = 16):
        super().__init__(model, dtype=dtype, batch_size=batch_size)
        self.name = name
        self.tokenizer = tokenizer
        self.preprocess = preprocess

    def _score_batch(self, images: torch.Tensor, prompts: list[str], metadata) -> RewardResult:
        device = self.device
        pixels = self.preprocess(images).to(device=device, dtype=self.dtype)
        tokens = self.tokenizer(prompts).to(device)
        f_img = self.model.encode_image(pixels, normalize=True).float()
        f_txt = self.model.encode_text(tokens, normalize=True).float()
        cosine = (f_img * f_txt).sum(dim=-1)
        return RewardResult(scores=cosine, details={"cosine": cosine})


def image_size_of(model: torch.nn.Module) -> int:
    """The (square) input size of an open_clip model's vision tower."""
    size = getattr(model.visual, "image_size", None)
    if isinstance(size, (tuple, list)):
        if len(set(size)) != 1:
            raise WeightsFormatError(f"non-square open_clip image size {tuple(size)} is not supported")
        size = size[0]
    if not isinstance(size, int):
        raise WeightsFormatError("this open_clip model does not state its image size")
    return size


class _DropRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No pretrained weights loaded")


def build_open_clip(arch: str, path: Path, reward: str) -> torch.nn.Module:
    """The open_clip model ``arch`` (a registered architecture name or ``local-dir:<folder>``) on the CPU in
    float32, with every weight read from ``path`` (strict: missing, unexpected or misshaped keys raise
    :class:`~.weights.WeightsFormatError` naming the file)."""
    open_clip = require("open_clip", "open_clip_torch>=3,<4", reward)
    state_dict = load_state_dict(path)
    quiet = _DropRandomInitWarning()
    logging.getLogger().addFilter(quiet)  # the weights are loaded just below, not "initialized randomly"
    try:
        model = open_clip.create_model(arch, pretrained=None, load_weights=False, device="cpu")
    except RuntimeError as e:
        raise WeightsFormatError(f"reward {reward!r}: open_clip has no architecture {arch!r} ({e})") from None
    finally:
        logging.getLogger().removeFilter(quiet)
    load_strict(model, state_dict, reward, path)
    return model


def clip_preprocessor(cfg: dict) -> Preprocess:
    """IMAGE ``[b, H, W, C]`` -> ``[b, 3, S, S]`` as an open_clip ``preprocess_cfg`` says (bicubic resizing)."""
    size = cfg.get("size", 224)
    size = size[0] if isinstance(size, (tuple, list)) and len(set(size)) == 1 else size
    if not isinstance(size, int):
        raise WeightsFormatError(f"non-square open_clip preprocessing size {size!r} is not supported")
    mean = tuple(cfg.get("mean") or OPENAI_CLIP_MEAN)
    std = tuple(cfg.get("std") or OPENAI_CLIP_STD)
    mode = cfg.get("resize_mode", "shortest")
    if mode == "shortest":
        return lambda images: resize_shortest_and_center_crop(images, size, mean, std)
    if mode == "longest":
        return lambda images: resize_longest_and_pad(images, size, mean, std)
    if mode == "squash":
        return lambda images: resize_squash(images, size, mean, std)
    raise WeightsFormatError(f"open_clip resize_mode {mode!r} is not supported (shortest, longest, squash)")


def load_open_clip_dir(folder: Path, reward: str, source: str = OPEN_CLIP_SOURCE):
    """``(model, tokenizer, preprocess_cfg)`` of an open_clip folder (``open_clip_config.json`` + weights, see
    :data:`OPEN_CLIP_WEIGHT_NAMES`). Raises :class:`~.weights.MissingWeightsError` naming the folder and the missing
    file."""
    folder = Path(folder)
    config_path = find_weights("open_clip_config.json", [folder], reward=reward, source=source)
    weights = [folder / n for n in OPEN_CLIP_WEIGHT_NAMES if (folder / n).is_file()]
    if not weights:
        raise MissingWeightsError(reward, OPEN_CLIP_WEIGHT_NAMES[0], [folder], source)
    config = read_json(config_path, reward)
    try:
        model_cfg = config["model_cfg"]
    except (KeyError, TypeError) as e:
        raise WeightsFormatError(f"{config_path} is not an open_clip config with a 'model_cfg' ({e})") from None
    if "hf_model_name" in model_cfg.get("text_cfg", {}):
        raise WeightsFormatError(f"{config_path}: open_clip models with a Hugging Face text tower are not "
                                 "supported (building one fetches its config from the hub)")
    model = build_open_clip(f"local-dir:{folder}", weights[0], reward)
    open_clip = require("open_clip", "open_clip_torch>=3,<4", reward)
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    preprocess_cfg = dict(config.get("preprocess_cfg") or {})
    preprocess_cfg.setdefault("size", image_size_of(model))
    return model, tokenizer, preprocess_cfg


def _build_clip_score(weights: Optional[Path], device: torch.device, dtype: torch.dtype) -> OpenClipReward:
    model, tokenizer, cfg = load_open_clip_dir(weights, "clip_score_open_clip")
    return OpenClipReward("clip_score_open_clip", model.to(device=device, dtype=dtype), tokenizer,
                          clip_preprocessor(cfg), dtype=dtype)


SPECS = [
    RewardSpec(
        name="clip_score_open_clip",
        build=_build_clip_score,
        description="CLIP score on an open_clip model folder: raw cosine between image and prompt embeddings.",
        default_weights=OPEN_CLIP_DEFAULT_DIR,
        weights_kind="dir",
        source=OPEN_CLIP_SOURCE,
        needs_prompt=True,
    ),
]
