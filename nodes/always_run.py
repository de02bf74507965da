"""Base class of the nodes that must execute on every queue (rollouts, updates, training, LoRA state)."""

from __future__ import annotations

from comfy_api.latest import io


class AlwaysRun(io.ComfyNode):
    """A node whose cached result is never reused.

    ``not_idempotent`` alone only adds the node id to ComfyUI's cache key (an unchanged node is still served from the
    cache on the next queue); a NaN fingerprint differs from every earlier one (NaN != NaN), so the node runs again.
    Rollouts, updates and trainer states depend on the live LoRA, which their inputs do not show.
    """

    @classmethod
    def fingerprint_inputs(cls, **kwargs) -> float:
        return float("nan")
