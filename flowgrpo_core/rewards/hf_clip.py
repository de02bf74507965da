"""Rewards on a transformers ``CLIPModel`` read from a local folder: PickScore and CLIP score.

Both score an image against its prompt by the cosine of the projected, L2-normalised CLIP embeddings
(``cos = <e_img, e_txt>``), scaled the way flow_grpo does:

* ``pickscore``: ``exp(logit_scale) * cos / 26``; PickScore v1 has ``exp(logit_scale)`` ~ 100, so ~ 0-1;
* ``clip_score``: ``exp(logit_scale) * cos / 30`` (= ``diag(logits_per_image) / 30``), ~ 0-1 for OpenAI CLIP L/14.

Details of both: ``cosine`` (the raw cosine, ``[B]``).

A model folder is what ``save_pretrained`` writes (``config.json`` + ``model.safetensors`` or
``pytorch_model.bin``). Optional companions in the same folder:

* ``preprocessor_config.json``: resize / crop size, mean and std (else the vision tower's ``image_size`` and
  OpenAI CLIP's mean/std). Images are resized (bicubic, antialiased) so the shortest side is the resize size,
  centre-cropped and normalised, on tensors (see :mod:`.preprocess`).
* tokenizer files (``tokenizer.json``, or ``vocab.json`` + ``merges.txt``); without them the OpenAI CLIP BPE
  tokenizer is generated from the vocabulary file bundled with ``open_clip_torch`` (the same tokenizer every
  OpenAI/LAION CLIP uses). Prompts are padded to 77 tokens and truncated.

Loading never downloads (``local_files_only=True``); transformers is imported only when a backend is built.
"""

from __future__ import annotations

import gzip
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from .base import RewardResult, TorchReward
from .preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, normalize, resize_shortest_and_center_crop
from .registry import RewardSpec, require
from .weights import MissingWeightsError, WeightsFormatError, find_weights, read_json

__all__ = ["ClipImageConfig", "read_image_config", "openai_bpe_path", "generated_clip_tokenizer",
           "load_clip_tokenizer", "load_clip_model", "pooled", "ClipSimilarityReward", "build_pickscore",
           "build_clip_score", "PICKSCORE_SOURCE", "CLIP_L14_SOURCE", "SPECS"]

PICKSCORE_SOURCE = ("https://huggingface.co/yuvalkirstain/PickScore_v1 (the processor/tokenizer files are those of "
                    "https://huggingface.co/laion/CLIP-ViT-H-14-laion2B-s32B-b79K)")
CLIP_L14_SOURCE = "https://huggingface.co/openai/clip-vit-large-patch14"
OPENAI_BPE = "bpe_simple_vocab_16e6.txt.gz"
MAX_TEXT_TOKENS = 77


@dataclass(frozen=True)
class ClipImageConfig:
    """CLIP image preprocessing: shortest side -> ``resize``, centre crop ``crop`` x ``crop``, ``(x - mean) / std``."""

    resize: int
    crop: int
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """``images`` ``[B, H, W, C]`` in ``[0, 1]`` -> pixel values ``[B, 3, crop, crop]`` float32."""
        if self.resize == self.crop:
            return resize_shortest_and_center_crop(images, self.crop, self.mean, self.std)
        square = resize_shortest_and_center_crop(images, self.resize, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
        top = (self.resize - self.crop) // 2
        return normalize(square[..., top:top + self.crop, top:top + self.crop], self.mean, self.std)


def _side(value: Any, path: Path, key: str) -> int:
    """A size of ``preprocessor_config.json``: ``n``, ``{"shortest_edge": n}`` or (crops only) a square
    ``{"height": n, "width": n}``."""
    if isinstance(value, dict):
        square = key == "crop_size" and value.get("height") == value.get("width")
        value = value.get("shortest_edge", value.get("height") if square else None)
    if not isinstance(value, int) or value < 1:
        raise WeightsFormatError(f"{path}: unsupported {key!r} (this loader resizes the shortest side and takes a "
                                 "square centre crop: use n or {'shortest_edge': n}, and a square crop_size)")
    return value


def read_image_config(folder: Path, image_size: int) -> ClipImageConfig:
    """The preprocessing of ``folder/preprocessor_config.json`` (``size``, ``crop_size``, ``image_mean``,
    ``image_std``); without that file: ``image_size`` (the vision tower's) and OpenAI CLIP's mean/std."""
    path = Path(folder) / "preprocessor_config.json"
    if not path.is_file():
        return ClipImageConfig(image_size, image_size)
    cfg = read_json(path, "clip")
    crop = _side(cfg.get("crop_size", image_size), path, "crop_size")
    resize = _side(cfg.get("size", crop), path, "size")
    mean, std = tuple(cfg.get("image_mean", OPENAI_CLIP_MEAN)), tuple(cfg.get("image_std", OPENAI_CLIP_STD))
    if resize < crop or len(mean) != 3 or len(std) != 3:
        raise WeightsFormatError(f"{path}: unsupported preprocessing (size {resize} smaller than crop {crop}, "
                                 f"or mean/std not 3 values: {mean}, {std})")
    return ClipImageConfig(resize, crop, tuple(map(float, mean)), tuple(map(float, std)))


def openai_bpe_path() -> Optional[Path]:
    """The OpenAI CLIP BPE vocabulary bundled with ``open_clip_torch`` (found without importing it), or None."""
    spec = importlib.util.find_spec("open_clip")
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = Path(location) / OPENAI_BPE
        if path.is_file():
            return path
    return None


def _bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP's byte -> printable character table, in byte order of the vocabulary."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in keep]
    return [chr(b) for b in keep] + [chr(256 + i) for i in range(len(shifted))]


def generated_clip_tokenizer(bpe_path: Path, reward: str = "clip"):
    """OpenAI CLIP's tokenizer as a transformers ``CLIPTokenizer`` built from ``bpe_path``: vocabulary = the 256
    byte characters, the same with ``</w>``, the 48,894 merged tokens, ``<|startoftext|>``, ``<|endoftext|>``
    (49,408 ids; pad = ``<|endoftext|>`` as in OpenAI's release)."""
    transformers = require("transformers", "transformers", reward)
    with gzip.open(bpe_path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]
    chars = _bytes_to_unicode()
    words = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    return transformers.CLIPTokenizer(vocab={w: i for i, w in enumerate(words)}, merges=merges,
                                      model_max_length=MAX_TEXT_TOKENS)


def load_clip_tokenizer(folder: Path, reward: str, source: str):
    """The tokenizer saved in ``folder`` (``tokenizer.json`` or ``vocab.json`` + ``merges.txt``), else the
    generated OpenAI CLIP tokenizer; :class:`MissingWeightsError` when neither is available."""
    folder = Path(folder)
    if (folder / "tokenizer.json").is_file() or all((folder / f).is_file() for f in ("vocab.json", "merges.txt")):
        transformers = require("transformers", "transformers", reward)
        return transformers.CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    bpe = openai_bpe_path()
    if bpe is None:
        raise MissingWeightsError(reward, "tokenizer.json", [folder], f"{source}, or install open_clip_torch "
                                  "(its bundled BPE vocabulary is used when the folder has no tokenizer files)")
    return generated_clip_tokenizer(bpe, reward)


def load_clip_model(folder: Path, device: torch.device, dtype: torch.dtype, reward: str, source: str):
    """``CLIPModel.from_pretrained(folder, local_files_only=True)`` in ``dtype`` on ``device``, eval mode; a folder
    without ``config.json`` raises :class:`MissingWeightsError`, one that is not a complete CLIP model
    :class:`WeightsFormatError`."""
    folder = Path(folder)
    config_path = find_weights("config.json", [folder], reward=reward, source=source)
    model_type = read_json(config_path, reward).get("model_type")
    if model_type != "clip":
        raise WeightsFormatError(f"reward {reward!r}: {folder} holds a {model_type!r} model, not a CLIP model "
                                 f"(config.json model_type must be 'clip'). Get the weights from {source}.")
    transformers = require("transformers", "transformers", reward)
    try:
        model, info = transformers.CLIPModel.from_pretrained(str(folder), local_files_only=True,
                                                             output_loading_info=True)
    except Exception as e:  # OSError (no weights file), SafetensorError, torch.load errors ...
        raise WeightsFormatError(f"reward {reward!r}: cannot load the CLIP model in {folder}: "
                                 f"{type(e).__name__}: {str(e).splitlines()[0][:300]}") from None
    missing = sorted(info.get("missing_keys") or [])
    if missing or info.get("mismatched_keys"):
        raise WeightsFormatError(f"reward {reward!r}: the weights in {folder} do not fit its config.json "
                                 f"({len(missing)} missing keys, e.g. {missing[:3]}; mismatched: "
                                 f"{sorted(info.get('mismatched_keys') or [])[:3]})")
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def pooled(output: Any) -> torch.Tensor:
    """The projected embedding from ``get_image_features`` / ``get_text_features`` (a tensor in transformers 4, an
    output object with ``pooler_output`` in transformers 5)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class ClipSimilarityReward(TorchReward):
    """``exp(logit_scale) * cos(e_img, e_txt) / divisor`` of each image with its prompt; details ``cosine``."""

    needs_prompt = True

    def __init__(self, name: str, model: torch.nn.Module, tokenizer: Any, image_config: ClipImageConfig,
                 divisor: float, dtype: torch.dtype = torch.float32, batch_size: int = 16):
        super().__init__(model, dtype, batch_size)
        self.name, self.tokenizer, self.image_config, self.divisor = name, tokenizer, image_config, float(divisor)
        self.max_tokens = min(MAX_TEXT_TOKENS, int(model.config.text_config.max_position_embeddings))

    def _score_batch(self, images: torch.Tensor, prompts: list[str],
                     metadata: Optional[list[dict]]) -> RewardResult:
        pixels = self.image_config(images).to(self.dtype)
        text = self.tokenizer(prompts, padding="max_length", max_length=self.max_tokens, truncation=True,
                              return_tensors="pt")
        e_img = pooled(self.model.get_image_features(pixel_values=pixels)).float()
        e_txt = pooled(self.model.get_text_features(input_ids=text["input_ids"].to(images.device),
                                                    attention_mask=text["attention_mask"].to(images.device))).float()
        cos = (torch.nn.functional.normalize(e_img, dim=-1) * torch.nn.functional.normalize(e_txt, dim=-1)).sum(-1)
        scores = self.model.logit_scale.detach().float().exp() * cos / self.divisor
        return RewardResult(scores=scores, details={"cosine": cos})


def _build(name: str, folder: Path, device: torch.device, dtype: torch.dtype, divisor: float,
           source: str) -> ClipSimilarityReward:
    model = load_clip_model(folder, device, dtype, name, source)
    tokenizer = load_clip_tokenizer(folder, name, source)
    image_config = read_image_config(folder, int(model.config.vision_config.image_size))
    return ClipSimilarityReward(name, model, tokenizer, image_config, divisor, dtype)


def build_pickscore(weights: Optional[Path], device: torch.device, dtype: torch.dtype) -> ClipSimilarityReward:
    """PickScore v1 from its model folder ``weights``: ``exp(logit_scale) * cos / 26``."""
    return _build("pickscore", Path(weights), device, dtype, 26.0, PICKSCORE_SOURCE)


def build_clip_score(weights: Optional[Path], device: torch.device, dtype: torch.dtype) -> ClipSimilarityReward:
    """CLIP score from a CLIP model folder ``weights``: ``exp(logit_scale) * cos / 30``."""
    return _build("clip_score", Path(weights), device, dtype, 30.0, CLIP_L14_SOURCE)


SPECS = [
    RewardSpec("pickscore", build_pickscore,
               "PickScore v1 (CLIP ViT-H/14 fine-tuned on Pick-a-Pic): 100*cos(image, prompt)/26, about 0-1",
               default_weights="PickScore_v1", weights_kind="dir", source=PICKSCORE_SOURCE, needs_prompt=True),
    RewardSpec("clip_score", build_clip_score,
               "CLIP score (OpenAI CLIP ViT-L/14 by default): 100*cos(image, prompt)/30, about 0-1",
               default_weights="clip-vit-large-patch14", weights_kind="dir", source=CLIP_L14_SOURCE,
               needs_prompt=True),
]
