"""A trainable LoRA on a ComfyUI MODEL, exposed as a ``flowgrpo_core`` :class:`FlowPolicy`.

:class:`ComfyFlowPolicy` computes ``v`` from ``BaseModel.apply_model`` (which returns the denoised sample), with true
CFG and Qwen-Image's optional per-token norm rescale, over the patcher :func:`~.lora_adapters.attach_trainable_lora`
returns and the kwargs :func:`~.conditioning.encode_conditioning` builds. Sample under ``torch.no_grad()``; run every
update (forward and backward) inside ``with policy.training():``, which also holds the memory options
(:func:`gradient_checkpointing`, :func:`mutation_guard`).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn

from ..flowgrpo_core.sde import velocity_from_denoised
from .compat import interrupts_held, training_mode
from .conditioning import batch_branches
from .lora_adapters import lora_adapters, lora_disabled, make_inference_params_trainable_, refuse_swapped
from .lora_targets import transformer_blocks

__all__ = ["cfg_norm_rescale", "mutates_saved_tensors", "mutation_guard", "gradient_checkpointing",
           "ComfyFlowPolicy"]


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
#: ComfyUI model config classes whose transformer blocks never update a tensor autograd saved (checked by
#: tests/comfy/test_comfy_policy.py): their updates skip the mutation guard, which costs time. Every other model
#: trains under the guard (the safe choice); SD3 only without its optional context processor (``x += ...``).
NON_MUTATING = ("SD3", "QwenImage")


def mutates_saved_tensors(base_model: Any) -> bool:
    """Whether ``base_model``'s blocks may update in place tensors that autograd saves (ComfyUI's FLUX double and
    single blocks do ``img += ...``; SD3's joint blocks and Qwen-Image's blocks do not): False only for
    :data:`NON_MUTATING` model classes."""
    config = type(getattr(base_model, "model_config", None)).__name__
    if config not in NON_MUTATING:
        return True
    return getattr(base_model.diffusion_model, "context_processor", None) is not None


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

    blocks = [b for _, b in transformer_blocks(patcher.model.diffusion_model)
              if "forward" not in b.__dict__]  # not yet wrapped
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
def _spatial_patch(diffusion_model: nn.Module) -> int:
    """The model's spatial patch size (an int, or the last of a ``(t, h, w)`` tuple as video models give it)."""
    size = getattr(diffusion_model, "patch_size", 2)
    return int(size[-1] if isinstance(size, (tuple, list)) else size)


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
        self.patch_size = _spatial_patch(patcher.model.diffusion_model)
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
        refuse_swapped(self.adapters, "training")
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
