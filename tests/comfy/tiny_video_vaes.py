"""Tiny, random VAE files for the tiny Wan models, in formats stock ``VAELoader`` detects (tests only).

* Wan 2.1 (16 latent channels): ComfyUI's own Wan 2.1 VAE class (``comfy.ldm.wan.vae.WanVAE``) at ``dim`` 8 instead
  of 96; ``comfy.sd.VAE`` reads ``dim`` from the state dict, so the tiny file loads like the real one (4x temporal,
  8x spatial).
* Wan 2.2 (48 latent channels): ComfyUI's Wan 2.2 VAE class has its width fixed (``dim`` 160, ~700M parameters), so
  it cannot be built tiny; the file is the other architecture ``VAELoader`` loads for 48-channel Wan 2.2 latents,
  TAEHV (the "lighttaew2_2" kind, ``comfy.taesd.taehv``, ~10M parameters; decode only), random.

Weights are seeded normals (``flowgrpo.demo_models.init_weights_``) scaled so decoded frames vary with the latent.
"""

from __future__ import annotations

import os
from pathlib import Path

from flowgrpo.demo_models import init_weights_, save_file

WAN21_VAE_DIM = 8


def wan21_vae_state_dict(seed: int = 0) -> dict:
    import comfy.ldm.wan.vae

    vae = comfy.ldm.wan.vae.WanVAE(dim=WAN21_VAE_DIM, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                                   attn_scales=[], temperal_downsample=[False, True, True], dropout=0.0)
    init_weights_(vae, seed, std=0.2)
    return {k: v.contiguous() for k, v in vae.state_dict().items()}


def wan22_taehv_state_dict(seed: int = 0) -> dict:
    import comfy.taesd.taehv

    vae = comfy.taesd.taehv.TAEHV(latent_channels=48)
    init_weights_(vae, seed, std=0.03)
    return {k: v.contiguous() for k, v in vae.state_dict().items()}


WRITERS = {"WAN21_T2V": wan21_vae_state_dict, "WAN22_T2V": wan22_taehv_state_dict}


def write_vae_file(family: str, path: os.PathLike, seed: int = 0) -> Path:
    """Write the tiny VAE of ``family`` (a key of :data:`WRITERS`) to ``path`` (put it in models/vae)."""
    return save_file(WRITERS[family](seed), path)
