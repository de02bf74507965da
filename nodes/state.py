"""The values that travel between the pack's nodes (custom ComfyUI types ``FLOWGRPO_*``) and the node-error helper.

ComfyUI passes outputs by reference and caches them, so nodes never mutate an input object: an update returns a new
:class:`TrainerState` (it shares the LoRA tensors and the optimizer, which the update advances in place; the returned
state's ``iteration`` says how far they are).

=====================  =======================  ==============================================================
type                   class                    made by
=====================  =======================  ==============================================================
``FLOWGRPO_GROUPS``    :class:`PromptBatch`     Prompt Source: which prompt each sample shows, its group id
``FLOWGRPO_ROLLOUT``   :class:`Rollout`         SDE Sampler (rollout): the trajectory with log-probs and spec
``FLOWGRPO_REWARDS``   :class:`Rewards`         reward nodes: one score per sample
``FLOWGRPO_TRAINER``   :class:`TrainerState`    LoRA Init / GRPO Update / loop nodes: LoRA, optimizer, history
=====================  =======================  ==============================================================
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from ..flowgrpo.report import CHECKPOINT_EVENT, METRICS_EVENT, RESULT_EVENT
from ..flowgrpo_core.rollout import Trajectory

__all__ = [
    "GROUPS", "ROLLOUT", "REWARDS", "TRAINER", "LOOP",
    "PromptBatch", "Rollout", "Rewards", "TrainerState", "LoraSettings",
    "NodeInputError", "node_error", "emit", "METRICS_EVENT", "CHECKPOINT_EVENT", "RESULT_EVENT",
]

GROUPS = "FLOWGRPO_GROUPS"
ROLLOUT = "FLOWGRPO_ROLLOUT"
REWARDS = "FLOWGRPO_REWARDS"
TRAINER = "FLOWGRPO_TRAINER"
LOOP = "FLOWGRPO_LOOP"

# Websocket events (``PromptServer.send_sync``), named once in the runner that prints them:
# METRICS_EVENT after every GRPO update (``{"run", "iteration", metrics...}``), CHECKPOINT_EVENT after a checkpoint
# was written (``{"iteration", "lora_path", "state_path"}``), RESULT_EVENT when a training node finishes
# (``{"run", "lora_path", "reward_curve_path", "iterations"}``).


class NodeInputError(ValueError):
    """A bad input, with the node's display name and the fix in the message.

    ComfyUI shows an error as ``<module>.<class>: <message>``; the class declares itself a builtin so that the user
    reads ``NodeInputError: FlowGRPO ...: <problem>. Fix: <fix>``, not the pack's module path."""


NodeInputError.__module__ = "builtins"  # see the docstring: no module path before the sentence a user reads


def node_error(node: str, problem: str, fix: str) -> NodeInputError:
    """``NodeInputError("<node>: <problem>. Fix: <fix>")`` (raise it)."""
    return NodeInputError(f"{node}: {problem}. Fix: {fix}")


def emit(event: str, data: dict) -> None:
    """Send a websocket event to every client of a running ComfyUI server; nothing without a server."""
    try:
        import server
    except ImportError:
        return
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    if instance is not None:
        instance.send_sync(event, data)


@dataclass(frozen=True)
class PromptBatch:
    """The prompts of one iteration, sample by sample (``B = prompts_per_iteration * group_size``).

    texts:          ``B`` prompt strings; samples of one group share their text.
    group_ids:      ``[B]`` long, equal ids = same prompt in this iteration (the GRPO groups).
    prompt_indices: ``B`` indices into the full prompt list (for per-prompt statistics).
    iteration:      the iteration the prompts were drawn for.
    group_size:     samples per prompt.
    """

    texts: tuple[str, ...]
    group_ids: torch.Tensor
    prompt_indices: tuple[int, ...]
    iteration: int
    group_size: int

    @property
    def batch_size(self) -> int:
        return len(self.texts)


@dataclass(frozen=True)
class Rollout:
    """A sampled batch and everything needed to replay its log-probs.

    trajectory: the core :class:`~flowgrpo_core.rollout.Trajectory` (latents ``[N+1, B, ...]``, log-probs ``[N, B]``,
                the frozen spec, the encoded conditioning).
    model:      the ``ModelPatcher`` that sampled it (carries the trainer's LoRA adapters when it came from one).
    groups:     the prompt batch (``None`` when the sampler got plain conditioning).
    seed:       the sampler's seed; ``iteration``: the iteration it was sampled for.
    stats:      what sampling cost (``time_rollout_s``, ``peak_mem_rollout_mb``), merged into the update's metrics.
    """

    trajectory: Trajectory
    model: Any
    groups: Optional[PromptBatch]
    seed: int
    iteration: int
    stats: dict = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return self.trajectory.batch_size


@dataclass(frozen=True)
class Rewards:
    """Per-sample scores.

    values:      ``[B]`` fp32, the reward (for several rewards: the weighted sum of the components).
    components:  ``(name, [B] scores)`` pairs, the rewards before weighting.
    weights:     ``(name, weight)`` pairs when several rewards were combined (empty: ``values`` is the reward).
    aggregation: how the update turns combined rewards into advantages (``flowgrpo_core.grpo.ADVANTAGE_MODES``):
                 ``weighted_sum`` normalises ``values``; ``advantage_sum`` normalises each component, then sums.
    stats:       what scoring cost (``time_reward_s``, ``peak_mem_reward_mb``), merged into the update's metrics.
    """

    values: torch.Tensor
    components: tuple[tuple[str, torch.Tensor], ...] = ()
    weights: tuple[tuple[str, float], ...] = ()
    aggregation: str = "weighted_sum"
    stats: dict = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return int(self.values.shape[0])


@dataclass(frozen=True)
class LoraSettings:
    """How the LoRA was made: what a checkpoint must match to be resumed."""

    rank: int
    alpha: float
    targets: str
    seed: int
    learning_rate: float
    family: str


@dataclass(frozen=True)
class TrainerState:
    """A LoRA being trained with GRPO.

    base_model:  the input MODEL (never modified).
    patcher:     a clone of it carrying the trainable LoRA (``nodes.lora_adapters.attach_trainable_lora``).
    lora_params: ``diffusion_model.<path>.lora_up.weight`` / ``.lora_down.weight`` / ``.alpha`` -> fp32 tensors
                 (the live parameters: a ComfyUI-native LoRA state dict).
    optimizer:   the optimizer over the trainable ``lora_params``.
    settings:    :class:`LoraSettings`.
    iteration:   completed GRPO updates (continues across resumes).
    history:     one metrics dict per completed update (``reward_mean``, ``reward_std``, ``loss``, ...).
    run_name:    file-name prefix of checkpoints; ``checkpoint``: path of the last saved LoRA file, if any, and
                 ``saved_iteration`` the iteration it holds (-1: none).
    extra:       JSON-able data saved with checkpoints (e.g. ``run_config``: the settings of the run).
    ema:         a :class:`flowgrpo_core.ema.LoraEMA` of ``lora_params`` (None: no EMA). When set, saved LoRA files and
                 the applied LoRA are its averaged weights; rollouts and updates use the live ones.
    """

    base_model: Any
    patcher: Any
    lora_params: dict[str, torch.Tensor]
    optimizer: torch.optim.Optimizer
    settings: LoraSettings
    iteration: int = 0
    history: tuple[dict, ...] = ()
    run_name: str = "flowgrpo"
    checkpoint: Optional[str] = None
    saved_iteration: int = -1
    extra: dict = field(default_factory=dict)
    ema: Any = None

    def advanced(self, metrics: dict) -> "TrainerState":
        """The state after one more update with ``metrics`` (a new object; tensors and optimizer shared)."""
        return dataclasses.replace(self, iteration=self.iteration + 1, history=self.history + (dict(metrics),))

    def with_checkpoint(self, path: str) -> "TrainerState":
        """The state recording that its current iteration was saved to ``path``."""
        return dataclasses.replace(self, checkpoint=str(path), saved_iteration=self.iteration)

    def reward_curve(self) -> list[float]:
        return [float(m.get("reward_mean", math.nan)) for m in self.history]
