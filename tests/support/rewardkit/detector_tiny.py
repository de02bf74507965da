"""A tiny random OWL-ViT (``OwlViTForObjectDetection``, the GenEval reward's detector) saved like
``google/owlvit-base-patch32``: ``config.json`` + ``model.safetensors`` (``save_pretrained``), the CLIP BPE tokenizer
files generated from open_clip's bundled vocabulary (the real OWL-ViT tokenizer: CLIP BPE, pad ``!`` = id 0,
16 tokens) and the processor config from ``OwlViTProcessor.save_pretrained`` (transformers 5 writes
``processor_config.json`` with the image processor nested; the hub folder has ``preprocessor_config.json``)."""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Sequence

import torch

__all__ = ["clip_tokenizer", "build_tiny_owlvit", "OWLVIT_DIR"]

OWLVIT_DIR = "owlvit-base-patch32"
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_tokenizer(pad_token: str = "!", model_max_length: int = 16):
    """A transformers ``CLIPTokenizer`` with OpenAI CLIP's BPE, built from open_clip's
    ``bpe_simple_vocab_16e6.txt.gz``: 256 byte symbols, their ``</w>`` forms, 48,894 merges, 2 specials (49,408)."""
    import open_clip
    from open_clip.tokenizer import bytes_to_unicode
    from transformers import CLIPTokenizer

    path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(path).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, pad_token=pad_token,
                         model_max_length=model_max_length)


def build_tiny_owlvit(models_dir: Path, name: str = OWLVIT_DIR, *, seed: int = 0, image_size: int = 32,
                      patch_size: int = 8, width: int = 32, image_mean: Sequence[float] = _CLIP_MEAN,
                      image_std: Sequence[float] = _CLIP_STD) -> Path:
    """Writes a tiny random OWL-ViT folder ``models_dir / "reward_models" / name`` and returns it (2 layers, width
    ``width`` in both towers, ``image_size`` px, ``(image_size / patch_size)**2`` boxes per image)."""
    from transformers import OwlViTConfig, OwlViTForObjectDetection, OwlViTImageProcessor, OwlViTProcessor

    tower = dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2, num_attention_heads=2)
    config = OwlViTConfig(text_config=dict(tower, vocab_size=49408, max_position_embeddings=16),
                          vision_config=dict(tower, image_size=image_size, patch_size=patch_size),
                          projection_dim=width)  # OWL-ViT's class head needs projection_dim == text width
    torch.manual_seed(seed)
    model = OwlViTForObjectDetection(config).eval()
    with torch.no_grad():  # heads at std 0.02 (transformers inits them at ~1): boxes near the patch grid, scores
        for head in (model.class_head, model.box_head):  # spread around 0.5 instead of saturated at 0 or 1
            for param in head.parameters():
                param.normal_(0.0, 0.02)
        model.box_head.dense2.bias[2:] = 1.0  # boxes ~1.6 patches wide: neighbours overlap, NMS has work
    folder = Path(models_dir) / "reward_models" / name
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    square = {"height": image_size, "width": image_size}
    processor = OwlViTProcessor(image_processor=OwlViTImageProcessor(size=square, crop_size=square,
                                                                     image_mean=list(image_mean),
                                                                     image_std=list(image_std)),
                                tokenizer=clip_tokenizer())
    processor.save_pretrained(folder)
    return folder
