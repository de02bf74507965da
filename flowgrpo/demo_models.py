"""Tiny, seeded model files that stock ComfyUI loaders read: the demo's models (and the tests').

* diffusion model: an SD3/MMDiT of depth 2 (hidden 128, 2 heads, ~1.9M params, fp32) -> ``UNETLoader``; context 4096
  and pooled 2048, what ComfyUI's SD3 text encoders emit; ``pos_embed_max_size`` 16, so latents up to 32x32 (256 px);
* text encoder: a random CLIP-L at full size (stock ``CLIPLoader`` only detects the real architecture; fp16, ~247 MB)
  -> ``CLIPLoader`` type ``sd3``;
* VAE: a TAESD-architecture autoencoder with 16 latent channels (keys ``taesd_encoder.*`` / ``taesd_decoder.*``,
  which ``comfy.sd.VAE`` recognises) -> ``VAELoader``. Its random weights are scaled so that decoded images vary
  with the latent (mean ~0.5, std ~0.2) instead of saturating: rewards on them then differ between samples.

ComfyUI must be importable for the builders (the ComfyUI root on ``sys.path``); it and torch are imported lazily, so
this module imports anywhere. :func:`ensure_comfy_importable` sets that up in a process that has not done it.
ComfyUI's ops skip weight initialisation, so every builder fills every parameter itself, seeded.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Optional

__all__ = ["INIT_STD", "SD3_CONTEXT_DIM", "SD3_POOLED_DIM", "DEMO_FILES", "CONTENT_VERSION", "init_weights_",
           "sd3_unet_config", "build_model_patcher", "build_sd3", "sd3_state_dict", "save_file", "write_sd3_file",
           "clip_l_state_dict", "write_clip_l_file", "taesd_state_dict", "write_taesd_file", "file_version",
           "ensure_comfy_importable", "build_demo_models"]

INIT_STD = 0.02
SD3_CONTEXT_DIM = 4096
SD3_POOLED_DIM = 2048
TAESD_LATENT_CHANNELS = 16

#: kind -> (models sub-folder, file name); the names the demo and example workflows use
DEMO_FILES = {
    "diffusion_model": ("diffusion_models", "flowgrpo_demo_sd3.safetensors"),
    "text_encoder": ("text_encoders", "flowgrpo_demo_clip_l.safetensors"),
    "vae": ("vae", "flowgrpo_demo_taesd16.safetensors"),
}
#: bump when a builder changes what it writes: files with another version are rewritten
CONTENT_VERSION = "2"
#: init scale of the demo's SD3: at the test models' 0.02 the random network's velocity barely depends on its weights,
#: so a LoRA hardly moves any reward; at 0.12 the demo's reward rises within a few iterations
DEMO_SD3_STD = 0.12
_VERSION_KEY = "flowgrpo_demo_version"


def init_weights_(module, seed: int = 0, std: float = INIT_STD):
    """Fill every parameter and floating-point buffer of ``module`` with N(0, std^2), seeded, in name order."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    tensors = dict(module.named_parameters())
    tensors.update((n, b) for n, b in module.named_buffers() if b.is_floating_point())
    with torch.no_grad():
        for name in sorted(tensors):
            t = tensors[name]
            t.copy_(torch.randn(t.shape, generator=generator, dtype=torch.float32).mul_(std).to(t.dtype))
    return module


# ----------------------------------------------------------------------------------------------- SD3
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


def build_model_patcher(model_config_cls: Any, unet_config: dict, seed: int = 0, dtype=None, std: float = INIT_STD):
    """``model_config_cls(unet_config).get_model({})`` with all weights initialised, in a ``ModelPatcher``."""
    import comfy.model_management
    import comfy.model_patcher
    import torch

    config = model_config_cls(dict(unet_config))
    config.set_inference_dtype(dtype or torch.float32, None)
    model = config.get_model({})
    init_weights_(model.diffusion_model, seed, std)
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


def build_sd3(seed: int = 0, std: float = INIT_STD, **config):
    """The tiny SD3 as an in-memory ``ModelPatcher`` (same architecture as :func:`write_sd3_file`)."""
    import comfy.supported_models

    return build_model_patcher(comfy.supported_models.SD3, sd3_unet_config(**config), seed, std=std)


def sd3_state_dict(seed: int = 0, dtype=None, std: float = INIT_STD, **config) -> dict:
    """State dict of the tiny SD3 diffusion model, with the key names ``comfy.model_detection`` expects (no prefix)."""
    import torch

    patcher = build_sd3(seed, std=std, **config)
    dtype = dtype or torch.float32
    return {k: v.detach().to(dtype).contiguous() for k, v in patcher.model.diffusion_model.state_dict().items()}


# ----------------------------------------------------------------------------------------------- files
def save_file(state_dict: dict, path: os.PathLike, metadata: Optional[dict] = None) -> Path:
    """Write a safetensors file atomically (``flowgrpo_core.checkpoint.atomic_save_safetensors``), making the
    folder if needed."""
    from flowgrpo_core.checkpoint import atomic_save_safetensors

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return atomic_save_safetensors(state_dict, path, metadata)


def write_sd3_file(path: os.PathLike, seed: int = 0, dtype=None, metadata: Optional[dict] = None,
                   std: float = INIT_STD) -> Path:
    """Write the tiny SD3 as a safetensors file that stock ``UNETLoader`` loads (put it in models/diffusion_models)."""
    return save_file(sd3_state_dict(seed, dtype, std=std), path, metadata)


def clip_l_state_dict(seed: int = 0, dtype=None) -> dict:
    """A random CLIP-L text encoder (ComfyUI's ``comfy.clip_model.CLIPTextModel`` layout: ``text_model.*`` and
    ``text_projection.weight``). ComfyUI fixes the architecture from its bundled config, so it must be full size."""
    import comfy.clip_model
    import comfy.ops
    import comfy.sd1_clip
    import torch

    dtype = dtype or torch.float16
    config_path = Path(comfy.sd1_clip.__file__).with_name("sd1_clip_config.json")
    config = json.loads(config_path.read_text())
    meta = comfy.clip_model.CLIPTextModel(config, dtype, "meta", comfy.ops.disable_weight_init)
    generator = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=generator, dtype=dtype).mul_(INIT_STD)
            for k, v in sorted(meta.state_dict().items())}


def write_clip_l_file(path: os.PathLike, seed: int = 0, dtype=None, metadata: Optional[dict] = None) -> Path:
    """Write the random CLIP-L (put it in models/text_encoders; stock ``CLIPLoader`` type ``sd3`` loads it and
    ``CLIPTextEncode`` then gives 77x4096 conditioning with a 2048 pooled output, matching the tiny SD3)."""
    return save_file(clip_l_state_dict(seed, dtype), path, metadata)


# ----------------------------------------------------------------------------------------------- TAESD VAE
def _calibrate_(last_conv, x, run, std: float, mean: float) -> None:
    """Rescale ``last_conv`` (weight; bias zero before) so that ``run(x)`` has the given mean and std: the output is
    linear in both, so one pass gives the factors."""
    import torch

    with torch.no_grad():
        y = run(x)
        scale = std / float(y.std().clamp_min(1e-8))
        last_conv.weight.mul_(scale)
        last_conv.bias.fill_(mean - scale * float(y.mean()))


def taesd_state_dict(seed: int = 0, latent_channels: int = TAESD_LATENT_CHANNELS) -> dict:
    """A random TAESD (``comfy.taesd.taesd.TAESD``) state dict: convolutions He-initialised (std sqrt(2/fan_in),
    the last convolution of each residual block scaled by 0.3, biases 0), then the last convolution of the decoder
    scaled so a N(0, 1) latent decodes to values of mean 0.5 and std 0.2 (the image, before clamping to [0, 1]) and
    that of the encoder so an image in [-1, 1] encodes to unit-std latents. fp32."""
    import comfy.taesd.taesd as taesd
    import torch

    model = taesd.TAESD(latent_channels=latent_channels)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name in ("vae_scale", "vae_shift"):
                p.fill_(1.0 if name == "vae_scale" else 0.0)
            elif p.dim() == 4:
                fan_in = p.shape[1] * p.shape[2] * p.shape[3]
                scale = 0.3 if name.endswith(".conv.4.weight") else 1.0
                p.copy_(torch.randn(p.shape, generator=generator).mul_(scale * (2.0 / fan_in) ** 0.5))
            else:
                p.zero_()
        probe = torch.Generator().manual_seed(seed + 1)
        latents = torch.randn((2, latent_channels, 8, 8), generator=probe)
        images = torch.rand((2, 3, 32, 32), generator=probe).mul_(2).sub_(1)
        _calibrate_(model.taesd_decoder[-1], latents, model.taesd_decoder, std=0.2, mean=0.5)
        _calibrate_(model.taesd_encoder[-1], images, model.encode, std=1.0, mean=0.0)
    return {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}


def write_taesd_file(path: os.PathLike, seed: int = 0, metadata: Optional[dict] = None) -> Path:
    """Write the random 16-channel TAESD (put it in models/vae; stock ``VAELoader`` loads it)."""
    return save_file(taesd_state_dict(seed), path, metadata)


# ----------------------------------------------------------------------------------------------- demo
def file_version(path: os.PathLike) -> Optional[str]:
    """The demo content version recorded in a safetensors file's metadata (None: absent or unreadable)."""
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get(_VERSION_KEY)
    except Exception:  # missing, truncated or not safetensors: rewrite it
        return None


def ensure_comfy_importable() -> None:
    """Make ``import comfy...`` work in this process, on CPU (no-op when ComfyUI is already imported)."""
    if "comfy" in sys.modules:
        return
    from .server import locate_comfyui

    root = str(locate_comfyui())
    if root not in sys.path:
        sys.path.insert(0, root)
    import comfy.cli_args  # imported as a library, ComfyUI does not parse argv: args hold the defaults

    if "comfy.model_management" not in sys.modules:  # it reads args.cpu once, at import
        comfy.cli_args.args.cpu = True


_WRITERS: dict[str, Callable[..., Path]] = {"diffusion_model": functools.partial(write_sd3_file, std=DEMO_SD3_STD),
                                            "text_encoder": write_clip_l_file,
                                            "vae": write_taesd_file}


def build_demo_models(models_dir: os.PathLike, log: Callable[[str], None] = lambda line: None) -> dict[str, str]:
    """Write the demo's three model files under ``models_dir`` (skipping files of the current content version);
    returns ``{"diffusion_model": name, "text_encoder": name, "vae": name}`` (the names the loaders list)."""
    models_dir = Path(models_dir)
    names = {}
    for kind, (folder, name) in DEMO_FILES.items():
        path = models_dir / folder / name
        names[kind] = name
        if file_version(path) == CONTENT_VERSION:
            continue
        ensure_comfy_importable()
        log(f"writing {path}")
        _WRITERS[kind](path, seed=0, metadata={_VERSION_KEY: CONTENT_VERSION})
    return names
