"""The pack's ComfyUI nodes, registered through the V3 extension API (``comfy_api.latest``).

ComfyUI imports the pack from its file path, so the pack is not importable by a top-level name: every import inside
the pack is relative. To add a node, import its class here and append it to ``NODE_CLASSES``.
"""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .sampler_nodes import FlowGRPOSDESampler

#: Every node class the pack registers, in menu order.
#: Node ids start with ``FlowGRPO``, custom types with ``FLOWGRPO_`` (tests/comfy checks both).
NODE_CLASSES: list[type[io.ComfyNode]] = [
    FlowGRPOSDESampler,
]


class FlowGRPOExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODE_CLASSES)


async def comfy_entrypoint() -> FlowGRPOExtension:
    return FlowGRPOExtension()


__all__ = ["NODE_CLASSES", "FlowGRPOExtension", "comfy_entrypoint"]
