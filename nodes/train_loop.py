"""The loop behind ``FlowGRPO GRPO Train``: iterations, evaluation, checkpoints and the run's logs.

One iteration: prompts (:func:`prompt_nodes.encode_prompt_batch`) -> rollout (:func:`rollout_nodes.run_rollout`) ->
VAE decode -> reward -> GRPO update (:func:`update_nodes.grpo_update`), each phase timed with its peak memory
(:class:`flowgrpo_core.profiling.PhaseTimer`). The same helpers back the composable nodes.

Files of a run ``<run>`` under ComfyUI's output folder, ``flowgrpo/<run>/``:

* ``metrics.jsonl``: one line per iteration (:class:`flowgrpo_core.metrics_log.MetricsLog`); ``tensorboard/`` with
  TensorBoard events when enabled; on resume, lines and events past the checkpoint are dropped;
* ``curves.png``: reward (mean +- std), approx_kl and clipfrac per iteration, refreshed at every save and at the end;
* ``samples/iter_<n>.jpg``: the iteration's groups with their rewards, every ``sample_every`` iterations;
* ``eval/iter_<n>.jpg``: the evaluation images with their rewards;
* ``flowgrpo/<run>_reward_curve.png`` (one level up): the reward curve.

Evaluation (``eval_steps > 0``): every ``eval_every`` iterations and after the last one, the first
:data:`EVAL_PROMPTS` prompts are sampled with ComfyUI's stock Euler sampler (an ODE: no noise after the start) for
``eval_steps`` steps on the trainer's model with the EMA weights swapped in (the live ones without EMA), from a
fixed noise, and scored with the training reward: ``eval_reward_mean`` / ``eval_reward_std`` in the metrics.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from ..flowgrpo.report import format_metrics
from ..flowgrpo_core.metrics_log import MetricsLog, jsonable
from ..flowgrpo_core.profiling import PhaseTimer
from . import lora_io, previews
from .prompt_nodes import EncodingCache, encode_prompt_batch, encode_texts
from .reward_model_nodes import score_images
from .reward_nodes import compute_simple_reward
from .rollout_nodes import SamplingSettings, empty_latent, make_sigmas, run_rollout
from .run_files import run_folder
from .state import METRICS_EVENT, NodeInputError, PromptBatch, Rewards, TrainerState, emit
from .update_nodes import UpdateSettings, grpo_update

__all__ = ["TrainJob", "train", "run_folder", "curve_file", "EVAL_PROMPTS", "open_metrics_log", "evaluate", "eval_images",
           "reward_curve_picture"]

log = logging.getLogger("flowgrpo")
EVAL_PROMPTS = 8
#: run settings whose change on resume gives a different run than the one the checkpoint continued
_RUN_KEYS = ("sampling", "update", "prompts_per_iteration", "group_size", "width", "height", "frames", "reward",
             "seed")


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
    node: str = "FlowGRPO GRPO Train"
    eval_steps: int = 0
    eval_every: int = 0
    sample_every: int = 0
    tensorboard: bool = False
    frames: int = 1  # video models: frames per sample (pixels)
    extra: dict = field(default_factory=dict)
    #: the prompts' text encodings, kept for the whole run (the text encoder is frozen)
    encodings: EncodingCache = field(default_factory=EncodingCache)

    def run_config(self) -> dict:
        """The settings that decide the run (JSON data), saved with every checkpoint."""
        reward = self.reward if self.reward_model is None else f"model:{getattr(self.reward_model, 'name', '?')}"
        return {"sampling": dataclasses.asdict(self.sampling), "update": dataclasses.asdict(self.update),
                "prompts_per_iteration": self.prompts_per_iteration, "group_size": self.group_size,
                "width": self.width, "height": self.height, "frames": self.frames, "reward": reward, "reward_scale": self.reward_scale,
                "flux_guidance": self.flux_guidance, "negative_prompt": self.negative_prompt, "seed": self.seed,
                "num_prompts": len(self.prompts), "eval_steps": self.eval_steps, "eval_every": self.eval_every}


def curve_file(run_name: str) -> tuple[Path, str]:
    """The reward-curve PNG of a run and its name relative to ``<output>/flowgrpo``."""
    name = f"{run_name}_reward_curve.png"
    return run_folder(run_name).parent / name, name


def _score(job: TrainJob, decoded: torch.Tensor, groups: Optional[PromptBatch]) -> Rewards:
    if job.reward_model is not None:
        return score_images(job.reward_model, decoded, groups, scale=job.reward_scale, node=job.node)
    return compute_simple_reward(job.reward, decoded, job.reward_scale, node=job.node)


def _iteration(state: TrainerState, job: TrainJob) -> tuple[TrainerState, dict, torch.Tensor, tuple]:
    it = state.iteration
    timer = PhaseTimer(state.patcher.load_device)
    with timer.phase("prompts"):
        positive, negative, groups = encode_prompt_batch(job.clip, job.prompts, job.negative_prompt,
                                                         job.prompts_per_iteration, job.group_size, it, job.seed,
                                                         job.flux_guidance, node=job.node, cache=job.encodings)
    rollout, latent = run_rollout(state.patcher, positive, negative, job.sampling, seed=job.seed, iteration=it,
                                  width=job.width, height=job.height, frames=job.frames, groups=groups,
                                  preview=False, node=job.node)
    with timer.phase("decode"):
        decoded = per_sample(job.vae.decode(latent["samples"]))
    rewards = _score(job, decoded, groups)
    state, metrics = grpo_update(state, rollout, rewards, job.update, node=job.node)
    metrics.update(timer.phases())
    metrics["time_iteration_s"] = sum(v for k, v in metrics.items() if k.startswith("time_") and k.endswith("_s")
                                      and k != "time_iteration_s" and isinstance(v, float))
    return state, metrics, decoded, (groups, rewards)


def per_sample(decoded: torch.Tensor) -> torch.Tensor:
    """A VAE decode as one entry per sample: IMAGE ``[B, H, W, C]``, or clips ``[B, T, H, W, C]`` for video (a
    one-frame time axis, as Qwen-Image's VAE gives, is dropped)."""
    return decoded[:, 0] if decoded.dim() == 5 and decoded.shape[1] == 1 else decoded


def eval_images(state: TrainerState, job: TrainJob) -> torch.Tensor:
    """IMAGE ``[K, H, W, C]`` (video: clips ``[K, T, H, W, C]``) of the first :data:`EVAL_PROMPTS` prompts: ComfyUI's stock Euler sampler (an ODE) for
    ``job.eval_steps`` steps on the trainer's model with the EMA weights swapped in (live ones without EMA), from
    ComfyUI's noise of seed ``job.seed`` (what SamplerCustom with ``noise_seed = seed`` starts from)."""
    import comfy.sample
    import comfy.samplers

    texts = _eval_texts(job)
    model = state.patcher
    positive, negative = encode_texts(job.clip, texts, job.negative_prompt, 1, job.flux_guidance, node=job.node,
                                      cache=job.encodings)
    latent = comfy.sample.fix_empty_latent_channels(model, empty_latent(model, len(texts), job.width, job.height,
                                                                        job.frames, node=job.node))
    noise = comfy.sample.prepare_noise(latent, job.seed)
    sigmas = make_sigmas(model, job.eval_steps, job.sampling.scheduler, job.sampling.shift)
    swap = state.ema.swapped_in(lora_io.trainable_params(state)) if state.ema is not None else contextlib.nullcontext()
    with torch.no_grad(), swap:
        samples = comfy.sample.sample_custom(model, noise, job.sampling.cfg, comfy.samplers.sampler_object("euler"),
                                             sigmas, positive, negative, latent, disable_pbar=True, seed=job.seed)
        return per_sample(job.vae.decode(samples))


def _eval_texts(job: TrainJob) -> list[str]:
    return list(dict.fromkeys(str(p) for p in job.prompts))[:EVAL_PROMPTS]


def evaluate(state: TrainerState, job: TrainJob) -> tuple[dict, Any]:
    """:func:`eval_images` scored with the training reward: ``({eval_reward_mean, eval_reward_std, eval_steps,
    eval_weights, time_eval_s, peak_mem_eval_mb}, grid)``."""
    timer = PhaseTimer(state.patcher.load_device)
    with timer.phase("eval"):
        images = eval_images(state, job)
    texts = _eval_texts(job)
    groups = PromptBatch(texts=tuple(texts), group_ids=torch.arange(len(texts)),
                         prompt_indices=tuple(range(len(texts))), iteration=state.iteration, group_size=1)
    rewards = _score(job, images, groups)
    values = rewards.values.double()
    metrics = {"eval_reward_mean": float(values.mean()), "eval_reward_std": float(values.std(unbiased=False)),
               "eval_steps": int(job.eval_steps), "eval_weights": "ema" if state.ema is not None else "live"}
    metrics.update(timer.phases())
    grid = previews.group_grid(images, list(range(len(texts))), rewards.values.tolist(), texts)
    return metrics, grid


def open_metrics_log(folder: Path, tensorboard: bool, node: str) -> MetricsLog:
    """A :class:`MetricsLog` in ``folder``; a node error when TensorBoard is asked for and not installed."""
    from .state import node_error

    try:
        return MetricsLog(folder, tensorboard=tensorboard)
    except ImportError as exc:
        raise node_error(node, str(exc), "install it into ComfyUI's Python (pip install tensorboard) or turn the "
                         "tensorboard input off") from None


def _check_resumed_config(state: TrainerState, job: TrainJob) -> None:
    saved = state.extra.get("run_config")
    if not isinstance(saved, dict):
        return
    now = job.run_config()
    changed = [k for k in _RUN_KEYS if k in saved and jsonable(saved[k]) != jsonable(now[k])]  # tuples as lists
    if changed:
        log.warning("%s: resuming %s with other settings than its checkpoint (%s); the run continues, but it is "
                    "no longer the run the checkpoint came from", job.node, state.run_name, ", ".join(changed))


def _save(state: TrainerState, job: TrainJob, final: bool = True) -> TrainerState:
    """``state`` with a checkpoint of its iteration written. A periodic save (``final=False``) that fails is logged
    and the run goes on (the next save, the last one or the one after an interrupt, tries again); a final one that
    fails raises its node error."""
    try:
        state = state.with_checkpoint(lora_io.save_checkpoint(state, node=job.node)[0])
    except NodeInputError as e:
        if final:
            raise
        log.warning("%s; training goes on, and the next checkpoint tries again", e)
        return state
    previews.save_png_atomic(previews.metric_curves(state.history), run_folder(state.run_name) / "curves.png")
    return state


def _due(every: int, iteration: int) -> bool:
    return bool(every) and iteration % every == 0


def train(state: TrainerState, job: TrainJob, progress: Any = None) -> tuple[TrainerState, Any, Path]:
    """Run ``state`` up to ``job.iterations`` completed updates; returns ``(state, last grid or None, curve path)``.

    On an interrupt (or any error) after at least one new update, a checkpoint of the last completed update is
    written before the exception propagates. ``progress``: a ComfyUI ``ProgressBar`` (None: none).
    """
    import comfy.model_management

    _check_resumed_config(state, job)
    state = dataclasses.replace(state, extra={**state.extra, "run_config": job.run_config()})
    folder = run_folder(state.run_name)
    start, grid = state.iteration, None
    with open_metrics_log(folder, job.tensorboard, job.node) as metrics_log:
        metrics_log.resume(state.iteration)
        try:
            while state.iteration < job.iterations:
                state, metrics, images, (groups, rewards) = _iteration(state, job)
                it = state.iteration
                grid = previews.group_grid(images, groups.group_ids.tolist(), rewards.values.tolist(), groups.texts)
                if job.eval_steps and (_due(job.eval_every, it) or it == job.iterations):
                    eval_metrics, eval_grid = evaluate(state, job)
                    metrics.update(eval_metrics)
                    previews.save_jpeg_atomic(eval_grid, folder / "eval" / f"iter_{it:05d}.jpg")
                state = dataclasses.replace(state, history=state.history[:-1] + (dict(metrics),))
                if _due(job.sample_every, it):
                    previews.save_jpeg_atomic(grid, folder / "samples" / f"iter_{it:05d}.jpg")
                metrics_log.log(it, metrics)
                _report(state, metrics, job, grid, progress)
                if _due(job.save_every, it) and it < job.iterations:
                    state = _save(state, job, final=False)
        except BaseException as e:
            if state.iteration > start and state.saved_iteration != state.iteration:
                state = _save(state, job)
                log.warning("FlowGRPO: %s at iteration %d; checkpoint saved to %s", type(e).__name__,
                            state.iteration, state.checkpoint)
            raise
    if state.saved_iteration != state.iteration:
        state = _save(state, job)
    previews.save_png_atomic(previews.metric_curves(state.history), folder / "curves.png")
    curve_path, _ = curve_file(state.run_name)
    previews.save_png_atomic(reward_curve_picture(state), curve_path)
    comfy.model_management.throw_exception_if_processing_interrupted()
    return state, grid, curve_path


def _report(state: TrainerState, metrics: dict, job: TrainJob, grid: Any, progress: Any) -> None:
    if progress is not None:
        progress.update_absolute(state.iteration, job.iterations, ("JPEG", grid, 512))
    emit(METRICS_EVENT, dict(metrics, iterations=job.iterations, run=state.run_name))
    log.info("FlowGRPO %s: %s", state.run_name, format_metrics(dict(metrics, iterations=job.iterations)))


def reward_curve_picture(state: TrainerState):
    """The reward curve of ``state``'s history (mean +- std per iteration)."""
    return previews.reward_curve(state.reward_curve(), [m.get("reward_std", 0.0) for m in state.history])
