"""Tiny random transformers CLIP models (PickScore / CLIP score / the aesthetic backbone) and a seeded aesthetic
head, written in the real formats into ``models_dir / "reward_models"``:

* a CLIP folder: ``config.json`` + ``model.safetensors`` (``save_pretrained``), optionally the tokenizer files
  (``vocab.json``, ``merges.txt``, ``tokenizer.json``, ``tokenizer_config.json``; the vocabulary is taken from
  open_clip's ``SimpleTokenizer``, 49,408 ids) and ``preprocessor_config.json`` (``CLIPImageProcessor``);
* the aesthetic head: ``torch.save`` of a plain state dict ``layers.{0,2,4,6,7}.{weight,bias}`` (the real
  ``.pth`` format) or the same tensors as ``.safetensors``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import torch

__all__ = ["TINY_IMAGE_SIZE", "PICKSCORE_MEAN", "PICKSCORE_STD", "write_clip_tokenizer_files", "build_tiny_clip",
           "build_tiny_pickscore", "tiny_aesthetic_head_state", "build_tiny_aesthetic"]

TINY_IMAGE_SIZE = 32
#: Deliberately not OpenAI's, so tests can tell the folder's preprocessor_config.json was read.
PICKSCORE_MEAN = (0.5, 0.4, 0.3)
PICKSCORE_STD = (0.2, 0.25, 0.3)


def write_clip_tokenizer_files(folder: Path) -> None:
    """OpenAI CLIP's BPE tokenizer files in ``folder``: ``vocab.json`` + ``merges.txt`` from open_clip's
    ``SimpleTokenizer`` (its specials renamed to ``<|startoftext|>``/``<|endoftext|>``), then re-saved through
    ``CLIPTokenizer`` (adds ``tokenizer.json`` and ``tokenizer_config.json``, as on the hub)."""
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    reference = SimpleTokenizer()
    rename = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {rename.get(token, token): index for token, index in reference.encoder.items()}
    merges = [" ".join(pair) for pair, _ in sorted(reference.bpe_ranks.items(), key=lambda item: item[1])]
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    CLIPTokenizer.from_pretrained(str(folder), local_files_only=True).save_pretrained(str(folder))


def build_tiny_clip(models_dir: Path, name: str = "clip-vit-large-patch14", *, projection_dim: int = 768,
                    seed: int = 0, logit_scale: float = 3.0, tokenizer: bool = True,
                    preprocessor: Optional[tuple[int, int, Sequence[float], Sequence[float]]] = None) -> Path:
    """A random ``CLIPModel`` (2 layers, width 32 in both towers, 32 px images, patch 8, vocabulary 49,408)
    saved to ``models_dir/reward_models/name``; ``logit_scale`` is the stored (log) scale. ``tokenizer``: write
    the tokenizer files; ``preprocessor``: ``(resize, crop, mean, std)`` for a ``preprocessor_config.json``
    (None: no file). Returns the folder."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    folder = Path(models_dir) / "reward_models" / name
    folder.mkdir(parents=True, exist_ok=True)
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    config = CLIPConfig(text_config=dict(tower, vocab_size=49408, max_position_embeddings=77),
                        vision_config=dict(tower, image_size=TINY_IMAGE_SIZE, patch_size=8),
                        projection_dim=projection_dim)
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    with torch.no_grad():
        model.logit_scale.fill_(logit_scale)
    model.save_pretrained(str(folder))
    if tokenizer:
        write_clip_tokenizer_files(folder)
    if preprocessor is not None:
        resize, crop, mean, std = preprocessor
        CLIPImageProcessor(size={"shortest_edge": resize}, crop_size={"height": crop, "width": crop},
                           image_mean=list(mean), image_std=list(std)).save_pretrained(str(folder))
    return folder


def build_tiny_pickscore(models_dir: Path, name: str = "PickScore_v1", seed: int = 1) -> Path:
    """A tiny PickScore folder: projection 16, ``logit_scale`` 4.0, tokenizer files, and a preprocessor config
    resizing to 40 and cropping 32 with :data:`PICKSCORE_MEAN` / :data:`PICKSCORE_STD`."""
    return build_tiny_clip(models_dir, name, projection_dim=16, seed=seed, logit_scale=4.0,
                           preprocessor=(40, TINY_IMAGE_SIZE, PICKSCORE_MEAN, PICKSCORE_STD))


def tiny_aesthetic_head_state(in_features: int = 768, seed: int = 0) -> dict[str, torch.Tensor]:
    """A seeded random head state dict with the real keys and shapes (``in_features`` -> 1024 -> 128 -> 64 -> 16
    -> 1, at indices 0, 2, 4, 6, 7 of ``layers``)."""
    generator = torch.Generator().manual_seed(seed)
    sizes = [(0, in_features, 1024), (2, 1024, 128), (4, 128, 64), (6, 64, 16), (7, 16, 1)]
    state = {}
    for index, fan_in, fan_out in sizes:
        bound = fan_in ** -0.5
        state[f"layers.{index}.weight"] = (torch.rand(fan_out, fan_in, generator=generator) * 2 - 1) * bound
        state[f"layers.{index}.bias"] = (torch.rand(fan_out, generator=generator) * 2 - 1) * bound
    return state


def build_tiny_aesthetic(models_dir: Path, head_name: str = "sac+logos+ava1-l14-linearMSE.pth", *,
                         backbone: bool = True, in_features: int = 768, seed: int = 0) -> Path:
    """The seeded head file ``models_dir/reward_models/head_name`` (``.pth``: ``torch.save`` of the state dict;
    ``.safetensors``: ``save_file``) and, with ``backbone``, a tiny ``clip-vit-large-patch14`` folder (projection
    768, OpenAI preprocessing defaults, no preprocessor file) next to it. Returns the head file."""
    root = Path(models_dir) / "reward_models"
    root.mkdir(parents=True, exist_ok=True)
    path = root / head_name
    state = tiny_aesthetic_head_state(in_features, seed)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, str(path))
    if backbone and not (root / "clip-vit-large-patch14").is_dir():
        build_tiny_clip(models_dir, "clip-vit-large-patch14", projection_dim=768, seed=seed + 7, tokenizer=False)
    return path
