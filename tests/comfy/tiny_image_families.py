"""Tiny configs of ComfyUI's IMAGE flow-matching families (tests only; see :mod:`model_families`).

Each :class:`~model_families.TinyFamily` builds the family's real ``comfy.supported_models`` class with a config a
real checkpoint's ``comfy.model_detection`` would yield, shrunk: hidden sizes 64-128, 2 heads, 1-2 blocks, text
features of 32-64 channels, 8 tokens. Config fields that differ between ComfyUI releases are fitted to the running
one (:func:`tiny_models.fit_to_params`); a family whose class the runtime lacks is absent there
(``model_families.build`` raises ``Unbuildable``).

``conditioning(seed)`` is a CONDITIONING of seeded random features (no text encoder) holding what the family's
``model_base.<Model>.extra_conds`` reads; ``latent(batch)`` takes its channels and dimensions from the class's
``latent_format`` (a 3-D latent format gets one frame).

:data:`NOT_BUILT` names the flow classes of ComfyUI 0.33 that have no tiny config here, each with the reason.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import torch

import tiny_models
from model_families import TinyFamily
from tiny_models import fit_to_params

TOKENS = 8


# ----------------------------------------------------------------------------------------------- helpers
@dataclasses.dataclass(frozen=True)
class Randn:
    """A conditioning value: seeded normal noise of ``shape`` (drawn after the cross-attention features)."""

    shape: tuple


def cond(dim: int, tokens: int = TOKENS, **extras: Any) -> Callable[[int], list]:
    """``conditioning(seed) -> [[cross_attn [1, tokens, dim], extras]]``; :class:`Randn` extras become seeded noise,
    others are passed as they are (guidance floats, masks, ...)."""

    def conditioning(seed: int) -> list:
        g = torch.Generator().manual_seed(seed)
        cross_attn = torch.randn((1, tokens, dim), generator=g)
        values = {k: torch.randn(v.shape, generator=g) if isinstance(v, Randn) else v for k, v in extras.items()}
        return [[cross_attn, values]]

    return conditioning


def latent(name: str, size: int = 8) -> Callable[[int], tuple]:
    """``latent(batch)``: ``[B, C, size, size]`` (``[B, C, 1, size, size]`` for a 3-D latent format), C from
    ``comfy.supported_models.<name>.latent_format``."""

    def shape(batch: int) -> tuple:
        import comfy.supported_models

        fmt = getattr(comfy.supported_models, name).latent_format
        frames = (1,) if fmt.latent_dimensions == 3 else ()
        return (batch, fmt.latent_channels, *frames, size, size)

    return shape


def fitted(params_path: str, config: dict, versioned: Optional[dict] = None) -> Callable[[], dict]:
    """``unet_config()``: ``config`` fitted to the runtime's parameter dataclass ``module:Class`` (fields one
    ComfyUI release has and another lacks are in ``versioned``)."""

    def unet_config() -> dict:
        import importlib

        module, cls = params_path.split(":")
        return fit_to_params(getattr(importlib.import_module(module), cls), dict(config), versioned or {})

    return unet_config


def fixed(config: dict) -> Callable[[], dict]:
    return lambda: dict(config)


def family(name: str, unet_config: Callable[[], dict], conditioning: Callable[[int], list],
           size: int = 8) -> TinyFamily:
    """A :class:`TinyFamily` whose latent is ``latent(name, size)``."""
    return TinyFamily(name=name, unet_config=unet_config, conditioning=conditioning, latent=latent(name, size))


# ----------------------------------------------------------------------------------------------- FLUX-like
FLUX_PARAMS = "comfy.ldm.flux.model:FluxParams"
CHROMA_PARAMS = "comfy.ldm.chroma.model:ChromaParams"
CHROMA_RADIANCE_PARAMS = "comfy.ldm.chroma_radiance.model:ChromaRadianceParams"
HUNYUAN_PARAMS = "comfy.ldm.hunyuan_video.model:HunyuanVideoParams"

#: FluxParams fields of later ComfyUI releases, with the values model_detection gives a FLUX.1 checkpoint
FLUX_VERSIONED = dict(tiny_models.FLUX1_VERSIONED_FIELDS, yak_mlp=False, txt_norm=False)

#: what CLIPTextEncode gives a text encoder without a pooled output (T5, LLMs): ComfyUI 0.3.75's
#: ``Flux.encode_adm`` reads the key unconditionally
NO_POOLED = {"pooled_output": None}


def flux_variant(versioned: Optional[dict] = None, **changes: Any) -> Callable[[], dict]:
    """The tiny FLUX.1 config of :func:`tiny_models.flux_unet_config` with ``changes``, fitted to FluxParams."""

    def unet_config() -> dict:
        base = {k: v for k, v in tiny_models.flux_unet_config().items() if k not in (versioned or {})}
        return fitted(FLUX_PARAMS, dict(base, **changes), dict(FLUX_VERSIONED, **(versioned or {})))()

    return unet_config


def flux_cond(guidance: Optional[float] = 3.5, pooled: bool = True, **extras: Any) -> Callable[[int], list]:
    """A FLUX conditioning: T5 tokens (tiny width), CLIP pooled output when ``pooled``, guidance unless None."""
    if pooled:
        extras["pooled_output"] = Randn((1, tiny_models.FLUX_POOLED_DIM))
    if guidance is not None:
        extras["guidance"] = guidance
    return cond(tiny_models.FLUX_CONTEXT_DIM, **extras)


SD3 = TinyFamily("SD3", tiny_models.sd3_unet_config, lambda seed: tiny_models.conditioning("sd3", seed=seed),
                 lambda batch: tiny_models.latent_shape("sd3", batch))
"""SD3 MMDiT (medium: depth 24, hidden 1536): tiny_models' depth 2, hidden 128; context 4096, pooled 2048."""

FLUX = TinyFamily("Flux", tiny_models.flux_unet_config, lambda seed: tiny_models.conditioning("flux", seed=seed),
                  lambda batch: tiny_models.latent_shape("flux", batch))
"""FLUX.1-dev (hidden 3072, 24 heads, 19 double + 38 single blocks, T5 4096, CLIP pooled 768): tiny_models'
hidden 128, 2 heads, 1 + 1 blocks, context 64, pooled 32, guidance embedder."""

FLUX_SCHNELL = family("FluxSchnell", flux_variant(guidance_embed=False), flux_cond(guidance=None))
"""FLUX.1-schnell (FLUX.1-dev's shape without the guidance embedder): the tiny FLUX without it."""

FLUX_INPAINT = family("FluxInpaint", flux_variant(in_channels=96),
                      flux_cond(guidance=30.0, concat_latent_image=Randn((1, 16, 8, 8)),
                                concat_mask=torch.ones((1, 1, 64, 64))))
"""FLUX.1-Fill (in_channels 96: 16 noise + 16 masked-image + 64 mask channels after 2x2 patching): the tiny FLUX
with 96 inputs; the conditioning carries InpaintModelConditioning's ``concat_latent_image`` and ``concat_mask``."""

FLUX2 = family("Flux2", fitted(FLUX_PARAMS, {
    "image_model": "flux2", "in_channels": 128, "out_channels": 128, "vec_in_dim": None, "context_in_dim": 64,
    "hidden_size": 128, "mlp_ratio": 3.0, "num_heads": 2, "depth": 1, "depth_single_blocks": 1,
    "axes_dim": [16, 16, 16, 16], "theta": 2000, "patch_size": 1, "qkv_bias": False, "guidance_embed": True,
    "global_modulation": True, "mlp_silu_act": True, "ops_bias": False, "default_ref_method": "index",
    "ref_index_scale": 10.0,
}, dict(FLUX_VERSIONED, txt_ids_dims=[3])), cond(64, guidance=4.0, **NO_POOLED), size=4)
"""FLUX.2-dev (hidden 6144, 48 heads, axes 4x32, 8 double + 48 single blocks, Mistral context 15360, 128-channel
latents at 1/16): hidden 128, 2 heads, axes 4x16, 1 + 1 blocks, context 64, 4x4 latents (the model pads the text
to 512 tokens)."""

LONGCAT_IMAGE = family("LongCatImage", flux_variant(
    guidance_embed=False, vec_in_dim=None, context_in_dim=48, versioned={"txt_ids_dims": [1, 2]}),
    cond(48, **NO_POOLED))
"""LongCat-Image (a FLUX.1 layout: hidden 3072, Qwen2.5-VL context 3584, no pooled input, no guidance, text
positions on axes 1 and 2): the tiny FLUX with context 48, no pooled input and no guidance."""

CHROMA_TINY = {
    "image_model": "chroma", "in_channels": 64, "out_channels": 64, "context_in_dim": 64, "hidden_size": 128,
    "mlp_ratio": 4.0, "num_heads": 2, "depth": 1, "depth_single_blocks": 1, "axes_dim": [8, 28, 28],
    "theta": 10000, "patch_size": 2, "qkv_bias": True, "in_dim": 64, "out_dim": 128, "hidden_dim": 64,
    "n_layers": 1,
}
CHROMA_VERSIONED = {"txt_ids_dims": [], "vec_in_dim": None}

CHROMA = family("Chroma", fitted(CHROMA_PARAMS, CHROMA_TINY, CHROMA_VERSIONED), cond(64, **NO_POOLED))
"""Chroma (FLUX.1-schnell pruned: hidden 3072, 19 + 38 blocks, T5 4096, a modulation approximator of width 5120
and 5 layers instead of per-block modulation): hidden 128, 1 + 1 blocks, context 64, approximator 64 x 1."""

CHROMA_RADIANCE = family("ChromaRadiance", fitted(CHROMA_RADIANCE_PARAMS, dict(
    CHROMA_TINY, image_model="chroma_radiance", in_channels=3, out_channels=3, patch_size=16, nerf_hidden_size=16,
    nerf_mlp_ratio=2, nerf_depth=1, nerf_max_freqs=4, nerf_tile_size=64, nerf_final_head_type="conv",
    nerf_embedder_dtype=torch.float32,
), dict(CHROMA_VERSIONED, use_x0=False, use_sequential_txt_ids=False)), cond(64, **NO_POOLED), size=32)
"""Chroma-Radiance (Chroma in pixel space: 16x16 RGB patches, a NeRF head of width 64 and 4 layers per pixel):
the tiny Chroma on 32x32 RGB images, NeRF head of width 16 and 1 layer."""

HUNYUAN_IMAGE_TINY = {
    "image_model": "hunyuan_video", "in_channels": 64, "out_channels": 64, "vec_in_dim": None,
    "context_in_dim": 64, "hidden_size": 64, "mlp_ratio": 4.0, "num_heads": 2, "depth": 1,
    "depth_single_blocks": 1, "axes_dim": [16, 16], "theta": 256, "patch_size": [1, 1], "qkv_bias": True,
    "guidance_embed": True, "byt5": False, "meanflow": False, "use_cond_type_embedding": False,
    "vision_in_dim": None,
}
HUNYUAN_VERSIONED = {"meanflow_sum": False}

HUNYUAN_IMAGE21 = family("HunyuanImage21", fitted(HUNYUAN_PARAMS, HUNYUAN_IMAGE_TINY, HUNYUAN_VERSIONED),
                         cond(64, guidance=3.5), size=4)
"""HunyuanImage-2.1 (hidden 3584, 28 heads, 20 double + 40 single blocks, Qwen2.5-VL context 3584, 64-channel
latents at 1/32, 1x1 patches, guidance-distilled): hidden 64, 2 heads, 1 + 1 blocks, context 64, 4x4 latents;
the ByT5 glyph branch (fixed width 2048) is left out, as for prompts without quoted text."""

HUNYUAN_IMAGE21_REFINER = family("HunyuanImage21Refiner", fitted(HUNYUAN_PARAMS, dict(
    HUNYUAN_IMAGE_TINY, in_channels=128, patch_size=[1, 1, 1], axes_dim=[8, 12, 12], guidance_embed=True,
), HUNYUAN_VERSIONED), cond(64, guidance=3.5), size=4)
"""HunyuanImage-2.1 refiner (the 2.1 transformer on 3-D latents, 128 inputs: noise + the 64-channel image to
refine): the tiny HunyuanImage-2.1 with 3-D 1x1x1 patches and 128 inputs (the concat image defaults to zeros)."""


# ----------------------------------------------------------------------------------------------- MMDiT-like
QWEN_IMAGE = TinyFamily(
    "QwenImage", tiny_models.qwen_image_unet_config, lambda seed: tiny_models.conditioning("qwen_image", seed=seed),
    lambda batch: tiny_models.latent_shape("qwen_image", batch))
"""Qwen-Image (60 layers, 24 heads of 128, Qwen2.5-VL context 3584): tiny_models' 1 layer, 2 heads of 32,
context 64; 5-D latents ``[B, 16, 1, H, W]``."""

MAGE_FLOW = family("MageFlow", fixed({
    "image_model": "mage_flow", "in_channels": 128, "out_channels": 128, "num_layers": 1,
    "attention_head_dim": 32, "num_attention_heads": 2, "joint_attention_dim": 64, "axes_dims_rope": (8, 12, 12),
}), cond(64), size=4)
"""Mage-Flow (Qwen-Image layout on FLUX.2 latents: 128 channels, Qwen3 context 2560, 24 heads of 128):
1 layer, 2 heads of 32, context 64, 4x4 latents."""

HIDREAM_LLAMA_DIM = 48
HIDREAM = family("HiDream", fixed({
    "image_model": "hidream", "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 1,
    "num_single_layers": 1, "attention_head_dim": 32, "num_attention_heads": 2,
    "caption_channels": [64, HIDREAM_LLAMA_DIM], "text_emb_dim": 32, "num_routed_experts": 2,
    "num_activated_experts": 1, "axes_dims_rope": [16, 8, 8], "max_resolution": [128, 128], "llama_layers": [0, 1],
}), cond(64, pooled_output=Randn((1, 32)), conditioning_llama3=Randn((1, 2, TOKENS, HIDREAM_LLAMA_DIM))))
"""HiDream-I1 (16 double + 32 single MoE blocks, 20 heads of 128, T5 4096 + 48 Llama-3.1 layers of 4096 as
``conditioning_llama3`` [1, layers, T, 4096], pooled CLIP 2048): 1 + 1 blocks, 2 heads of 32, 2 experts, T5 64,
2 Llama layers of 48, pooled 32."""

AURA_FLOW = family("AuraFlow", fixed({
    "in_channels": 4, "out_channels": 4, "patch_size": 2, "dim": 64, "n_layers": 2, "n_double_layers": 1,
    "n_heads": 2, "global_conddim": 64, "cond_seq_dim": 48, "max_seq": 256,
}), cond(48))
"""AuraFlow v0.3 (dim 3072, 4 double + 32 single layers, 12 heads, Pile-T5 2048, SDXL 4-channel latents): dim 64,
1 + 1 layers, 2 heads, context 48."""

LENS = family("Lens", fixed({
    "image_model": "lens", "patch_size": 2, "in_channels": 128, "out_channels": 32, "num_layers": 1,
    "attention_head_dim": 32, "num_attention_heads": 2, "enc_hidden_dim": 32, "axes_dims_rope": (8, 12, 12),
    "multi_layer_encoder_feature": True, "selected_layer_index": (0, 1),
}), cond(64), size=4)
"""Microsoft Lens (48 dual-stream layers, 24 heads of 64, GPT-OSS-20B features of 4 layers x 2880 concatenated,
FLUX.2 latents): 1 layer, 2 heads of 32, 2 text layers of 32 (context 64), 4x4 latents."""

ERNIE_IMAGE = family("ErnieImage", fixed({
    "image_model": "ernie", "hidden_size": 64, "num_attention_heads": 2, "num_layers": 1, "ffn_hidden_size": 128,
    "in_channels": 128, "out_channels": 128, "patch_size": 1, "text_in_dim": 48, "rope_axes_dim": (8, 12, 12),
}), cond(48), size=4)
"""ERNIE-Image (hidden 4096, 32 heads, 36 layers, text 3072, FLUX.2 latents): hidden 64, 2 heads, 1 layer,
text 48, 4x4 latents."""

KREA2 = family("Krea2", fixed({
    "image_model": "krea2", "features": 64, "tdim": 32, "txtdim": 32, "heads": 2, "kvheads": 1, "multiplier": 2,
    "layers": 1, "patch": 2, "channels": 16, "txtlayers": 2, "txtheads": 2, "txtkvheads": 2,
}), cond(64))
"""Krea 2 (features 6144, 48 heads / 12 kv heads, 28 layers, a text-fusion stack over 12 Qwen3-VL layers of
2560 concatenated): features 64, 2 heads / 1 kv head, 1 layer, 2 text layers of 32 (context 64)."""

JOY_IMAGE = family("JoyImage", fixed({
    "image_model": "joyimage", "patch_size": [1, 2, 2], "in_channels": 16, "hidden_size": 256,
    "num_attention_heads": 2, "text_dim": 64, "num_layers": 1,
}), cond(64))
"""JoyImage (hidden 3072, 24 heads of 128, 20 double blocks, text 4096, Wan 2.1 latents): hidden 256, 2 heads of 128
(supported_models.JoyImage fixes the RoPE axes to 16 + 56 + 56 = 128), 1 block, text 64; 5-D latents
``[B, 16, 1, H, W]``."""


# ----------------------------------------------------------------------------------------------- Lumina-like
LUMINA_TINY = {
    "image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 64, "n_layers": 1, "n_refiner_layers": 1,
    "n_heads": 2, "n_kv_heads": 1, "multiple_of": 16, "qk_norm": True, "cap_feat_dim": 48,
    "axes_dims": [8, 12, 12], "axes_lens": [300, 512, 512], "rope_theta": 10000.0, "ffn_dim_multiplier": 4.0,
}
#: z-image modulation embeds the timestep to 256 channels and projects it with min(dim, 256) inputs: dim >= 256
ZIMAGE_TINY = dict(LUMINA_TINY, dim=256, n_kv_heads=2, axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512],
                   rope_theta=256.0, ffn_dim_multiplier=8.0 / 3.0, z_image_modulation=True, time_scale=1000.0,
                   pad_tokens_multiple=32)

LUMINA2 = family("Lumina2", fixed(LUMINA_TINY), cond(48))
"""Lumina-Image 2.0 (dim 2304, 26 layers, 24 heads / 8 kv heads, Gemma-2 2304 context): dim 64, 1 layer + 1 refiner
layer, 2 heads / 1 kv head, context 48."""

ZIMAGE = family("ZImage", fixed(ZIMAGE_TINY), cond(48))
"""Z-Image (dim 3840, 30 layers, 30 heads, Qwen3-4B 2560 context padded to multiples of 32, z-image modulation):
dim 256 (the least z-image modulation takes), 1 layer + 1 refiner layer, 2 heads of 128, context 48, the same
padding and modulation."""

ZIMAGE_PIXEL = family("ZImagePixelSpace", fixed(dict(
    ZIMAGE_TINY, image_model="zimage_pixel", patch_size=8, in_channels=3, decoder_in_channels=3 * 8 * 8,
    decoder_hidden_size=32, decoder_num_res_blocks=1, decoder_max_freqs=4,
)), cond(48), size=32)
"""Z-Image pixel space (Z-Image on RGB patches with a per-pixel decoder of width 3840, 4 res blocks): the tiny
Z-Image on 32x32 RGB images in 8x8 patches, decoder width 32, 1 res block."""

OMNIGEN_TINY = {
    "image_model": "omnigen2", "patch_size": 2, "in_channels": 16, "hidden_size": 64, "num_layers": 1,
    "num_refiner_layers": 1, "num_attention_heads": 2, "num_kv_heads": 1, "multiple_of": 16,
    "axes_dim_rope": [8, 12, 12], "axes_lens": [1024, 1664, 1664], "text_feat_dim": 48, "timestep_scale": 1000.0,
}

#: a text encoder's attention mask (integers): Omnigen2.extra_conds turns it into the ``num_tokens`` the model needs
TEXT_MASK = torch.ones((1, TOKENS), dtype=torch.long)

OMNIGEN2 = family("Omnigen2", fixed(OMNIGEN_TINY), cond(48, attention_mask=TEXT_MASK))
"""OmniGen2 (hidden 2520, 32 layers, 21 heads / 7 kv heads, Qwen2.5-VL 2048 context): hidden 64, 1 layer + 1
refiner layer, 2 heads / 1 kv head, context 48 with its attention mask."""

BOOGU = family("Boogu", fixed({
    "image_model": "boogu", "patch_size": 2, "in_channels": 16, "hidden_size": 64, "num_layers": 1,
    "num_double_stream_layers": 1, "num_refiner_layers": 1, "num_attention_heads": 2, "num_kv_heads": 1,
    "multiple_of": 16, "axes_dim_rope": [8, 12, 12], "axes_lens": [2048, 1664, 1664], "instruction_feat_dim": 48,
    "timestep_scale": 1000.0,
}), cond(48, attention_mask=TEXT_MASK))
"""Boogu-Image (OmniGen2 derivative: hidden 3360, 8 dual-stream + 32 single-stream layers, 28 heads / 7 kv heads,
instruction features 4096): hidden 64, 1 + 1 layers, 2 heads / 1 kv head, context 48 with its attention mask."""

PIXELDIT = family("PixelDiTT2I", fixed({
    "image_model": "pixeldit_t2i", "in_channels": 3, "num_groups": 2, "hidden_size": 64, "pixel_hidden_size": 8,
    "pixel_attn_hidden_size": 32, "pixel_num_groups": 2, "patch_depth": 1, "pixel_depth": 1, "patch_size": 16,
    "txt_embed_dim": 48, "txt_max_length": 16,
}), cond(48, attention_mask=TEXT_MASK), size=32)
"""PixelDiT T2I (pixel space: 16x16 patches, hidden 1536 with 24 heads over 14 patch blocks, per-pixel blocks of
width 16 / attention 1152, Gemma-2 2304 context up to 300 tokens): hidden 64, 2 heads, 1 patch block and 1 pixel
block (width 8, attention 32), context 48 up to 16 tokens, 32x32 RGB images."""


KANDINSKY5_IMAGE = family("Kandinsky5Image", fixed({
    "image_model": "kandinsky5", "in_visual_dim": 16, "out_visual_dim": 16, "in_text_dim": 64, "in_text_dim2": 32,
    "time_dim": 32, "model_dim": 64, "ff_dim": 128, "visual_embed_dim": 64, "patch_size": (1, 2, 2),
    "num_text_blocks": 1, "num_visual_blocks": 1, "axes_dims": (8, 12, 12), "rope_scale_factor": (1.0, 1.0, 1.0),
}), cond(64, pooled_output=Randn((1, 32))))
"""Kandinsky 5 Image Lite (model dim 2560, 2 text + 50 visual blocks, Qwen2.5-VL 3584 context, CLIP pooled 768):
dim 64, 1 + 1 blocks, context 64, pooled 32."""


FAMILIES: list[TinyFamily] = [
    SD3, FLUX, FLUX_SCHNELL, CHROMA, FLUX2, QWEN_IMAGE, ZIMAGE, LUMINA2, HIDREAM, AURA_FLOW, LONGCAT_IMAGE,
    HUNYUAN_IMAGE21, OMNIGEN2, CHROMA_RADIANCE, KANDINSKY5_IMAGE, ERNIE_IMAGE, KREA2, JOY_IMAGE,
    MAGE_FLOW, BOOGU, LENS, ZIMAGE_PIXEL, PIXELDIT, FLUX_INPAINT, HUNYUAN_IMAGE21_REFINER,
]

_AUDIO = "audio model: its latents are audio, which an image reward cannot score"
_3D = "3-D model: it generates shapes or splats, not images an image reward can score"
_PERCEPTION = "perception model: it segments, detects or estimates depth, it does not generate images"

#: the image flow families without a tiny config, and the flow classes of ComfyUI 0.33 that generate neither images
#: nor videos (the video ones are in tiny_video_families), each with the reason
NOT_BUILT: dict[str, str] = {
    "Ideogram4": "supported_models.Ideogram4.unet_extra_config forces the full widths over any config (18 heads "
                 "of 256, MLP 12288, LLM features 53248): its LLM projection alone is 53248 x 4608 = 245M weights",
    "Anima": "its LLM adapter (a 32128 x 1024 token embedding and 6 blocks of width 1024: 135M weights) has fixed "
             "sizes that no unet_config shrinks",
    "HiDreamO1": "its conditioning is token ids (text_input_ids) read by its own Qwen3-VL language model (36 layers of "
                 "4096, vocabulary 151936) and vision tower; a tiny one needs text and vision config overrides not "
                 "attempted here",
    "PiD": "pixel diffusion decoder: it decodes and 4x upscales another model's latent (lq_latent from "
           "PiDConditioning), so its output is fixed by that latent rather than generated from a prompt",
    "ACEStep": _AUDIO,
    "ACEStep15": _AUDIO,
    "StableAudio3": _AUDIO,
    "MiniMaxMusic3": _AUDIO,
    "Hunyuan3Dv2": _3D,
    "Hunyuan3Dv2_1": _3D,
    "Hunyuan3Dv2mini": _3D,
    "Trellis2": _3D,
    "TripoSplat": _3D,
    "SAM3": _PERCEPTION,
    "SAM31": _PERCEPTION,
    "RT_DETR_v4": _PERCEPTION,
    "DepthAnything3": _PERCEPTION,
}
