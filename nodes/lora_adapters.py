"""Trainable LoRA adapters on a ComfyUI MODEL, through ComfyUI's weight-adapter mechanism.

* :func:`attach_trainable_lora` clones the ``ModelPatcher`` and adds fp32 LoRA adapters to the Linear weights of
  ``diffusion_model`` that :func:`~.lora_targets.lora_target_names` picks (``add_weight_wrapper``, as
  ``TrainLoraNode`` does). The input MODEL keeps no wrapper: ComfyUI installs a patcher's wrappers into the shared
  modules only while that patcher is the loaded one, and loading another clone (e.g. the original in a stock
  sampler) replaces them.
* :func:`lora_disabled` passes every adapter of a patcher through unchanged (the frozen reference policy).
* :func:`merged_lora_weights` (a rollout) runs the adapted Linear layers on weights merged once, as plain
  ``F.linear`` where ComfyUI allows it, instead of merging at every forward.

The clone shares ``BaseModel`` with the input MODEL; the only lasting change made to it is replacing inference-tensor
parameters by normal clones with identical values (and ``requires_grad=False`` on the base); during a rollout the
adapted layers hold merged weights, and get their own back at its end. The base weights stay in the dtype they were
loaded in (fp8 included): the adapters are fp32 and ComfyUI's weight function computes ``w + scale * up @ down`` in
fp32 before casting to the dtype the layer computes in.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from typing import Any, Iterator, Optional

import torch
from torch import nn

from .lora_targets import lora_target_names

__all__ = ["attach_trainable_lora", "lora_adapters", "lora_disabled", "merged_lora_weights", "SWAP_MERGED_WEIGHTS",
           "make_inference_params_trainable_", "refuse_swapped"]


@functools.lru_cache(maxsize=None)
def _switchable_lora_class() -> type:
    """ComfyUI's ``LoraDiff`` (``comfy.weight_adapter.lora``) with an ``enabled`` switch (created lazily: comfy)."""
    from comfy.weight_adapter.lora import LoraDiff

    class SwitchableLoraDiff(LoraDiff):
        """``w + alpha / rank * up @ down`` while ``enabled``; ``w`` unchanged otherwise (the reference policy).

        Within :func:`merged_lora_weights` (``merged`` is a dict), a call without gradients returns the merged weight
        computed at its first call for that dtype and device instead of merging again at every forward, and
        ``swapped`` is set while the adapter's Linear layer holds the merged weight itself (the adapter then is out
        of the layer's weight functions; should ComfyUI put it back on a reload, it passes the weight through).
        """

        enabled = True
        merged: Optional[dict] = None
        scope: Optional["_MergeScope"] = None
        swapped: Optional["_Swap"] = None

        def __call__(self, w: torch.Tensor) -> torch.Tensor:
            if not self.enabled:
                return w
            if self.merged is None or torch.is_grad_enabled():
                return super().__call__(w)
            if self.swapped is not None and self.swapped.active():
                return w  # already the merged weight
            key = (w.dtype, w.device, tuple(w.shape))
            if key not in self.merged:
                self.merged[key] = self.merge(w)
            return self.merged[key]

        def merge(self, w: torch.Tensor) -> torch.Tensor:
            """``w + alpha / rank * up @ down`` in ``w``'s dtype without autograd: bitwise what ``LoraDiff.__call__``
            returns (the same fp32 product, scaling and sum, rounded once to ``w``'s dtype), with the scaling and the
            sum done in place on the product instead of in two more full-size temporaries."""
            with torch.no_grad():
                diff = self.lora_up.weight @ self.lora_down.weight
                diff = diff.reshape(w.shape).mul_(self.alpha / self.rank).add_(w)
                return diff.to(w.dtype)

    return SwitchableLoraDiff


def _make_adapter(weight: torch.Tensor, rank: int, alpha: float, generator: torch.Generator) -> nn.Module:
    """A switchable fp32 LoRA for ``weight`` ``[out, in]``: up ``[out, rank]`` = 0, down ``[rank, in]`` kaiming-uniform.

    Same layout as ``comfy.weight_adapter.adapter_maps["LoRA"].create_train`` (which zeroes *down* instead).
    """
    out_dim, in_dim = weight.shape
    up = torch.zeros(out_dim, rank, dtype=torch.float32)
    down = torch.empty(rank, in_dim, dtype=torch.float32)
    nn.init.kaiming_uniform_(down, a=math.sqrt(5), generator=generator)
    adapter = _switchable_lora_class()((up, down, float(alpha), None, None, None)).float()
    adapter.to(weight.device)
    adapter.lora_up.weight.requires_grad_(True)
    adapter.lora_down.weight.requires_grad_(True)
    adapter.alpha.requires_grad_(False)
    return adapter


def _is_inference(t: torch.Tensor) -> bool:
    """Whether ``t`` is a plain inference tensor. Wrapper subclasses (quantized weights of 2026 runtimes' mixed
    precision ops) stay as loaded: ComfyUI moves them only inside inference mode, and autograd saves their
    dequantized copy, not them."""
    return type(t) in (torch.Tensor, nn.Parameter) and t.is_inference()


def make_inference_params_trainable_(module: nn.Module) -> int:
    """Replace every parameter and buffer of ``module`` that is a plain inference tensor by a normal clone (same
    values, ``requires_grad=False``), so that autograd may save it for backward (RMSNorm scales, ...); returns how
    many."""
    count = 0
    with torch.inference_mode(False):
        for m in module.modules():
            for name, p in list(m._parameters.items()):
                if p is not None and _is_inference(p):
                    m._parameters[name] = nn.Parameter(p.clone(), requires_grad=False)
                    count += 1
            for name, b in list(m._buffers.items()):
                if b is not None and _is_inference(b):
                    m._buffers[name] = b.clone()
                    count += 1
    return count


def _refuse_scaled_weights(diffusion_model: nn.Module, names: list[str]) -> None:
    """ValueError for target layers whose weight is stored scaled (ComfyUI's scaled-fp8 / mixed-precision quantized
    checkpoint formats): ComfyUI applies weight adapters there before the layer's scale (0.3.x) or moves the
    quantized weights only in inference mode (2026 runtimes), so the LoRA would train on a different weight than
    the one stock loaders patch."""
    for name in names:
        module = diffusion_model.get_submodule(name)
        if type(module.weight) not in (torch.Tensor, nn.Parameter) or getattr(module, "scale_weight", None) is not None:
            raise ValueError(f"this model's weights are stored in a scaled / quantized format ({name}: "
                             f"{type(module).__qualname__}), which FlowGRPO does not train on yet; load a bf16/fp16 "
                             "file, with UNETLoader's weight_dtype fp8_e4m3fn to keep the base in fp8")


def attach_trainable_lora(model_patcher: Any, rank: int = 8, alpha: float = 8.0, targets: str = "attention",
                          seed: int = 0) -> tuple[Any, dict[str, torch.Tensor]]:
    """Clone ``model_patcher`` and put a trainable LoRA on the ``targets`` Linear weights of its diffusion model.

    Returns ``(patcher_clone, lora_params)``; ``lora_params`` maps ``diffusion_model.<path>.lora_up.weight``
    (``[out, rank]``, zeros: the fresh policy equals the base), ``.lora_down.weight`` (``[rank, in]``, kaiming-uniform
    from ``seed``) and ``.alpha`` (0-d, frozen) to fp32 tensors, the key layout of ComfyUI LoRA files. The base
    weights are frozen, and inference-tensor parameters are replaced by normal clones with the same values.
    """
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    names = lora_target_names(model_patcher.model, targets)
    _refuse_scaled_weights(model_patcher.model.diffusion_model, names)

    patcher = model_patcher.clone()
    lora_params: dict[str, torch.Tensor] = {}
    generator = torch.Generator().manual_seed(int(seed))
    with torch.inference_mode(False):
        diffusion_model = patcher.model.diffusion_model
        diffusion_model.requires_grad_(False)
        make_inference_params_trainable_(patcher.model)
        for name in names:
            key = f"diffusion_model.{name}"
            adapter = _make_adapter(diffusion_model.get_submodule(name).weight, rank, alpha, generator)
            patcher.add_weight_wrapper(f"{key}.weight", adapter)
            for pname, param in adapter.named_parameters():
                lora_params[f"{key}.{pname}"] = param
    return patcher, lora_params


def lora_adapters(patcher: Any) -> list[nn.Module]:
    """The FlowGRPO LoRA adapters among ``patcher``'s weight wrappers, in insertion order."""
    cls = _switchable_lora_class()
    return [f for fns in patcher.weight_wrapper_patches.values() for f in fns if isinstance(f, cls)]


@contextlib.contextmanager
def lora_disabled(patcher: Any) -> Iterator[None]:
    """Within the context every FlowGRPO adapter of ``patcher`` returns the base weight unchanged."""
    adapters = lora_adapters(patcher)
    if not adapters:
        raise ValueError("this MODEL has no FlowGRPO LoRA to disable; use attach_trainable_lora first")
    refuse_swapped(adapters, "lora_disabled")
    previous = [a.enabled for a in adapters]
    for a in adapters:
        a.enabled = False
    try:
        yield
    finally:
        for a, was in zip(adapters, previous):
            a.enabled = was


#: :func:`merged_lora_weights` swaps the merged weights into the Linear layers (False: only its per-rollout cache;
#: the tests compare both)
SWAP_MERGED_WEIGHTS = True


@contextlib.contextmanager
def merged_lora_weights(patcher: Any, headroom: float = 1.25, swap: Optional[bool] = None) -> Iterator[bool]:
    """Within the context (a rollout: the LoRA and the base weights do not change) the FlowGRPO-adapted Linear
    layers of ``patcher`` run on weights merged once, ``w + scale * up @ down``, instead of ComfyUI's weight adapters
    copying and merging every adapted weight at every forward (a cost per weight, not per token: at FLUX width and
    few tokens, more than the forward itself).

    With ``swap`` (default :data:`SWAP_MERGED_WEIGHTS`), at the first sampling forward of a
    :class:`ComfyFlowPolicy` on the loaded model, each adapted layer whose adapter is its only weight function, that
    ComfyUI does not cast (``comfy_cast_weights`` off: no lowvram offload, no manual cast) and whose weight has the
    model's dtype gets a ``Parameter`` holding its merged weight, and the adapter leaves its ``weight_function``:
    the layer then runs ``F.linear`` on it like ComfyUI's stock sampler runs the base model. On exit (also by
    exception) every layer gets its own ``Parameter`` object (moved to where ComfyUI moved the layer meanwhile, if
    it did) and ``weight_function`` list back. The other adapted layers (and all of them without ``swap``, or when
    the model is partially loaded) merge once at their first forward without gradients and reuse the result.

    The merged weights are bitwise those a training forward computes, so replaying the rollout gives the same
    log-probs. Costs one extra copy of the adapted weights while the context lasts; yields False (and ComfyUI merges
    per forward as before) when the load device has less than ``headroom`` times that free, or the patcher has no
    adapter. Nested contexts on the same adapters leave the outer one in charge. Training (``policy.training()``) and
    :func:`lora_disabled` refuse to run while layers hold merged weights.
    """
    adapters = lora_adapters(patcher)
    if any(a.scope is not None for a in adapters):
        yield True
        return
    if not adapters or not _merge_fits(patcher, adapters, headroom):
        yield False
        return
    scope = _MergeScope(patcher, adapters, headroom, SWAP_MERGED_WEIGHTS if swap is None else bool(swap))
    try:
        yield True
    finally:
        scope.close()


def _merge_fits(patcher: Any, adapters: list[nn.Module], headroom: float) -> bool:
    """Whether the load device has ``headroom`` times the memory of one copy of the adapted weights free."""
    import comfy.model_management

    dtype = patcher.model.manual_cast_dtype or patcher.model.get_dtype()
    size = sum(a.lora_up.weight.shape[0] * a.lora_down.weight.shape[1] for a in adapters) * dtype.itemsize
    return size * headroom <= comfy.model_management.get_free_memory(patcher.load_device)


@dataclasses.dataclass(eq=False)
class _Swap:
    """One Linear layer running on its merged weight: what :class:`_MergeScope` gives back on exit."""

    module: nn.Module
    original: nn.Parameter  # the layer's own weight
    functions: list  # its weight_function list before the swap (``[adapter]``)
    installed: list  # the list put in its place (empty: ``ops.Linear`` takes its plain forward)
    merged: nn.Parameter

    def active(self) -> bool:
        """Whether the layer still holds the merged weight (ComfyUI may replace a weight when it unpatches)."""
        return self.module._parameters.get("weight") is self.merged

    def restore(self) -> None:
        module = self.module
        if self.active():
            if self.original.device != self.merged.device:  # ComfyUI moved the layer (an unload) meanwhile
                self.original.data = self.original.data.to(self.merged.device)
            module.weight = self.original
        if module.weight_function is self.installed:  # else a load rebuilt the list, the adapter included
            self.functions.extend(self.installed)  # what ComfyUI appended meanwhile (a partial unload's patch)
            module.weight_function = self.functions


class _MergeScope:
    """The state of one :func:`merged_lora_weights` context; every adapter points to it (``adapter.scope``)."""

    def __init__(self, patcher: Any, adapters: list[nn.Module], headroom: float, swap: bool):
        self.patcher, self.adapters, self.headroom = patcher, adapters, headroom
        self.pending = swap  # the swap needs the loaded model: it is tried at the first sampling forward
        self.swaps: list[_Swap] = []
        for a in adapters:
            a.merged, a.scope = {}, self

    def swap_in(self) -> None:
        """Swap the merged weights into the eligible layers (see :func:`merged_lora_weights`); once per context,
        called by :meth:`ComfyFlowPolicy.velocity` after it loaded the model, before its first sampling forward."""
        if not self.pending:
            return
        self.pending = False
        model = self.patcher.model
        if getattr(model, "model_lowvram", True):  # partially loaded (or never loaded): ComfyUI casts the layers
            return
        if not _merge_fits(self.patcher, self.adapters, self.headroom):  # measured now that the model is loaded
            for a in self.adapters:
                a.merged = None
            return
        dtype = model.get_dtype()
        ours = {id(a) for a in self.adapters}
        # the merged weights must not be inference tensors (ensure_loaded would replace them)
        with torch.inference_mode(False), torch.no_grad():
            for key, functions in self.patcher.weight_wrapper_patches.items():
                for adapter in functions:
                    if id(adapter) in ours and key.endswith(".weight"):
                        self._swap(model.get_submodule(key.removesuffix(".weight")), adapter, dtype)

    def _swap(self, module: nn.Module, adapter: nn.Module, dtype: torch.dtype) -> None:
        weight, bias = module._parameters.get("weight"), module._parameters.get("bias")
        plain = (adapter.enabled and adapter.swapped is None and getattr(module, "comfy_cast_weights", True) is False
                 and len(module.weight_function) == 1 and module.weight_function[0] is adapter
                 and not module.bias_function and weight is not None and type(weight.data) is torch.Tensor
                 and weight.dtype == dtype
                 and (bias is None or (bias.dtype == dtype and bias.device == weight.device)))
        if not plain:
            return
        merged = nn.Parameter(adapter.merge(weight), requires_grad=False)
        swap = _Swap(module=module, original=weight, functions=module.weight_function, installed=[], merged=merged)
        module.weight = merged
        module.weight_function = swap.installed
        adapter.swapped = swap
        self.swaps.append(swap)

    def close(self) -> None:
        with torch.inference_mode(False):
            for swap in reversed(self.swaps):
                swap.restore()
        self.swaps.clear()
        for a in self.adapters:
            a.merged = a.scope = a.swapped = None


def refuse_swapped(adapters: list[nn.Module], what: str) -> None:
    if any(a.swapped is not None for a in adapters):
        raise RuntimeError(f"{what} cannot run inside merged_lora_weights once its layers hold merged weights "
                           "(a rollout context); leave the context first")
