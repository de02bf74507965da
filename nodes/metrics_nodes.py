"""``FlowGRPO Log Metrics``: the all-in-one node's run log for composable graphs.

Placed after GRPO Update in a loop body, it appends the trainer's latest metrics to
``output/flowgrpo/<run_name>/metrics.jsonl`` (and TensorBoard events), redraws ``curves.png`` (reward, approx_kl,
clipfrac) and shows it in its UI. The first call of a run in this ComfyUI process drops log lines past the trainer's
iteration (a resumed run), later calls append. One writer per run folder is kept open between passes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from comfy_api.latest import io, ui

from ..flowgrpo_core.metrics_log import MetricsLog
from . import previews
from .always_run import AlwaysRun
from .state import TRAINER, TrainerState, node_error
from .train_loop import open_metrics_log, run_folder

__all__ = ["log_metrics", "FlowGRPOLogMetrics", "NODES"]

NODE = "FlowGRPO Log Metrics"
_open: dict[tuple[str, bool], MetricsLog] = {}


def _log_for(folder: Path, tensorboard: bool, iteration: int) -> MetricsLog:
    key = (str(folder), bool(tensorboard))
    metrics_log = _open.get(key)
    if metrics_log is None:
        metrics_log = open_metrics_log(folder, tensorboard, NODE)
        metrics_log.resume(iteration - 1)
        _open[key] = metrics_log
    return metrics_log


def log_metrics(state: TrainerState, tensorboard: bool = False) -> Path:
    """Append ``state``'s latest metrics to its run's log and redraw the curves; returns the curves PNG path."""
    if not isinstance(state, TrainerState):
        raise node_error(NODE, f"trainer is a {type(state).__name__}", "connect the trainer output of FlowGRPO GRPO "
                         "Update (or Loop End)")
    folder = run_folder(state.run_name)
    if state.history:
        _log_for(folder, tensorboard, state.iteration).log(state.iteration, state.history[-1])
    return previews.save_png_atomic(previews.metric_curves(state.history), folder / "curves.png")


class FlowGRPOLogMetrics(AlwaysRun):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FlowGRPOLogMetrics",
            display_name=NODE,
            category="FlowGRPO/training",
            description="Logs the trainer's latest GRPO update to output/flowgrpo/<run_name>/metrics.jsonl (and "
                        "TensorBoard) and shows the reward, approx_kl and clipfrac curves. Put it after GRPO Update "
                        "inside the loop.",
            inputs=[
                io.Custom(TRAINER).Input("trainer", tooltip="The trainer after FlowGRPO GRPO Update."),
                io.Boolean.Input("tensorboard", default=False,
                                 tooltip="Also write TensorBoard events to output/flowgrpo/<run_name>/tensorboard "
                                         "(needs pip install tensorboard)."),
            ],
            outputs=[
                io.Custom(TRAINER).Output(display_name="trainer", tooltip="The same trainer, passed through."),
                io.Image.Output(display_name="curves", tooltip="Reward, approx_kl and clipfrac per iteration."),
            ],
            is_output_node=True,
            not_idempotent=True,
        )

    @classmethod
    def execute(cls, trainer: Any, tensorboard: bool = False) -> io.NodeOutput:
        path = log_metrics(trainer, tensorboard)
        saved = ui.SavedImages([ui.SavedResult(path.name, f"flowgrpo/{trainer.run_name}", io.FolderType.output)])
        return io.NodeOutput(trainer, previews.to_image(previews.metric_curves(trainer.history)), ui=saved)


NODES = [FlowGRPOLogMetrics]
