"""Which Linear layers of a ComfyUI diffusion model get a LoRA: chosen by role, for any flow model ComfyUI loads.

No per-family tables: the targets come from the model's own modules.

* A **transformer block** is an element of an ``nn.ModuleList`` child of ``diffusion_model`` (SD3 ``joint_blocks``,
  FLUX ``double_blocks`` / ``single_blocks``, Qwen-Image ``transformer_blocks``, Wan ``blocks``, Lumina / Z-Image
  ``layers``, ...).
* Inside a block, a ComfyUI Linear layer (``comfy.ops``: it has ``weight_function``, a 2-D weight) has one **role**
  read from its path relative to the block:

  - ``modulation``: a path segment names a modulation, norm or embedding (``adaLN_modulation``, ``img_mod``,
    ``norm1.linear``, ``time_embed``, ...): never a target (the papers adapt attention and feed-forward layers);
  - ``mlp``: a segment names a feed-forward network (``mlp``, ``ff``, ``ffn``, ``feed_forward``, ``fc1``/``fc2``);
  - ``attention``: a segment names attention (``attn``, ``attention``, ``self_attn``, ``attn1``, ...), or the layer
    is a direct child of the block that is neither of the above (FLUX-style single blocks fuse the attention
    projections and the MLP into ``linear1`` / ``linear2``; they count as attention, as in Flow-GRPO's FLUX setup);
  - anything else (a router gate inside a block, a projection under an unnamed wrapper): not a target.

* ``targets="attention"`` adapts the attention layers, ``"attention_mlp"`` both groups.
* Every target is checked against the keys ComfyUI's LoRA loader maps for this model
  (``comfy.lora.model_lora_keys_unet``), so a saved file (``diffusion_model.<path>.lora_up.weight`` ...) loads in
  stock nodes with no unloaded key.

:func:`model_family` names the family from ComfyUI's own model config class (``SD3`` -> ``"sd3"``, ``Flux2`` ->
``"flux2"``, ``WAN22_T2V`` -> ``"wan22_t2v"``): the name settings, presets and checkpoints record.
"""

from __future__ import annotations

import re
from typing import Any

from torch import nn

__all__ = ["LORA_TARGETS", "ROLES", "model_family", "layer_role", "transformer_blocks", "lora_target_names"]

LORA_TARGETS = ("attention", "attention_mlp")
ROLES = ("attention", "mlp", "modulation", "other")
_GROUPS = {"attention": ("attention",), "attention_mlp": ("attention", "mlp")}

_MODULATION = re.compile(r"(^|_)(mod|modulation|adaln|adanorm|norm\d*|embed(der)?|emb|time|timestep|t_embedder)"
                         r"(_|\d|$)|modulation|adaln", re.IGNORECASE)
_MLP = re.compile(r"(^|_)(mlp|ff|ffn|feed_?forward|fc\d|ff_[a-z]+|experts?|shared_experts)(_|\d|$)", re.IGNORECASE)
_ATTENTION = re.compile(r"attn|attention", re.IGNORECASE)


def _snake(name: str) -> str:
    """``QwenImage`` -> ``qwen_image``, ``ZImage`` -> ``z_image``, ``WAN22_T2V`` -> ``wan22_t2v``."""
    name = re.sub(r"(?<=[a-z])(?=[A-Z])", "_", name)
    name = re.sub(r"(?<=[A-Z])(?=[A-Z][a-z])", "_", name)
    return name.lower()


def model_family(base_model: Any) -> str:
    """The family of a ``comfy.model_base`` model: its ComfyUI model config class (``comfy.supported_models``) in
    snake case (``sd3``, ``flux``, ``flux_schnell``, ``flux2``, ``qwen_image``, ``z_image``, ``wan22_t2v``, ...)."""
    config = getattr(base_model, "model_config", None)
    if config is None:
        raise ValueError(f"{type(base_model).__name__} is not a ComfyUI model (it has no model_config); connect a "
                         "MODEL from a stock loader")
    return _snake(type(config).__name__)


def layer_role(path: str) -> str:
    """The role of the Linear layer at ``path`` relative to its transformer block (``"attn.to_q"``, ``"linear1"``,
    ``"img_mlp.0"``, ``"adaLN_modulation.1"``): one of :data:`ROLES` (see the module doc)."""
    segments = path.split(".")
    names = [s for s in segments if not s.isdigit()]
    if any(_MODULATION.search(s) for s in names):
        return "modulation"
    if any(_MLP.search(s) for s in names):
        return "mlp"
    if any(_ATTENTION.search(s) for s in names) or len(segments) == 1:
        return "attention"
    return "other"


def transformer_blocks(diffusion_model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(path, block)`` for every element of the ``nn.ModuleList`` children of ``diffusion_model``."""
    return [(f"{name}.{i}", block) for name, child in diffusion_model.named_children()
            if isinstance(child, nn.ModuleList) for i, block in enumerate(child)]


def _is_linear(module: nn.Module) -> bool:
    """A ComfyUI Linear layer: a ``comfy.ops`` ``Linear`` (it has weight functions) with a 2-D weight. Quantized
    layers (2026 runtimes' mixed-precision ops) are ``Linear`` classes that do not derive from ``nn.Linear``."""
    weight = getattr(module, "weight", None)
    return (isinstance(module, nn.Linear) or type(module).__name__ == "Linear") \
        and hasattr(module, "weight_function") and weight is not None and weight.dim() == 2


def lora_target_names(base_model: Any, targets: str = "attention") -> list[str]:
    """Module paths (relative to ``diffusion_model``) of the Linear layers ``targets`` adapts, in module order.

    ValueError when ``targets`` is unknown, or no layer qualifies, or ComfyUI's LoRA loader would not map one of them
    (the saved LoRA would then not load in stock nodes)."""
    if targets not in LORA_TARGETS:
        raise ValueError(f"targets must be one of {LORA_TARGETS}, got {targets!r}")
    import comfy.lora

    roles = _GROUPS[targets]
    names = []
    for block_path, block in transformer_blocks(base_model.diffusion_model):
        for path, module in block.named_modules():
            if path and _is_linear(module) and layer_role(path) in roles:
                names.append(f"{block_path}.{path}")
    family = model_family(base_model)
    if not names:
        raise ValueError(f"this {family} model has no {' or '.join(roles)} Linear layer inside a transformer block "
                         "(an nn.ModuleList of diffusion_model); FlowGRPO cannot place a LoRA on it")
    mapped = set(comfy.lora.model_lora_keys_unet(base_model, {}).values())
    unmapped = [n for n in names if f"diffusion_model.{n}.weight" not in mapped]
    if unmapped:
        raise ValueError(f"ComfyUI's LoRA loader maps no key to {len(unmapped)} target layers of this {family} model "
                         f"(first: {unmapped[0]}); a LoRA trained on them would not load in stock nodes")
    return names
