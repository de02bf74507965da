"""A tiny random ImageReward in the upstream file format: ``ImageReward.pt`` is ``torch.save`` of a state dict with
the keys of upstream ``ImageReward`` (``blip.visual_encoder.*`` timm-style ViT, ``blip.text_encoder.*`` BLIP
``med.py`` BERT with cross-attention, ``blip.vision_proj/text_proj``, ``mlp.layers.{0,2,4,6,7}``), written from
random tensors of the right shapes (no model code of the pack is used), plus a small BERT ``vocab.txt`` and,
optionally, a ``med_config.json`` like the one on the Hub.

The real model is ViT-L/16 at 224 px (width 1024, 24 blocks) and BERT-base (768, 12 layers, vocab 30524); the tiny
one keeps the 224 px / patch 16 image path and shrinks the widths and depths.
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

__all__ = ["TinyImageRewardConfig", "TINY_WORDS", "tiny_vocab", "tiny_upstream_state_dict",
           "build_tiny_image_reward"]

#: BERT's special tokens (the real vocab has them at 0, 100-103; position does not matter to the tokenizer).
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
TINY_WORDS = (
    "a an the of in on at with and or to from by for is are was this that there it its his her their one two three "
    "four five red green blue yellow black white orange purple pink brown gray golden silver dark bright small big "
    "large tiny old young new happy sad cute beautiful ugly photo picture painting drawing sketch render image "
    "portrait landscape cat dog bird horse fish cow sheep lion tiger bear mouse rabbit fox wolf car bus train plane "
    "boat bike house tree flower grass sky cloud sun moon star mountain river lake sea beach forest city street road "
    "bridge castle table chair cup bottle book phone computer man woman child boy girl people person face hand eye "
    "hat shirt dress shoe sitting standing running flying eating holding wearing looking under over behind near "
    "inside outside top bottom left right front back high low sign says word text letter night day morning winter "
    "summer snow rain fire water stone wood glass metal gold style art oil watercolor digital anime realistic "
    "detailed sharp blurry 4k hd"
).split()


def tiny_vocab() -> list[str]:
    """The tiny ``vocab.txt`` lines: specials, whole words, single characters and their ``##`` continuations (so
    WordPiece can spell any lower-case ASCII word), punctuation, digits."""
    chars = list(string.ascii_lowercase + string.digits)
    lines = SPECIALS + TINY_WORDS + chars + ["##" + c for c in chars] + list(".,!?'\"-:;()")
    return list(dict.fromkeys(lines))  # unique lines, like a real vocab ("a" is a word and a character)


@dataclass(frozen=True)
class TinyImageRewardConfig:
    """Shapes of the tiny model. ``vision_heads`` / ``text_heads`` are only written into ``med_config.json``
    (``vision_num_attention_heads`` / ``num_attention_heads``) when ``med_config`` is true; without the file the
    loader assumes 64-wide heads (2 heads at width 128)."""

    vision_width: int = 128
    vision_layers: int = 2
    vision_mlp: int = 256
    patch: int = 16
    image_size: int = 224
    text_width: int = 128
    text_layers: int = 2
    text_intermediate: int = 256
    max_positions: int = 40
    med_config: bool = False
    vision_heads: int = 4
    text_heads: int = 4
    seed: int = 0


def tiny_upstream_state_dict(config: TinyImageRewardConfig, vocab_size: int) -> dict[str, torch.Tensor]:
    """Random tensors under the upstream ``ImageReward`` keys (fp32). Linear weights ~ N(0, 1/fan_in), biases and
    LayerNorm offsets ~ N(0, 0.05), LayerNorm scales ~ 1 + N(0, 0.1), embeddings ~ N(0, 0.5)."""
    gen = torch.Generator().manual_seed(config.seed)
    sd: dict[str, torch.Tensor] = {}

    def linear(name: str, out_features: int, in_features: int) -> None:
        sd[name + ".weight"] = torch.randn(out_features, in_features, generator=gen) / in_features ** 0.5
        sd[name + ".bias"] = torch.randn(out_features, generator=gen) * 0.05

    def layer_norm(name: str, width: int) -> None:
        sd[name + ".weight"] = 1 + torch.randn(width, generator=gen) * 0.1
        sd[name + ".bias"] = torch.randn(width, generator=gen) * 0.05

    w, p, n = config.vision_width, config.patch, (config.image_size // config.patch) ** 2
    v = "blip.visual_encoder."
    sd[v + "cls_token"] = torch.randn(1, 1, w, generator=gen) * 0.5
    sd[v + "pos_embed"] = torch.randn(1, n + 1, w, generator=gen) * 0.5
    sd[v + "patch_embed.proj.weight"] = torch.randn(w, 3, p, p, generator=gen) / (3 * p * p) ** 0.5
    sd[v + "patch_embed.proj.bias"] = torch.randn(w, generator=gen) * 0.05
    for i in range(config.vision_layers):
        b = f"{v}blocks.{i}."
        layer_norm(b + "norm1", w)
        linear(b + "attn.qkv", 3 * w, w)
        linear(b + "attn.proj", w, w)
        layer_norm(b + "norm2", w)
        linear(b + "mlp.fc1", config.vision_mlp, w)
        linear(b + "mlp.fc2", w, config.vision_mlp)
    layer_norm(v + "norm", w)

    h, t = config.text_width, "blip.text_encoder."
    sd[t + "embeddings.word_embeddings.weight"] = torch.randn(vocab_size, h, generator=gen) * 0.5
    sd[t + "embeddings.position_embeddings.weight"] = torch.randn(config.max_positions, h, generator=gen) * 0.5
    layer_norm(t + "embeddings.LayerNorm", h)
    sd[t + "embeddings.position_ids"] = torch.arange(config.max_positions).expand(1, -1).clone()
    for i in range(config.text_layers):
        b = f"{t}encoder.layer.{i}."
        for part, kv_width in (("attention", h), ("crossattention", w)):
            linear(f"{b}{part}.self.query", h, h)
            linear(f"{b}{part}.self.key", h, kv_width)
            linear(f"{b}{part}.self.value", h, kv_width)
            linear(f"{b}{part}.output.dense", h, h)
            layer_norm(f"{b}{part}.output.LayerNorm", h)
        linear(b + "intermediate.dense", config.text_intermediate, h)
        linear(b + "output.dense", h, config.text_intermediate)
        layer_norm(b + "output.LayerNorm", h)
    linear("blip.vision_proj", 256, w)  # BLIP pre-training projections: in the real file, unused by the score
    linear("blip.text_proj", 256, h)
    for index, (out_features, in_features) in zip((0, 2, 4, 6, 7),
                                                  ((1024, h), (128, 1024), (64, 128), (16, 64), (1, 16))):
        linear(f"mlp.layers.{index}", out_features, in_features)
    return sd


def build_tiny_image_reward(models_dir: Path, config: TinyImageRewardConfig = TinyImageRewardConfig(), *,
                            vocab: Optional[list[str]] = None,
                            state_dict: Optional[dict[str, torch.Tensor]] = None) -> Path:
    """Writes ``models_dir/reward_models/ImageReward/``: ``ImageReward.pt`` (``state_dict``, default
    :func:`tiny_upstream_state_dict`), ``vocab.txt`` (``vocab``, default :func:`tiny_vocab`; ``[]`` writes none)
    and, when ``config.med_config``, ``med_config.json``. Returns the ``.pt`` path."""
    folder = Path(models_dir) / "reward_models" / "ImageReward"
    folder.mkdir(parents=True, exist_ok=True)
    vocab = tiny_vocab() if vocab is None else vocab
    if vocab:
        (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    if state_dict is None:
        state_dict = tiny_upstream_state_dict(config, len(vocab or tiny_vocab()) + 2)  # + [DEC], [ENC]
    if config.med_config:  # the Hub's med_config.json at tiny size, plus the pack's vision head count
        med = {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
               "hidden_dropout_prob": 0.1, "hidden_size": config.text_width, "initializer_range": 0.02,
               "intermediate_size": config.text_intermediate, "layer_norm_eps": 1e-12,
               "max_position_embeddings": config.max_positions, "model_type": "bert",
               "num_attention_heads": config.text_heads, "num_hidden_layers": config.text_layers, "pad_token_id": 0,
               "type_vocab_size": 2, "vocab_size": len(vocab or tiny_vocab()) + 2, "encoder_width": 768,
               "add_cross_attention": True, "vision_num_attention_heads": config.vision_heads}
        (folder / "med_config.json").write_text(json.dumps(med, indent=2), encoding="utf-8")
    path = folder / "ImageReward.pt"
    torch.save(state_dict, path)
    return path
