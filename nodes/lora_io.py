"""ComfyUI glue for the trainable LoRA: start or resume a run, save checkpoints, apply the LoRA to a MODEL.

Files live in the first ``loras`` folder (``folder_paths.get_folder_paths("loras")[0]``, i.e. ``models/loras``):

* ``<prefix>_<iteration:05d>.safetensors``: the LoRA, ComfyUI-native keys ``diffusion_model.<path>.lora_up.weight``
  / ``.lora_down.weight`` / ``.alpha`` in fp32, nothing else; stock ``LoraLoaderModelOnly`` lists and loads it.
* ``<same stem>.flowgrpo-state``: its training state (safetensors inside, ``flowgrpo_core.checkpoint``): optimizer,
  iteration, history, settings, and in ``extra`` the live LoRA values (``live_lora``), the EMA (``ema``), the global
  random states (``rng``, :mod:`flowgrpo_core.rng`) and the run's settings (``trainer_extra.run_config``). ComfyUI
  does not list this extension as a LoRA. The files of one checkpoint are written as a group (every file complete on
  disk before the first rename, the state renamed last), so its presence means the pair is complete; only pairs can
  be resumed. The state records the LoRA file's SHA-256 (``lora_sha256``) and its own tensors' checksum: resuming a
  pair that does not match them is refused, naming the newest intact checkpoint of the run. With EMA on, the LoRA
  file holds the averaged weights and the live ones travel in the state.

A run owns its name: a new run (resume "none", or "latest" with nothing to resume) on a ``run_name`` that already has
checkpoints or a log folder is written as ``<run_name>-2`` (then ``-3``, ...), and says so, so no run's files are
replaced or mixed with another's.
* ``<same stem>.peft.safetensors`` (export "peft"): the same LoRA in PEFT / diffusers keys
  ``transformer.<diffusers path>.lora_A.weight`` / ``.lora_B.weight`` / ``.alpha``, built from the keys ComfyUI's own
  loader accepts (``comfy.lora.model_lora_keys_unet``: ``comfy.utils.mmdit_to_diffusers`` for SD3,
  ``flux_to_diffusers`` for FLUX, the module names themselves for Qwen-Image); fused ``qkv`` / ``linear1`` are split
  by rows. The scale alpha / rank is folded into ``lora_B`` and ``.alpha`` = rank, so loaders that ignore ``.alpha``
  (and then assume ``lora_alpha = r``) apply the same update as ComfyUI and diffusers' FLUX loader, which read it.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import logging
import os
import re
from pathlib import Path
from typing import Any, Optional

import torch

from ..flowgrpo_core.checkpoint import (
    CheckpointError,
    TrainingStateFile,
    atomic_write_files,
    load_training_state,
    peft_from_comfy,
    safetensors_bytes,
    training_state_payload,
)
from ..flowgrpo_core.ema import LoraEMA
from ..flowgrpo_core.rng import capture_rng_state, restore_rng_state
from .comfy_policy import LORA_TARGETS, attach_trainable_lora, model_family
from .model_adapter import require_flow_model
from .state import CHECKPOINT_EVENT, LoraSettings, TrainerState, emit, node_error

__all__ = [
    "INIT_NODE", "SAVE_NODE", "APPLY_NODE", "STATE_SUFFIX", "PEFT_SUFFIX", "PEFT_PREFIX",
    "loras_root", "run_folder", "state_path_for", "resume_options", "find_latest_checkpoint", "new_run_name",
    "make_trainer_state", "save_checkpoint", "lora_state_dict", "live_state_dict", "trainable_params", "peft_key_map", "peft_state_dict", "apply_lora",
]

log = logging.getLogger(__name__)

INIT_NODE = "FlowGRPO LoRA Init"
SAVE_NODE = "FlowGRPO Save LoRA"
APPLY_NODE = "FlowGRPO Apply Trained LoRA"

LORA_SUFFIX = ".safetensors"
STATE_SUFFIX = ".flowgrpo-state"
PEFT_SUFFIX = ".peft.safetensors"
PEFT_PREFIX = "transformer."
EXPORTS = ("comfyui", "peft")
_TRAINABLE = (".lora_up.weight", ".lora_down.weight")
_BAD_CHARS = re.compile(r'[\x00-\x1f<>:"|?*]')
#: settings a checkpoint must share with the requested LoRA to be resumed
_RESUME_KEYS = ("family", "rank", "alpha", "targets")


# ----------------------------------------------------------------------------------------------- files
def loras_root() -> Path:
    """The first ``loras`` folder (where checkpoints are written and looked for)."""
    import folder_paths

    return Path(folder_paths.get_folder_paths("loras")[0])


def state_path_for(lora_path: os.PathLike | str) -> Path:
    """``<stem>.flowgrpo-state`` next to ``<stem>.safetensors``."""
    lora_path = Path(lora_path)
    return lora_path.with_name(lora_path.name[: -len(LORA_SUFFIX)] + STATE_SUFFIX)


def _peft_path_for(lora_path: Path) -> Path:
    return lora_path.with_name(lora_path.name[: -len(LORA_SUFFIX)] + PEFT_SUFFIX)


def _safe_prefix(prefix: str, node: str, what: str) -> str:
    """``prefix`` as a relative ``a/b/name`` inside the loras folder; node_error for traversal or odd characters."""
    text = str(prefix).strip().replace("\\", "/")
    fix = ("use a plain name such as 'flowgrpo' or 'runs/flowgrpo' (a sub-folder of the loras folder): no '..', "
           "no leading '/', no drive letter, none of <>:\"|?*")
    if not text:
        raise node_error(node, f"{what} is empty", fix)
    parts = text.split("/")
    if text.startswith("/") or re.match(r"^[A-Za-z]:", text) or any(p in ("", ".", "..") for p in parts) \
            or _BAD_CHARS.search(text):
        raise node_error(node, f"{what} {prefix!r} is not a file name inside the loras folder", fix)
    return "/".join(parts)


def _checkpoints() -> list[tuple[str, Path]]:
    """``(name, lora_path)`` of every LoRA in the first loras folder with a training-state sidecar; name relative."""
    root = loras_root()
    found = []
    for folder, _, files in os.walk(root, followlinks=True):
        for f in files:
            if f.endswith(LORA_SUFFIX) and not f.endswith(PEFT_SUFFIX):
                path = Path(folder) / f
                if state_path_for(path).is_file():
                    found.append((path.relative_to(root).as_posix(), path))
    return sorted(found)


def resume_options() -> list[str]:
    """``["none", "latest", *names]``: names are LoRA files in the first loras folder that can be resumed."""
    try:
        names = [name for name, _ in _checkpoints()]
    except (OSError, IndexError, KeyError):  # no loras folder configured: nothing to resume
        names = []
    return ["none", "latest", *names]


def _iteration_of(name: str, run_name: str) -> Optional[int]:
    """The iteration in a checkpoint name ``<run_name>_<digits>.safetensors`` of this run, else None."""
    found = re.fullmatch(re.escape(run_name) + r"_(\d+)" + re.escape(LORA_SUFFIX), name)
    return int(found.group(1)) if found else None


def _run_checkpoints(run_name: str) -> list[tuple[int, str, Path]]:
    """``(iteration, name, lora_path)`` of the run's resumable checkpoints, highest iteration first."""
    own = [(_iteration_of(name, run_name), name, path) for name, path in _checkpoints()]
    return sorted(((it, name, path) for it, name, path in own if it is not None), reverse=True)


def find_latest_checkpoint(run_name: str) -> Optional[Path]:
    """The run's resumable checkpoint of the highest iteration: ``<run_name>_<digits>`` (the names
    :func:`save_checkpoint` gives), so ``flowgrpo`` never picks up ``flowgrpo_big_00010`` or ``flowgrpo-2_00010``."""
    found = _run_checkpoints(run_name)
    return found[0][2] if found else None


def run_folder(run_name: str) -> Path:
    """``<output>/flowgrpo/<run_name>``: the run's logs and images."""
    import folder_paths

    return Path(folder_paths.get_output_directory()) / "flowgrpo" / run_name


def _run_files(run_name: str) -> list[Path]:
    """Files that belong to ``run_name``: its checkpoint files (any iteration, with or without their partner) in
    the loras folder, and its log folder when it holds anything."""
    parts = run_name.split("/")
    folder = loras_root().joinpath(*parts[:-1])
    own = re.compile(re.escape(parts[-1]) + r"_\d+(" + "|".join(map(re.escape, (PEFT_SUFFIX, LORA_SUFFIX, STATE_SUFFIX)))
                     + ")")
    files = sorted(p for p in folder.iterdir() if own.fullmatch(p.name)) if folder.is_dir() else []
    logs = run_folder(run_name)
    if logs.is_dir() and any(logs.iterdir()):
        files.append(logs)
    return files


def new_run_name(run_name: str, node: str) -> str:
    """``run_name`` when no run has used it, else the first free ``<run_name>-<n>`` (n = 2, 3, ...); says so."""
    taken = _run_files(run_name)
    if not taken:
        return run_name
    n = 2
    while _run_files(f"{run_name}-{n}"):
        n += 1
    fresh = f"{run_name}-{n}"
    shown = ", ".join(p.name for p in taken[:3]) + (f" and {len(taken) - 3} more" if len(taken) > 3 else "")
    log.warning("%s: run_name %r already has files (%s); this new run is %r, so they are kept. To continue that "
                "run, set resume to 'latest'; to reuse the name, move its files away.", node, run_name, shown, fresh)
    return fresh


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
    for name, path in _checkpoints():
        if name == resume:
            return path
    raise node_error(node, f"resume {resume!r} is not a FlowGRPO checkpoint in {loras_root()} (a LoRA file with a "
                           f"{STATE_SUFFIX} training state next to it)",
                     "pick one from the resume list (refresh the page after saving), 'latest' or 'none'")


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_checkpoint(lora_file: Path) -> TrainingStateFile:
    """The checkpoint's training state after checking the pair: the state readable and matching its checksum, the
    LoRA file matching the SHA-256 the state recorded (states written before that record skip this check).
    Raises FileNotFoundError or :class:`CheckpointError`."""
    saved = load_training_state(state_path_for(lora_file))
    recorded = saved.extra.get("lora_sha256")
    if recorded is not None:
        if not lora_file.is_file():
            raise CheckpointError(f"the LoRA file {lora_file} of this checkpoint is missing")
        if _file_sha256(lora_file) != recorded:
            raise CheckpointError(f"{lora_file} is damaged: it is not the LoRA file its training state was saved "
                                  "with (the SHA-256 differs)")
    return saved


def _newest_intact(lora_file: Path) -> Optional[str]:
    """The name of the newest checkpoint of the same run as ``lora_file`` (older iterations) that passes
    :func:`verify_checkpoint`, or None."""
    name = lora_file.relative_to(loras_root()).as_posix()
    run = re.fullmatch(r"(.+)_\d+" + re.escape(LORA_SUFFIX), name)
    for _, other, path in _run_checkpoints(run.group(1)) if run else []:
        if other == name:
            continue
        try:
            verify_checkpoint(path)
        except (OSError, CheckpointError):
            continue
        return other
    return None


def _read_checkpoint(lora_file: Path, wanted: dict, node: str) -> TrainingStateFile:
    try:
        saved = verify_checkpoint(lora_file)
    except (FileNotFoundError, CheckpointError) as exc:
        intact = _newest_intact(lora_file)
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
        raise node_error(node, str(exc), "connect a flow-matching MODEL (SD3, FLUX or Qwen-Image) from a stock "
                                         "loader such as UNETLoader") from exc
    _check_inputs(rank, alpha, targets, learning_rate, node)
    if ema_decay and not (0.0 < float(ema_decay) < 1.0 and int(ema_every) >= 1):
        raise node_error(node, f"ema_decay {ema_decay} with ema_every {ema_every} is not an EMA",
                         "set ema_decay in (0, 1) (Flow-GRPO: 0.9) and ema_every >= 1 (Flow-GRPO: 8), or ema_decay 0 "
                         "for no EMA")
    run_name = _safe_prefix(run_name, node, "run_name")
    settings = LoraSettings(rank=int(rank), alpha=float(alpha), targets=targets, seed=int(seed),
                            learning_rate=float(learning_rate), family=family)
    lora_file = _resume_file(resume, run_name, node)
    saved = _read_checkpoint(lora_file, dataclasses.asdict(settings), node) if lora_file is not None else None
    if saved is None:
        run_name = new_run_name(run_name, node)

    with torch.inference_mode(False):
        patcher, params = attach_trainable_lora(model, settings.rank, settings.alpha, targets, settings.seed)
        trainable = [p for k, p in params.items() if k.endswith(_TRAINABLE)]  # the state does not exist yet
        optimizer = torch.optim.AdamW(trainable, lr=settings.learning_rate, betas=(0.9, 0.999), weight_decay=1e-4,
                                      eps=1e-8)
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
    prefix = _safe_prefix(filename_prefix or state.run_name, node, "filename_prefix")
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
        files.append((_peft_path_for(lora_path), safetensors_bytes(peft, {**lora_meta, "flowgrpo.keys": "peft"})))
        event["peft_path"] = str(files[-1][0])
    files.append((state_path, safetensors_bytes(tensors, metadata)))  # last: its presence marks the pair complete
    try:
        lora_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_files(files)
    except OSError as exc:
        previous = next((name for it, name, _ in _run_checkpoints(prefix) if it != state.iteration), None)
        raise node_error(node, f"could not write checkpoint {lora_path.name} into {lora_path.parent} "
                               f"({exc.strerror or exc}); nothing of it was written, and the previous checkpoint "
                               f"({previous or 'none yet'}) is kept", _save_fix(exc)) from exc
    emit(CHECKPOINT_EVENT, event)
    log.info("%s: saved %s (iteration %d)", node, lora_path, state.iteration)
    return str(lora_path), str(state_path)


def _save_fix(exc: OSError) -> str:
    if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        return "free space on that disk (or point ComfyUI's loras folder to another disk) and run again"
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return "make the folder writable, or point ComfyUI's loras folder (extra_model_paths.yaml) to a writable one"
    return "check that the folder exists and can be written, then run again"


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
