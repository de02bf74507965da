"""A trainable LoRA on a ComfyUI MODEL, exposed as a ``flowgrpo_core`` :class:`FlowPolicy`.

* :func:`attach_trainable_lora` clones the ``ModelPatcher`` and adds fp32 LoRA adapters to selected Linear weights of
  ``diffusion_model`` through ComfyUI's weight-adapter mechanism (``add_weight_wrapper``, as ``TrainLoraNode`` does).
  The input MODEL keeps no wrapper: ComfyUI installs a patcher's wrappers into the shared modules only while that
  patcher is the loaded one, and loading another clone (e.g. the original in a stock sampler) replaces them.
* :func:`lora_disabled` passes every adapter of a patcher through unchanged (the frozen reference policy).
* :func:`merged_lora_weights` (a rollout) runs the adapted Linear layers on weights merged once, as plain
  ``F.linear`` where ComfyUI allows it, instead of merging at every forward.
* :func:`encode_conditioning` turns CONDITIONING lists into the batch-first dict of ``apply_model`` kwargs that
  :func:`flowgrpo_core.policy.index_cond` slices.
* :class:`ComfyFlowPolicy` computes ``v`` from ``BaseModel.apply_model`` (which returns the denoised sample), with
  true CFG and Qwen-Image's optional per-token norm rescale. Sample under ``torch.no_grad()``; run every update
  (forward and backward) inside ``with policy.training():``.

The clone shares ``BaseModel`` with the input MODEL; the only lasting change made to it is replacing inference-tensor
parameters by normal clones with identical values (and ``requires_grad=False`` on the base); during a rollout the
adapted layers hold merged weights, and get their own back at its end.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import re
from typing import Any, Iterator, Optional

import torch
from torch import nn

from ..flowgrpo_core.sde import velocity_from_denoised
from .compat import interrupts_held, training_mode

__all__ = [
    "LORA_TARGETS",
    "TARGET_PATTERNS",
    "model_family",
    "attach_trainable_lora",
    "lora_adapters",
    "lora_disabled",
    "merged_lora_weights",
    "SWAP_MERGED_WEIGHTS",
    "make_inference_params_trainable_",
    "encode_conditioning",
    "batch_branches",
    "cfg_norm_rescale",
    "mutates_saved_tensors",
    "mutation_guard",
    "gradient_checkpointing",
    "ComfyFlowPolicy",
]

LORA_TARGETS = ("attention", "attention_mlp")

# Module-name regexes (relative to ``diffusion_model``) per family and target group.
# FLUX single blocks fuse attention and MLP in ``linear1`` (qkv + mlp_in) and ``linear2`` (proj + mlp_out), so they
# belong to the attention group.
_ATTN, _MLP = "attention", "mlp"
TARGET_PATTERNS: dict[str, dict[str, str]] = {
    "sd3": {
        _ATTN: r"joint_blocks\.\d+\.(context_block|x_block)\.attn2?\.(qkv|proj)",
        _MLP: r"joint_blocks\.\d+\.(context_block|x_block)\.mlp\.(fc1|fc2)",
    },
    "flux": {
        _ATTN: r"(double_blocks\.\d+\.(img|txt)_attn\.(qkv|proj)|single_blocks\.\d+\.(linear1|linear2))",
        _MLP: r"double_blocks\.\d+\.(img|txt)_mlp\.(0|2)",
    },
    "qwen_image": {
        _ATTN: r"transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)",
        _MLP: r"transformer_blocks\.\d+\.(img|txt)_mlp\.net\.(0\.proj|2)",
    },
}


def model_family(base_model: Any) -> str:
    """``"sd3"``, ``"flux"`` or ``"qwen_image"`` for a ``comfy.model_base`` model; ValueError otherwise."""
    import comfy.model_base as mb

    for cls_name, family in (("QwenImage", "qwen_image"), ("Flux", "flux"), ("SD3", "sd3")):
        cls = getattr(mb, cls_name, None)
        if cls is not None and isinstance(base_model, cls):
            return family
    raise ValueError(f"FlowGRPO LoRA targets are defined for SD3, FLUX and Qwen-Image; got {type(base_model).__name__}")


# ----------------------------------------------------------------------------------------------- adapters
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


def make_inference_params_trainable_(module: nn.Module) -> int:
    """Replace every parameter and buffer of ``module`` that is an inference tensor by a normal clone (same values,
    ``requires_grad=False``), so that autograd may save it for backward (RMSNorm scales, ...); returns how many."""
    count = 0
    with torch.inference_mode(False):
        for m in module.modules():
            for name, p in list(m._parameters.items()):
                if p is not None and p.is_inference():
                    m._parameters[name] = nn.Parameter(p.clone(), requires_grad=False)
                    count += 1
            for name, b in list(m._buffers.items()):
                if b is not None and b.is_inference():
                    m._buffers[name] = b.clone()
                    count += 1
    return count


def attach_trainable_lora(model_patcher: Any, rank: int = 8, alpha: float = 8.0, targets: str = "attention",
                          seed: int = 0) -> tuple[Any, dict[str, torch.Tensor]]:
    """Clone ``model_patcher`` and put a trainable LoRA on the ``targets`` Linear weights of its diffusion model.

    Returns ``(patcher_clone, lora_params)``; ``lora_params`` maps ``diffusion_model.<path>.lora_up.weight``
    (``[out, rank]``, zeros: the fresh policy equals the base), ``.lora_down.weight`` (``[rank, in]``, kaiming-uniform
    from ``seed``) and ``.alpha`` (0-d, frozen) to fp32 tensors, the key layout of ComfyUI LoRA files. The base
    weights are frozen, and inference-tensor parameters are replaced by normal clones with the same values.
    """
    if targets not in LORA_TARGETS:
        raise ValueError(f"targets must be one of {LORA_TARGETS}, got {targets!r}")
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    family = model_family(model_patcher.model)
    groups = [_ATTN] if targets == "attention" else [_ATTN, _MLP]
    pattern = re.compile("|".join(f"(?:{TARGET_PATTERNS[family][g]})" for g in groups))

    patcher = model_patcher.clone()
    lora_params: dict[str, torch.Tensor] = {}
    generator = torch.Generator().manual_seed(int(seed))
    with torch.inference_mode(False):
        diffusion_model = patcher.model.diffusion_model
        diffusion_model.requires_grad_(False)
        make_inference_params_trainable_(patcher.model)
        for name, module in diffusion_model.named_modules():
            weight = getattr(module, "weight", None)
            if not (hasattr(module, "weight_function") and weight is not None and weight.dim() == 2
                    and pattern.fullmatch(name)):
                continue
            key = f"diffusion_model.{name}"
            adapter = _make_adapter(weight, rank, alpha, generator)
            patcher.add_weight_wrapper(f"{key}.weight", adapter)
            for pname, param in adapter.named_parameters():
                lora_params[f"{key}.{pname}"] = param
    if not lora_params:
        raise ValueError(f"no Linear layer of this {family} model matches the LoRA targets {targets!r} "
                         f"(patterns: {pattern.pattern}); the model layout is not the one FlowGRPO expects")
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
    _refuse_swapped(adapters, "lora_disabled")
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


def _refuse_swapped(adapters: list[nn.Module], what: str) -> None:
    if any(a.swapped is not None for a in adapters):
        raise RuntimeError(f"{what} cannot run inside merged_lora_weights once its layers hold merged weights "
                           "(a rollout context); leave the context first")


# ----------------------------------------------------------------------------------------------- conditioning
_UNSUPPORTED_COND_KEYS = ("area", "mask", "control", "gligen", "hooks", "timestep_start", "timestep_end")


def _on_device(value: Any, device: torch.device) -> Any:
    """A processed cond value on ``device``, tensors as normal (non-inference) clones."""
    if isinstance(value, torch.Tensor):
        with torch.inference_mode(False):
            return value.to(device).clone()
    if isinstance(value, list):
        return [_on_device(v, device) for v in value]
    return value


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


# ----------------------------------------------------------------------------------------------- CFG
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


def cfg_norm_rescale(guided: torch.Tensor, cond: torch.Tensor, patch_size: int = 2) -> torch.Tensor:
    """Qwen-Image's rescale ``v = guided * ||cond|| / ||guided||``, norms per token over its values.

    ``guided``, ``cond``: ``[B, C, H, W]`` or ``[B, C, T, H, W]`` (ComfyUI's unpacked layout); a token is one
    ``patch_size x patch_size`` spatial patch times ``C`` channels (64 values for Qwen-Image), as in diffusers'
    packed layout. Odd spatial sizes are zero-padded for the norm (zeros do not change it).
    """
    h, w = guided.shape[-2:]
    ph, pw = (-h) % patch_size, (-w) % patch_size

    def token_norm(t: torch.Tensor) -> torch.Tensor:
        t = nn.functional.pad(t, (0, pw, 0, ph)) if ph or pw else t
        lead, c = t.shape[:-2], t.shape[1]
        hp, wp = t.shape[-2] // patch_size, t.shape[-1] // patch_size
        t = t.reshape(*lead, hp, patch_size, wp, patch_size)
        sq = t.square().sum(dim=(-3, -1), keepdim=True).sum(dim=1, keepdim=True)  # [B, 1, (T,) hp, 1, wp, 1]
        norm = sq.sqrt().expand(*lead[:1], c, *lead[2:], hp, patch_size, wp, patch_size)
        norm = norm.reshape(*lead, hp * patch_size, wp * patch_size)
        return norm[..., :h, :w]

    return guided * (token_norm(cond) / token_norm(guided))


# ----------------------------------------------------------------------------------------------- memory
def _blocks(diffusion_model: nn.Module) -> list[nn.Module]:
    """The transformer blocks: every element of the ``nn.ModuleList`` children of the diffusion model
    (SD3 ``joint_blocks``, FLUX ``double_blocks`` + ``single_blocks``, Qwen-Image ``transformer_blocks``)."""
    return [b for child in diffusion_model.children() if isinstance(child, nn.ModuleList) for b in child]


def mutates_saved_tensors(base_model: Any) -> bool:
    """Whether ``base_model``'s blocks update in place tensors that autograd saves: ComfyUI's FLUX double and single
    blocks (``img += ...``) and SD3's optional context processor (``x += ...``) do; SD3's joint blocks and
    Qwen-Image's blocks do not. Unknown model classes count as mutating (the safe choice)."""
    try:
        family = model_family(base_model)
    except ValueError:
        return True
    if family == "sd3":
        return getattr(base_model.diffusion_model, "context_processor", None) is not None
    return family == "flux"


def mutation_guard(base_model: Any) -> contextlib.AbstractContextManager:
    """``allow_mutation_on_saved_tensors()`` for a model that :func:`mutates_saved_tensors` (plain autograd rejects
    its backward), a no-op context for the others (the guard watches every operation and so costs time)."""
    if mutates_saved_tensors(base_model):
        return torch.autograd.graph.allow_mutation_on_saved_tensors()
    return contextlib.nullcontext()


@contextlib.contextmanager
def gradient_checkpointing(patcher: Any, enabled: bool = True, copy_inputs: bool = True) -> Iterator[int]:
    """Within the context, each transformer block of ``patcher``'s diffusion model recomputes its activations in the
    backward pass instead of storing them (``torch.utils.checkpoint``, non-reentrant) whenever gradients are on.
    ``copy_inputs``: the block works on copies of its inputs (needed when it updates them in place, see
    :func:`mutates_saved_tensors`). Yields the number of wrapped blocks; the blocks are restored on exit (they are
    shared with the input MODEL)."""
    if not enabled:
        yield 0
        return
    import torch.utils.checkpoint

    blocks = [b for b in _blocks(patcher.model.diffusion_model) if "forward" not in b.__dict__]  # not yet wrapped
    for block in blocks:
        plain = block.forward

        def on_copies(*args: Any, _plain=plain, **kwargs: Any) -> Any:
            # FLUX blocks update their inputs in place (x += ...); the checkpoint must keep the originals intact
            # for the recomputation, so the block works on copies
            copy = lambda v: v.clone() if isinstance(v, torch.Tensor) else v  # noqa: E731
            return _plain(*map(copy, args), **{k: copy(v) for k, v in kwargs.items()})

        def checkpointed(*args: Any, _plain=plain, _copies=on_copies if copy_inputs else plain, **kwargs: Any) -> Any:
            if torch.is_grad_enabled():
                return torch.utils.checkpoint.checkpoint(_copies, *args, use_reentrant=False, **kwargs)
            return _plain(*args, **kwargs)

        block.forward = checkpointed
    try:
        yield len(blocks)
    finally:
        for block in blocks:
            block.__dict__.pop("forward", None)


# ----------------------------------------------------------------------------------------------- the policy
def _normal(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself, or a normal clone when it is an inference tensor (autograd cannot save those)."""
    return t.clone() if t.is_inference() else t


class ComfyFlowPolicy:
    """A :class:`flowgrpo_core.policy.FlowPolicy` over a patcher returned by :func:`attach_trainable_lora`.

    ``cond`` is :func:`encode_conditioning`'s dict. With ``cfg != 1`` (needs ``cond["negative"]``), ``velocity``
    runs both branches as one batched ``apply_model`` (:func:`batch_branches`) and returns
    ``v = v_u + cfg * (v_c - v_u)``, optionally :func:`cfg_norm_rescale`'d (Qwen-Image). FLUX's guidance travels in
    ``cond["positive"]["guidance"]``.
    """

    def __init__(self, patcher: Any, cfg: float = 1.0, norm_rescale: bool = False,
                 checkpointing: bool = False):
        self.patcher = patcher
        self.cfg = float(cfg)
        self.norm_rescale = bool(norm_rescale)
        self.checkpointing = bool(checkpointing)
        #: every sampling forward is an interrupt point; a training forward only while this is True. An update with
        #: several optimizer steps sets it False: interrupted between its steps, the LoRA would hold part of an
        #: update that no iteration count describes (with one step, every forward comes before the step). Read
        #: when :meth:`training` is entered.
        self.interrupt_in_training = True
        self.adapters = lora_adapters(patcher)  # empty for a plain MODEL: it can sample but not train
        self.patch_size = int(getattr(patcher.model.diffusion_model, "patch_size", 2))
        self._training_depth = 0
        self._loaded = False
        self._options = self._transformer_options()

    @contextlib.contextmanager
    def training(self) -> Iterator[None]:
        """The context every forward *and backward* with gradients must run in (wrap ``GRPOTrainer.update``).

        Leaves ComfyUI's inference mode and enables gradients. For models whose blocks update tensors saved for
        backward in place (:func:`mutates_saved_tensors`: ComfyUI's FLUX blocks do ``x += ...`` after a LayerNorm
        saved ``x``, which plain autograd rejects once a LoRA upstream makes ``x`` require grad) it also allows that
        (``torch.autograd.graph.allow_mutation_on_saved_tensors``, which watches every operation and so costs
        time); other models train without it. With ``checkpointing`` the transformer blocks recompute their
        activations in backward (:func:`gradient_checkpointing`); the mutation context is then left out: it cannot
        be combined with recomputation, and the checkpointed blocks of such models work on copies of their inputs.
        """
        _refuse_swapped(self.adapters, "training")
        base = self.patcher.model
        mutation = contextlib.nullcontext() if self.checkpointing else mutation_guard(base)
        held = contextlib.nullcontext() if self.interrupt_in_training else interrupts_held()
        with torch.inference_mode(False), torch.enable_grad(), training_mode(), held, mutation, \
                gradient_checkpointing(self.patcher, self.checkpointing, copy_inputs=mutates_saved_tensors(base)):
            self._training_depth += 1
            try:
                yield
            finally:
                self._training_depth -= 1

    def extras(self) -> tuple[tuple[str, Any], ...]:
        """Model-side settings for ``RolloutSpec.extras``."""
        return (("cfg", self.cfg), ("norm_rescale", self.norm_rescale))

    def ensure_loaded(self) -> None:
        """Make this patcher (with its weight wrappers) the loaded one; fix inference-tensor parameters.

        :meth:`velocity` calls this only when ComfyUI does not list the patcher as loaded (its first call, or after
        another model took its place): asking the model manager and scanning the modules on every forward costs
        time that grows with the model's module count.
        """
        import comfy.model_management

        with torch.inference_mode(False):
            comfy.model_management.load_models_gpu([self.patcher], force_full_load=True)
            make_inference_params_trainable_(self.patcher.model)
        self._loaded = True

    def _is_loaded(self) -> bool:
        import comfy.model_management

        return self._loaded and any(m.model is self.patcher for m in comfy.model_management.current_loaded_models)

    def _transformer_options(self) -> dict:
        """The patcher's ``transformer_options`` plus its wrappers (as ComfyUI's samplers pass them: a
        ``TorchCompileModel`` or other ``APPLY_MODEL`` / ``DIFFUSION_MODEL`` wrapper applies here too)."""
        import comfy.patcher_extension

        options = dict(self.patcher.model_options.get("transformer_options", {}))
        options["wrappers"] = comfy.patcher_extension.merge_nested_dicts(
            options.get("wrappers", {}), self.patcher.wrappers, copy_dict1=True)
        return options

    def _denoise(self, x: torch.Tensor, sigma: torch.Tensor, kwargs: dict, branches: list[int]) -> torch.Tensor:
        """``v`` ``[b, ...]`` fp32 from one ``apply_model`` (denoised) call; ``branches`` as ComfyUI's
        ``cond_or_uncond`` (0: positive, 1: negative) for each equal slice of the batch."""
        options = dict(self._options, cond_or_uncond=branches, sigmas=sigma)
        denoised = self.patcher.model.apply_model(x, sigma, transformer_options=options, **kwargs)
        return velocity_from_denoised(x, denoised, sigma)

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict) -> torch.Tensor:
        """``v`` ``[b, ...]`` fp32 at ``x`` ``[b, ...]``, ``sigma`` ``[b]``; ``cond`` holds ``b`` samples.

        With true CFG the two branches run as one forward of ``2b`` samples (positive rows first), as ComfyUI's
        samplers batch them, whenever their conditionings have the same shapes; otherwise (e.g. prompts of other
        token lengths than the negative) as two forwards of ``b``. Sampling runs in the caller's grad mode
        (ComfyUI's inference mode: no copies of the latents); with gradients (``training()``), inference-tensor
        inputs are cloned, which autograd needs.
        """
        grad = torch.is_grad_enabled()
        if grad and not self._training_depth:
            raise RuntimeError("ComfyFlowPolicy.velocity with gradients must run inside `with policy.training():` "
                               "(forward and backward); use torch.no_grad() for sampling")
        import comfy.model_management

        if not self._training_depth or self.interrupt_in_training:  # see __init__
            comfy.model_management.throw_exception_if_processing_interrupted()
        if not self._is_loaded():
            self.ensure_loaded()
        scope = self.adapters[0].scope if self.adapters else None
        if scope is not None and not grad:
            scope.swap_in()  # merged_lora_weights: once the model is loaded
        device = self.patcher.load_device
        x, sigma = x.to(device), sigma.to(device)
        if grad:
            x, sigma = _normal(x), _normal(sigma)
        if self.cfg == 1.0:
            return self._denoise(x, sigma, cond["positive"], [0])
        if cond.get("negative") is None:
            raise ValueError(f"cfg {self.cfg} needs a negative conditioning")
        both = batch_branches(cond["positive"], cond["negative"])
        if both is not None:
            n = x.shape[0]
            v = self._denoise(torch.cat([x, x]), torch.cat([sigma, sigma]), both, [0, 1])
            v_c, v_u = v[:n], v[n:]
        else:
            v_c = self._denoise(x, sigma, cond["positive"], [0])
            v_u = self._denoise(x, sigma, cond["negative"], [1])
        v = v_u + self.cfg * (v_c - v_u)
        if self.norm_rescale:
            v = cfg_norm_rescale(v, v_c, self.patch_size)
        return v

    def reference(self):
        return lora_disabled(self.patcher)

    def trainable_parameters(self) -> list[nn.Parameter]:
        if not self.adapters:
            raise ValueError("this MODEL has no FlowGRPO LoRA to train; use attach_trainable_lora first")
        return [p for a in self.adapters for p in a.parameters() if p.requires_grad]
