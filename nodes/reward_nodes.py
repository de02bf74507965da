"""Reward nodes: IMAGE (+ prompt groups) -> ``FLOWGRPO_REWARDS``. Model-based rewards come with the reward issue;
these weight-free ones make every training graph runnable today.

Video: a rollout's sample is a clip. VAEDecode gives its frames one after another (``B * T`` images); with the
prompt groups connected the reward node regroups them per sample (:func:`clips_of`) and scores each clip as the mean
of the image reward over its frames (:class:`~flowgrpo_core.rewards.clips.FrameMean`): one reward per sample."""

from __future__ import annotations

from typing import Optional

import torch
from comfy_api.latest import io

from ..flowgrpo_core.grpo import ADVANTAGE_MODES, aggregate_rewards
from ..flowgrpo_core.profiling import PhaseTimer
from ..flowgrpo_core.rewards.clips import FrameMean, frames_as_clips
from ..flowgrpo_core.rewards.simple import SIMPLE_REWARDS, SimpleReward
from .state import GROUPS, REWARDS, Rewards, node_error

__all__ = ["images_as_batch", "clips_of", "compute_simple_reward", "combine_rewards", "FlowGRPOSimpleReward",
           "FlowGRPOCombineRewards", "NODES"]

NODE = "FlowGRPO Simple Reward"


def images_as_batch(images: torch.Tensor) -> torch.Tensor:
    """IMAGE ``[B, H, W, C]``; a video-shaped decode ``[B, T, H, W, C]`` (Qwen-Image's VAE) is flattened to frames."""
    return images.reshape(-1, *images.shape[-3:]) if images.dim() == 5 else images


def clips_of(images: torch.Tensor, samples: Optional[int], node: str = NODE) -> torch.Tensor:
    """The clips ``[B, T, H, W, C]`` of ``images``: a decode ``[B, T, H, W, C]`` as it is, an IMAGE batch of
    ``B * T`` frames as ``samples`` clips (``samples`` None: one image per sample); a node error when the frames do
    not split into ``samples`` equal clips."""
    try:
        return frames_as_clips(images, samples)
    except ValueError as e:
        raise node_error(node, f"{e} (images of shape {tuple(images.shape)})",
                         "connect the images decoded from this rollout's LATENT and the groups of the same "
                         "rollout") from None


def compute_simple_reward(kind: str, images: torch.Tensor, scale: float = 1.0, node: str = NODE,
                          samples: Optional[int] = None) -> Rewards:
    """``Rewards`` of ``scale *`` the :class:`SimpleReward` backend's scores, one per clip (:func:`clips_of`: the
    mean over a sample's frames); its checks (shape, NaN or inf scores) become node errors."""
    clips = clips_of(images, samples, node)
    timer = PhaseTimer(images.device)
    try:
        with timer.phase("reward"):
            scores = FrameMean(SimpleReward(kind)).score_clips(clips, [""] * clips.shape[0]).scores
    except ValueError as e:
        raise node_error(node, str(e), "check the decoded images (NaN pixels come from a diverged model: lower the "
                         "learning rate)") from None
    values = scores * float(scale)
    return Rewards(values=values, components=((kind, values),), stats=timer.phases())


def merged_stats(parts: list[Rewards]) -> dict:
    """The stats of several scorings of one batch: times add up, the peak memory is the largest."""
    out: dict = {}
    for part in parts:
        for key, value in part.stats.items():
            if value is None:
                out.setdefault(key, None)
            elif key.startswith("time_"):
                out[key] = (out.get(key) or 0.0) + value
            else:
                out[key] = max(out.get(key) or 0.0, value)
    return out


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
                                       "reward); brightness / saturation: colour statistics in [0, 1]; redness: mean of R - (G + B) / 2, in [-1, 1]."),
                io.Float.Input("scale", default=1.0, min=-1000.0, max=1000.0, step=0.01,
                               tooltip="Multiplies the score (a negative scale turns a reward into a penalty)."),
                io.Custom(GROUPS).Input("groups", optional=True,
                                        tooltip="FlowGRPO Prompt Source's groups (video: needed). With them the "
                                                "frames of each sample are scored as one clip: the mean of the "
                                                "reward over its frames. Without them every image is one sample."),
            ],
            outputs=[io.Custom(REWARDS).Output(display_name="rewards",
                                               tooltip="One score per sample (per image, or per clip for video), "
                                                       "for FlowGRPO GRPO Update.")],
            not_idempotent=True,
        )

    @classmethod
    def execute(cls, images, reward, scale, groups=None) -> io.NodeOutput:
        samples = None if groups is None else groups.batch_size
        return io.NodeOutput(compute_simple_reward(reward, images, scale, samples=samples))


COMBINE_NODE = "FlowGRPO Combine Rewards"
_SLOTS = 4


def combine_rewards(parts: list[tuple[Rewards, float]], mode: str, node: str = COMBINE_NODE) -> Rewards:
    """One ``Rewards`` from ``(rewards, weight)`` pairs: ``values = sum_k w_k r_k``; each part enters as one component
    (its name: its single component's, else ``reward_<k>``; repeated names get ``_<k>``)."""
    if mode not in ADVANTAGE_MODES:
        raise node_error(node, f"unknown mode {mode!r}", f"choose one of {list(ADVANTAGE_MODES)}")
    if len(parts) < 2:
        raise node_error(node, f"{len(parts)} reward connected", "connect at least two rewards to combine (one "
                         "reward can go to GRPO Update directly)")
    components, weights = {}, {}
    for k, (rewards, weight) in enumerate(parts, start=1):
        name = rewards.components[0][0] if len(rewards.components) == 1 else f"reward_{k}"
        if name in components:
            name = f"{name}_{k}"
        components[name], weights[name] = rewards.values, float(weight)
    try:
        values = aggregate_rewards(components, weights, mode="weighted_sum")
    except ValueError as e:
        raise node_error(node, str(e), "give every reward one value per sample and a nonzero weight somewhere") from e
    return Rewards(values=values, components=tuple(components.items()), weights=tuple(weights.items()),
                   aggregation=mode, stats=merged_stats([rewards for rewards, _ in parts]))


class FlowGRPOCombineRewards(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        slots = []
        for k in range(1, _SLOTS + 1):
            slots += [io.Custom(REWARDS).Input(f"rewards_{k}", optional=k > 2,
                                               tooltip=f"Reward {k} (one score per sample)."),
                      io.Float.Input(f"weight_{k}", default=1.0, min=-1000.0, max=1000.0, step=0.01,
                                     tooltip=f"Weight of reward {k}.")]
        return io.Schema(
            node_id="FlowGRPOCombineRewards",
            display_name=COMBINE_NODE,
            category="FlowGRPO/rewards",
            description="Combines up to four rewards with weights. weighted_sum (Flow-GRPO): the update normalises "
                        "sum_k w_k r_k; advantage_sum (DanceGRPO / MixGRPO): it normalises each reward within its "
                        "groups, then sums w_k A_k, so the rewards' scales do not matter.",
            inputs=[*slots,
                    io.Combo.Input("mode", options=list(ADVANTAGE_MODES), default="weighted_sum",
                                   tooltip="weighted_sum: sum the raw rewards, then normalise; advantage_sum: "
                                           "normalise each reward, then sum the advantages.")],
            outputs=[io.Custom(REWARDS).Output(display_name="rewards",
                                               tooltip="The combined rewards, each component kept for metrics.")],
        )

    @classmethod
    def execute(cls, mode, **inputs) -> io.NodeOutput:
        parts = [(inputs[f"rewards_{k}"], inputs[f"weight_{k}"]) for k in range(1, _SLOTS + 1)
                 if inputs.get(f"rewards_{k}") is not None]
        return io.NodeOutput(combine_rewards(parts, mode))


NODES = [FlowGRPOSimpleReward, FlowGRPOCombineRewards]
