"""Reward nodes on the reward interface (``flowgrpo_core.rewards``): pick a scorer (a local backend or a reward
server), score decoded images with it, or turn any chain of FLOAT values into ``FLOWGRPO_REWARDS``.

``FLOWGRPO_REWARD_MODEL`` carries a :class:`~flowgrpo_core.rewards.RewardBackend`. Load Reward Model offers the
weight-free statistics, the model backends of ``flowgrpo_core.rewards.registry`` (weights from
``models/reward_models``) and the user rewards of ``models/reward_scripts`` (see :mod:`.reward_loading`).
"""

from __future__ import annotations

import math
import re
from typing import Optional, Sequence

import torch
from comfy_api.latest import io, ui

from ..flowgrpo_core.prompts import prompt_metadata
from ..flowgrpo_core.rewards import RemoteReward, RewardBackend
from ..flowgrpo_core.rewards.clips import ClipReward, clip_reward
from ..flowgrpo_core.rewards.registry import MissingDependencyError
from ..flowgrpo_core.rewards.weights import MissingWeightsError, WeightsFormatError
from ..flowgrpo_core.profiling import PhaseTimer
from .always_run import AlwaysRun
from .reward_loading import DEFAULT_WEIGHTS, DEVICES, DTYPES, backend_options, build_reward, weights_options
from .reward_nodes import clips_of
from .state import GROUPS, REWARDS, NodeInputError, PromptBatch, Rewards, node_error

__all__ = ["REWARD_MODEL", "load_reward_model", "prompts_for", "score_images", "summarize",
           "parse_floats", "rewards_from_floats", "FlowGRPOLoadRewardModel", "FlowGRPORewardServer",
           "FlowGRPOScoreImages", "FlowGRPORewardsFromFloats", "NODES"]

REWARD_MODEL = "FLOWGRPO_REWARD_MODEL"

LOAD_NODE = "FlowGRPO Load Reward Model"
SERVER_NODE = "FlowGRPO Reward Server"
SCORE_NODE = "FlowGRPO Score Images"
FLOATS_NODE = "FlowGRPO Rewards From Floats"

_REWARD_MODEL_TOOLTIP = "The scorer: FlowGRPO Load Reward Model or FlowGRPO Reward Server."

_FIX_WEIGHTS = ("put the file or folder where the message says (layouts and download links: docs/reward-models.md), "
                "or pick the file in the weights list")


def load_reward_model(backend: str, weights: str = DEFAULT_WEIGHTS, device: str = "auto",
                      dtype: str = "auto") -> RewardBackend:
    """The scorer ``backend`` (:func:`reward_loading.build_reward`); every loading problem becomes a node error
    that names the file or package and the fix."""
    try:
        return build_reward(backend, weights, device, dtype)
    except MissingWeightsError as e:
        raise node_error(LOAD_NODE, str(e), _FIX_WEIGHTS) from None
    except MissingDependencyError as e:
        raise node_error(LOAD_NODE, str(e), "install the package, then restart ComfyUI") from None
    except WeightsFormatError as e:
        raise node_error(LOAD_NODE, str(e), "use the original weights of this reward model, or .safetensors "
                                            "converted from them") from None
    except ValueError as e:
        raise node_error(LOAD_NODE, str(e), "choose a backend from the list (user rewards: a .py file in "
                                            "models/reward_scripts, then refresh)") from None


# ------------------------------------------------------------------------------------------ scoring
def prompts_for(backend: RewardBackend | ClipReward, groups: Optional[PromptBatch], samples: int,
                node: str = SCORE_NODE) -> list[str]:
    """One prompt per sample (``samples`` of them); ``""`` for every sample without groups (a node error if the
    backend needs them)."""
    if groups is None:
        if backend.needs_prompt:
            raise node_error(node, f"reward {backend.name!r} scores images against their prompts, but no "
                                   "groups are connected",
                             "connect the groups output of FlowGRPO Prompt Source (the same one the sampler uses)")
        return [""] * samples
    texts = list(groups.texts)
    if len(texts) != samples:
        raise node_error(node, f"groups hold {len(texts)} prompts but the images are {samples} samples",
                         "connect the groups of the rollout these images were decoded from")
    return texts


def score_images(backend: RewardBackend | ClipReward, images: torch.Tensor, groups: Optional[PromptBatch] = None,
                 name: str = "", scale: float = 1.0, node: str = SCORE_NODE) -> Rewards:
    """``Rewards`` of ``scale *`` the backend's score of each sample, with one component ``name`` (empty: the
    backend's name). A sample is a clip (:func:`~.reward_nodes.clips_of`: a decode ``[B, T, H, W, C]``, or with
    ``groups`` an IMAGE batch of ``B * T`` frames; an image is a one-frame clip): a :class:`ClipReward` scores it
    whole, an image reward as the mean over its frames. ``metadata`` is the prompts' JSONL records
    (:class:`~flowgrpo_core.prompts.Prompt`), if any. A backend's ValueError (a bad batch, an unreachable server,
    ...) becomes a node error with its message."""
    if not isinstance(backend, (RewardBackend, ClipReward)):
        raise node_error(node, f"reward_model is a {type(backend).__name__}, not a reward backend",
                         "connect FlowGRPO Load Reward Model or FlowGRPO Reward Server")
    if groups is not None and images.dim() == 5 and images.shape[0] != groups.batch_size:
        raise node_error(node, f"groups hold {groups.batch_size} prompts but the images are {images.shape[0]} "
                               f"samples (shape {tuple(images.shape)})",
                         "connect the groups of the rollout these images were decoded from")
    clips = clips_of(images, None if groups is None else groups.batch_size, node)
    prompts = prompts_for(backend, groups, clips.shape[0], node)
    timer = PhaseTimer(getattr(backend, "device", None))
    try:
        with timer.phase("reward"):
            scores = clip_reward(backend).score_clips(clips, prompts, prompt_metadata(prompts)).scores
    except NodeInputError:
        raise
    except ValueError as e:  # includes RemoteRewardError; the message names the problem and the fix
        raise NodeInputError(f"{node}: {e}") from None
    values = scores * float(scale)
    return Rewards(values=values, components=((name or backend.name, values),), stats=timer.phases())


def summarize(name: str, values: torch.Tensor) -> str:
    """``"name: mean ± std (min .. max)"`` (population std, so one sample reads ± 0)."""
    v = values.double()
    return (f"{name}: {v.mean().item():.4g} ± {v.std(unbiased=False).item():.4g} "
            f"({v.min().item():.4g} .. {v.max().item():.4g})")


# ------------------------------------------------------------------------------------------ floats
_SEPARATORS = re.compile(r"[\s,;]+")


def parse_floats(text: str) -> list[float]:
    """Numbers separated by commas, semicolons, whitespace or newlines; a node error names the first bad token."""
    values = []
    for i, token in enumerate(t for t in _SEPARATORS.split(text.strip()) if t):
        try:
            values.append(float(token))
        except ValueError:
            raise node_error(FLOATS_NODE, f"text entry {i} ({token!r}) is not a number",
                             "write plain numbers separated by commas, spaces or newlines, e.g. 0.5, 1, -2e-3") from None
    return values


def rewards_from_floats(values: Sequence[float], name: str = "custom") -> Rewards:
    """``Rewards`` holding ``values`` (one per sample) as component ``name``; node error if empty or not finite."""
    if not values:
        raise node_error(FLOATS_NODE, "no values", "connect a FLOAT list to values or type the numbers into text")
    bad = [i for i, v in enumerate(values) if not math.isfinite(float(v))]
    if bad:
        raise node_error(FLOATS_NODE, f"values of samples {bad} are NaN or infinite",
                         "fix the upstream scorer (every reward must be a finite number)")
    tensor = torch.tensor([float(v) for v in values], dtype=torch.float32)
    return Rewards(values=tensor, components=((name or "custom", tensor),))


def _single(value, default):
    """The one value of an ``is_input_list`` input that is a widget (a one-element list), or ``default``."""
    if isinstance(value, (list, tuple)):
        return value[0] if value else default
    return default if value is None else value


# ------------------------------------------------------------------------------------------ nodes
class FlowGRPOLoadRewardModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FlowGRPOLoadRewardModel",
            display_name=LOAD_NODE,
            category="FlowGRPO/rewards",
            description=("Loads a reward model for FlowGRPO Score Images. Weights come from models/reward_models "
                         "(never downloaded); see docs/reward-models.md for each backend's files."),
            inputs=[
                io.Combo.Input("backend", options=backend_options(), default="jpeg_compressibility",
                               tooltip="The reward. Weight-free: jpeg_(in)compressibility (minus/plus the JPEG kB), "
                                       "brightness, saturation, redness. Models: hpsv2 / hpsv2.1 (human preference), "
                                       "pickscore, aesthetic (LAION v2), clip_score (transformers CLIP) / clip_score_open_clip, image_reward, ocr (quoted text "
                                       "rendered correctly), geneval (objects, counts, colours, positions), input_similarity (image "
                                       "editing: closeness to each sample's input image). user:* "
                                       "are .py files in models/reward_scripts. Higher is better."),
                io.Combo.Input("weights", options=weights_options(), default=DEFAULT_WEIGHTS,
                               tooltip="Weights file or folder in models/reward_models; (default): the backend's "
                                       "standard name (e.g. HPS_v2.1_compressed.pt). Ignored by weight-free "
                                       "backends."),
                io.Combo.Input("device", options=DEVICES, default="auto",
                               tooltip="auto: ComfyUI's device, offloaded while the diffusion model trains; cpu: "
                                       "always on the CPU (saves VRAM, slower)."),
                io.Combo.Input("dtype", options=list(DTYPES), default="auto",
                               tooltip="Compute precision of the reward model; auto: float16 on a GPU that supports "
                                       "it, float32 on the CPU."),
            ],
            outputs=[io.Custom(REWARD_MODEL).Output(display_name="reward_model",
                                                    tooltip="The scorer, for FlowGRPO Score Images.")],
        )

    @classmethod
    def execute(cls, backend: str, weights: str = DEFAULT_WEIGHTS, device: str = "auto",
                dtype: str = "auto") -> io.NodeOutput:
        return io.NodeOutput(load_reward_model(backend, weights, device, dtype))


class FlowGRPORewardServer(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FlowGRPORewardServer",
            display_name=SERVER_NODE,
            category="FlowGRPO/rewards",
            description=("A reward computed by a reward server (python -m flowgrpo_core.rewards serve). Nothing is "
                         "sent until FlowGRPO Score Images scores images; they travel as 8-bit PNGs."),
            inputs=[
                io.String.Input("url", default="http://127.0.0.1:8000",
                                tooltip="The server's address (http:// or https://, host and port)."),
                io.String.Input("api_key", default="",
                                tooltip="The key the server was started with (sent as X-API-Key); empty: none."),
                io.Float.Input("timeout", default=120.0, min=0.1, max=3600.0, step=1.0,
                               tooltip="Seconds to wait for each request's answer."),
                io.Int.Input("retries", default=2, min=0, max=20,
                             tooltip="Extra attempts after a connection error or a server error (5xx)."),
                io.Int.Input("batch_size", default=64, min=1, max=4096,
                             tooltip="Images per request (lower it when the server refuses large requests)."),
                io.Boolean.Input("needs_prompt", default=True,
                                 tooltip="On: the server's reward reads the prompts (CLIP score, OCR, ...), so "
                                         "Score Images needs groups. Off: image-only rewards."),
            ],
            outputs=[io.Custom(REWARD_MODEL).Output(display_name="reward_model",
                                                    tooltip="The remote scorer, for FlowGRPO Score Images.")],
        )

    @classmethod
    def execute(cls, url: str, api_key: str = "", timeout: float = 120.0, retries: int = 2, batch_size: int = 64,
                needs_prompt: bool = True) -> io.NodeOutput:
        try:
            backend = RemoteReward(url, api_key=api_key or None, timeout=timeout, retries=retries,
                                   batch_size=batch_size, needs_prompt=needs_prompt)
        except ValueError as e:
            raise node_error(SERVER_NODE, str(e), "set url to the reward server's address, e.g. "
                                                  "http://127.0.0.1:8000") from None
        return io.NodeOutput(backend)


class FlowGRPOScoreImages(AlwaysRun):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FlowGRPOScoreImages",
            display_name=SCORE_NODE,
            category="FlowGRPO/rewards",
            description="Scores each image with a reward model or server. Higher is better. Video: each sample's "
                        "frames are scored and averaged into one reward per sample (connect the groups).",
            inputs=[
                io.Custom(REWARD_MODEL).Input("reward_model", tooltip=_REWARD_MODEL_TOOLTIP),
                io.Image.Input("images", tooltip="Decoded rollout images (VAEDecode of the rollout's LATENT)."),
                io.Custom(GROUPS).Input("groups", optional=True,
                                        tooltip="FlowGRPO Prompt Source's groups: the prompt of each image. Needed "
                                                "by rewards that read prompts and for video (the frames of each "
                                                "sample become one clip); without it prompts are empty and every "
                                                "image is one sample."),
                io.String.Input("name", default="",
                                tooltip="Name of this reward component in metrics; empty: the backend's name."),
                io.Float.Input("scale", default=1.0, min=-1000.0, max=1000.0, step=0.01,
                               tooltip="Multiplies the score (a negative scale turns a reward into a penalty)."),
            ],
            outputs=[
                io.Custom(REWARDS).Output(display_name="rewards",
                                          tooltip="One score per sample (per image, or per clip for video), for "
                                                  "FlowGRPO GRPO Update."),
                io.Float.Output(display_name="scores", is_output_list=True,
                                tooltip="The same scores as a FLOAT list (one value per sample)."),
                io.String.Output(display_name="summary", tooltip="name: mean ± std (min .. max)."),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, reward_model, images, groups=None, name: str = "", scale: float = 1.0) -> io.NodeOutput:
        rewards = score_images(reward_model, images, groups, name, scale)
        component, values = rewards.components[0]
        text = summarize(component, values)
        return io.NodeOutput(rewards, values.tolist(), text, ui=ui.PreviewText(text))


class FlowGRPORewardsFromFloats(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FlowGRPORewardsFromFloats",
            display_name=FLOATS_NODE,
            category="FlowGRPO/rewards",
            description=("Rewards from plain numbers: a FLOAT list from any node chain (one value per image) or "
                         "numbers typed into text."),
            inputs=[
                io.Float.Input("values", optional=True, force_input=True,
                               tooltip="One FLOAT per image (a list output, e.g. Score Images' scores)."),
                io.String.Input("text", optional=True, multiline=True, default="",
                                tooltip="Numbers separated by commas, spaces or newlines; used instead of values "
                                        "when not empty."),
                io.String.Input("name", default="custom", tooltip="Name of this reward component in metrics."),
            ],
            outputs=[io.Custom(REWARDS).Output(display_name="rewards",
                                               tooltip="One score per image, for FlowGRPO GRPO Update.")],
            is_input_list=True,
            is_output_node=True,
        )

    @classmethod
    def execute(cls, values=None, text=None, name=None) -> io.NodeOutput:
        text = _single(text, "") or ""
        name = _single(name, "custom") or "custom"
        numbers = parse_floats(text) if text.strip() else list(values or [])
        rewards = rewards_from_floats(numbers, name)
        return io.NodeOutput(rewards, ui=ui.PreviewText(summarize(name, rewards.values)))


NODES = [FlowGRPOLoadRewardModel, FlowGRPORewardServer, FlowGRPOScoreImages, FlowGRPORewardsFromFloats]
