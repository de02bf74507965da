"""ImageReward v1.0 (Xu et al. 2023) on transformers' BLIP classes, read from the upstream ``ImageReward.pt``.

The ``image-reward`` package cannot be installed next to current libraries (it pins timm 0.6.13 and fails to import
on transformers 5), so its model is rebuilt here from transformers' ``BlipVisionModel`` (BLIP's ViT) and
``BlipTextModel`` (BLIP's BERT text encoder with cross-attention), with the upstream weights remapped onto them.

Scoring, as upstream ``ImageReward.score``:

1. image: shortest side -> 224 (bicubic, antialiased), centre crop 224 x 224, OpenAI CLIP mean/std;
   ``v = ViT(image)`` ``[B, 197, 1024]`` (after the final LayerNorm);
2. prompt: BERT WordPiece (``bert-base-uncased`` vocabulary, lower-cased, ``[DEC]`` and ``[ENC]`` added as
   special tokens), ``[CLS] ... [SEP]`` padded / truncated to 35 tokens; position 0 stays ``[CLS]``;
3. ``h = TextEncoder(tokens, cross-attention to v with an all-ones image mask)[:, 0]`` (768-d);
4. ``r = MLP(h)``: Linear(768, 1024), Dropout(0.2), Linear(1024, 128), Dropout(0.2), Linear(128, 64),
   Dropout(0.1), Linear(64, 16), Linear(16, 1), no activations (one affine map in eval mode);
5. **score = (r - 0.16717362830052426) / 1.0333394966054072** (flow_grpo's scale: roughly zero mean, unit std
   over ImageReward's training prompts; higher is better). Details: ``raw`` = ``r`` ``[B]``.

Files (a folder under ``models/reward_models/``, default ``ImageReward/``):

* ``ImageReward.pt`` from https://huggingface.co/THUDM/ImageReward: a torch state dict of the upstream module, read
  with ``weights_only=True``. Keys: ``blip.visual_encoder.*`` (timm-style ViT), ``blip.text_encoder.*`` (BLIP's
  ``med.py`` BertModel, no pooler), ``mlp.layers.{0,2,4,6,7}.*``; ``blip.vision_proj.*``, ``blip.text_proj.*`` and
  ``blip.text_encoder.embeddings.position_ids`` are not used for scoring and are dropped; any other unknown or
  missing key is an error.
* ``vocab.txt`` (required) NEXT TO IT: the ``bert-base-uncased`` WordPiece vocabulary (30,522 lines), from
  https://huggingface.co/google-bert/bert-base-uncased; with ``[DEC]`` and ``[ENC]`` it must give exactly the
  text encoder's vocabulary size (30,524).
* ``med_config.json`` (optional, from the same HF repo): the text encoder's BertConfig. Layer counts and widths
  are read from the weights' shapes (a ``med_config.json`` that disagrees is an error); from the file come
  ``num_attention_heads`` (default: width / 64, i.e. 12), ``layer_norm_eps`` (1e-12) and ``hidden_act`` (gelu),
  plus one key of this pack, ``vision_num_attention_heads`` (default: ViT width / 64, i.e. 16 for ViT-L).
  The ViT's patch size and input size follow ``patch_embed`` and ``pos_embed`` (16 and 224 for v1.0).
"""

from __future__ import annotations

import inspect
import math
import re
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from torch import nn

from .aesthetic import AestheticHead
from .base import RewardResult, TorchReward
from .preprocess import resize_shortest_and_center_crop
from .registry import RewardSpec, require
from .weights import (MissingWeightsError, WeightsFormatError, find_weights, load_state_dict, load_strict,
                      read_json)

__all__ = ["ImageRewardModel", "ImageReward", "build_image_reward", "remap_upstream_keys", "blip_configs",
           "blip_model", "load_bert_tokenizer", "IMAGE_REWARD_WEIGHTS", "IMAGE_REWARD_SOURCE", "BERT_VOCAB_SOURCE",
           "IMAGE_REWARD_MEAN", "IMAGE_REWARD_STD", "MAX_TEXT_TOKENS", "DROPPED_UPSTREAM_KEYS", "SPECS"]

NAME = "image_reward"
IMAGE_REWARD_WEIGHTS = "ImageReward/ImageReward.pt"
IMAGE_REWARD_SOURCE = "https://huggingface.co/THUDM/ImageReward"
BERT_VOCAB_SOURCE = "https://huggingface.co/google-bert/bert-base-uncased (its vocab.txt)"
#: Upstream ``ImageReward.mean`` / ``ImageReward.std``: score = (r - mean) / std.
IMAGE_REWARD_MEAN = 0.16717362830052426
IMAGE_REWARD_STD = 1.0333394966054072
MAX_TEXT_TOKENS = 35
VISION_LAYER_NORM_EPS = 1e-6  # BLIP's ViT: partial(nn.LayerNorm, eps=1e-6)
HEAD_WIDTH = 64  # BLIP ViT-B/L and BERT-base all use 64-wide attention heads
#: Upstream keys (after the ``blip.`` prefix is stripped) that scoring does not use: the contrastive projections of
#: BLIP pre-training and BERT's position-id buffer (transformers rebuilds it).
DROPPED_UPSTREAM_KEYS = ("vision_proj.", "text_proj.", "text_encoder.embeddings.position_ids")

# BLIP ViT (timm names) -> transformers BlipVisionModel, applied to keys under "visual_encoder.".
_VISION_RENAMES = [
    (r"^cls_token$", "embeddings.class_embedding"),
    (r"^pos_embed$", "embeddings.position_embedding"),
    (r"^patch_embed\.proj\.", "embeddings.patch_embedding."),
    (r"^blocks\.(\d+)\.norm1\.", r"encoder.layers.\1.layer_norm1."),
    (r"^blocks\.(\d+)\.norm2\.", r"encoder.layers.\1.layer_norm2."),
    (r"^blocks\.(\d+)\.attn\.qkv\.", r"encoder.layers.\1.self_attn.qkv."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.projection."),
    (r"^blocks\.(\d+)\.mlp\.(fc[12])\.", r"encoder.layers.\1.mlp.\2."),
    (r"^norm\.", "post_layernorm."),
]


def remap_upstream_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Upstream ``ImageReward`` keys -> :class:`ImageRewardModel` keys: ``blip.`` is stripped, the ViT's timm names
    become transformers' ``BlipVisionModel`` names (``blip.visual_encoder.blocks.3.attn.proj.weight`` ->
    ``visual_encoder.encoder.layers.3.self_attn.projection.weight``); the text encoder (``med.py`` and
    ``BlipTextModel`` share names) and ``mlp.layers.*`` keep theirs. Keys matching no rule pass through unchanged
    (so a strict load reports them)."""
    out = {}
    for key, value in state_dict.items():
        name = key[len("blip."):] if key.startswith("blip.") else key
        if name.startswith("visual_encoder."):
            rest = name[len("visual_encoder."):]
            for pattern, replacement in _VISION_RENAMES:
                new, hits = re.subn(pattern, replacement, rest)
                if hits:
                    name = "visual_encoder." + new
                    break
        out[name] = value
    return out


class ImageRewardModel(nn.Module):
    """Every weight of the scorer: ``visual_encoder`` (``BlipVisionModel``), ``text_encoder`` (``BlipTextModel``
    with cross-attention) and ``mlp`` (the reward head, upstream's ``MLP``)."""

    def __init__(self, visual_encoder: nn.Module, text_encoder: nn.Module, mlp: AestheticHead):
        super().__init__()
        self.visual_encoder, self.text_encoder, self.mlp = visual_encoder, text_encoder, mlp

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> torch.Tensor:
        """``pixel_values`` ``[B, 3, S, S]`` (normalised), ``input_ids`` / ``attention_mask`` ``[B, T]`` -> raw head
        outputs ``r`` ``[B]`` float32."""
        image_embeds = self.visual_encoder(pixel_values=pixel_values).last_hidden_state
        image_mask = torch.ones(image_embeds.shape[:2], dtype=torch.long, device=image_embeds.device)
        text = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask,
                                 encoder_hidden_states=image_embeds, encoder_attention_mask=image_mask)
        features = text.last_hidden_state[:, 0, :]
        return self.mlp(features.to(self.mlp.layers[0].weight.dtype)).float()


class ImageReward(TorchReward):
    """ImageReward v1.0: ``(r - 0.16717362830052426) / 1.0333394966054072`` per image and prompt."""

    name = NAME
    needs_prompt = True

    def __init__(self, model: ImageRewardModel, tokenizer: Any, image_size: int, dtype: torch.dtype = torch.float32,
                 batch_size: int = 16):
        super().__init__(model, dtype, batch_size)
        self.tokenizer = tokenizer
        self.image_size = int(image_size)

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``input_ids``, ``attention_mask`` ``[B, 35]``: ``[CLS] prompt [SEP] [PAD]...``, truncated to 35."""
        tokens = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=MAX_TEXT_TOKENS,
                                return_tensors="pt")
        return tokens["input_ids"], tokens["attention_mask"]

    def _score_batch(self, images: torch.Tensor, prompts: list[str],
                     metadata: Optional[list[dict]]) -> RewardResult:
        device = images.device
        pixels = resize_shortest_and_center_crop(images, self.image_size).to(self.dtype)
        input_ids, attention_mask = self.tokenize(prompts)
        raw = self.model(pixels, input_ids.to(device), attention_mask.to(device))
        return RewardResult(scores=(raw - IMAGE_REWARD_MEAN) / IMAGE_REWARD_STD, details={"raw": raw})


def load_bert_tokenizer(vocab_file: Path) -> Any:
    """BLIP's tokenizer (``init_tokenizer``): BERT WordPiece over ``vocab_file`` (lower-cased), plus ``[DEC]`` as
    the BOS token and ``[ENC]`` as an additional special token (ids ``len(vocab)`` and ``len(vocab) + 1``)."""
    transformers = require("transformers", "transformers", NAME)
    cls = transformers.BertTokenizer
    params = inspect.signature(cls.__init__).parameters
    if "vocab_file" in params:  # transformers 4: the Python WordPiece tokenizer reads the file
        tokenizer = cls(vocab_file=str(vocab_file), do_lower_case=True)
    else:  # transformers 5: the tokenizers-backed class takes the vocabulary itself (and ignores vocab_file)
        lines = Path(vocab_file).read_text(encoding="utf-8").splitlines()
        tokenizer = cls(vocab={token: i for i, token in enumerate(lines)}, do_lower_case=True)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


def _read_med_config(folder: Path) -> dict:
    path = folder / "med_config.json"
    if not path.is_file():
        return {}
    return read_json(path, NAME)


def _shape(sd: Mapping[str, torch.Tensor], key: str, path: Path) -> tuple[int, ...]:
    if key not in sd:
        raise WeightsFormatError(f"reward {NAME!r}: {path} has no {key!r}; is this ImageReward.pt (the state dict of "
                                 f"upstream ImageReward, from {IMAGE_REWARD_SOURCE})?")
    return tuple(sd[key].shape)


def _count(sd: Mapping[str, torch.Tensor], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return len({m.group(1) for k in sd for m in [pattern.match(k)] if m})


def _heads(width: int, value: Any, what: str, path: Path) -> int:
    heads = int(value) if value is not None else max(1, width // HEAD_WIDTH)
    if heads < 1 or width % heads:
        raise WeightsFormatError(f"reward {NAME!r}: {what} = {heads} does not divide the width {width} of {path}; "
                                 "set it in med_config.json next to the weights")
    return heads


def blip_configs(sd: Mapping[str, torch.Tensor], med: dict, path: Path) -> tuple[dict, dict]:
    """``BlipVisionConfig`` and ``BlipTextConfig`` arguments from the shapes in ``sd`` (upstream keys) and the
    non-shape settings of ``med`` (the parsed ``med_config.json``, ``{}`` without one)."""
    v, t = "blip.visual_encoder.", "blip.text_encoder."
    width = _shape(sd, v + "cls_token", path)[-1]
    patch = _shape(sd, v + "patch_embed.proj.weight", path)[-1]
    grid = math.isqrt(_shape(sd, v + "pos_embed", path)[1] - 1)
    vision = dict(hidden_size=width, num_hidden_layers=_count(sd, v + "blocks."),
                  intermediate_size=_shape(sd, v + "blocks.0.mlp.fc1.weight", path)[0],
                  num_attention_heads=_heads(width, med.get("vision_num_attention_heads"),
                                             "vision_num_attention_heads", path),
                  image_size=grid * patch, patch_size=patch, hidden_act="gelu", layer_norm_eps=VISION_LAYER_NORM_EPS)
    vocab, hidden = _shape(sd, t + "embeddings.word_embeddings.weight", path)
    text = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=_count(sd, t + "encoder.layer."),
                intermediate_size=_shape(sd, t + "encoder.layer.0.intermediate.dense.weight", path)[0],
                max_position_embeddings=_shape(sd, t + "embeddings.position_embeddings.weight", path)[0])
    for key, value in text.items():
        if key in med and int(med[key]) != value:
            raise WeightsFormatError(f"reward {NAME!r}: med_config.json next to {path} says {key} = {med[key]} but the "
                                     f"weights have {value}; use the med_config.json that belongs to these weights")
    if med.get("position_embedding_type", "absolute") != "absolute":
        raise WeightsFormatError(f"reward {NAME!r}: only absolute position embeddings are supported "
                                 f"(med_config.json says {med['position_embedding_type']!r})")
    text.update(num_attention_heads=_heads(hidden, med.get("num_attention_heads"), "num_attention_heads", path),
                hidden_act=med.get("hidden_act", "gelu"), layer_norm_eps=float(med.get("layer_norm_eps", 1e-12)),
                encoder_hidden_size=width, is_decoder=True)  # is_decoder: build the cross-attention layers
    return vision, text


def blip_model(vision_args: dict, text_args: dict, **token_ids: Optional[int]) -> ImageRewardModel:
    """A randomly initialised :class:`ImageRewardModel` of :func:`blip_configs`' shapes (``token_ids``: the
    tokenizer's ``pad/bos/sep/eos_token_id`` for the text config)."""
    transformers = require("transformers", "transformers", NAME)
    text_config = transformers.BlipTextConfig(**text_args, **token_ids)
    return ImageRewardModel(transformers.BlipVisionModel(transformers.BlipVisionConfig(**vision_args)),
                            transformers.BlipTextModel(text_config, add_pooling_layer=False),
                            AestheticHead(text_args["hidden_size"]))


def build_image_reward(weights: Optional[Path], device: torch.device, dtype: torch.dtype) -> ImageReward:
    """ImageReward from ``weights`` (``ImageReward.pt``) with ``vocab.txt`` (and optionally ``med_config.json``)
    next to it. Raises :class:`~.weights.MissingWeightsError` naming a missing file,
    :class:`~.weights.WeightsFormatError` when the files do not fit together."""
    if weights is None:
        raise MissingWeightsError(NAME, IMAGE_REWARD_WEIGHTS, [], IMAGE_REWARD_SOURCE)
    weights = Path(weights)
    vocab_file = find_weights("vocab.txt", [weights.parent], reward=NAME, source=BERT_VOCAB_SOURCE)
    tokenizer = load_bert_tokenizer(vocab_file)
    upstream = load_state_dict(weights)
    vision_args, text_args = blip_configs(upstream, _read_med_config(weights.parent), weights)
    if len(tokenizer) != text_args["vocab_size"]:
        raise WeightsFormatError(f"reward {NAME!r}: {vocab_file} gives {len(tokenizer)} tokens with [DEC] and [ENC], "
                                 f"but the text encoder in {weights} has {text_args['vocab_size']}; use the "
                                 f"bert-base-uncased vocab.txt ({BERT_VOCAB_SOURCE})")
    model = blip_model(vision_args, text_args, pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, sep_token_id=tokenizer.sep_token_id,
                       eos_token_id=tokenizer.sep_token_id)
    load_strict(model, remap_upstream_keys(upstream), NAME, weights, ignore=DROPPED_UPSTREAM_KEYS)
    return ImageReward(model.to(device=device, dtype=dtype), tokenizer, vision_args["image_size"], dtype)


SPECS = [
    RewardSpec(NAME, build_image_reward,
               "ImageReward v1.0 (BLIP ViT-L + BERT cross-attention + MLP head): (r - 0.1672) / 1.0333",
               default_weights=IMAGE_REWARD_WEIGHTS, weights_kind="file",
               source=f"{IMAGE_REWARD_SOURCE} (ImageReward.pt, med_config.json) and vocab.txt from "
                      f"{BERT_VOCAB_SOURCE}, in the same folder",
               needs_prompt=True),
]
