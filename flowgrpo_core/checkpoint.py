"""Checkpoint files: atomic safetensors writes, optimizer and training state, PEFT export of a LoRA.

Everything is safetensors (no pickle). Non-tensor values travel as JSON in the file's string metadata
(``safetensors.safe_open(path, "pt").metadata()``), tensors as ordinary entries.

Training-state file (the sidecar of a LoRA checkpoint), metadata keys:

==================  ===========================================================================================
``format``          :data:`STATE_FORMAT`
``format_version``  :data:`STATE_FORMAT_VERSION` (an integer, as text)
``iteration``       completed GRPO updates (an integer, as text)
``history``         JSON: one metrics dict per completed update
``settings``        JSON: how the LoRA was made (rank, alpha, targets, ...)
``extra``           JSON: anything else the caller keeps (may reference tensors)
``optimizer``       JSON: the optimizer ``state_dict`` with its tensors replaced by references
``tensors_sha256``  :func:`tensor_digest` of the file's tensors: :func:`load_training_state` refuses a file whose
                    tensors do not match it (damage that leaves the header readable)
==================  ===========================================================================================

Writes are atomic (:func:`atomic_write_files`: temporary files, fsync, rename), and a checkpoint's files are written as
one group: every file is complete on disk before the first is renamed into place, so a failed write (a full disk, a
read-only folder) leaves the previous files as they were and no partial file behind.

A value that is not plain JSON is encoded with a one-key tag: ``{"__tensor__": name}`` (a tensor stored in the file
under ``name``), ``{"__tuple__": [...]}``, and ``{"__items__": [[key, value], ...]}`` for a dict whose keys are not
all strings (optimizer state is keyed by parameter index). Decoding gives back the same Python types, so an
optimizer ``state_dict`` round-trips exactly (tensors bit for bit, ``step`` as a tensor or a number as it was).

LoRA layouts (per adapted Linear ``W [out, in]``, update ``dW = alpha / r * B @ A``):

* ComfyUI-native: ``diffusion_model.<path>.lora_up.weight`` = B ``[out, r]``, ``.lora_down.weight`` = A ``[r, in]``,
  ``.alpha`` (0-d).
* PEFT / diffusers: ``<prefix><diffusers path>.lora_B.weight`` = B, ``.lora_A.weight`` = A, ``.alpha``. Where ComfyUI
  fuses projections that diffusers keeps apart (SD3/FLUX ``qkv``, FLUX ``linear1`` = q, k, v, mlp-in), each diffusers
  module gets its rows of B and the whole (shared) A: ``B[rows] @ A = (B @ A)[rows]``, so the export is exact.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import torch

__all__ = [
    "STATE_FORMAT",
    "STATE_FORMAT_VERSION",
    "CheckpointError",
    "TrainingStateFile",
    "atomic_write_files",
    "atomic_save_safetensors",
    "safetensors_bytes",
    "tensor_digest",
    "read_safetensors_metadata",
    "encode_tree",
    "decode_tree",
    "optimizer_state_tensors",
    "optimizer_state_from_tensors",
    "training_state_payload",
    "save_training_state",
    "load_training_state",
    "peft_from_comfy",
]

STATE_FORMAT = "flowgrpo.training_state"
STATE_FORMAT_VERSION = 1

_TENSOR, _TUPLE, _ITEMS = "__tensor__", "__tuple__", "__items__"
_LORA_SUFFIXES = (".lora_up.weight", ".lora_down.weight", ".alpha")

PathLike = Union[str, os.PathLike]


class CheckpointError(ValueError):
    """A file that is not a readable FlowGRPO checkpoint (wrong format, version or content)."""


# ----------------------------------------------------------------------------------------------- atomic writes
def _cpu_tensor(name: str, value: Any) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"checkpoint entry {name!r} is a {type(value).__name__}, not a tensor")
    # an own contiguous CPU copy: safetensors refuses tensors that share memory
    return value.detach().to("cpu").contiguous().clone()


def atomic_write_files(files: Sequence[tuple[PathLike, bytes]]) -> list[Path]:
    """Write each ``(path, data)`` atomically and all of them as one group; returns the paths.

    Every file's bytes go to a new temporary file in its folder (created like any regular file: mode 0o666 minus the
    umask) and are flushed to disk (fsync); only when all are written are they renamed over their paths
    (``os.replace``), in the given order (put the file whose presence marks the group complete last). If a write
    fails (e.g. ENOSPC, EACCES), every temporary file is removed and every existing path is left as it was. Renames
    within one folder do not fail for lack of space; should one fail all the same, the files renamed before it are
    removed too, so no part of the group stays behind.
    """
    pending: list[tuple[Path, str]] = []
    done: list[Path] = []
    try:
        for path, data in files:
            path = Path(path)
            tmp_name = str(path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp"))
            fd = os.open(tmp_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            pending.append((path, tmp_name))
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        for path, tmp_name in pending:
            os.replace(tmp_name, path)
            done.append(path)
    except BaseException:
        for path, tmp_name in pending:
            try:
                os.unlink(path if path in done else tmp_name)
            except FileNotFoundError:
                pass
        raise
    for folder in {path.parent for path, _ in pending}:
        _fsync_dir(folder)
    return [path for path, _ in pending]


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (:func:`atomic_write_files` with one file); returns ``path``. If anything
    fails, the temporary file is removed and an existing ``path`` is left as it was."""
    return atomic_write_files([(path, data)])[0]


def safetensors_bytes(tensors: Mapping[str, torch.Tensor], metadata: Optional[Mapping[str, str]] = None) -> bytes:
    """``tensors`` (+ string ``metadata``) serialised as a safetensors file, from detached contiguous CPU copies."""
    import safetensors.torch

    cpu = {str(k): _cpu_tensor(str(k), v) for k, v in tensors.items()}
    meta = None if metadata is None else {str(k): v for k, v in metadata.items()}
    return safetensors.torch.save(cpu, metadata=meta)


def atomic_save_safetensors(tensors: Mapping[str, torch.Tensor], path: PathLike,
                            metadata: Optional[Mapping[str, str]] = None) -> Path:
    """Write ``tensors`` (+ string ``metadata``) to ``path`` as safetensors with :func:`atomic_write_bytes`; returns
    ``path``. Tensors are stored as detached, contiguous CPU copies; a failure leaves an existing ``path`` as it was."""
    return atomic_write_bytes(path, safetensors_bytes(tensors, metadata))


def tensor_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 (hex) over every tensor's name, dtype, shape and bytes, in name order: the same for the tensors saved
    and the tensors loaded back from an intact file, different after any change of a byte."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _fsync_dir(folder: Path) -> None:
    """Persist the rename (best effort: not every platform can open a directory)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_safetensors_metadata(path: PathLike) -> dict[str, str]:
    """The string metadata of a safetensors file ({} when it has none); CheckpointError if it is not one."""
    import safetensors

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as exc:  # safetensors raises its own SafetensorError for anything unreadable
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc})") from exc


# ----------------------------------------------------------------------------------------------- value trees
def encode_tree(value: Any, name: str, tensors: dict[str, torch.Tensor]) -> Any:
    """``value`` as JSON-able data; each tensor inside is added to ``tensors`` under a key starting with ``name``.

    Supports tensors, dicts (any hashable JSON-able keys), lists, tuples, str, int, float (incl. nan/inf), bool and
    None; anything else raises TypeError naming where it sits.
    """
    if isinstance(value, torch.Tensor):
        key, n = name, 1
        while key in tensors:
            key, n = f"{name}#{n}", n + 1
        tensors[key] = value
        return {_TENSOR: key}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, tuple):
        return {_TUPLE: [encode_tree(v, f"{name}.{i}", tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [encode_tree(v, f"{name}.{i}", tensors) for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: encode_tree(v, f"{name}.{k}", tensors) for k, v in value.items()}
        return {_ITEMS: [[encode_tree(k, f"{name}.key", tensors), encode_tree(v, f"{name}.{k}", tensors)]
                         for k, v in value.items()]}
    raise TypeError(f"cannot store {name!r}: {type(value).__name__} is not a tensor or plain JSON data")


def decode_tree(data: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """The inverse of :func:`encode_tree`."""
    if isinstance(data, list):
        return [decode_tree(v, tensors) for v in data]
    if isinstance(data, dict):
        if len(data) == 1:
            (tag, inner), = data.items()
            if tag == _TENSOR:
                if inner not in tensors:
                    raise CheckpointError(f"the checkpoint refers to a tensor {inner!r} that it does not contain")
                return tensors[inner]
            if tag == _TUPLE:
                return tuple(decode_tree(v, tensors) for v in inner)
            if tag == _ITEMS:
                return {decode_tree(k, tensors): decode_tree(v, tensors) for k, v in inner}
        return {k: decode_tree(v, tensors) for k, v in data.items()}
    return data


def _dumps(data: Any) -> str:
    return json.dumps(data, allow_nan=True, separators=(",", ":"))


# ----------------------------------------------------------------------------------------------- optimizer
def optimizer_state_tensors(optimizer_state_dict: Mapping[str, Any],
                            prefix: str = "optimizer") -> tuple[dict[str, torch.Tensor], str]:
    """``(tensors, meta_json)`` for a ``torch.optim`` ``state_dict()``.

    ``state_dict = {"state": {param_index: {"step": tensor or number, "exp_avg": tensor, ...}},
    "param_groups": [{"lr": ..., "betas": (b1, b2), "params": [indices], ...}]}``. Tensors are returned as they are
    (:func:`atomic_save_safetensors` copies them to the CPU), keyed ``<prefix>.state.<index>.<name>``.
    """
    tensors: dict[str, torch.Tensor] = {}
    meta = encode_tree(dict(optimizer_state_dict), prefix, tensors)
    return tensors, _dumps(meta)


def optimizer_state_from_tensors(tensors: Mapping[str, torch.Tensor], meta_json: str) -> dict[str, Any]:
    """The ``state_dict`` that :func:`optimizer_state_tensors` encoded, for ``optimizer.load_state_dict``."""
    state = decode_tree(json.loads(meta_json), tensors)
    if not isinstance(state, dict) or "state" not in state or "param_groups" not in state:
        raise CheckpointError("the optimizer entry is not a torch.optim state_dict (needs 'state' and 'param_groups')")
    return state


# ----------------------------------------------------------------------------------------------- training state
@dataclass
class TrainingStateFile:
    """What :func:`load_training_state` reads: the optimizer ``state_dict``, the iteration, the metrics history,
    the LoRA settings and the caller's extra data (tensors in it come back as tensors)."""

    optimizer_state: dict
    iteration: int
    history: list[dict] = field(default_factory=list)
    settings: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)


def training_state_payload(optimizer: Union[torch.optim.Optimizer, Mapping[str, Any]], *, iteration: int,
                           history: Sequence[Mapping[str, Any]], settings: Mapping[str, Any],
                           extra: Optional[Mapping[str, Any]] = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of a training-state file (format in the module doc), built in memory.

    ``optimizer`` is an optimizer or its ``state_dict()``. TypeError when a value cannot be stored.
    """
    opt_sd = optimizer.state_dict() if isinstance(optimizer, torch.optim.Optimizer) else optimizer
    tensors, opt_meta = optimizer_state_tensors(opt_sd)
    metadata = {
        "format": STATE_FORMAT,
        "format_version": str(STATE_FORMAT_VERSION),
        "iteration": str(int(iteration)),
        "history": _dumps(encode_tree(list(history), "history", tensors)),
        "settings": _dumps(encode_tree(dict(settings), "settings", tensors)),
        "extra": _dumps(encode_tree(dict(extra or {}), "extra", tensors)),
        "optimizer": opt_meta,
    }
    metadata["tensors_sha256"] = tensor_digest(tensors)
    return tensors, metadata


def save_training_state(path: PathLike, optimizer: Union[torch.optim.Optimizer, Mapping[str, Any]], *,
                        iteration: int, history: Sequence[Mapping[str, Any]], settings: Mapping[str, Any],
                        extra: Optional[Mapping[str, Any]] = None) -> Path:
    """Atomically write a training-state file (:func:`training_state_payload`); returns ``path``. Nothing is
    written when a value cannot be stored (TypeError)."""
    tensors, metadata = training_state_payload(optimizer, iteration=iteration, history=history, settings=settings,
                                               extra=extra)
    return atomic_save_safetensors(tensors, path, metadata)


def load_training_state(path: PathLike) -> TrainingStateFile:
    """Read a file written by :func:`save_training_state`.

    Raises FileNotFoundError for a missing file and :class:`CheckpointError` for a file that is not a FlowGRPO
    training state or has another format version. Tensors come back as normal (non-inference) CPU tensors.
    """
    import safetensors.torch

    path = Path(path)
    meta = read_safetensors_metadata(path)
    if meta.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{path} is not a FlowGRPO training state (its format is "
                              f"{meta.get('format', 'not recorded')!r}, expected {STATE_FORMAT!r})")
    version = meta.get("format_version", "")
    if version != str(STATE_FORMAT_VERSION):
        raise CheckpointError(f"{path} has training-state format version {version or 'unknown'}; this FlowGRPO "
                              f"reads version {STATE_FORMAT_VERSION}")
    with torch.inference_mode(False):  # ComfyUI runs nodes in inference mode; optimizer state must stay mutable
        try:
            tensors = safetensors.torch.load_file(str(path), device="cpu")
        except Exception as exc:  # safetensors' own SafetensorError: truncated data, a broken header
            raise CheckpointError(f"{path} is a damaged FlowGRPO training state ({exc})") from exc
        recorded = meta.get("tensors_sha256")
        if recorded is not None and tensor_digest(tensors) != recorded:
            raise CheckpointError(f"{path} is a damaged FlowGRPO training state: its tensors do not match the "
                                  "checksum they were saved with")
        try:
            return TrainingStateFile(
                optimizer_state=optimizer_state_from_tensors(tensors, meta["optimizer"]),
                iteration=int(meta["iteration"]),
                history=list(decode_tree(json.loads(meta["history"]), tensors)),
                settings=dict(decode_tree(json.loads(meta["settings"]), tensors)),
                extra=dict(decode_tree(json.loads(meta["extra"]), tensors)),
            )
        except (KeyError, ValueError, TypeError) as exc:
            if isinstance(exc, CheckpointError):
                raise
            raise CheckpointError(f"{path} is a damaged FlowGRPO training state ({type(exc).__name__}: {exc})") \
                from exc


# ----------------------------------------------------------------------------------------------- PEFT export
RowSpan = Optional[tuple[int, int]]  # (start, length) of rows of the native weight; None = all rows


def _check_rows(path: str, targets: Sequence[tuple[str, RowSpan]], out_dim: int) -> list[tuple[str, RowSpan]]:
    """``targets`` sorted by first row, after checking they cover ``out_dim`` rows exactly once."""
    if len(targets) == 1 and targets[0][1] is None:
        return list(targets)
    if any(rows is None for _, rows in targets):
        raise ValueError(f"{path}: the key map mixes a whole-module target with row slices: {list(targets)}")
    ordered = sorted(targets, key=lambda t: t[1][0])
    position = 0
    for target, (start, length) in ordered:
        if start != position or length <= 0:
            raise ValueError(f"{path}: row slices of {[t for t, _ in ordered]} do not tile its {out_dim} rows "
                             f"(gap or overlap at row {position}); an exact export is impossible")
        position += length
    if position != out_dim:
        raise ValueError(f"{path}: row slices cover {position} of its {out_dim} rows; an exact export is impossible")
    return ordered


def peft_from_comfy(lora_sd: Mapping[str, torch.Tensor], key_map: Mapping[str, Sequence[tuple[str, RowSpan]]],
                    prefix: str = "transformer.", fold_scale: bool = False) -> dict[str, torch.Tensor]:
    """A ComfyUI-native LoRA state dict in PEFT / diffusers keys (layouts in the module doc).

    ``lora_sd``: ``<native path>.lora_up.weight`` ``[out, r]``, ``.lora_down.weight`` ``[r, in]``, optional
    ``.alpha``. ``key_map``: native path (``diffusion_model.<path>``) -> ``[(diffusers path, rows), ...]`` where
    ``rows`` is ``(start, length)`` in the native ``out`` dimension or None for the whole module. A fused module
    becomes one PEFT module per slice: ``lora_B`` = its rows of B, ``lora_A`` = A (a copy each), the same alpha.
    ``fold_scale``: multiply B by ``alpha / r`` and store ``alpha = r`` (scale 1), so that loaders which ignore
    ``.alpha`` keys (they assume ``lora_alpha = r``) apply the same update as those that read them.
    Raises ValueError for keys it does not know, missing partners, unmapped modules and slices that do not tile.
    """
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in lora_sd.items():
        suffix = next((s for s in _LORA_SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            raise ValueError(f"{key!r} is not a LoRA key (expected one of {_LORA_SUFFIXES}); only plain LoRA exports")
        modules.setdefault(key[: -len(suffix)], {})[suffix] = value
    out: dict[str, torch.Tensor] = {}
    for path, parts in modules.items():
        if ".lora_up.weight" not in parts or ".lora_down.weight" not in parts:
            raise ValueError(f"{path}: needs both .lora_up.weight and .lora_down.weight, has {sorted(parts)}")
        up, down = parts[".lora_up.weight"].detach(), parts[".lora_down.weight"].detach()
        if up.dim() != 2 or down.dim() != 2 or up.shape[1] != down.shape[0]:
            raise ValueError(f"{path}: up {tuple(up.shape)} and down {tuple(down.shape)} are not [out, r] and [r, in]")
        targets = key_map.get(path)
        if not targets:
            raise ValueError(f"{path} has no diffusers name in the key map; this module cannot be exported as PEFT")
        alpha = parts[".alpha"].detach() if ".alpha" in parts else None
        if fold_scale:
            rank = down.shape[0]
            if alpha is not None:
                up = up * (alpha.to(up.dtype) / rank)
            alpha = torch.tensor(float(rank), dtype=torch.float32)
        for target, rows in _check_rows(path, targets, up.shape[0]):
            b = up if rows is None else up[rows[0]: rows[0] + rows[1]]
            out[f"{prefix}{target}.lora_B.weight"] = b.contiguous().clone()
            out[f"{prefix}{target}.lora_A.weight"] = down.contiguous().clone()
            if alpha is not None:
                out[f"{prefix}{target}.alpha"] = alpha.clone()
    return out
