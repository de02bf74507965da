"""flowgrpo: online RL (Flow-GRPO, DanceGRPO, CPS, MixGRPO windows) for flow-matching models in ComfyUI.

ComfyUI imports this file from the pack folder in ``custom_nodes/``. The pure-PyTorch core lives in
``flowgrpo_core`` and is importable without ComfyUI; the node wrappers in ``nodes/`` need ComfyUI's runtime.
"""

#: Served by ComfyUI at ``/extensions/<pack folder>/``; ``web/docs/<NodeId>.md`` are the nodes' help pages (the "?"
#: of a selected node in the front end).
WEB_DIRECTORY = "./web"

try:  # inside ComfyUI
    from comfy_api.latest import ComfyExtension  # noqa: F401
except ImportError:  # plain Python (tests of the core, tooling): nothing to register
    comfy_entrypoint = None
else:
    from .nodes import comfy_entrypoint  # noqa: F401

__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
