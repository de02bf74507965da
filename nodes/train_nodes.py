"""``FlowGRPO GRPO Train``: the whole loop in one node (prompts -> rollout -> VAE decode -> reward -> update).

It calls the same helpers as the composable nodes (:func:`prompt_nodes.encode_prompt_batch`,
:func:`rollout_nodes.run_rollout`, :func:`reward_nodes.compute_simple_reward` (or
:func:`reward_model_nodes.score_images` with a connected reward model), :func:`update_nodes.grpo_update`,
:mod:`lora_io` for checkpoints), reports every iteration (progress bar with the group grid as preview, a
``flowgrpo.metrics`` websocket event, a log line), saves every ``save_every`` iterations, and on an interrupt saves
a checkpoint before stopping. ``iterations`` is the run's total: a resumed run continues up to it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from comfy_api.latest import io, ui

from . import lora_io, previews
from .comfy_policy import LORA_TARGETS
from .prompt_nodes import encode_prompt_batch, read_prompts
from .reward_model_nodes import REWARD_MODEL, score_images
from .reward_nodes import compute_simple_reward, images_as_batch
from .rollout_nodes import SamplingSettings, run_rollout, sampling_inputs, sampling_settings
from .always_run import AlwaysRun
from .state import METRICS_EVENT, RESULT_EVENT, TRAINER, TrainerState, emit, node_error
from .update_nodes import UpdateSettings, grpo_inputs, grpo_update, update_settings
from ..flowgrpo.report import format_metrics
from ..flowgrpo_core.rewards.simple import SIMPLE_REWARDS

__all__ = ["TrainJob", "train", "FlowGRPOTrain", "NODES"]

NODE = "FlowGRPO GRPO Train"
log = logging.getLogger("flowgrpo")


@dataclass
class TrainJob:
    """Everything one all-in-one run needs besides the trainer state."""

    clip: Any
    vae: Any
    prompts: list
    negative_prompt: str
    prompts_per_iteration: int
    group_size: int
    flux_guidance: float
    width: int
    height: int
    sampling: SamplingSettings
    update: UpdateSettings
    reward: str
    reward_scale: float
    reward_model: Any  # a RewardBackend from Load Reward Model / Reward Server, used instead of ``reward``
    iterations: int
    save_every: int
    seed: int


def _iteration(state: TrainerState, job: TrainJob) -> tuple[TrainerState, dict, torch.Tensor, Any]:
    it = state.iteration
    positive, negative, groups = encode_prompt_batch(job.clip, job.prompts, job.negative_prompt,
                                                     job.prompts_per_iteration, job.group_size, it, job.seed,
                                                     job.flux_guidance, node=NODE)
    rollout, latent = run_rollout(state.patcher, positive, negative, job.sampling, seed=job.seed, iteration=it,
                                  width=job.width, height=job.height, groups=groups, preview=False, node=NODE)
    decoded = job.vae.decode(latent["samples"])
    images = images_as_batch(decoded)
    if job.reward_model is not None:
        rewards = score_images(job.reward_model, decoded, groups, scale=job.reward_scale, node=NODE)
    else:
        rewards = compute_simple_reward(job.reward, images, job.reward_scale, node=NODE)
    state, metrics = grpo_update(state, rollout, rewards, job.update, node=NODE)
    return state, metrics, images, (groups, rewards)


def _report(state: TrainerState, metrics: dict, job: TrainJob, images, scored, progress) -> Any:
    groups, rewards = scored
    grid = previews.group_grid(images, groups.group_ids.tolist(), rewards.values.tolist(), groups.texts)
    progress.update_absolute(state.iteration, job.iterations, ("JPEG", grid, 512))
    emit(METRICS_EVENT, dict(metrics, iterations=job.iterations, run=state.run_name))
    log.info("FlowGRPO %s: %s", state.run_name, format_metrics(dict(metrics, iterations=job.iterations)))
    return grid


def _curve_picture(state: TrainerState):
    """The reward curve of ``state``'s history (mean +- std per iteration)."""
    return previews.reward_curve(state.reward_curve(), [m.get("reward_std", 0.0) for m in state.history])


def _curve_file(state: TrainerState) -> tuple[Path, str]:
    import folder_paths

    name = f"{state.run_name}_reward_curve.png"
    return Path(folder_paths.get_output_directory()) / "flowgrpo" / name, name


def train(state: TrainerState, job: TrainJob) -> tuple[TrainerState, Any, Path]:
    """Run ``state`` up to ``job.iterations`` completed updates; returns ``(state, last grid or None, curve path)``.

    On an interrupt (or any error) after at least one new update, a checkpoint of the last completed update is
    written before the exception propagates.
    """
    import comfy.model_management
    import comfy.utils

    progress = comfy.utils.ProgressBar(job.iterations)
    progress.update_absolute(state.iteration, job.iterations)
    start, grid = state.iteration, None
    try:
        while state.iteration < job.iterations:
            state, metrics, images, scored = _iteration(state, job)
            grid = _report(state, metrics, job, images, scored, progress)
            if job.save_every and state.iteration % job.save_every == 0 and state.iteration < job.iterations:
                state = state.with_checkpoint(lora_io.save_checkpoint(state, node=NODE)[0])
    except BaseException as e:
        if state.iteration > start and state.saved_iteration != state.iteration:
            path = lora_io.save_checkpoint(state, node=NODE)[0]
            log.warning("FlowGRPO: %s at iteration %d; checkpoint saved to %s", type(e).__name__, state.iteration,
                        path)
        raise
    if state.saved_iteration != state.iteration:
        state = state.with_checkpoint(lora_io.save_checkpoint(state, node=NODE)[0])
    curve_path, _ = _curve_file(state)
    previews.save_png_atomic(_curve_picture(state), curve_path)
    comfy.model_management.throw_exception_if_processing_interrupted()
    return state, grid, curve_path


class FlowGRPOTrain(AlwaysRun):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FlowGRPOTrain",
            display_name=NODE,
            category="FlowGRPO/training",
            description="Trains a LoRA with GRPO in one node: each iteration draws prompts, samples groups of images "
                        "with an SDE, decodes and scores them, and updates the LoRA. Saves checkpoints into "
                        "models/loras (also when interrupted) and draws the reward curve.",
            inputs=[
                io.Model.Input("model", tooltip="The flow-matching MODEL to fine-tune (left unchanged)."),
                io.Clip.Input("clip", tooltip="The text encoder of this model (encodes the prompts)."),
                io.Vae.Input("vae", tooltip="The VAE that decodes rollouts for the reward."),
                io.String.Input("prompts", multiline=True, default="a red apple\na blue car\na green tree",
                                tooltip="Training prompts, one per line (used when prompt_file is empty)."),
                io.String.Input("prompt_file", default="",
                                tooltip="Optional .txt (one prompt per line) or .jsonl ({\"prompt\": ...} per line) "
                                        "file in ComfyUI's input folder."),
                io.String.Input("negative_prompt", multiline=True, default="",
                                tooltip="Negative prompt for true CFG (cfg > 1)."),
                io.Int.Input("prompts_per_iteration", default=2, min=1, max=1024,
                             tooltip="Distinct prompts per iteration."),
                io.Int.Input("group_size", default=4, min=2, max=1024,
                             tooltip="Images per prompt (the GRPO group); at least 2."),
                io.Float.Input("flux_guidance", default=3.5, min=0.0, max=100.0, step=0.1,
                               tooltip="FLUX guidance embedding written into the prompts (ignored by other models)."),
                io.Int.Input("width", default=512, min=16, max=8192, step=16, tooltip="Image width in pixels."),
                io.Int.Input("height", default=512, min=16, max=8192, step=16, tooltip="Image height in pixels."),
                *sampling_inputs(),
                io.Combo.Input("reward", options=list(SIMPLE_REWARDS), default="jpeg_compressibility",
                               tooltip="The reward each decoded image gets (weight-free statistics); ignored when "
                                       "reward_model is connected."),
                io.Float.Input("reward_scale", default=1.0, min=-1000.0, max=1000.0, step=0.01,
                               tooltip="Multiplies the reward."),
                io.Custom(REWARD_MODEL).Input("reward_model", optional=True,
                                              tooltip="A reward model (FlowGRPO Load Reward Model) or reward "
                                                      "server; replaces the reward combo when connected."),
                *grpo_inputs(),
                io.Int.Input("rank", default=16, min=1, max=1024, tooltip="LoRA rank."),
                io.Float.Input("alpha", default=16.0, min=0.0, max=4096.0, step=0.5,
                               tooltip="LoRA alpha (scale = alpha / rank)."),
                io.Combo.Input("targets", options=list(LORA_TARGETS), default="attention",
                               tooltip="Layers that get a LoRA: attention projections, or attention and MLP."),
                io.Float.Input("learning_rate", default=1e-4, min=0.0, max=1.0, step=1e-6,
                               tooltip="AdamW learning rate of the LoRA."),
                io.Int.Input("iterations", default=100, min=1, max=10**7,
                             tooltip="Total GRPO updates of the run (a resumed run continues up to this count)."),
                io.Int.Input("save_every", default=25, min=0, max=10**7,
                             tooltip="Save a checkpoint every N iterations (0: only at the end and on interrupt)."),
                io.String.Input("run_name", default="flowgrpo",
                                tooltip="File-name prefix of the checkpoints in models/loras."),
                io.Combo.Input("resume", options=lora_io.resume_options(), default="none",
                               tooltip="none: a new LoRA; latest: the newest checkpoint of run_name; or a "
                                       "checkpoint file (with its optimizer state and iteration)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=False,
                             tooltip="Run seed: prompts, noise, step windows and the LoRA init."),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL", tooltip="The input model with the trained LoRA applied."),
                io.Custom(TRAINER).Output(display_name="trainer", tooltip="The trainer state (save, apply, "
                                                                           "continue)."),
                io.String.Output(display_name="lora_path", tooltip="Path of the last saved LoRA file."),
                io.Image.Output(display_name="reward_curve", tooltip="Reward per iteration."),
                io.Image.Output(display_name="samples", tooltip="The last iteration's groups with their rewards."),
            ],
            is_output_node=True,
            not_idempotent=True,
        )

    @classmethod
    def execute(cls, model, clip, vae, prompts, prompt_file, negative_prompt, prompts_per_iteration, group_size,
                flux_guidance, width, height, steps, scheduler, shift, sde_kind, noise_level, cfg, norm_rescale,
                step_mode, train_fraction, window_size, window_start, window_shift_every, micro_batch_size,
                reward, reward_scale, clip_range, kl_beta, adv_clip_max, max_grad_norm, std_mode, optimizer_steps,
                gradient_checkpointing, rank, alpha, targets, learning_rate, iterations, save_every, run_name, resume,
                seed, reward_model=None) -> io.NodeOutput:
        sampling = sampling_settings(steps, scheduler, shift, sde_kind, noise_level, cfg, norm_rescale, step_mode,
                                     train_fraction, window_size, window_start, window_shift_every,
                                     micro_batch_size, node=NODE)
        if group_size < 2:
            raise node_error(NODE, f"group_size is {group_size}", "use at least 2 images per prompt (GRPO compares "
                             "samples within a group)")
        job = TrainJob(clip=clip, vae=vae, prompts=read_prompts(prompts, prompt_file, node=NODE),
                       negative_prompt=negative_prompt, prompts_per_iteration=prompts_per_iteration,
                       group_size=group_size, flux_guidance=flux_guidance, width=width, height=height,
                       sampling=sampling, update=update_settings(clip_range, kl_beta, adv_clip_max, max_grad_norm,
                                                                 std_mode, optimizer_steps, gradient_checkpointing),
                       reward=reward, reward_scale=reward_scale, reward_model=reward_model,
                       iterations=iterations, save_every=save_every,
                       seed=seed)
        state = lora_io.make_trainer_state(model, rank=rank, alpha=alpha, targets=targets,
                                           learning_rate=learning_rate, seed=seed, run_name=run_name, resume=resume,
                                           node=NODE)
        state, grid, curve_path = train(state, job)
        emit(RESULT_EVENT, {"run": state.run_name, "lora_path": state.checkpoint,
                            "reward_curve_path": str(curve_path), "iterations": state.iteration})
        curve = previews.to_image(_curve_picture(state))
        samples = previews.to_image(grid) if grid is not None else curve
        trained = lora_io.apply_lora(model, lora_io.lora_state_dict(state), 1.0, node=NODE)
        _, curve_name = _curve_file(state)
        saved = ui.SavedImages([ui.SavedResult(curve_name, "flowgrpo", io.FolderType.output)])
        return io.NodeOutput(trained, state, state.checkpoint or "", curve, samples, ui=saved)


NODES = [FlowGRPOTrain]
