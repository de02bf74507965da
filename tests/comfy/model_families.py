"""The flow-matching model families of the running ComfyUI, and tiny configs to build them (tests only).

:func:`flow_families` enumerates ``comfy.supported_models.models`` and keeps the classes whose model sampling is a
flow (``comfy.model_sampling.CONST``), asking ComfyUI itself: the model type a class's ``get_model`` passes (or its
``model_base`` class's default) goes through ``comfy.model_base.model_sampling`` with the class's own config.

:data:`TINY` maps a ``supported_models`` class name to a :class:`TinyFamily`: a complete, tiny ``unet_config`` for the
running ComfyUI and a CONDITIONING that fits it. The entries live in :mod:`tiny_image_families` and
:mod:`tiny_video_families`; a family without an entry is reported with the reason, never skipped silently.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from typing import Any, Callable, Optional

import torch


@dataclasses.dataclass(frozen=True)
class TinyFamily:
    """How to build one family tiny on the running ComfyUI.

    * ``name``: the ``comfy.supported_models`` class name (``"Flux2"``, ``"WAN22_T2V"``, ...);
    * ``unet_config()``: the complete config ``cls(config).get_model({})`` takes (fitted to the runtime's parameter
      dataclasses where fields differ between ComfyUI releases); raises :class:`Unbuildable` with the reason when
      this runtime cannot build it;
    * ``conditioning(seed)``: a CONDITIONING ``[[cross_attn [1, T, C], extras]]`` this tiny model accepts (pooled
      output, guidance, attention masks, extra text-encoder outputs: whatever the family's ``extra_conds`` reads);
    * ``latent(batch)``: the latent shape of ``batch`` samples, ``[B, C, H, W]`` or ``[B, C, T, H, W]``, channels and
      dimensions as the family's ``latent_format`` says;
    * ``video``: the latents carry a time axis of more than one frame.
    """

    name: str
    unet_config: Callable[[], dict]
    conditioning: Callable[[int], list]
    latent: Callable[[int], tuple]
    video: bool = False


#: lines test_every_flow_family leaves for the end-of-run summary (conftest.pytest_terminal_summary prints them)
REPORT: list[str] = []


class Unbuildable(Exception):
    """This runtime cannot build the family tiny; the message says why."""


def supported_model_classes() -> dict[str, type]:
    import comfy.supported_models

    return {cls.__name__: cls for cls in comfy.supported_models.models}


def _model_type(cls: type) -> Optional[Any]:
    """The ``comfy.model_base.ModelType`` the class's ``get_model`` builds its model with (None: not found)."""
    import comfy.model_base

    try:
        src = inspect.getsource(cls.get_model)
    except (OSError, TypeError):
        return None
    explicit = re.findall(r"model_type\s*=\s*model_base\.ModelType\.(\w+)", src)
    if explicit:
        return getattr(comfy.model_base.ModelType, explicit[0])
    if "self.model_type(" in src or "model_type=self.model_type" in src:
        return None  # decided from the state dict (e.g. SD2 v-prediction): not a flow family class
    bases = re.findall(r"model_base\.(\w+)\(", src)
    if not bases:
        bases = ["BaseModel"]
    base_cls = getattr(comfy.model_base, bases[0], None)
    if base_cls is None:
        return None
    default = inspect.signature(base_cls.__init__).parameters.get("model_type")
    return None if default is None or default.default is inspect.Parameter.empty else default.default


def is_flow_family(cls: type) -> bool:
    """Whether ComfyUI samples ``cls``'s models with a flow (CONST) model sampling."""
    import comfy.model_base
    import comfy.model_sampling

    model_type = _model_type(cls)
    if model_type is None:
        return False
    try:
        config = cls(dict(cls.unet_config))
        sampling = comfy.model_base.model_sampling(config, model_type)
    except Exception:  # noqa: BLE001 - a config that needs more keys than its detection keys: ask the type alone
        return model_type.name in ("FLOW", "FLUX", "IMG_TO_IMG_FLOW")
    return isinstance(sampling, comfy.model_sampling.CONST)


def flow_families() -> dict[str, type]:
    """Every ``supported_models`` class of the running ComfyUI whose models sample as flows, by class name."""
    return {name: cls for name, cls in supported_model_classes().items() if is_flow_family(cls)}


def tiny_families() -> dict[str, TinyFamily]:
    """The tiny configs of :mod:`tiny_image_families` and :mod:`tiny_video_families`, by class name."""
    import tiny_image_families
    import tiny_video_families

    out: dict[str, TinyFamily] = {}
    for module in (tiny_image_families, tiny_video_families):
        for family in module.FAMILIES:
            assert family.name not in out, f"two tiny configs for {family.name}"
            out[family.name] = family
    return out


def build(family: TinyFamily, seed: int = 0, dtype: Optional[torch.dtype] = None):
    """The tiny model of ``family`` in a ``ModelPatcher``, every weight seeded (N(0, 0.02^2))."""
    from tiny_models import build_model_patcher

    cls = supported_model_classes().get(family.name)
    if cls is None:
        raise Unbuildable(f"this ComfyUI has no supported_models.{family.name}")
    return build_model_patcher(cls, family.unet_config(), seed, dtype=dtype)
