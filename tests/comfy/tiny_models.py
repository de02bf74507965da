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

The SD3 builder and the file writers (SD3, CLIP-L, and the demo's TAESD VAE) live in :mod:`flowgrpo.demo_models`,
shared with ``python -m flowgrpo demo``; they are re-exported here.
"""

from __future__ import annotations

from typing import Optional

import torch

from flowgrpo.demo_models import (  # noqa: F401  (re-exported for the tests)
    INIT_STD, SD3_CONTEXT_DIM, SD3_POOLED_DIM, build_model_patcher, build_sd3, clip_l_state_dict, init_weights_,
    save_file as _save, sd3_state_dict, sd3_unet_config, taesd_state_dict, write_clip_l_file, write_sd3_file,
    write_taesd_file,
)

FLUX_CONTEXT_DIM = 64
FLUX_POOLED_DIM = 32
QWEN_CONTEXT_DIM = 64
SD15_CONTEXT_DIM = 32

#: latent channels per model kind
LATENT_CHANNELS = {"sd3": 16, "flux": 16, "qwen_image": 16, "sd15": 4}
MODEL_KINDS = tuple(LATENT_CHANNELS)


# ----------------------------------------------------------------------------------------------- configs
#: FLUX.1 values of ``FluxParams`` fields that some ComfyUI releases require and others lack (as
#: ``comfy.model_detection`` sets them for a FLUX.1 checkpoint): used only where the runtime's ``FluxParams`` has them.
FLUX1_VERSIONED_FIELDS = {"txt_ids_dims": []}


def fit_to_params(params_cls, config: dict, versioned: dict) -> dict:
    """``config`` as the runtime's parameter dataclass ``params_cls`` takes it: keys it has no field for are dropped
    only if they are ``versioned`` ones, required fields missing from ``config`` come from ``versioned``; anything
    else the runtime requires and the fixture lacks fails with the field's name (a stale fixture)."""
    import dataclasses

    fields = {f.name: f for f in dataclasses.fields(params_cls)}
    out = {k: v for k, v in config.items() if k in fields or k not in versioned}
    for name, f in fields.items():
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if name not in out and name in versioned:
            out[name] = versioned[name]
        elif required and name not in out:
            raise TypeError(f"this ComfyUI's {params_cls.__qualname__} requires {name!r}, which the tiny fixture "
                            f"does not set: add its FLUX.1 value (see comfy/model_detection.py) to "
                            f"FLUX1_VERSIONED_FIELDS")
    return out


def flux_unet_config() -> dict:
    """The tiny FLUX.1 config, fitted to the running ComfyUI's ``FluxParams``."""
    from comfy.ldm.flux.model import FluxParams

    return fit_to_params(FluxParams, {
        "image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": FLUX_POOLED_DIM,
        "context_in_dim": FLUX_CONTEXT_DIM, "hidden_size": 128, "mlp_ratio": 4.0, "num_heads": 2, "depth": 1,
        "depth_single_blocks": 1, "axes_dim": [8, 28, 28], "theta": 10000, "patch_size": 2, "qkv_bias": True,
        "guidance_embed": True,
    }, FLUX1_VERSIONED_FIELDS)


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
