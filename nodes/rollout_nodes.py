"""SDE rollouts with log-probs on a ComfyUI MODEL: the ``FlowGRPO SDE Sampler (rollout)`` node and its helpers.

:func:`run_rollout` is the one code path for rollouts (this node and the all-in-one train node): flow-model check,
sigma grid, step plan (:mod:`flowgrpo_core.windows`), conditioning (:func:`conditioning.encode_conditioning`), the
initial noise from ``(seed, iteration)``, then :func:`flowgrpo_core.rollout.sample_trajectory` with ComfyUI's latent
previewer, progress bar and interrupt checks. Latents inside the trajectory are in the model's space
(``process_latent_in``); the LATENT output is converted back (``process_latent_out``) for VAEDecode.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

import torch
from comfy_api.latest import io

from ..flowgrpo_core.profiling import PhaseTimer
from ..flowgrpo_core.rollout import RolloutSpec, sample_trajectory
from ..flowgrpo_core.sde import SDE_KINDS, check_noise_level
from ..flowgrpo_core.seeding import iteration_generator
from ..flowgrpo_core.windows import STEP_MODES, StepSelection, select_steps
from .comfy_policy import ComfyFlowPolicy
from .compat import latent_ratios
from .conditioning import encode_conditioning
from .lora_adapters import merged_lora_weights
from .model_adapter import require_flow_model
from .always_run import AlwaysRun
from .state import GROUPS, ROLLOUT, PromptBatch, Rollout, node_error

__all__ = ["SamplingSettings", "sampling_inputs", "sampling_settings", "random_window_range", "make_sigmas",
           "empty_latent", "frames_input", "run_rollout", "initial_noise", "FlowGRPOSDERollout", "NODES"]

NODE = "FlowGRPO SDE Sampler (rollout)"
ROLLOUT_KINDS = tuple(k for k in SDE_KINDS if k != "ode")
SCHEDULER_DEFAULT = "simple"


@dataclass(frozen=True)
class SamplingSettings:
    """What decides a rollout's transition densities (besides the model and conditioning)."""

    steps: int = 10
    scheduler: str = SCHEDULER_DEFAULT
    shift: float = 0.0
    sde_kind: str = "flow_sde"
    noise_level: float = 0.7
    cfg: float = 4.5
    norm_rescale: bool = False
    selection: StepSelection = StepSelection()
    micro_batch_size: int = 0
    same_noise_per_group: bool = False
    window_end: int = 0


def _scheduler_names() -> list[str]:
    import comfy.samplers

    return list(comfy.samplers.SCHEDULER_NAMES)


def sampling_inputs() -> list:
    """The sampling widgets shared by the rollout node and the all-in-one train node (every one with a tooltip)."""
    return [
        io.Int.Input("steps", default=10, min=2, max=1000,
                     tooltip="Sampling steps of each rollout (Flow-GRPO trains with 10, evaluates with 40)."),
        io.Combo.Input("scheduler", options=_scheduler_names(), default=SCHEDULER_DEFAULT,
                       tooltip="ComfyUI scheduler for the sigma grid (uses the model's own sampling shift). "
                               "Ignored when shift > 0 or a SIGMAS input is connected."),
        io.Float.Input("shift", default=0.0, min=0.0, max=100.0, step=0.05,
                       tooltip="0: use the scheduler. > 0: the Flow-GRPO/SD3 grid sigma = s*t / (1 + (s-1)*t) on "
                               "evenly spaced t (3.0 is the SD3.5 reference)."),
        io.Combo.Input("sde_kind", options=list(ROLLOUT_KINDS), default="flow_sde",
                       tooltip="Reverse SDE of the stochastic steps. flow_sde: Flow-GRPO; dance_sde: DanceGRPO; "
                               "cps: coefficient-preserving sampling; euler_ancestral: ComfyUI's ancestral step."),
        io.Float.Input("noise_level", default=0.7, min=0.0, max=5.0, step=0.01,
                       tooltip="flow_sde: a (0.7 SD3.5, 0.9 FLUX, 1.2 Qwen-Image); dance_sde: eta (~0.3); "
                               "cps and euler_ancestral: eta in [0, 1] (0.8 is a common CPS value)."),
        io.Float.Input("cfg", default=4.5, min=1.0, max=30.0, step=0.1,
                       tooltip="True classifier-free guidance scale (SD3.5: 4.5, Qwen-Image: 4). 1 disables it and "
                               "the negative is not used (FLUX: keep 1 and set the guidance on the prompts)."),
        io.Boolean.Input("norm_rescale", default=False,
                         tooltip="Qwen-Image's CFG norm rescale: the guided velocity takes the per-token norm of "
                                 "the conditional one."),
        io.Combo.Input("step_mode", options=list(STEP_MODES), default="fraction",
                       tooltip="Which steps are stochastic and trained. fraction: all but the last are SDE, the "
                               "first fraction*N trained (Flow-GRPO); fixed_window / random_window (Flow-GRPO-Fast) "
                               "/ sliding_window (MixGRPO): SDE and trained only in a window, ODE elsewhere; "
                               "random_subset: a random share of the steps trained (DanceGRPO)."),
        io.Float.Input("train_fraction", default=0.99, min=0.01, max=1.0, step=0.01,
                       tooltip="fraction / random_subset: share of the steps that are trained (0.99 = all but "
                               "the last)."),
        io.Int.Input("window_size", default=2, min=1, max=1000,
                     tooltip="Window modes: number of consecutive SDE (and trained) steps."),
        io.Int.Input("window_start", default=0, min=0, max=1000,
                     tooltip="fixed_window: first step of the window; sliding_window: where the sweep starts; "
                             "random_window: the first step the window may start at."),
        # inputs added after the first release are optional (with the old behaviour as default): saved workflows
        # without them still validate
        io.Int.Input("window_end", optional=True, default=0, min=0, max=1000,
                     tooltip="random_window: the window lies in steps [window_start, window_end) (0 = up to the "
                             "last stochastic step). Flow-GRPO-Fast: 3 steps in [0, 5) for SD3.5, [0, 3) for FLUX."),
        io.Int.Input("window_shift_every", default=25, min=1, max=100000,
                     tooltip="sliding_window: iterations before the window moves one step later."),
        io.Int.Input("micro_batch_size", default=0, min=0, max=4096,
                     tooltip="Samples per model forward (0 = the whole batch). The update replays with the same "
                             "layout; lower it to save memory."),
        io.Boolean.Input("same_noise_per_group", optional=True, default=False,
                         tooltip="Start every image of a prompt group from the same initial noise (DanceGRPO, "
                                 "MixGRPO); the SDE noise still differs. Off: every image gets its own noise "
                                 "(Flow-GRPO)."),
    ]


def random_window_range(step_mode: str, window_start: int, window_end: int, num_steps: int):
    """``(window_start, window_end)`` for ``random_window`` (``window_end = 0``: ``num_steps - 1``, the last
    stochastic step); None (the whole ``[0, N - 1)``) when both are 0 or for the other modes."""
    if step_mode != "random_window" or not (window_start or window_end):
        return None
    return int(window_start), int(window_end) or int(num_steps) - 1


def sampling_settings(steps: int, scheduler: str, shift: float, sde_kind: str, noise_level: float, cfg: float,
                      norm_rescale: bool, step_mode: str, train_fraction: float, window_size: int,
                      window_start: int, window_shift_every: int, micro_batch_size: int, window_end: int = 0,
                      same_noise_per_group: bool = False, node: str = NODE) -> SamplingSettings:
    """Parse the widgets of :func:`sampling_inputs` (node errors for bad combinations).

    random_window: the window range is ``[window_start, window_end)``; ``window_end = 0`` stands for ``N - 1`` (the
    last stochastic step) and is resolved when the rollout knows ``N``.
    """
    window_range = random_window_range(step_mode, window_start, window_end, int(steps))
    try:
        check_noise_level(sde_kind, noise_level)
        selection = StepSelection(mode=step_mode, fraction=float(train_fraction), window_size=int(window_size),
                                  window_start=int(window_start), iters_per_shift=int(window_shift_every),
                                  window_range=window_range)
    except ValueError as e:
        raise node_error(node, str(e), "change the sampling settings") from None
    if sde_kind not in ROLLOUT_KINDS:
        raise node_error(node, f"sde_kind {sde_kind!r} records no log-probs",
                         f"choose one of {', '.join(ROLLOUT_KINDS)}")
    return SamplingSettings(steps=int(steps), scheduler=scheduler, shift=float(shift), sde_kind=sde_kind,
                            noise_level=float(noise_level), cfg=float(cfg), norm_rescale=bool(norm_rescale),
                            selection=selection, micro_batch_size=int(micro_batch_size),
                            same_noise_per_group=bool(same_noise_per_group), window_end=int(window_end))


def make_sigmas(model: Any, steps: int, scheduler: str, shift: float) -> torch.Tensor:
    """``[steps + 1]`` fp32 sigmas, decreasing to 0: the Flow-GRPO shifted grid when ``shift > 0``, else ComfyUI's
    ``scheduler`` on the model's own ``model_sampling``."""
    if shift > 0:
        t = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
        return (shift * t / (1.0 + (shift - 1.0) * t)).float()
    import comfy.samplers

    return comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, steps).float().cpu()


def frames_input():
    """The optional ``frames`` widget of the rollout and train nodes (video models)."""
    return io.Int.Input("frames", optional=True, default=1, min=1, max=4096,
                        tooltip="Video models (Wan, HunyuanVideo, ...): frames of each sample in pixels; the latent "
                                "holds (frames - 1) / 4 + 1 of them for Wan. Image models: keep 1. Ignored when a "
                                "latent is connected.")


def _check_sigmas(sigmas: torch.Tensor, node: str) -> torch.Tensor:
    sigmas = sigmas.detach().float().cpu().reshape(-1)
    if sigmas.numel() < 3:
        raise node_error(node, f"the SIGMAS input has {sigmas.numel()} values", "give at least 3 (2 steps)")
    if float(sigmas[-1]) != 0.0:
        raise node_error(node, f"the SIGMAS end at {float(sigmas[-1]):.4g}, not 0",
                         "use a full schedule ending at 0 (denoise 1.0), or SplitSigmas' second half")
    if bool((sigmas[1:] >= sigmas[:-1]).any()) or float(sigmas[0]) > 1.0 + 1e-5:
        raise node_error(node, "the SIGMAS are not a strictly decreasing flow schedule within [0, 1]",
                         "connect a scheduler of this flow model (e.g. BasicScheduler)")
    return sigmas


def _conditioning_batch(positive: list, node: str) -> int:
    if not positive or len(positive) != 1:
        raise node_error(node, f"the positive CONDITIONING has {len(positive or [])} entries",
                         "connect FlowGRPO Prompt Source (one batched entry) or one CLIPTextEncode output")
    return int(positive[0][0].shape[0])


def empty_latent(model: Any, batch: int, width: int, height: int, frames: int = 1, node: str = NODE) -> torch.Tensor:
    """Zeros ``[B, C, h, w]`` (image models) or ``[B, C, t, h, w]`` (models with a time axis: video, and image
    models that carry one, such as Qwen-Image) as the model's empty-latent nodes make them: ``C`` from its
    ``latent_format``, ``h, w`` the pixel size over its spatial ratio, ``t = (frames - 1) // r + 1`` for its
    temporal ratio ``r`` (:func:`~.compat.latent_ratios`)."""
    fmt = model.get_model_object("latent_format")
    spatial, temporal = latent_ratios(fmt)
    if width % spatial or height % spatial:
        raise node_error(node, f"width {width} and height {height} must be multiples of {spatial} for this model",
                         f"round them to multiples of {spatial}")
    size = (height // spatial, width // spatial)
    if getattr(fmt, "latent_dimensions", 2) != 3:
        if frames != 1:
            raise node_error(node, f"frames is {frames} but this model makes single images", "set frames to 1")
        return torch.zeros(batch, fmt.latent_channels, *size)
    return torch.zeros(batch, fmt.latent_channels, (int(frames) - 1) // temporal + 1, *size)


def _initial_latent(model: Any, batch: int, width: int, height: int, latent: Optional[dict], node: str,
                    frames: int = 1):
    """The clean-side latent ``[B, C, (T,) h, w]`` in the model's space (zeros unless a LATENT is given)."""
    import comfy.sample

    fmt = model.get_model_object("latent_format")
    if latent is None:
        samples = empty_latent(model, batch, width, height, frames, node)
    else:
        samples = latent["samples"]
        if samples.shape[0] == 1 and batch > 1:
            samples = samples.repeat(batch, *[1] * (samples.dim() - 1))
        if samples.shape[0] != batch:
            raise node_error(node, f"mismatched latent sizes: the LATENT has batch {samples.shape[0]} but the "
                             f"conditioning has {batch} samples",
                             "use a LATENT of batch 1 or of the conditioning's batch (prompts_per_iteration * "
                             "group_size), or leave the latent input empty")
    samples = comfy.sample.fix_empty_latent_channels(model, samples.float())
    if samples.shape[1] != fmt.latent_channels:
        raise node_error(node, f"mismatched latent sizes: the LATENT has {samples.shape[1]} channels but this model "
                         f"uses {fmt.latent_channels}", "make the latent with this model's empty-latent node or VAE")
    return model.model.process_latent_in(samples)


def _step_callback(model: Any, steps: int, preview: bool):
    """``callback(i, x_next)`` for sample_trajectory: an interrupt check, and with ``preview`` ComfyUI's latent
    preview and progress bar (the same previewer SamplerCustomAdvanced uses)."""
    import comfy.model_management
    import latent_preview

    progress = latent_preview.prepare_callback(model, steps) if preview else None

    def callback(i: int, x_next: torch.Tensor) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()
        if progress is not None:
            progress(i, x_next, x_next, steps)

    return callback


def initial_noise(shape: torch.Size, seed: int, iteration: int, groups: Optional[PromptBatch]) -> torch.Tensor:
    """The initial noise ``[B, ...]`` of iteration ``iteration`` from the ``(seed, iteration, "noise")`` stream.

    With ``groups`` every sample takes the noise of the first sample of its prompt group (shared initial noise, as
    DanceGRPO's ``init_same_noise``); the SDE noise of the steps stays per sample.
    """
    noise = torch.randn(shape, generator=iteration_generator(seed, iteration, "noise"))
    if groups is None:
        return noise
    ids = groups.group_ids.tolist()
    first = {}
    source = [first.setdefault(g, i) for i, g in enumerate(ids)]
    return noise[torch.tensor(source, dtype=torch.long)]


def run_rollout(model: Any, positive: list, negative: Optional[list], settings: SamplingSettings, *, seed: int,
                iteration: int = 0, width: int = 512, height: int = 512, frames: int = 1,
                latent: Optional[dict] = None,
                sigmas: Optional[torch.Tensor] = None, groups: Optional[PromptBatch] = None, preview: bool = True,
                node: str = NODE) -> tuple[Rollout, dict]:
    """Sample one batch with log-probs; returns ``(Rollout, LATENT)``. ``B`` = the positive conditioning's batch.

    The initial noise comes from ``(seed, iteration, "noise")`` and the SDE noise from ``(seed, iteration, "sde")``
    (:mod:`flowgrpo_core.seeding`), the step plan from ``(seed, iteration)``, so a run is reproducible and resumes
    exactly.
    """
    try:
        require_flow_model(model)
    except ValueError as e:
        raise node_error(node, str(e), "connect a flow-matching MODEL (FLUX, Qwen-Image, SD3)") from None
    if settings.same_noise_per_group and groups is None:
        raise node_error(node, "same_noise_per_group needs the prompt groups",
                         "connect FlowGRPO Prompt Source's groups output, or turn same_noise_per_group off")
    batch = _conditioning_batch(positive, node)
    if groups is not None and groups.batch_size != batch:
        raise node_error(node, f"the groups describe {groups.batch_size} samples but the conditioning has {batch}",
                         "connect the positive, negative and groups outputs of the same FlowGRPO Prompt Source")
    if settings.cfg != 1.0 and negative is None:
        raise node_error(node, f"cfg {settings.cfg} needs a negative conditioning",
                         "connect the negative output of FlowGRPO Prompt Source, or set cfg to 1")
    if latent is None and (width % 8 or height % 8):
        raise node_error(node, f"width {width} and height {height} must be multiples of 8", "round them")
    grid = make_sigmas(model, settings.steps, settings.scheduler, settings.shift) if sigmas is None else sigmas
    grid = _check_sigmas(grid, node)
    n = grid.numel() - 1
    selection = settings.selection
    try:  # the window range again, for this grid's N (a SIGMAS input may change it)
        selection = dataclasses.replace(selection, window_range=random_window_range(
            selection.mode, selection.window_start, settings.window_end, n))
        plan = select_steps(selection, n, seed, iteration)
    except ValueError as e:
        raise node_error(node, str(e), "change the step-selection settings") from None

    policy = ComfyFlowPolicy(model, cfg=settings.cfg, norm_rescale=settings.norm_rescale)
    device = model.load_device
    timer = PhaseTimer(device)
    clean = _initial_latent(model, batch, width, height, latent, node, frames)
    cond = encode_conditioning(model, positive, negative if settings.cfg != 1.0 else None, batch, clean.shape,
                               device=device)
    spec = RolloutSpec(kind=settings.sde_kind, noise_level=settings.noise_level, sigmas=grid.tolist(),
                       sde_mask=plan.sde_mask, train_mask=plan.train_mask,
                       micro_batch_size=settings.micro_batch_size, extras=policy.extras())
    noise = initial_noise(clean.shape, seed, iteration, groups if settings.same_noise_per_group else None)
    sigma0 = spec.sigmas[0]
    x_start = (sigma0 * noise + (1.0 - sigma0) * clean).to(device)
    generator = iteration_generator(seed, iteration, "sde", device=device)
    with timer.phase("rollout"), merged_lora_weights(model):
        trajectory = sample_trajectory(policy, x_start, cond, spec, generator=generator,
                                       callback=_step_callback(model, n, preview))
    out = {"samples": model.model.process_latent_out(trajectory.final.float()).cpu()}
    return Rollout(trajectory=trajectory, model=model, groups=groups, seed=int(seed), iteration=int(iteration),
                   stats=timer.phases()), out


class FlowGRPOSDERollout(AlwaysRun):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FlowGRPOSDERollout",
            display_name=NODE,
            category="FlowGRPO/sampling",
            description=("Samples a batch with a reverse SDE and records every step's latent and log-probability: "
                         "the rollout a GRPO update trains on. Works with any flow-matching MODEL; connect the "
                         "trainer's MODEL (FlowGRPO LoRA Init) to train on the rollout."),
            inputs=[
                io.Model.Input("model", tooltip="A flow-matching MODEL. To train, use the MODEL output of "
                                                "FlowGRPO LoRA Init (it carries the trainable LoRA)."),
                io.Conditioning.Input("positive", tooltip="Batched prompts (FlowGRPO Prompt Source), one row per "
                                                          "sample; FLUX guidance travels in it."),
                io.Conditioning.Input("negative", optional=True,
                                      tooltip="Negative prompt for true CFG (needed when cfg > 1)."),
                io.Custom(GROUPS).Input("groups", optional=True,
                                        tooltip="Prompt groups from FlowGRPO Prompt Source; GRPO Update needs them "
                                                "to compare samples of the same prompt."),
                io.Latent.Input("latent", optional=True,
                                tooltip="Optional start latent (batch 1 or the full batch); empty: pure noise at "
                                        "width x height."),
                io.Sigmas.Input("sigmas", optional=True,
                                tooltip="Optional sigma schedule (overrides steps, scheduler and shift); must end "
                                        "at 0."),
                io.Int.Input("width", default=512, min=16, max=8192, step=16,
                             tooltip="Image width in pixels (ignored when a latent is connected)."),
                io.Int.Input("height", default=512, min=16, max=8192, step=16,
                             tooltip="Image height in pixels (ignored when a latent is connected)."),
                frames_input(),
                *sampling_inputs(),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Run seed: the initial noise, the SDE noise and random step windows are drawn "
                                     "from (seed, iteration)."),
                io.Int.Input("iteration", default=0, min=0, max=10**9,
                             tooltip="Training iteration (wire FlowGRPO Loop Start's iteration): moves the noise and "
                                     "the window schedule from one iteration to the next."),
            ],
            outputs=[
                io.Latent.Output(display_name="LATENT", tooltip="The final clean latents (for VAEDecode)."),
                io.Custom(ROLLOUT).Output(display_name="rollout",
                                          tooltip="Per-step latents, log-probs, trained-step mask and the exact "
                                                  "sampling spec, for FlowGRPO GRPO Update."),
            ],
            not_idempotent=True,
        )

    @classmethod
    def execute(cls, model, positive, width, height, steps, scheduler, shift, sde_kind, noise_level, cfg,
                norm_rescale, step_mode, train_fraction, window_size, window_start, window_shift_every,
                micro_batch_size, seed, iteration, window_end=0, same_noise_per_group=False, negative=None,
                groups=None, latent=None, sigmas=None, frames=1) -> io.NodeOutput:
        settings = sampling_settings(steps, scheduler, shift, sde_kind, noise_level, cfg, norm_rescale, step_mode,
                                     train_fraction, window_size, window_start, window_shift_every,
                                     micro_batch_size, window_end, same_noise_per_group)
        rollout, out = run_rollout(model, positive, negative, settings, seed=seed, iteration=iteration,
                                   width=width, height=height, frames=frames, latent=latent, sigmas=sigmas,
                                   groups=groups)
        return io.NodeOutput(out, rollout)


NODES = [FlowGRPOSDERollout]
