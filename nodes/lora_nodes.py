"""LoRA nodes: start or resume a GRPO run, save its LoRA (+ training state), apply the trained LoRA to a MODEL.

The work is in :mod:`.lora_io`; these classes only declare inputs and shape outputs. All three re-run on every queue
(``not_idempotent`` plus a NaN fingerprint): the trainer's tensors change in place between queues, so a cached
output would be stale.
"""

from __future__ import annotations

from comfy_api.latest import io, ui

from .lora_targets import LORA_TARGETS
from .lora_io import APPLY_NODE, EXPORTS, INIT_NODE, SAVE_NODE, apply_lora, lora_state_dict, make_trainer_state, \
    resume_options, save_checkpoint
from .always_run import AlwaysRun
from .state import TRAINER

__all__ = ["FlowGRPOLoRAInit", "FlowGRPOSaveLoRA", "FlowGRPOApplyLoRA"]

_TRAINER_TOOLTIP = "The FlowGRPO trainer (from FlowGRPO LoRA Init or a GRPO update node)."


def ema_inputs() -> list:
    """The EMA widgets (LoRA Init and the all-in-one train node); optional, so workflows saved before they existed
    still validate."""
    return [
        io.Float.Input("ema_decay", optional=True, default=0.0, min=0.0, max=0.9999, step=0.001,
                       tooltip="EMA of the LoRA weights (Flow-GRPO: 0.9, DanceGRPO: 0.995); saved files, the applied "
                               "LoRA and evaluation use the average, rollouts the live weights. 0: no EMA."),
        io.Int.Input("ema_every", optional=True, default=1, min=1, max=10000,
                     tooltip="Update the EMA every N GRPO updates (Flow-GRPO: 8), with Flow-GRPO's warm-up "
                             "decay min(ema_decay, (1 + n) / (10 + n))."),
    ]


class FlowGRPOLoRAInit(AlwaysRun):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FlowGRPOLoRAInit",
            display_name=INIT_NODE,
            category="FlowGRPO/training",
            description=("Puts a trainable LoRA on a copy of any flow-matching MODEL ComfyUI loads (FLUX, Qwen-Image, "
                         "SD3, Wan, Z-Image, ...) and makes "
                         "its AdamW optimizer, or resumes a saved run. The input MODEL is not changed; the MODEL "
                         "output carries the LoRA: sample rollouts with it."),
            inputs=[
                io.Model.Input("model", tooltip="The flow-matching model to train a LoRA for (e.g. UNETLoader)."),
                io.Int.Input("rank", default=16, min=1, max=1024,
                             tooltip="LoRA rank r: size of the low-rank update (4 to 64 is typical)."),
                io.Float.Input("alpha", default=16.0, min=0.001, max=4096.0, step=0.5,
                               tooltip="LoRA alpha: the update is scaled by alpha / rank (alpha = rank gives 1)."),
                io.Combo.Input("targets", options=list(LORA_TARGETS), default=LORA_TARGETS[0],
                               tooltip=("Which Linear layers get a LoRA: 'attention' (q/k/v/out projections, FLUX "
                                        "single blocks) or 'attention_mlp' (also the feed-forward layers).")),
                io.Float.Input("learning_rate", default=1e-4, min=1e-8, max=1.0, step=1e-6, round=False,
                               tooltip="AdamW learning rate (betas 0.9/0.999, weight decay 1e-4); also on resume."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF,
                             tooltip="Seed of the LoRA's random init (lora_down); lora_up starts at zero."),
                io.String.Input("run_name", default="flowgrpo",
                                tooltip=("Name of this run: checkpoints are saved as "
                                         "<run_name>_<iteration>.safetensors in models/loras, and resume 'latest' "
                                         "looks for them.")),
                io.Combo.Input("resume", options=resume_options(), default="none",
                               tooltip=("'none': start a new LoRA. 'latest': continue the newest checkpoint of "
                                        "run_name (a new run if there is none). Or pick a saved checkpoint: LoRA, "
                                        "optimizer, iteration and history are restored (same rank, alpha, targets "
                                        "and model family required).")),
                *ema_inputs(),
            ],
            outputs=[
                io.Custom(TRAINER).Output(display_name="trainer",
                                          tooltip="The trainer: LoRA, optimizer, EMA, iteration and history."),
                io.Model.Output(display_name="model",
                                tooltip="The model with the trainable LoRA: use it to sample rollouts."),
            ],
            not_idempotent=True,
        )

    @classmethod
    def execute(cls, model, rank: int, alpha: float, targets: str, learning_rate: float, seed: int, run_name: str,
                resume: str = "none", ema_decay: float = 0.0, ema_every: int = 1) -> io.NodeOutput:
        state = make_trainer_state(model, rank=rank, alpha=alpha, targets=targets, learning_rate=learning_rate,
                                   seed=seed, run_name=run_name, resume=resume, ema_decay=ema_decay,
                                   ema_every=ema_every, node=INIT_NODE)
        return io.NodeOutput(state, state.patcher)


class FlowGRPOSaveLoRA(AlwaysRun):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FlowGRPOSaveLoRA",
            display_name=SAVE_NODE,
            category="FlowGRPO/training",
            description=("Saves the trainer's LoRA to models/loras as <prefix>_<iteration>.safetensors (loads with "
                         "the stock LoRA loaders) plus a .flowgrpo-state file next to it for resuming."),
            inputs=[
                io.Custom(TRAINER).Input("trainer", tooltip=_TRAINER_TOOLTIP),
                io.String.Input("filename_prefix", default="",
                                tooltip=("File name before _<iteration>.safetensors, inside models/loras (sub-folders "
                                         "allowed, e.g. runs/cat). Empty: the trainer's run_name.")),
                io.Combo.Input("export", options=list(EXPORTS), default="comfyui",
                               tooltip=("'comfyui': ComfyUI-native keys only. 'peft': also <name>.peft.safetensors "
                                        "with PEFT/diffusers keys (transformer.*.lora_A/lora_B) for other tools.")),
            ],
            outputs=[io.String.Output(display_name="lora_path", tooltip="Full path of the saved LoRA file.")],
            is_output_node=True,
            not_idempotent=True,
        )

    @classmethod
    def execute(cls, trainer, filename_prefix: str = "", export: str = "comfyui") -> io.NodeOutput:
        lora_path, state_path = save_checkpoint(trainer, filename_prefix=filename_prefix or None, export=export,
                                                node=SAVE_NODE)
        text = f"iteration {trainer.iteration}\nLoRA: {lora_path}\ntraining state: {state_path}"
        return io.NodeOutput(lora_path, ui=ui.PreviewText(text))


class FlowGRPOApplyLoRA(AlwaysRun):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FlowGRPOApplyLoRA",
            display_name=APPLY_NODE,
            category="FlowGRPO/training",
            description=("Applies the trainer's current LoRA to a MODEL the way the stock LoRA loaders do (no file "
                         "needed), and outputs it as LORA_MODEL for the stock Load LoRA Model node too."),
            inputs=[
                io.Model.Input("model", tooltip="The model to apply the LoRA to (same kind as the trained one)."),
                io.Custom(TRAINER).Input("trainer", tooltip=_TRAINER_TOOLTIP),
                io.Float.Input("strength", default=1.0, min=-100.0, max=100.0, step=0.01,
                               tooltip="LoRA strength: 1 = as trained, 0 = off, negative values invert it."),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="The model with the LoRA applied."),
                io.LoraModel.Output(display_name="lora", tooltip="The LoRA tensors (ComfyUI-native keys)."),
            ],
            not_idempotent=True,
        )

    @classmethod
    def execute(cls, model, trainer, strength: float = 1.0) -> io.NodeOutput:
        lora = lora_state_dict(trainer)
        return io.NodeOutput(apply_lora(model, lora, strength, node=APPLY_NODE), lora)


NODES = [FlowGRPOLoRAInit, FlowGRPOSaveLoRA, FlowGRPOApplyLoRA]
