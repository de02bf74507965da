"""Freeing device memory for the GRPO update: every model ComfyUI holds loaded, except the one being trained, goes
back to its offload device (VAE, text encoders, reward models), so the update's activations and optimizer state
get that memory. They load again on their next use (ComfyUI's ``load_models_gpu``)."""

from __future__ import annotations

from typing import Any, Callable

__all__ = ["unload_where", "offload_all_but"]


def unload_where(predicate: Callable[[Any], bool]) -> list[Any]:
    """Unload every loaded ``ModelPatcher`` for which ``predicate(patcher)`` holds; returns those patchers."""
    import comfy.model_management

    models = comfy.model_management.current_loaded_models
    unloaded = []
    for i in range(len(models) - 1, -1, -1):
        patcher = models[i].model
        if patcher is not None and predicate(patcher):
            models.pop(i).model_unload()
            unloaded.append(patcher)
    if unloaded:
        comfy.model_management.soft_empty_cache()
    return unloaded


def offload_all_but(keep: Any) -> list[Any]:
    """Unload every loaded model except ``keep`` (the trained model's patcher) and its clones (they share its
    weights); returns the unloaded patchers."""
    return unload_where(lambda patcher: patcher is not keep and not keep.is_clone(patcher))
