"""Tiny, seeded, real models built from ComfyUI's own classes, for tests (CPU, milliseconds to build).

ComfyUI must be importable (the ``comfy_runtime`` fixture puts it on ``sys.path``); comfy is imported lazily inside the
functions so this module itself imports anywhere.

ComfyUI's ops skip weight initialisation (``torch.empty``), so every builder fills **every** parameter and floating
buffer (e.g. MMDiT's ``pos_embed``) with a seeded normal (std 0.02); otherwise outputs are garbage or NaN.

Models:

* SD3 / MMDiT: depth 2 (hidden 128, 2 heads), context 4096 and pooled 2048 (what ComfyUI's SD3 text encoders emit),
  ~1.9M params. Written as a state dict file that stock ``UNETLoader`` detects unchanged.
* FLUX: hidden 128, 2 heads, axes_dim [8, 28, 28], 1 double + 1 single block, context 64, pooled 32, guidance embed.
* Qwen-Image: 1 layer, 2 heads of 32, joint_attention_dim 64; latents are 5-D ``[B, 16, T, H, W]``.
* SD1.5-style UNet (eps prediction), ~0.2M params: only to check that non-flow models are refused.
* CLIP-L text encoder (full size: stock ``CLIPLoader`` only detects the real architecture), random, fp16, ~247 MB.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

import torch

INIT_STD = 0.02

SD3_CONTEXT_DIM = 4096
SD3_POOLED_DIM = 2048
FLUX_CONTEXT_DIM = 64
FLUX_POOLED_DIM = 32
QWEN_CONTEXT_DIM = 64
SD15_CONTEXT_DIM = 32

#: latent channels per model kind
LATENT_CHANNELS = {"sd3": 16, "flux": 16, "qwen_image": 16, "sd15": 4}
MODEL_KINDS = tuple(LATENT_CHANNELS)


def init_weights_(module: torch.nn.Module, seed: int = 0, std: float = INIT_STD) -> torch.nn.Module:
    """Fill every parameter and floating-point buffer of ``module`` with N(0, std^2), seeded, in name order."""
    generator = torch.Generator().manual_seed(seed)
    tensors = dict(module.named_parameters())
    tensors.update((n, b) for n, b in module.named_buffers() if b.is_floating_point())
    with torch.no_grad():
        for name in sorted(tensors):
            t = tensors[name]
            t.copy_(torch.randn(t.shape, generator=generator, dtype=torch.float32).mul_(std).to(t.dtype))
    return module


# ----------------------------------------------------------------------------------------------- configs
def sd3_unet_config(depth: int = 2, context_dim: int = SD3_CONTEXT_DIM, pooled_dim: int = SD3_POOLED_DIM,
                    pos_embed_max_size: int = 16) -> dict:
    """The unet_config ``comfy.model_detection`` derives from the tiny SD3 state dict (hidden = 64 * depth)."""
    hidden = 64 * depth
    return {
        "in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": depth, "input_size": None,
        "adm_in_channels": pooled_dim,
        "context_embedder_config": {"target": "torch.nn.Linear",
                                    "params": {"in_features": context_dim, "out_features": hidden}},
        "num_patches": pos_embed_max_size ** 2, "pos_embed_max_size": pos_embed_max_size,
        "pos_embed_scaling_factor": None, "x_block_self_attn_layers": [],
    }


def flux_unet_config() -> dict:
    return {
        "image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": FLUX_POOLED_DIM,
        "context_in_dim": FLUX_CONTEXT_DIM, "hidden_size": 128, "mlp_ratio": 4.0, "num_heads": 2, "depth": 1,
        "depth_single_blocks": 1, "axes_dim": [8, 28, 28], "theta": 10000, "patch_size": 2, "qkv_bias": True,
        "guidance_embed": True,
    }


def qwen_image_unet_config() -> dict:
    return {
        "image_model": "qwen_image", "patch_size": 2, "in_channels": 64, "out_channels": 16, "num_layers": 1,
        "attention_head_dim": 32, "num_attention_heads": 2, "joint_attention_dim": QWEN_CONTEXT_DIM,
        "axes_dims_rope": (8, 12, 12),
    }


def sd15_unet_config() -> dict:
    return {
        "in_channels": 4, "out_channels": 4, "model_channels": 32, "num_res_blocks": [1], "channel_mult": [1],
        "transformer_depth": [1], "transformer_depth_output": [1, 1], "transformer_depth_middle": 0,
        "context_dim": SD15_CONTEXT_DIM, "use_linear_in_transformer": True, "adm_in_channels": None,
        "use_temporal_attention": False, "use_spatial_transformer": True, "legacy": False, "image_size": 32,
        "use_checkpoint": False,
    }


# ----------------------------------------------------------------------------------------------- builders
def build_model_patcher(model_config_cls: Any, unet_config: dict, seed: int = 0, dtype: torch.dtype = torch.float32):
    """``model_config_cls(unet_config).get_model({})`` with all weights initialised, in a ``ModelPatcher``."""
    import comfy.model_management
    import comfy.model_patcher

    config = model_config_cls(dict(unet_config))
    config.set_inference_dtype(dtype, None)
    model = config.get_model({})
    init_weights_(model.diffusion_model, seed)
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


def build_sd3(seed: int = 0, **config):
    """The tiny SD3 as an in-memory ``ModelPatcher`` (same architecture as :func:`write_sd3_file`)."""
    import comfy.supported_models

    return build_model_patcher(comfy.supported_models.SD3, sd3_unet_config(**config), seed)


def build_flux(seed: int = 0):
    import comfy.supported_models

    return build_model_patcher(comfy.supported_models.Flux, flux_unet_config(), seed)


def build_qwen_image(seed: int = 0):
    import comfy.supported_models

    return build_model_patcher(comfy.supported_models.QwenImage, qwen_image_unet_config(), seed)


def build_sd15_eps(seed: int = 0):
    """A tiny SD1.5-style UNet: an eps-prediction (non-flow) model."""
    import comfy.supported_models

    return build_model_patcher(comfy.supported_models.SD15, sd15_unet_config(), seed)


BUILDERS = {"sd3": build_sd3, "flux": build_flux, "qwen_image": build_qwen_image, "sd15": build_sd15_eps}


# ----------------------------------------------------------------------------------------------- files
def sd3_state_dict(seed: int = 0, dtype: torch.dtype = torch.float32, **config) -> dict:
    """State dict of the tiny SD3 diffusion model, with the key names ``comfy.model_detection`` expects (no prefix)."""
    patcher = build_sd3(seed, **config)
    return {k: v.detach().to(dtype).contiguous() for k, v in patcher.model.diffusion_model.state_dict().items()}


def _save(state_dict: dict, path: os.PathLike) -> Path:
    import safetensors.torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    safetensors.torch.save_file(state_dict, str(tmp))
    os.replace(tmp, path)
    return path


def write_sd3_file(path: os.PathLike, seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    """Write the tiny SD3 as a safetensors file that stock ``UNETLoader`` loads (put it in models/diffusion_models)."""
    return _save(sd3_state_dict(seed, dtype), path)


def clip_l_state_dict(seed: int = 0, dtype: torch.dtype = torch.float16) -> dict:
    """A random CLIP-L text encoder (ComfyUI's ``comfy.clip_model.CLIPTextModel`` layout: ``text_model.*`` and
    ``text_projection.weight``). ComfyUI fixes the architecture from its bundled config, so it must be full size."""
    import comfy.clip_model
    import comfy.ops
    import comfy.sd1_clip

    config_path = Path(comfy.sd1_clip.__file__).with_name("sd1_clip_config.json")
    config = json.loads(config_path.read_text())
    meta = comfy.clip_model.CLIPTextModel(config, dtype, "meta", comfy.ops.disable_weight_init)
    generator = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=generator, dtype=dtype).mul_(INIT_STD)
            for k, v in sorted(meta.state_dict().items())}


def write_clip_l_file(path: os.PathLike, seed: int = 0, dtype: torch.dtype = torch.float16) -> Path:
    """Write the random CLIP-L (put it in models/text_encoders; stock ``CLIPLoader`` type ``sd3`` loads it and
    ``CLIPTextEncode`` then gives 77x4096 conditioning with a 2048 pooled output, matching the tiny SD3)."""
    return _save(clip_l_state_dict(seed, dtype), path)


# ----------------------------------------------------------------------------------------------- inputs
def _randn(shape, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=generator, dtype=torch.float32)


def latent_shape(kind: str, batch: int = 1, height: int = 8, width: int = 8, frames: int = 1) -> tuple:
    """Latent shape for ``kind`` (Qwen-Image latents are 5-D ``[B, C, T, H, W]``)."""
    channels = LATENT_CHANNELS[kind]
    if kind == "qwen_image":
        return (batch, channels, frames, height, width)
    return (batch, channels, height, width)


def random_latent(kind: str, batch: int = 1, height: int = 8, width: int = 8, seed: int = 0) -> torch.Tensor:
    return _randn(latent_shape(kind, batch, height, width), torch.Generator().manual_seed(seed))


def apply_model_kwargs(kind: str, batch: int = 1, tokens: int = 8, seed: int = 0,
                       guidance: Optional[float] = 3.5) -> dict:
    """Keyword arguments for ``BaseModel.apply_model(x, sigma, **kwargs)`` of the tiny ``kind`` model."""
    g = torch.Generator().manual_seed(seed)
    if kind == "sd3":
        return {"c_crossattn": _randn((batch, tokens, SD3_CONTEXT_DIM), g), "y": _randn((batch, SD3_POOLED_DIM), g)}
    if kind == "flux":
        out = {"c_crossattn": _randn((batch, tokens, FLUX_CONTEXT_DIM), g), "y": _randn((batch, FLUX_POOLED_DIM), g)}
        if guidance is not None:
            out["guidance"] = torch.full((batch,), float(guidance))
        return out
    if kind == "qwen_image":
        return {"c_crossattn": _randn((batch, tokens, QWEN_CONTEXT_DIM), g)}
    if kind == "sd15":
        return {"c_crossattn": _randn((batch, tokens, SD15_CONTEXT_DIM), g)}
    raise ValueError(f"unknown model kind {kind!r}; choose one of {MODEL_KINDS}")


def conditioning(kind: str, tokens: int = 8, seed: int = 0, guidance: Optional[float] = 3.5) -> list:
    """A ComfyUI CONDITIONING (``[[cond, {...}]]``) for the tiny ``kind`` model, built without a text encoder."""
    kw = apply_model_kwargs(kind, 1, tokens, seed, guidance)
    extra = {}
    if "y" in kw:
        extra["pooled_output"] = kw["y"]
    if "guidance" in kw:
        extra["guidance"] = float(guidance)
    return [[kw["c_crossattn"], extra]]
