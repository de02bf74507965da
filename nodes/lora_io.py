"""ComfyUI glue for the trainable LoRA: start or resume a run, save checkpoints, apply the LoRA to a MODEL.

Where checkpoint files live, what they hold, how runs are named and how a checkpoint is verified before it is
resumed: :mod:`.run_files`. This module builds the trainer state, restores it from a verified checkpoint, writes a
checkpoint (LoRA, optional PEFT export, training state) as one group of files, and applies a LoRA through ComfyUI's
stock path.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from pathlib import Path
from typing import Any, Optional

import torch

from ..flowgrpo_core.checkpoint import (
    CheckpointError,
    TrainingStateFile,
    atomic_write_files,
    peft_from_comfy,
    safetensors_bytes,
    training_state_payload,
)
from ..flowgrpo_core.ema import LoraEMA
from ..flowgrpo_core.rng import capture_rng_state, restore_rng_state
from .lora_adapters import attach_trainable_lora
from .lora_targets import LORA_TARGETS, model_family
from .model_adapter import require_flow_model
from .run_files import (LORA_SUFFIX, PEFT_SUFFIX, STATE_SUFFIX, checkpoints, find_latest_checkpoint, loras_root,
                        new_run_name, newest_intact, peft_path_for, resume_options, run_checkpoints, run_folder,
                        safe_prefix, save_fix, state_path_for, verify_checkpoint)
from .state import CHECKPOINT_EVENT, LoraSettings, TrainerState, emit, node_error

__all__ = [
    "INIT_NODE", "SAVE_NODE", "APPLY_NODE", "PEFT_PREFIX", "make_trainer_state", "save_checkpoint", "lora_state_dict",
    "live_state_dict", "trainable_params", "peft_key_map", "peft_state_dict", "apply_lora",
    # re-exported from .run_files for the nodes and tests that reach them through this module
    "STATE_SUFFIX", "PEFT_SUFFIX", "loras_root", "run_folder", "state_path_for", "resume_options",
    "find_latest_checkpoint", "new_run_name", "verify_checkpoint",
]

log = logging.getLogger(__name__)

INIT_NODE = "FlowGRPO LoRA Init"
SAVE_NODE = "FlowGRPO Save LoRA"
APPLY_NODE = "FlowGRPO Apply Trained LoRA"

PEFT_PREFIX = "transformer."
EXPORTS = ("comfyui", "peft")
_TRAINABLE = (".lora_up.weight", ".lora_down.weight")
#: settings a checkpoint must share with the requested LoRA to be resumed
_RESUME_KEYS = ("family", "rank", "alpha", "targets")


# ----------------------------------------------------------------------------------------------- LoRA values
def live_state_dict(state: TrainerState) -> dict[str, torch.Tensor]:
    """Detached CPU fp32 copies of the live (trained) LoRA, ComfyUI-native keys."""
    with torch.no_grad():
        return {k: v.detach().to("cpu", torch.float32).clone() for k, v in state.lora_params.items()}


def lora_state_dict(state: TrainerState) -> dict[str, torch.Tensor]:
    """The LoRA to save and apply, ComfyUI-native keys, CPU fp32 copies (a stock LORA_MODEL): the EMA weights when
    the trainer keeps an EMA (the ``.alpha`` entries are the live ones: they are not trained), else the live ones."""
    values = live_state_dict(state)
    if state.ema is not None:
        values.update(state.ema.copy())
    return values


def trainable_params(state: TrainerState) -> dict[str, torch.Tensor]:
    """The trained tensors of the LoRA (``lora_up`` / ``lora_down``), by key."""
    return {k: v for k, v in state.lora_params.items() if k.endswith(_TRAINABLE)}


def peft_key_map(model: Any, prefix: str = PEFT_PREFIX) -> dict[str, list[tuple[str, Optional[tuple[int, int]]]]]:
    """Native path -> ``[(diffusers path, rows), ...]`` from the ``prefix`` keys ComfyUI's loader accepts for ``model``.

    Entries that need a weight transform (e.g. SD3/FLUX ``norm_out`` scale/shift swap) are left out: a LoRA on those
    has no exact PEFT form. Where the loader accepts several forms of one module (names, or whole vs row
    slices), the first it lists is used.
    """
    import comfy.lora

    base = getattr(model, "model", model)
    key_map: dict[str, list] = {}
    for key, target in comfy.lora.model_lora_keys_unet(base, {}).items():
        if not key.startswith(prefix):
            continue
        if isinstance(target, str):
            native, rows = target, None
        elif len(target) == 2 and target[1] is not None and target[1][0] == 0:  # (weight key, (dim 0, start, length))
            native, rows = target[0], (int(target[1][1]), int(target[1][2]))
        else:
            continue
        if not native.endswith(".weight"):
            continue
        targets = key_map.setdefault(native[: -len(".weight")], [])
        if targets and (rows is None or targets[0][1] is None):
            # another form of a module already mapped (2026 loaders add LyCoris' ff.linear_in beside diffusers'
            # ff.net.0.proj, and FLUX.2's whole attn.to_qkv_mlp_proj beside FLUX.1's row slices): the first form
            # the loader lists is kept, whole or sliced
            continue
        targets.append((key[len(prefix):], rows))
    return key_map


def peft_state_dict(state: TrainerState, node: str = SAVE_NODE) -> dict[str, torch.Tensor]:
    """The LoRA in PEFT / diffusers keys (``transformer.`` prefix), or node_error when no exact export exists."""
    try:
        return peft_from_comfy(lora_state_dict(state), peft_key_map(state.base_model), prefix=PEFT_PREFIX,
                               fold_scale=True)
    except ValueError as exc:
        raise node_error(node, f"this {state.settings.family} LoRA has no exact PEFT/diffusers form ({exc})",
                         "save with export 'comfyui' (ComfyUI-native keys)") from exc


# ----------------------------------------------------------------------------------------------- init / resume
def _check_inputs(rank: int, alpha: float, targets: str, learning_rate: float, node: str) -> None:
    if int(rank) < 1:
        raise node_error(node, f"rank {rank} is not a LoRA rank", "set rank to 1 or more (4 to 64 is typical)")
    if not float(alpha) > 0:
        raise node_error(node, f"alpha {alpha} must be positive", "set alpha > 0 (the LoRA scale is alpha / rank)")
    if targets not in LORA_TARGETS:
        raise node_error(node, f"unknown targets {targets!r}", f"choose one of {list(LORA_TARGETS)}")
    if not (float(learning_rate) > 0 and float(learning_rate) < float("inf")):
        raise node_error(node, f"learning_rate {learning_rate} must be positive", "set e.g. 1e-4")


def _resume_file(resume: str, run_name: str, node: str) -> Optional[Path]:
    """The LoRA file to resume from, None to start fresh."""
    if resume in ("", "none"):
        return None
    if resume == "latest":
        path = find_latest_checkpoint(run_name)
        if path is None:
            log.info("%s: no checkpoint named %s_* in %s; starting a new run", node, run_name, loras_root())
        return path
    for name, path in checkpoints():
        if name == resume:
            return path
    raise node_error(node, f"resume {resume!r} is not a FlowGRPO checkpoint in {loras_root()} (a LoRA file with a "
                           f"{STATE_SUFFIX} training state next to it)",
                     "pick one from the resume list (refresh the page after saving), 'latest' or 'none'")


def _read_checkpoint(lora_file: Path, wanted: dict, node: str) -> TrainingStateFile:
    try:
        saved = verify_checkpoint(lora_file)
    except (FileNotFoundError, CheckpointError) as exc:
        intact = newest_intact(lora_file)
        fix = (f"set resume to {intact!r}, the newest intact checkpoint of this run, to continue from there; or "
               if intact else "no other checkpoint of this run is intact: pick another from the resume list, or ")
        raise node_error(node, f"cannot resume from {lora_file.name}: {exc}",
                         fix + "'none' to start a new run") from exc
    differ = [k for k in _RESUME_KEYS if saved.settings.get(k) != wanted[k]]
    if differ:
        have = ", ".join(f"{k}={saved.settings.get(k)!r}" for k in differ)
        asked = ", ".join(f"{k}={wanted[k]!r}" for k in differ)
        fix = [f"set {k} to {saved.settings.get(k)!r}" for k in differ if k != "family"]
        if "family" in differ:
            fix.insert(0, f"connect the {saved.settings.get('family')} model it was trained on")
        raise node_error(node, f"checkpoint {lora_file.name} was trained with {have}, but this node has {asked}",
                         " and ".join(fix) + " to resume it, or set resume to 'none' to start a new run")
    return saved


def _restore(state: TrainerState, lora_file: Path, saved: TrainingStateFile, node: str) -> TrainerState:
    """``state`` continued from the checkpoint: LoRA values copied in place, optimizer, iteration and history."""
    import comfy.utils

    fix = "resume from a checkpoint of the same model and settings, or set resume to 'none'"
    if saved.extra.get("trainable_keys") != list(trainable_params(state)):
        raise node_error(node, f"checkpoint {lora_file.name} was trained on a model with other layers", fix)
    values = saved.extra.get("live_lora")  # the live weights; older states (and EMA-free runs) match the LoRA file
    if not isinstance(values, dict):
        values = comfy.utils.load_torch_file(str(lora_file), safe_load=True)
    if set(values) != set(state.lora_params):
        raise node_error(node, f"{lora_file.name} does not hold this LoRA's tensors "
                               f"({len(set(values) ^ set(state.lora_params))} keys differ)", fix)
    bad = [k for k, p in state.lora_params.items() if tuple(values[k].shape) != tuple(p.shape)]
    if bad:
        raise node_error(node, f"{lora_file.name} has other shapes for {len(bad)} tensors, e.g. {bad[0]}", fix)
    with torch.inference_mode(False), torch.no_grad():
        for k, p in state.lora_params.items():
            p.copy_(values[k].to(device=p.device, dtype=p.dtype))
        try:
            state.optimizer.load_state_dict(saved.optimizer_state)
        except (ValueError, KeyError) as exc:
            raise node_error(node, f"the optimizer state in {state_path_for(lora_file).name} does not fit ({exc})",
                             fix) from exc
    for group in state.optimizer.param_groups:  # this node's learning rate wins over the saved one
        group["lr"] = state.settings.learning_rate
    if saved.extra.get("rng") is not None:
        try:
            restore_rng_state(saved.extra["rng"])
        except ValueError as exc:
            log.warning("%s: the random state in %s was not restored (%s)", node, lora_file.name, exc)
    log.info("%s: resumed %s at iteration %d", node, lora_file.name, saved.iteration)
    return dataclasses.replace(state, iteration=int(saved.iteration), history=tuple(dict(h) for h in saved.history),
                               checkpoint=str(lora_file), saved_iteration=int(saved.iteration),
                               extra=dict(saved.extra.get("trainer_extra", {})))


def _restore_ema(ema: LoraEMA, saved: Any, lora_file: Path, node: str) -> None:
    """Continue the checkpoint's EMA (its averages and update count; this node's decay and interval), or start the
    average from the resumed weights when the checkpoint has none."""
    if not isinstance(saved, dict):
        log.info("%s: %s has no EMA; the average starts from the resumed weights", node, lora_file.name)
        return
    decay, every, warmup = ema.decay, ema.update_every, ema.warmup
    try:
        with torch.inference_mode(False):
            ema.load_state_dict(saved)
    except ValueError as exc:
        raise node_error(node, f"the EMA in {state_path_for(lora_file).name} does not fit this LoRA ({exc})",
                         "resume from a checkpoint of the same model and settings, or set resume to 'none'") from exc
    ema.decay, ema.update_every, ema.warmup = decay, every, warmup


def make_trainer_state(model: Any, *, rank: int, alpha: float, targets: str, learning_rate: float, seed: int,
                       run_name: str, resume: str = "none", ema_decay: float = 0.0, ema_every: int = 1,
                       node: str = INIT_NODE) -> TrainerState:
    """A new :class:`TrainerState`: a trainable LoRA on a clone of ``model`` and its AdamW optimizer.

    ``ema_decay > 0`` keeps an EMA of the LoRA (:class:`flowgrpo_core.ema.LoraEMA`, updated after every
    ``ema_every``-th GRPO update, Flow-GRPO's warm-up ``min(decay, (1 + n) / (10 + n))``); saving and applying then
    use the averaged weights.

    ``resume``: "none"; "latest" (the newest checkpoint named ``<run_name>_*``; none found: start fresh); or a name
    from :func:`resume_options`. Resuming copies the saved LoRA into the live adapters and restores the optimizer,
    iteration and history; a checkpoint made with another family/rank/alpha/targets is a node_error. The learning rate
    is always this call's.
    """
    try:
        require_flow_model(model)
        family = model_family(model.model)
    except ValueError as exc:
        raise node_error(node, str(exc), "connect a flow-matching MODEL (FLUX, Qwen-Image, SD3, Wan, Z-Image, "
                                         "...) from a stock loader such as UNETLoader") from exc
    _check_inputs(rank, alpha, targets, learning_rate, node)
    if ema_decay and not (0.0 < float(ema_decay) < 1.0 and int(ema_every) >= 1):
        raise node_error(node, f"ema_decay {ema_decay} with ema_every {ema_every} is not an EMA",
                         "set ema_decay in (0, 1) (Flow-GRPO: 0.9) and ema_every >= 1 (Flow-GRPO: 8), or ema_decay 0 "
                         "for no EMA")
    run_name = safe_prefix(run_name, node, "run_name")
    settings = LoraSettings(rank=int(rank), alpha=float(alpha), targets=targets, seed=int(seed),
                            learning_rate=float(learning_rate), family=family)
    lora_file = _resume_file(resume, run_name, node)
    saved = _read_checkpoint(lora_file, dataclasses.asdict(settings), node) if lora_file is not None else None
    if saved is None:
        run_name = new_run_name(run_name, node)

    with torch.inference_mode(False):
        try:
            patcher, params = attach_trainable_lora(model, settings.rank, settings.alpha, targets, settings.seed)
        except ValueError as exc:
            raise node_error(node, str(exc), "report the model (its loader and file) to FlowGRPO; meanwhile try "
                                             "the other targets setting") from exc
        trainable = [p for k, p in params.items() if k.endswith(_TRAINABLE)]  # the state does not exist yet
        optimizer = torch.optim.AdamW(trainable, lr=settings.learning_rate, betas=(0.9, 0.999), weight_decay=1e-4,
                                      eps=1e-8)
    log.info("FlowGRPO %s: %s model (family %r): a rank-%d LoRA on %d %s layers", node,
             type(model.model.model_config).__name__, family, settings.rank, len(params) // 3, targets)
    state = TrainerState(base_model=model, patcher=patcher, lora_params=params, optimizer=optimizer,
                         settings=settings, run_name=run_name)
    if saved is not None:
        state = _restore(state, lora_file, saved, node)
    if not ema_decay:
        return state
    with torch.inference_mode(False):
        ema = LoraEMA(trainable_params(state), decay=float(ema_decay), update_every=int(ema_every))
    if saved is not None:
        _restore_ema(ema, saved.extra.get("ema"), lora_file, node)
    return dataclasses.replace(state, ema=ema)


# ----------------------------------------------------------------------------------------------- save
def save_checkpoint(state: TrainerState, *, filename_prefix: Optional[str] = None, export: str = "comfyui",
                    node: str = SAVE_NODE) -> tuple[str, str]:
    """Write ``<loras>/<prefix>_<iteration:05d>.safetensors`` and its training state; returns both paths.

    ``filename_prefix``: None or "" = ``state.run_name``; may name a sub-folder. ``export`` "peft" also writes
    ``<stem>.peft.safetensors``. Every payload is built in memory first, then the files are written as one group
    (:func:`~flowgrpo_core.checkpoint.atomic_write_files`, the state last): a failed write (full disk, read-only
    folder) leaves no file of this checkpoint and the previous ones as they were, and becomes a node error naming the
    folder, the cause and the fix. ``state`` itself is not changed, so the save can be tried again.
    """
    if export not in EXPORTS:
        raise node_error(node, f"unknown export {export!r}", f"choose one of {list(EXPORTS)}")
    prefix = safe_prefix(filename_prefix or state.run_name, node, "filename_prefix")
    root = loras_root()
    lora_path = root.joinpath(*prefix.split("/")[:-1]) / f"{prefix.split('/')[-1]}_{state.iteration:05d}{LORA_SUFFIX}"
    state_path = state_path_for(lora_path)

    s = state.settings
    lora_meta = {"format": "pt", "flowgrpo.family": s.family, "flowgrpo.rank": str(s.rank),
                 "flowgrpo.alpha": repr(s.alpha), "flowgrpo.targets": s.targets,
                 "flowgrpo.iteration": str(state.iteration), "flowgrpo.run_name": state.run_name,
                 "flowgrpo.weights": "ema" if state.ema is not None else "live"}
    lora_bytes = safetensors_bytes(lora_state_dict(state), lora_meta)
    peft = peft_state_dict(state, node) if export == "peft" else None
    try:
        tensors, metadata = training_state_payload(
            state.optimizer, iteration=state.iteration, history=[dict(h) for h in state.history],
            settings=dataclasses.asdict(s),
            extra={"run_name": state.run_name, "lora_file": lora_path.name,
                   "lora_sha256": hashlib.sha256(lora_bytes).hexdigest(),
                   "trainable_keys": list(trainable_params(state)), "trainer_extra": dict(state.extra),
                   "live_lora": live_state_dict(state),
                   "ema": state.ema.state_dict() if state.ema is not None else None,
                   "rng": capture_rng_state()})
    except TypeError as exc:
        raise node_error(node, f"the trainer holds a value that cannot be saved ({exc})",
                         "keep only tensors, numbers, strings and lists/dicts of them in the trainer's history "
                         "and extra") from exc
    files = [(lora_path, lora_bytes)]
    event = {"node": node, "iteration": state.iteration, "lora_path": str(lora_path), "state_path": str(state_path)}
    if peft is not None:
        files.append((peft_path_for(lora_path), safetensors_bytes(peft, {**lora_meta, "flowgrpo.keys": "peft"})))
        event["peft_path"] = str(files[-1][0])
    files.append((state_path, safetensors_bytes(tensors, metadata)))  # last: its presence marks the pair complete
    try:
        lora_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_files(files)
    except OSError as exc:
        previous = next((name for it, name, _ in run_checkpoints(prefix) if it != state.iteration), None)
        raise node_error(node, f"could not write checkpoint {lora_path.name} into {lora_path.parent} "
                               f"({exc.strerror or exc}); nothing of it was written, and the previous checkpoint "
                               f"({previous or 'none yet'}) is kept", save_fix(exc)) from exc
    emit(CHECKPOINT_EVENT, event)
    log.info("%s: saved %s (iteration %d)", node, lora_path, state.iteration)
    return str(lora_path), str(state_path)


# ----------------------------------------------------------------------------------------------- apply
def _check_fits(model: Any, lora_sd: dict, node: str) -> None:
    """node_error unless every LoRA module of ``lora_sd`` is a weight of ``model`` with matching shape."""
    import comfy.lora

    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    weights = model.model.state_dict()
    misfits = []
    for key, up in lora_sd.items():
        if not key.endswith(".lora_up.weight"):
            continue
        path = key[: -len(".lora_up.weight")]
        target = key_map.get(path)
        down = lora_sd.get(f"{path}.lora_down.weight")
        if not isinstance(target, str) or down is None or \
                tuple(weights[target].shape) != (up.shape[0], down.shape[1]):
            misfits.append(path)
    if misfits:
        raise node_error(node, f"{len(misfits)} LoRA layers do not exist in this MODEL with the trained shape "
                               f"(e.g. {misfits[0]})",
                         "connect a model of the same kind and size as the one the trainer was made from")


def apply_lora(model: Any, lora_sd: dict, strength: float, node: str = APPLY_NODE) -> Any:
    """A new MODEL: ``model`` plus ``lora_sd`` (ComfyUI-native keys) at ``strength``, through ComfyUI's stock LoRA path
    (``comfy.sd.load_lora_for_models``, as ``LoraLoaderModelOnly`` / ``LoraModelLoader``). ``model`` is unchanged."""
    import comfy.sd

    _check_fits(model, lora_sd, node)
    if strength == 0:
        return model.clone()
    patched, _ = comfy.sd.load_lora_for_models(model, None, lora_sd, float(strength), 0)
    return patched
