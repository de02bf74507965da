"""The GRPO update on a ComfyUI trainer state: ``FlowGRPO GRPO Update`` and :func:`grpo_update` (shared with the
all-in-one train node).

The update replays the rollout with the model that sampled it (same conditioning, CFG, guidance, sigma grid and
micro-batch layout: the rollout's frozen spec), so the first recomputed log-prob ratio is 1; the metric
``first_log_ratio_abs_max`` reports how close it was.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
from comfy_api.latest import io

from ..flowgrpo_core.grpo import group_advantages, multi_reward_advantages
from ..flowgrpo_core.trainer import GRPOConfig, GRPOTrainer
from . import lora_io
from .comfy_policy import ComfyFlowPolicy
from .lora_adapters import lora_adapters
from .always_run import AlwaysRun
from ..flowgrpo_core.profiling import PhaseTimer
from .offload import offload_all_but
from .state import METRICS_EVENT, REWARDS, ROLLOUT, TRAINER, Rewards, Rollout, TrainerState, emit, node_error

__all__ = ["UpdateSettings", "grpo_inputs", "update_settings", "advantages", "grpo_update", "FlowGRPOUpdate",
           "NODES"]

NODE = "FlowGRPO GRPO Update"
STD_MODES = ("global", "group")


@dataclass(frozen=True)
class UpdateSettings:
    """GRPO hyper-parameters of an update (advantage normalisation + :class:`GRPOConfig`)."""

    config: GRPOConfig = GRPOConfig()
    std_mode: str = "global"
    std_floor: float = 0.0
    gradient_checkpointing: bool = False


def grpo_inputs() -> list:
    """The update widgets shared by the GRPO Update node and the all-in-one train node."""
    return [
        io.Float.Input("clip_range", default=1e-4, min=1e-7, max=1.0, step=1e-5,
                       tooltip="PPO ratio clip epsilon (Flow-GRPO: 1e-4 for SDE rollouts, 1e-5 for CPS)."),
        io.Float.Input("kl_beta", default=0.0, min=0.0, max=10.0, step=0.001,
                       tooltip="Weight of the KL to the frozen base model (Flow-GRPO SD3.5: 0.04; 0 skips the "
                               "reference forward)."),
        io.Float.Input("adv_clip_max", default=5.0, min=0.0, max=100.0, step=0.1,
                       tooltip="Advantages are clipped to +-this (0 disables the clip)."),
        io.Float.Input("max_grad_norm", default=1.0, min=0.0, max=1000.0, step=0.1,
                       tooltip="Gradient-norm clip of each optimizer step (0 disables it)."),
        io.Combo.Input("std_mode", options=list(STD_MODES), default="global",
                       tooltip="Advantage normalisation: global = divide by the std of the whole batch (Flow-GRPO "
                               "default), group = by each prompt group's std."),
        io.Int.Input("optimizer_steps", default=1, min=1, max=64,
                     tooltip="Optimizer steps per update; the micro-batches are split among them (needs at least "
                             "as many micro-batches)."),
        io.Boolean.Input("gradient_checkpointing", default=False,
                         tooltip="Recompute each transformer block's activations in the backward pass: much less "
                                 "memory for about one extra forward of compute."),
    ]


def update_settings(clip_range: float, kl_beta: float, adv_clip_max: float, max_grad_norm: float, std_mode: str,
                    optimizer_steps: int, gradient_checkpointing: bool = False) -> UpdateSettings:
    config = GRPOConfig(clip_range=float(clip_range), adv_clip_max=float(adv_clip_max) or None,
                        kl_beta=float(kl_beta), max_grad_norm=float(max_grad_norm) or None,
                        optimizer_steps=int(optimizer_steps))
    return UpdateSettings(config=config, std_mode=std_mode, gradient_checkpointing=bool(gradient_checkpointing))


def _check_inputs(state: TrainerState, rollout: Rollout, rewards: Rewards, node: str) -> None:
    trained = {id(a) for a in lora_adapters(state.patcher)}
    sampled = {id(a) for a in lora_adapters(rollout.model)}
    if not trained or sampled != trained:
        raise node_error(node, "the rollout was sampled with a model that does not carry this trainer's LoRA",
                         "connect the MODEL output of the FlowGRPO LoRA Init that made this trainer (or a model "
                         "derived from it) to the rollout sampler")
    if rollout.groups is None:
        raise node_error(node, "the rollout has no prompt groups", "connect FlowGRPO Prompt Source's groups output "
                         "to the rollout sampler's groups input")
    if rewards.batch_size != rollout.batch_size:
        raise node_error(node, f"{rewards.batch_size} rewards for a rollout of {rollout.batch_size} samples",
                         "score the images decoded from this rollout's LATENT (one reward per sample)")
    bad = (~torch.isfinite(rewards.values)).nonzero().flatten().tolist()
    if bad:
        raise node_error(node, f"the rewards of samples {bad} are NaN or infinite; the update was skipped and the "
                         "LoRA is unchanged", "fix the reward (a NaN reward would poison its whole group)")


def advantages(rewards: Rewards, group_ids: torch.Tensor, settings: UpdateSettings):
    """The :class:`~flowgrpo_core.grpo.AdvantageResult` of ``rewards``: one reward normalised per group, or several
    combined by ``rewards.aggregation`` (:func:`~flowgrpo_core.grpo.multi_reward_advantages`)."""
    norm = dict(std_mode=settings.std_mode, clip=settings.config.adv_clip_max, std_floor=settings.std_floor)
    if rewards.weights:
        return multi_reward_advantages(dict(rewards.components), dict(rewards.weights), group_ids,
                                       mode=rewards.aggregation, **norm)
    return group_advantages(rewards.values, group_ids, **norm)


def grpo_update(state: TrainerState, rollout: Rollout, rewards: Rewards, settings: UpdateSettings,
                node: str = NODE) -> tuple[TrainerState, dict]:
    """One GRPO update of ``state``'s LoRA on ``rollout`` scored by ``rewards``; returns ``(new_state, metrics)``.

    Metrics: the trainer's (loss, approx_kl, clipfrac, ratio_mean/min/max, grad_norm, kl,
    first_log_ratio_abs_max, ...) plus reward_mean, reward_std, zero_std_ratio, iteration (completed updates
    after this one), seconds, ``reward_<name>`` (the mean of each component when there are several), the per-sample
    lists ``advantages`` ``[B]`` and ``rewards`` (component name -> ``[B]`` scores), the step plan ``sde_steps`` /
    ``train_steps``, ``ema_updated``, ``offloaded`` (models unloaded for the update), and the phase costs
    ``time_<phase>_s`` / ``peak_mem_<phase>_mb`` of the rollout, the reward and this update.

    Before training, every other loaded model (VAE, text encoders, reward models) is offloaded, so the update gets
    their memory. With an EMA, it is stepped after the optimizer (``n`` = this update's 0-based index).
    """
    _check_inputs(state, rollout, rewards, node)
    adv = advantages(rewards, rollout.groups.group_ids, settings)
    spec = rollout.trajectory.spec
    extras = dict(spec.extras)
    policy = ComfyFlowPolicy(rollout.model, cfg=extras.get("cfg", 1.0), norm_rescale=extras.get("norm_rescale", False),
                             checkpointing=settings.gradient_checkpointing)
    policy.interrupt_in_training = settings.config.optimizer_steps == 1
    trainer = GRPOTrainer(policy, state.optimizer, settings.config)
    timer = PhaseTimer(rollout.model.load_device)
    offloaded = offload_all_but(rollout.model)
    try:
        with timer.phase("update"), policy.training():
            metrics = trainer.update(rollout.trajectory, adv.advantages)
    except FloatingPointError as e:
        raise node_error(node, str(e), "lower the learning rate or check the rewards") from e
    except ValueError as e:
        raise node_error(node, str(e), "change the update settings to fit the rollout") from e
    ema_updated = False
    if state.ema is not None:
        with torch.inference_mode(False):
            ema_updated = state.ema.step(lora_io.trainable_params(state), state.iteration)
    values = rewards.values.double()
    phases = timer.phases()
    metrics.update(reward_mean=float(values.mean()), reward_std=float(values.std(unbiased=False)),
                   zero_std_ratio=float(adv.zero_std_ratio), iteration=state.iteration + 1,
                   seconds=phases["time_update_s"], ema_updated=ema_updated, offloaded=len(offloaded),
                   sde_steps=[i for i, s in enumerate(spec.sde_mask) if s], train_steps=spec.train_steps)
    metrics.update(rollout.stats)
    metrics.update(rewards.stats)
    metrics.update(phases)
    for name, component in rewards.components:
        if len(rewards.components) > 1:
            metrics[f"reward_{name}"] = float(component.double().mean())
    metrics["advantages"] = adv.advantages.tolist()
    metrics["rewards"] = {name: component.tolist() for name, component in rewards.components}
    return state.advanced(metrics), metrics


class FlowGRPOUpdate(AlwaysRun):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FlowGRPOUpdate",
            display_name=NODE,
            category="FlowGRPO/training",
            description="One GRPO update of the trainer's LoRA from a rollout and its rewards: group-relative "
                        "advantages, log-probs replayed with the rollout's exact settings, clipped surrogate "
                        "(+ KL), one or more optimizer steps.",
            inputs=[
                io.Custom(TRAINER).Input("trainer", tooltip="Trainer state (FlowGRPO LoRA Init, or the previous "
                                                            "update through FlowGRPO Loop Start)."),
                io.Custom(ROLLOUT).Input("rollout", tooltip="The rollout from FlowGRPO SDE Sampler (rollout), "
                                                            "sampled with this trainer's MODEL."),
                io.Custom(REWARDS).Input("rewards", tooltip="One reward per sample of the rollout."),
                *grpo_inputs(),
            ],
            outputs=[
                io.Custom(TRAINER).Output(display_name="trainer", tooltip="The trainer after this update."),
                io.String.Output(display_name="metrics", tooltip="This update's metrics as JSON."),
                io.Float.Output(display_name="reward_mean", tooltip="Mean reward of the rollout."),
            ],
            not_idempotent=True,
        )

    @classmethod
    def execute(cls, trainer, rollout, rewards, clip_range, kl_beta, adv_clip_max, max_grad_norm, std_mode,
                optimizer_steps, gradient_checkpointing) -> io.NodeOutput:
        settings = update_settings(clip_range, kl_beta, adv_clip_max, max_grad_norm, std_mode, optimizer_steps,
                                   gradient_checkpointing)
        state, metrics = grpo_update(trainer, rollout, rewards, settings)
        emit(METRICS_EVENT, dict(metrics, run=state.run_name))
        return io.NodeOutput(state, json.dumps(metrics, sort_keys=True), metrics["reward_mean"])


NODES = [FlowGRPOUpdate]
