"""ComfyUI CONDITIONING as the batch-first ``apply_model`` kwargs a :class:`~.comfy_policy.ComfyFlowPolicy` takes.

The model's own ``extra_conds`` / ``process_cond`` encode each entry, as ComfyUI's samplers do, so guidance
embeddings, pooled outputs, attention masks and edit models' reference latents arrive as in a stock sampler, for any
family ComfyUI loads.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

__all__ = ["encode_conditioning", "batch_branches"]


_UNSUPPORTED_COND_KEYS = ("area", "mask", "control", "gligen", "hooks", "timestep_start", "timestep_end")


def _on_device(value: Any, device: torch.device) -> Any:
    """A processed cond value on ``device``, tensors as normal (non-inference) clones."""
    if isinstance(value, torch.Tensor):
        with torch.inference_mode(False):
            return value.to(device).clone()
    if isinstance(value, list):
        return [_on_device(v, device) for v in value]
    return value


def _reference_latents(base_model: Any, params: dict, prompt_type: str) -> list:
    """An edit conditioning's ``reference_latents`` with image latents ``[B, C, H, W]`` given a frame axis for models
    with 3-D latents (as ``comfy.sample.fix_empty_latent_channels`` does for the sampled latent). ValueError when
    the model's ``extra_conds`` ignores them (not an edit model: the images would silently change nothing)."""
    dims = getattr(getattr(base_model, "latent_format", None), "latent_dimensions", 2)
    latents = [lat.unsqueeze(2) if dims == 3 and isinstance(lat, torch.Tensor) and lat.dim() == 4 else lat
               for lat in params["reference_latents"]]
    without = {k: v for k, v in params.items() if k != "reference_latents"}
    if base_model.extra_conds(**without).keys() == base_model.extra_conds(**without, reference_latents=latents).keys():
        raise ValueError(f"the {prompt_type} CONDITIONING carries reference images (reference_latents: edit images "
                         f"from FlowGRPO Prompt Source or ReferenceLatent) but this model "
                         f"({type(base_model).__name__}) does not read them, so they would change nothing. Fix: "
                         "train an edit model (Qwen-Image-Edit, FLUX Kontext), or disconnect the edit images")
    return latents


def _encode_one(base_model: Any, conditioning: list, prompt_type: str, latent_shape: tuple, batch_size: int,
                device: torch.device) -> dict[str, Any]:
    import comfy.sampler_helpers

    entries = comfy.sampler_helpers.convert_cond(conditioning)
    if len(entries) != 1:
        raise ValueError(f"the {prompt_type} CONDITIONING has {len(entries)} entries; FlowGRPO needs exactly one "
                         "(combine prompts with ConditioningConcat or encode them as one)")
    entry = entries[0]
    bad = [k for k in _UNSUPPORTED_COND_KEYS if entry.get(k) is not None]
    if bad:
        raise ValueError(f"the {prompt_type} CONDITIONING uses {bad}, which FlowGRPO training does not support")
    noise = torch.zeros(latent_shape)
    params = dict(entry, device=device, noise=noise, prompt_type=prompt_type)
    params.setdefault("width", latent_shape[-1] * 8)
    params.setdefault("height", latent_shape[-2] * 8)
    model_conds = dict(entry["model_conds"])
    if params.get("reference_latents") is not None:
        params["reference_latents"] = _reference_latents(base_model, params, prompt_type)
    model_conds.update(base_model.extra_conds(**params))
    return {k: _on_device(c.process_cond(batch_size=batch_size, area=None, device=device).cond, device)
            for k, c in model_conds.items()}


def encode_conditioning(patcher: Any, positive: list, negative: Optional[list], batch_size: int,
                        latent_shape: tuple, device: Optional[torch.device] = None) -> dict[str, Any]:
    """Batch-first ``apply_model`` kwargs for ``batch_size`` samples, as ``comfy.samplers`` encodes model conds.

    Returns ``{"positive": {...}}`` plus ``"negative"`` when given; each branch maps kwarg names to values repeated
    along the batch: ``c_crossattn [B, T, C]``, ``y [B, P]`` (SD3, FLUX), ``guidance [B]`` (FLUX), ... ``latent_shape``
    is one sample's or the batch's latent shape (only its spatial dims are used).
    """
    device = device or patcher.load_device
    shape = (batch_size, *tuple(latent_shape)[1:])
    out = {"positive": _encode_one(patcher.model, positive, "positive", shape, batch_size, device)}
    if negative is not None:
        out["negative"] = _encode_one(patcher.model, negative, "negative", shape, batch_size, device)
    return out


def batch_branches(positive: dict, negative: dict) -> Optional[dict]:
    """The ``apply_model`` kwargs of both CFG branches as one batch (positive rows, then negative), or None when
    they cannot be batched exactly: other keys, tensors of other shapes (prompt and negative of different token
    lengths) or non-tensor values that differ. ComfyUI's sampler repeats shorter token sequences to batch them;
    that changes joint attention (SD3, FLUX, Qwen-Image), so here the branches then run as two forwards."""
    if positive.keys() != negative.keys():
        return None
    both = {}
    for key, p in positive.items():
        q = negative[key]
        if isinstance(p, torch.Tensor) and isinstance(q, torch.Tensor) and p.dim() > 0:
            if p.shape != q.shape or p.dtype != q.dtype:
                return None
            both[key] = torch.cat([p, q])
        elif p is q or (isinstance(p, (bool, int, float, str)) and type(p) is type(q) and p == q):
            both[key] = p
        else:
            return None
    return both
