"""ComfyUI glue: from a ComfyUI MODEL to the velocities that ``flowgrpo_core`` works with.

ComfyUI hands models around in several wrappings, all of which this module accepts:

* a ``ModelPatcher`` (the MODEL type that flows between nodes): ``.model`` is the ``BaseModel``;
* a ``BaseModel`` (``comfy.model_base``): holds ``model_sampling`` and ``apply_model``;
* a guider (``comfy.samplers.CFGGuider``): ``.model_patcher``, and ``.inner_model`` while sampling;
* the denoiser a KSAMPLER function receives (``comfy.samplers.KSamplerX0Inpaint``): ``.inner_model`` is the guider.

For a flow-matching model (``model_sampling`` is a ``comfy.model_sampling.CONST``) every one of these callables
returns the denoised ``D = x - sigma * v`` (see ``CONST.calculate_denoised``), so the velocity the network predicted is
``v = (x - D) / sigma`` for any ``sigma > 0``.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Union

import torch

from ..flowgrpo_core.sde import velocity_from_denoised

__all__ = [
    "NOT_FLOW_MODEL_MESSAGE",
    "find_model_sampling",
    "is_flow_model",
    "require_flow_model",
    "predict_velocity",
    "velocity_from_denoised",
]

NOT_FLOW_MODEL_MESSAGE = (
    "FlowGRPO needs a flow-matching model (FLUX, Qwen-Image, SD3, ...); this model predicts {kind} "
    "(SD1.5/SDXL-style) — load a flow model, or remove the node that changed its sampling type "
    "(e.g. ModelSamplingDiscrete)."
)

# Attributes to follow, in order, when looking for ``model_sampling`` inside ComfyUI's wrappers.
_WRAPPER_ATTRS = ("inner_model", "model_patcher", "model")
_MAX_DEPTH = 6


def find_model_sampling(model: Any) -> Optional[Any]:
    """The ``model_sampling`` object in effect for ``model`` (any wrapping listed in the module doc), or None.

    While sampling, the object found through ``inner_model`` is the one actually used (object patches such as
    ``ModelSamplingSD3`` or ``ModelSamplingDiscrete`` are applied to it); a bare ``ModelPatcher`` is asked through
    ``get_model_object`` so that its pending object patches count too.
    """
    seen = set()
    obj = model
    for _ in range(_MAX_DEPTH):
        if obj is None or id(obj) in seen:
            return None
        seen.add(id(obj))
        get_object = getattr(obj, "get_model_object", None)
        if callable(get_object):  # ModelPatcher: includes object patches not yet applied
            try:
                return get_object("model_sampling")
            except (AttributeError, KeyError):
                pass
        sampling = getattr(obj, "model_sampling", None)
        if sampling is not None:
            return sampling
        obj = next((getattr(obj, a) for a in _WRAPPER_ATTRS if getattr(obj, a, None) is not None), None)
    return None


def _const_class():
    import comfy.model_sampling  # ComfyUI's runtime; imported lazily so the module imports without it

    return comfy.model_sampling.CONST


def is_flow_model(model: Any) -> bool:
    """True when ``model``'s ``model_sampling`` is a ``comfy.model_sampling.CONST`` (rectified flow)."""
    sampling = find_model_sampling(model)
    return sampling is not None and isinstance(sampling, _const_class())


def _prediction_kind(sampling: Any) -> str:
    import comfy.model_sampling as ms

    for cls, name in ((getattr(ms, "V_PREDICTION", None), "v"), (getattr(ms, "X0", None), "x0"),
                      (getattr(ms, "EPS", None), "eps")):
        if cls is not None and isinstance(sampling, cls):
            return name
    return type(sampling).__name__


def require_flow_model(model: Any) -> Any:
    """Return ``model``'s ``model_sampling`` if it is a flow model, else raise a ValueError that says what to do."""
    sampling = find_model_sampling(model)
    if sampling is None:
        raise ValueError(f"FlowGRPO could not find model_sampling on {type(model).__name__}; pass a ComfyUI MODEL")
    if not isinstance(sampling, _const_class()):
        raise ValueError(NOT_FLOW_MODEL_MESSAGE.format(kind=_prediction_kind(sampling)))
    return sampling


def _sigma_batch(x: torch.Tensor, sigma: Union[float, torch.Tensor]) -> torch.Tensor:
    """``sigma`` (float, 0-d or ``[B]``) as a ``[B]`` tensor on ``x``'s device and dtype, as samplers pass it."""
    s = torch.as_tensor(sigma, device=x.device, dtype=x.dtype)
    if s.dim() == 0:
        return s * x.new_ones([x.shape[0]])
    return s.reshape(-1)


def predict_velocity(denoiser: Callable[..., torch.Tensor], x: torch.Tensor, sigma: Union[float, torch.Tensor],
                     **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Call a ComfyUI denoiser at ``(x, sigma)`` and return ``(velocity, denoised)``.

    ``denoiser`` is anything with ComfyUI's ``(x, sigma, **kwargs) -> denoised`` convention: the ``model`` a KSAMPLER
    function receives (kwargs = its ``extra_args``), or ``BaseModel.apply_model`` (kwargs = ``c_crossattn``, ``y``,
    ``guidance``, ...). ``sigma`` is broadcast to the batch. The velocity is fp32; ``denoised`` is returned as is.
    The caller must have checked the model is a flow model (:func:`require_flow_model`).
    """
    sigma_b = _sigma_batch(x, sigma)
    denoised = denoiser(x, sigma_b, **kwargs)
    return velocity_from_denoised(x, denoised, sigma_b), denoised
