"""Checkpoint files of FlowGRPO runs: where they live, how a run is named, which checkpoint ``latest`` is, and
whether a checkpoint is intact.

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
* ``<same stem>.peft.safetensors`` (export "peft"): the same LoRA in PEFT / diffusers keys
  ``transformer.<diffusers path>.lora_A.weight`` / ``.lora_B.weight`` / ``.alpha``, built from the keys ComfyUI's own
  loader accepts (``comfy.lora.model_lora_keys_unet``: ``comfy.utils.mmdit_to_diffusers`` for SD3,
  ``flux_to_diffusers`` for FLUX, the module names themselves for Qwen-Image); fused ``qkv`` / ``linear1`` are split
  by rows. The scale alpha / rank is folded into ``lora_B`` and ``.alpha`` = rank, so loaders that ignore ``.alpha``
  (and then assume ``lora_alpha = r``) apply the same update as ComfyUI and diffusers' FLUX loader, which read it.

A run owns its name: a new run (resume "none", or "latest" with nothing to resume) on a ``run_name`` that already has
checkpoints or a log folder is written as ``<run_name>-2`` (then ``-3``, ...), and says so, so no run's files are
replaced or mixed with another's.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
from pathlib import Path
from typing import Optional

from ..flowgrpo_core.checkpoint import CheckpointError, TrainingStateFile, load_training_state
from .state import node_error

__all__ = ["LORA_SUFFIX", "STATE_SUFFIX", "PEFT_SUFFIX", "loras_root", "state_path_for", "peft_path_for",
           "safe_prefix", "checkpoints", "resume_options", "run_checkpoints", "find_latest_checkpoint", "run_folder",
           "new_run_name", "verify_checkpoint", "newest_intact", "save_fix"]

log = logging.getLogger(__name__)

LORA_SUFFIX = ".safetensors"
STATE_SUFFIX = ".flowgrpo-state"
PEFT_SUFFIX = ".peft.safetensors"
_BAD_CHARS = re.compile(r'[\x00-\x1f<>:"|?*]')
#: a checkpoint's LoRA name, relative to the loras folder: ``<run>_<iteration digits>.safetensors``
_CHECKPOINT_NAME = re.compile(r"(?P<run>.+)_(?P<iteration>\d+)" + re.escape(LORA_SUFFIX))


def loras_root() -> Path:
    """The first ``loras`` folder (where checkpoints are written and looked for)."""
    import folder_paths

    return Path(folder_paths.get_folder_paths("loras")[0])


def state_path_for(lora_path: os.PathLike | str) -> Path:
    """``<stem>.flowgrpo-state`` next to ``<stem>.safetensors``."""
    lora_path = Path(lora_path)
    return lora_path.with_name(lora_path.name[: -len(LORA_SUFFIX)] + STATE_SUFFIX)


def peft_path_for(lora_path: Path) -> Path:
    """``<stem>.peft.safetensors`` next to ``<stem>.safetensors``."""
    return lora_path.with_name(lora_path.name[: -len(LORA_SUFFIX)] + PEFT_SUFFIX)


def safe_prefix(prefix: str, node: str, what: str) -> str:
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


def checkpoints() -> list[tuple[str, Path]]:
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
        names = [name for name, _ in checkpoints()]
    except (OSError, IndexError, KeyError):  # no loras folder configured: nothing to resume
        names = []
    return ["none", "latest", *names]


def _iteration_of(name: str, run_name: str) -> Optional[int]:
    """The iteration in a checkpoint name ``<run_name>_<digits>.safetensors`` of this run, else None."""
    found = _CHECKPOINT_NAME.fullmatch(name)
    return int(found["iteration"]) if found and found["run"] == run_name else None


def run_checkpoints(run_name: str) -> list[tuple[int, str, Path]]:
    """``(iteration, name, lora_path)`` of the run's resumable checkpoints, highest iteration first."""
    own = [(_iteration_of(name, run_name), name, path) for name, path in checkpoints()]
    return sorted(((it, name, path) for it, name, path in own if it is not None), reverse=True)


def find_latest_checkpoint(run_name: str) -> Optional[Path]:
    """The run's resumable checkpoint of the highest iteration: ``<run_name>_<digits>`` (the names
    :func:`save_checkpoint` gives), so ``flowgrpo`` never picks up ``flowgrpo_big_00010`` or ``flowgrpo-2_00010``."""
    found = run_checkpoints(run_name)
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


def newest_intact(lora_file: Path) -> Optional[str]:
    """The name of the newest checkpoint of the same run as ``lora_file`` (older iterations) that passes
    :func:`verify_checkpoint`, or None."""
    name = lora_file.relative_to(loras_root()).as_posix()
    run = _CHECKPOINT_NAME.fullmatch(name)
    for _, other, path in run_checkpoints(run["run"]) if run else []:
        if other == name:
            continue
        try:
            verify_checkpoint(path)
        except (OSError, CheckpointError):
            continue
        return other
    return None


def save_fix(exc: OSError) -> str:
    if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        return "free space on that disk (or point ComfyUI's loras folder to another disk) and run again"
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return "make the folder writable, or point ComfyUI's loras folder (extra_model_paths.yaml) to a writable one"
    return "check that the folder exists and can be written, then run again"
