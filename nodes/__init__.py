"""The pack's ComfyUI nodes, registered through the V3 extension API (``comfy_api.latest``).

ComfyUI imports the pack from its file path, so the pack is not importable by a top-level name: every import inside
the pack is relative. Each node module lists its classes in ``NODES``; this file only concatenates them, in menu
order.
"""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from . import (loop_nodes, lora_nodes, metrics_nodes, preset_nodes, prompt_nodes, reward_loading, reward_model_nodes,
               reward_nodes, rollout_nodes, sampler_nodes, train_nodes, update_nodes)

reward_loading.register_folders()  # models/reward_models and models/reward_scripts
reward_loading.user_rewards()  # discover user rewards at start (import errors are logged here)

#: Every node class the pack registers, in menu order.
#: Node ids start with ``FlowGRPO``, custom types with ``FLOWGRPO_`` (tests/comfy checks both).
NODE_CLASSES: list[type[io.ComfyNode]] = [
    *prompt_nodes.NODES,
    *rollout_nodes.NODES,
    *sampler_nodes.NODES,
    *reward_nodes.NODES,
    *reward_model_nodes.NODES,
    *update_nodes.NODES,
    *preset_nodes.NODES,
    *train_nodes.NODES,
    *metrics_nodes.NODES,
    *lora_nodes.NODES,
    *loop_nodes.NODES,
]


class FlowGRPOExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODE_CLASSES)


async def comfy_entrypoint() -> FlowGRPOExtension:
    return FlowGRPOExtension()


__all__ = ["NODE_CLASSES", "FlowGRPOExtension", "comfy_entrypoint"]
