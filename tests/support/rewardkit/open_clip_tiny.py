"""Tiny random open_clip models (the CLIP ViT architecture of ViT-H-14 at a few million parameters, same BPE
tokenizer: vocab 49408, context 77), saved in the real formats:

* :func:`build_tiny_hps`: an HPS checkpoint, ``torch.save({"state_dict": fp16 tensors})`` like
  ``HPS_v2_compressed.pt``; score it with the architecture :data:`TINY_ARCH` after :func:`register_tiny_arch`;
* :func:`build_tiny_open_clip_dir`: a Hub-style open_clip folder (``open_clip_config.json`` with ``model_cfg`` and
  ``preprocess_cfg`` + ``open_clip_model.safetensors``), which carries its own architecture.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType
from typing import Optional

import torch

__all__ = ["TINY_ARCH", "TINY_CONFIG", "register_tiny_arch", "tiny_model", "build_tiny_hps",
           "build_tiny_open_clip_dir"]

TINY_ARCH = "flowgrpo-tiny-ViT"
#: ViT-H-14's config shape at toy size (GELU, non-quick; head_width != 64 like ViT-H's 80).
TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def register_tiny_arch(config_dir: Path, open_clip_module: Optional[ModuleType] = None) -> str:
    """Writes ``<config_dir>/<TINY_ARCH>.json`` and registers it with ``open_clip_module`` (default: open_clip;
    hpsv2's vendored ``hpsv2.src.open_clip`` has its own registry). Returns :data:`TINY_ARCH`."""
    if open_clip_module is None:
        import open_clip as open_clip_module
    config_dir = Path(config_dir)
    config_dir.mkdir(parents=True, exist_ok=True)
    path = config_dir / f"{TINY_ARCH}.json"
    path.write_text(json.dumps(TINY_CONFIG), encoding="utf-8")
    open_clip_module.add_model_config(path)
    return TINY_ARCH


def tiny_model(seed: int = 0) -> torch.nn.Module:
    """A random open_clip CLIP of :data:`TINY_CONFIG` (fp32, eval), with a random (not constant) logit scale."""
    from open_clip.model import CLIP

    torch.manual_seed(seed)
    model = CLIP(**json.loads(json.dumps(TINY_CONFIG)))
    with torch.no_grad():  # open_clip zero-inits some parameters; make every weight matter
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def build_tiny_hps(models_dir: Path, name: str = "HPS_v2_compressed.pt", seed: int = 0) -> Path:
    """``models_dir/reward_models/<name>``: a tiny HPS checkpoint (``{"state_dict": ...}``, fp16 like the real
    ``*_compressed.pt``)."""
    target = Path(models_dir) / "reward_models" / name
    target.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.half() for k, v in tiny_model(seed).state_dict().items()}
    torch.save({"state_dict": state}, target)
    return target


def build_tiny_open_clip_dir(models_dir: Path, name: str = "CLIP-ViT-H-14-laion2B-s32B-b79K", seed: int = 0,
                             preprocess_cfg: Optional[dict] = None) -> Path:
    """``models_dir/reward_models/<name>/``: ``open_clip_config.json`` (``model_cfg`` = :data:`TINY_CONFIG`,
    ``preprocess_cfg`` as given, default the OpenAI CLIP one at size 64) + ``open_clip_model.safetensors``."""
    from safetensors.torch import save_file

    folder = Path(models_dir) / "reward_models" / name
    folder.mkdir(parents=True, exist_ok=True)
    preprocess_cfg = preprocess_cfg or {"size": 64, "mean": [0.48145466, 0.4578275, 0.40821073],
                                        "std": [0.26862954, 0.26130258, 0.27577711],
                                        "interpolation": "bicubic", "resize_mode": "shortest"}
    config = {"model_cfg": TINY_CONFIG, "preprocess_cfg": preprocess_cfg}
    (folder / "open_clip_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    state = {k: v.contiguous() for k, v in tiny_model(seed).state_dict().items()}
    save_file(state, str(folder / "open_clip_model.safetensors"))
    return folder
