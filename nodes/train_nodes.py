"""``FlowGRPO GRPO Train``: the whole loop in one node (prompts -> rollout -> VAE decode -> reward -> update).

The loop, evaluation and logs live in :mod:`train_loop` (shared helpers with the composable nodes); this node parses
its widgets (or a connected preset, :mod:`preset_nodes`), makes or resumes the trainer (:mod:`lora_io`), runs the
loop with a progress bar, and shows the reward curve and the metric curves (reward, approx_kl, clipfrac) in its UI.
``iterations`` is the run's total: a resumed run continues up to it.
"""

from __future__ import annotations

import logging
from typing import Any

from comfy_api.latest import io, ui

from . import lora_io, previews
from .always_run import AlwaysRun
from .lora_targets import LORA_TARGETS
from .lora_nodes import ema_inputs
from .preset_nodes import apply_preset, preset_input
from .prompt_nodes import read_prompts
from .reward_model_nodes import REWARD_MODEL
from .rollout_nodes import frames_input, sampling_inputs, sampling_settings
from .state import RESULT_EVENT, TRAINER, emit, node_error
from .train_loop import TrainJob, curve_file, reward_curve_picture, run_folder, train
from .update_nodes import grpo_inputs, update_settings
from ..flowgrpo_core.rewards.simple import SIMPLE_REWARDS

__all__ = ["FlowGRPOTrain", "make_job", "NODES"]

NODE = "FlowGRPO GRPO Train"
log = logging.getLogger("flowgrpo")


def run_inputs() -> list:
    """Widgets of a run: evaluation, EMA, logs (the all-in-one node's own; LoRA Init shares the EMA ones)."""
    return [
        io.Int.Input("eval_steps", optional=True, default=0, min=0, max=1000,
                     tooltip="Evaluation steps (ODE, stock Euler sampler, EMA weights when on): Flow-GRPO trains "
                             "with 10 steps and evaluates with 40. 0: no evaluation."),
        io.Int.Input("eval_every", optional=True, default=0, min=0, max=10**7,
                     tooltip="Evaluate every N iterations (0: only after the last one). Needs eval_steps > 0."),
        *ema_inputs(),
        io.Int.Input("sample_every", optional=True, default=0, min=0, max=10**7,
                     tooltip="Save the iteration's groups with their rewards to output/flowgrpo/<run_name>/samples "
                             "every N iterations (0: never)."),
        io.Boolean.Input("tensorboard", optional=True, default=False,
                         tooltip="Also write TensorBoard events to output/flowgrpo/<run_name>/tensorboard (needs "
                                 "pip install tensorboard). metrics.jsonl is always written."),
    ]


def make_job(clip: Any, vae: Any, reward_model: Any, w: dict, node: str = NODE) -> TrainJob:
    """The :class:`TrainJob` of the node's widget values ``w`` (node errors for bad settings)."""
    sampling = sampling_settings(w["steps"], w["scheduler"], w["shift"], w["sde_kind"], w["noise_level"], w["cfg"],
                                 w["norm_rescale"], w["step_mode"], w["train_fraction"], w["window_size"],
                                 w["window_start"], w["window_shift_every"], w["micro_batch_size"],
                                 w.get("window_end", 0), w.get("same_noise_per_group", False), node=node)
    if w["group_size"] < 2:
        raise node_error(node, f"group_size is {w['group_size']}", "use at least 2 images per prompt (GRPO compares "
                         "samples within a group)")
    if w.get("eval_every") and not w.get("eval_steps"):
        raise node_error(node, f"eval_every is {w['eval_every']} but eval_steps is 0",
                         "set eval_steps (e.g. 40 for SD3.5) or eval_every to 0")
    update = update_settings(w["clip_range"], w["kl_beta"], w["adv_clip_max"], w["max_grad_norm"], w["std_mode"],
                             w["optimizer_steps"], w["gradient_checkpointing"])
    return TrainJob(clip=clip, vae=vae, prompts=read_prompts(w["prompts"], w["prompt_file"], node=node),
                    negative_prompt=w["negative_prompt"], prompts_per_iteration=w["prompts_per_iteration"],
                    group_size=w["group_size"], flux_guidance=w["flux_guidance"], width=w["width"],
                    height=w["height"], sampling=sampling, update=update, reward=w["reward"],
                    reward_scale=w["reward_scale"], reward_model=reward_model, iterations=w["iterations"],
                    save_every=w["save_every"], seed=w["seed"], node=node, eval_steps=w.get("eval_steps", 0),
                    eval_every=w.get("eval_every", 0), sample_every=w.get("sample_every", 0),
                    tensorboard=bool(w.get("tensorboard", False)), frames=int(w.get("frames", 1)))


class FlowGRPOTrain(AlwaysRun):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FlowGRPOTrain",
            display_name=NODE,
            category="FlowGRPO/training",
            description="Trains a LoRA with GRPO in one node: each iteration draws prompts, samples groups of images "
                        "with an SDE, decodes and scores them, and updates the LoRA. Saves checkpoints into "
                        "models/loras (also when interrupted), logs every iteration to "
                        "output/flowgrpo/<run_name>/metrics.jsonl, and draws the reward and metric curves.",
            inputs=[
                io.Model.Input("model", tooltip="The flow-matching MODEL to fine-tune (left unchanged)."),
                io.Clip.Input("clip", tooltip="The text encoder of this model (encodes the prompts)."),
                io.Vae.Input("vae", tooltip="The VAE that decodes rollouts for the reward."),
                preset_input(),
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
                frames_input(),
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
                io.Float.Input("alpha", default=16.0, min=0.001, max=4096.0, step=0.5,
                               tooltip="LoRA alpha (scale = alpha / rank)."),
                io.Combo.Input("targets", options=list(LORA_TARGETS), default="attention",
                               tooltip="Layers that get a LoRA: attention projections, or attention and MLP."),
                io.Float.Input("learning_rate", default=1e-4, min=1e-8, max=1.0, step=1e-6, round=False,
                               tooltip="AdamW learning rate of the LoRA."),
                io.Int.Input("iterations", default=100, min=1, max=10**7,
                             tooltip="Total GRPO updates of the run (a resumed run continues up to this count)."),
                io.Int.Input("save_every", default=25, min=0, max=10**7,
                             tooltip="Save a checkpoint every N iterations (0: only at the end and on interrupt)."),
                *run_inputs(),
                io.String.Input("run_name", default="flowgrpo",
                                tooltip="File-name prefix of the checkpoints in models/loras and the name of the "
                                        "log folder output/flowgrpo/<run_name>."),
                io.Combo.Input("resume", options=lora_io.resume_options(), default="none",
                               tooltip="none: a new LoRA; latest: the newest checkpoint of run_name; or a "
                                       "checkpoint file (LoRA, optimizer, EMA, random states and iteration)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=False,
                             tooltip="Run seed: prompts, noise, step windows and the LoRA init."),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL", tooltip="The input model with the trained LoRA applied (the "
                                                               "EMA weights when ema_decay > 0)."),
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
    def execute(cls, model, clip, vae, preset=None, reward_model=None, **widgets) -> io.NodeOutput:
        import comfy.utils

        names = [i.id for i in cls.define_schema().inputs]
        w = apply_preset(preset, widgets, NODE, family=_family(model), names=names)
        job = make_job(clip, vae, reward_model, w)
        state = lora_io.make_trainer_state(model, rank=w["rank"], alpha=w["alpha"], targets=w["targets"],
                                           learning_rate=w["learning_rate"], seed=w["seed"], run_name=w["run_name"],
                                           resume=w["resume"], ema_decay=w.get("ema_decay", 0.0),
                                           ema_every=w.get("ema_every", 1), node=NODE)
        progress = comfy.utils.ProgressBar(job.iterations)
        progress.update_absolute(state.iteration, job.iterations)
        state, grid, curve_path = train(state, job, progress)
        emit(RESULT_EVENT, {"run": state.run_name, "lora_path": state.checkpoint,
                            "reward_curve_path": str(curve_path), "iterations": state.iteration,
                            "metrics_path": str(run_folder(state.run_name) / "metrics.jsonl")})
        curve = previews.to_image(reward_curve_picture(state))
        samples = previews.to_image(grid) if grid is not None else curve
        trained = lora_io.apply_lora(model, lora_io.lora_state_dict(state), 1.0, node=NODE)
        _, curve_name = curve_file(state.run_name)
        saved = ui.SavedImages([ui.SavedResult(curve_name, "flowgrpo", io.FolderType.output),
                                ui.SavedResult("curves.png", f"flowgrpo/{state.run_name}", io.FolderType.output)])
        return io.NodeOutput(trained, state, state.checkpoint or "", curve, samples, ui=saved)


def _family(model: Any):
    from .lora_targets import model_family

    try:
        return model_family(model.model)
    except (AttributeError, ValueError):
        return None  # make_trainer_state reports a model that is not a flow model


NODES = [FlowGRPOTrain]
