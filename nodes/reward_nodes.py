"""Reward nodes: IMAGE (+ prompt groups) -> ``FLOWGRPO_REWARDS``. Model-based rewards come with the reward issue;
these weight-free ones make every training graph runnable today."""

from __future__ import annotations

import torch
from comfy_api.latest import io

from ..flowgrpo_core.rewards.simple import SIMPLE_REWARDS, simple_reward
from .state import REWARDS, Rewards, node_error

__all__ = ["images_as_batch", "compute_simple_reward", "FlowGRPOSimpleReward", "NODES"]

NODE = "FlowGRPO Simple Reward"


def images_as_batch(images: torch.Tensor) -> torch.Tensor:
    """IMAGE ``[B, H, W, C]``; a video-shaped decode ``[B, T, H, W, C]`` (Qwen-Image's VAE) is flattened to frames."""
    return images.reshape(-1, *images.shape[-3:]) if images.dim() == 5 else images


def compute_simple_reward(kind: str, images: torch.Tensor, scale: float = 1.0, node: str = NODE) -> Rewards:
    """``Rewards`` of ``scale * simple_reward(kind, images)``; NaN or inf scores are a node error."""
    images = images_as_batch(images)
    values = simple_reward(kind, images) * float(scale)
    bad = (~torch.isfinite(values)).nonzero().flatten().tolist()
    if bad:
        raise node_error(node, f"the {kind} reward is not finite for samples {bad}",
                         "check the decoded images (NaN pixels come from a diverged model: lower the learning rate)")
    return Rewards(values=values, components=((kind, values),))


class FlowGRPOSimpleReward(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FlowGRPOSimpleReward",
            display_name=NODE,
            category="FlowGRPO/rewards",
            description="Scores each image with a weight-free statistic (JPEG compressibility, brightness, "
                        "saturation, redness). Higher is better.",
            inputs=[
                io.Image.Input("images", tooltip="Decoded rollout images (VAEDecode of the rollout's LATENT)."),
                io.Combo.Input("reward", options=list(SIMPLE_REWARDS), default="jpeg_compressibility",
                               tooltip="jpeg_compressibility: minus the JPEG size in kB (Flow-GRPO's compression "
                                       "reward); brightness / saturation / redness: colour statistics in [0, 1]."),
                io.Float.Input("scale", default=1.0, min=-1000.0, max=1000.0, step=0.01,
                               tooltip="Multiplies the score (a negative scale turns a reward into a penalty)."),
            ],
            outputs=[io.Custom(REWARDS).Output(display_name="rewards",
                                               tooltip="One score per image, for FlowGRPO GRPO Update.")],
            not_idempotent=True,
        )

    @classmethod
    def execute(cls, images, reward, scale) -> io.NodeOutput:
        return io.NodeOutput(compute_simple_reward(reward, images, scale))


NODES = [FlowGRPOSimpleReward]
