"""Tiny configs of ComfyUI's flow-matching **video** families (tests only; see :mod:`model_families`).

Every entry builds the family's own ComfyUI class (``comfy.supported_models.<name>``) tiny: hidden 64-128, 1-2
blocks, 2 heads, latents of 2-3 frames at 8x8, channels from the class's ``latent_format``. ``conditioning(seed)``
is a CONDITIONING drawn from ``torch.randn`` with a generator seeded by ``seed`` (no text encoder). Config fields that
differ between ComfyUI releases are fitted to the running one (:func:`tiny_models.fit_to_params`).

:data:`NOT_BUILT` names the video variants that have no tiny entry, with the reason.
"""

from __future__ import annotations

import torch

from model_families import TinyFamily, supported_model_classes
from tiny_models import fit_to_params

FRAMES = 3  # latent frames of the tiny video latents
SIZE = 8  # latent height and width
TOKENS = 6  # text tokens of the tiny conditionings


def _channels(name: str) -> int:
    return supported_model_classes()[name].latent_format.latent_channels


def _latent(name: str, frames: int = FRAMES):
    return lambda batch: (batch, _channels(name), frames, SIZE, SIZE)


def _randn(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


def _cross_attn(dim: int, **extras):
    """``conditioning(seed)``: ``[[cross_attn [1, TOKENS, dim], extras]]``; an extra given as a callable is called
    with the seed's generator (a tensor per seed), the others are taken as they are."""
    def conditioning(seed: int) -> list:
        g = torch.Generator().manual_seed(seed)
        cross = torch.randn((1, TOKENS, dim), generator=g, dtype=torch.float32)
        return [[cross, {k: (v(g) if callable(v) else v) for k, v in extras.items()}]]
    return conditioning


def _mask(generator: torch.Generator) -> torch.Tensor:
    """A text attention mask ``[1, TOKENS]`` (integers: 1 keeps a token) that keeps every token (LTXV, Mochi)."""
    return torch.ones((1, TOKENS), dtype=torch.long)


# ----------------------------------------------------------------------------------------------- Wan
#: the real Wan's text width (umT5-XXL), which the tests' random CLIP-L (CLIPLoader type sd3) also emits
WAN_TEXT_DIM = 4096


def wan_unet_config(name: str) -> dict:
    """A tiny Wan 2.1 / 2.2 text-to-video config (``comfy.ldm.wan.model.WanModel``), as ``model_detection`` reads a
    Wan checkpoint: head dim 32 (RoPE splits it over t, h, w), in and out channels of the family's latent."""
    channels = _channels(name)
    return {
        "image_model": "wan2.1", "model_type": "t2v", "patch_size": (1, 2, 2), "in_dim": channels,
        "out_dim": channels, "dim": 64, "ffn_dim": 128, "freq_dim": 64, "text_dim": WAN_TEXT_DIM, "num_heads": 2,
        "num_layers": 2, "window_size": (-1, -1), "qk_norm": True, "cross_attn_norm": True, "eps": 1e-6,
    }


def _wan(name: str) -> TinyFamily:
    return TinyFamily(name=name, unet_config=lambda: wan_unet_config(name), conditioning=_cross_attn(WAN_TEXT_DIM),
                      latent=_latent(name), video=True)


# ----------------------------------------------------------------------------------------------- HunyuanVideo
HUNYUAN_TEXT_DIM = 32
HUNYUAN_POOLED_DIM = 32
#: HunyuanVideoParams fields some ComfyUI releases have and others lack (0.33 adds meanflow_sum)
HUNYUAN_VERSIONED_FIELDS = {"meanflow_sum": False}


def hunyuan_video_unet_config(name: str) -> dict:
    """A tiny HunyuanVideo / HunyuanVideo 1.5 config (``HunyuanVideoParams``): hidden 128, 2 heads of 64 (RoPE
    16 + 24 + 24), one double and one single block. HunyuanVideo 1.5 takes its latent, a start-image latent and a
    mask as input channels (2C + 1; zeros and no mask for text-to-video, as its ``concat_cond`` fills them)."""
    from comfy.ldm.hunyuan_video.model import HunyuanVideoParams

    channels = _channels(name)
    v15 = name == "HunyuanVideo15"
    return fit_to_params(HunyuanVideoParams, {
        "image_model": "hunyuan_video", "in_channels": 2 * channels + 1 if v15 else channels,
        "out_channels": channels, "vec_in_dim": None if v15 else HUNYUAN_POOLED_DIM,
        "context_in_dim": HUNYUAN_TEXT_DIM, "hidden_size": 128, "mlp_ratio": 2.0, "num_heads": 2, "depth": 1,
        "depth_single_blocks": 1, "axes_dim": [16, 24, 24], "theta": 256, "patch_size": [1, 2, 2],
        "qkv_bias": True, "guidance_embed": not v15, "byt5": False, "meanflow": False,
        "use_cond_type_embedding": v15, "vision_in_dim": None,
    }, HUNYUAN_VERSIONED_FIELDS)


def _hunyuan(name: str) -> TinyFamily:
    if name == "HunyuanVideo15":
        conditioning = _cross_attn(HUNYUAN_TEXT_DIM, pooled_output=None)  # its text encoder gives no pooled output
    else:
        conditioning = _cross_attn(HUNYUAN_TEXT_DIM, guidance=6.0,
                                   pooled_output=lambda g: torch.randn((1, HUNYUAN_POOLED_DIM), generator=g))
    return TinyFamily(name=name, unet_config=lambda: hunyuan_video_unet_config(name), conditioning=conditioning,
                      latent=_latent(name), video=True)


# ----------------------------------------------------------------------------------------------- LTXV
LTXV_TEXT_DIM = 32


def ltxv_unet_config() -> dict:
    """A tiny LTX-Video config (``LTXVModel``): 2 layers, 2 heads of 32, captions of 32 features."""
    return {
        "image_model": "ltxv", "in_channels": _channels("LTXV"), "num_layers": 2, "attention_head_dim": 32,
        "num_attention_heads": 2, "cross_attention_dim": 64, "caption_channels": LTXV_TEXT_DIM,
    }


# ----------------------------------------------------------------------------------------------- Mochi
MOCHI_TEXT_DIM = 32


def mochi_unet_config() -> dict:
    """A tiny Genmo Mochi config (``AsymmDiTJoint``): visual stream 128 wide, text stream 64, 2 heads, 2 blocks.
    ComfyUI's block asserts the visual MLP is 1536 * 8 wide (the real model's), so mlp_ratio_x is 12288 / 128: the
    two feed-forward layers hold most of the ~3M parameters."""
    return {
        "image_model": "mochi_preview", "depth": 2, "patch_size": 2, "num_heads": 2, "hidden_size_x": 128,
        "hidden_size_y": 64, "mlp_ratio_x": 1536 * 8 / 128, "mlp_ratio_y": 2.0, "learn_sigma": False,
        "in_channels": _channels("GenmoMochi"), "qk_norm": True, "qkv_bias": False, "out_bias": True,
        "attn_drop": 0.0, "patch_embed_bias": True, "posenc_preserve_area": True, "timestep_mlp_bias": True,
        "attend_to_padding": False, "timestep_scale": 1000.0, "use_t5": True, "t5_feat_dim": MOCHI_TEXT_DIM,
        "t5_token_length": TOKENS, "rope_theta": 10000.0,
    }


# ----------------------------------------------------------------------------------------------- Kandinsky 5
KANDINSKY_TEXT_DIM = 32
KANDINSKY_POOLED_DIM = 16


def kandinsky5_unet_config() -> dict:
    """A tiny Kandinsky 5 video config: model dim 128 (2 heads of 64: RoPE 16 + 24 + 24), one text and one visual
    block. Its visual input is the latent, a start-image latent and a mask (2C + 1 channels) in 1x2x2 patches."""
    channels = _channels("Kandinsky5")
    return {
        "image_model": "kandinsky5", "in_visual_dim": channels, "out_visual_dim": channels,
        "in_text_dim": KANDINSKY_TEXT_DIM, "in_text_dim2": KANDINSKY_POOLED_DIM, "time_dim": 64, "model_dim": 128,
        "ff_dim": 256, "visual_embed_dim": (2 * channels + 1) * 4, "patch_size": (1, 2, 2), "num_text_blocks": 1,
        "num_visual_blocks": 1, "axes_dims": (16, 24, 24),
    }


FAMILIES: list[TinyFamily] = [
    _wan("WAN22_T2V"),
    _wan("WAN21_T2V"),
    _hunyuan("HunyuanVideo"),
    TinyFamily(name="LTXV", unet_config=ltxv_unet_config, conditioning=_cross_attn(LTXV_TEXT_DIM, attention_mask=_mask),
               latent=_latent("LTXV", frames=2), video=True),
    TinyFamily(name="GenmoMochi", unet_config=mochi_unet_config, conditioning=_cross_attn(MOCHI_TEXT_DIM, attention_mask=_mask),
               latent=_latent("GenmoMochi"), video=True),
    _hunyuan("HunyuanVideo15"),
    TinyFamily(name="Kandinsky5", unet_config=kandinsky5_unet_config,
               conditioning=_cross_attn(KANDINSKY_TEXT_DIM, pooled_output=lambda g: torch.randn(
                   (1, KANDINSKY_POOLED_DIM), generator=g)),
               latent=_latent("Kandinsky5"), video=True),
]

_I2V = "image-to-video: needs a start image latent (and CLIP vision features) the pack does not supply yet"
#: video variants without a tiny entry: class name -> why
NOT_BUILT: dict[str, str] = {
    "WAN21_I2V": _I2V,
    "WAN21_FunControl2V": "control video: needs a control video latent concatenated to the input (48 channels)",
    "WAN21_Camera": "camera control: needs camera pose embeddings the pack does not supply",
    "WAN22_Camera": "camera control: needs camera pose embeddings and a start image latent",
    "WAN21_Vace": "VACE: needs control video frames and masks (vace_context) the pack does not supply",
    "WAN22_S2V": "speech-to-video: needs audio encoder features and a reference image",
    "WAN21_HuMo": "human-centric audio/image-to-video: needs audio embeddings and reference images",
    "WAN22_Animate": "character animation: needs pose and face video inputs and a reference image",
    "WAN_Animate2": "character animation: needs pose and face video inputs and a reference image",
    "WAN21_CausalAR_T2V": "causal autoregressive sampling with a KV cache over frame chunks, not one denoiser call "
                          "per step as the pack's SDE sampler makes",
    "WAN21_FlowRVS": "video-to-video flow (IMG_TO_IMG_FLOW): starts from an input video, not from noise",
    "WAN21_SCAIL": "pose-driven animation: needs pose latents and a reference latent",
    "WAN21_SCAIL2": "pose-driven animation: needs pose latents, masks and a reference latent",
    "WAN22_WanDancer": "music-to-dance: needs music features and a start image latent",
    "HunyuanVideoI2V": _I2V,
    "HunyuanVideoSkyreelsI2V": _I2V,
    "HunyuanVideo15_SR_Distilled": "super-resolution: needs a low-resolution video latent as its input",
    "LTXAV": "audio and video in one latent: a reward over clips would need the audio part decoded and scored too",
    "MiniMaxH3": "audio and video in one latent: a reward over clips would need the audio part decoded and scored too",
    "SeedVR2": "video restoration: starts from an input video latent, not from noise and a prompt",
}

#: class names of the video families (tiny or listed in NOT_BUILT), to find any the runtime adds
VIDEO_NAME = r"^(WAN|HunyuanVideo|LTX|GenmoMochi|Kandinsky5$|Cosmos\w*[TV]2V|MiniMax\w*H\d|SeedVR)"
