"""Local reward-model weights: where they are looked up and how they are read.

Weights come only from local paths: a name relative to one of the reward-model folders (ComfyUI's
``models/reward_models/``) or an absolute path. Nothing is ever downloaded. Files are read with safetensors or with
``torch.load(weights_only=True)`` (no pickled code runs); a wrapper ``{"state_dict": ...}`` and DataParallel's
``module.`` prefix are unwrapped.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence

import torch

__all__ = ["MissingWeightsError", "WeightsFormatError", "find_weights", "load_state_dict", "load_strict", "read_json",
           "PICKLE_SUFFIXES", "WEIGHT_SUFFIXES"]

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
WEIGHT_SUFFIXES = (".safetensors",) + PICKLE_SUFFIXES


class MissingWeightsError(FileNotFoundError):
    """A reward's weights are not where they were looked for. The message names the reward, the expected file or
    folder, every folder searched and where to get the weights."""

    def __init__(self, reward: str, expected: str, folders: Sequence[Path], source: str = "", kind: str = "file"):
        self.reward, self.expected, self.folders = reward, expected, [Path(f) for f in folders]
        where = ", ".join(str(f) for f in self.folders) or "(no reward_models folder configured)"
        what = "folder" if kind == "dir" else "file"
        fix = f" Download it from {source} and put it there" if source else " Put it there"
        first = self.folders[0] if self.folders else Path("models/reward_models")
        super().__init__(f"reward {reward!r} needs the {what} {expected!r}, not found in {where}.{fix} "
                         f"(expected path: {first / expected}), or choose another weights entry.")


class WeightsFormatError(ValueError):
    """A weights file exists but cannot be read safely or does not fit the model."""


def find_weights(name: str, folders: Sequence[Path | str], *, reward: str, source: str = "",
                 kind: str = "file") -> Path:
    """The existing path of ``name`` (``kind`` ``"file"`` or ``"dir"``): itself when absolute, else the first
    ``folder / name`` that exists. Raises :class:`MissingWeightsError` naming the folders and the file."""
    folders = [Path(f) for f in folders]
    candidates = [Path(name)] if os.path.isabs(name) else [f / name for f in folders]
    for path in candidates:
        if (path.is_dir() if kind == "dir" else path.is_file()):
            return path
    if os.path.isabs(name):
        raise MissingWeightsError(reward, Path(name).name, [Path(name).parent], source, kind)
    raise MissingWeightsError(reward, name, folders, source, kind)


def _unwrap(obj: object, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsFormatError(f"{path} does not hold a state dict of tensors")
    prefix = "module."
    if obj and all(k.startswith(prefix) for k in obj):
        obj = {k[len(prefix):]: v for k, v in obj.items()}
    return dict(obj)


def load_state_dict(path: Path | str) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file, or of a torch file read with ``weights_only=True`` (a pickle holding
    anything but tensors and plain containers is refused with a message saying how to convert it)."""
    path = Path(path)
    if not path.is_file():
        raise MissingWeightsError(path.stem, path.name, [path.parent])
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return _unwrap(load_file(str(path)), path)
    if path.suffix not in PICKLE_SUFFIXES:
        raise WeightsFormatError(f"{path}: unknown weights format {path.suffix!r} (use one of {WEIGHT_SUFFIXES})")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError and friends: the file holds pickled objects
        raise WeightsFormatError(
            f"{path} cannot be read with weights_only=True ({type(e).__name__}: {str(e).splitlines()[0][:200]}). "
            "Convert it to .safetensors in a trusted environment and load that instead.") from None
    return _unwrap(obj, path)


def read_json(path: Path | str, reward: str) -> dict:
    """The JSON object in ``path`` (a model's config); :class:`WeightsFormatError` naming the file otherwise."""
    import json

    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightsFormatError(f"reward {reward!r}: cannot read {path} ({type(e).__name__}: {e})") from None
    if not isinstance(value, dict):
        raise WeightsFormatError(f"reward {reward!r}: {path} holds a JSON {type(value).__name__}, not an object")
    return value


def load_strict(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], reward: str,
                path: Optional[Path] = None, ignore: Iterable[str] = ()) -> None:
    """``module.load_state_dict(state_dict)`` that reports missing and unexpected keys (except those starting with
    a prefix in ``ignore``) and shape mismatches as one :class:`WeightsFormatError` naming the reward and file."""
    ignore = tuple(ignore)
    own = module.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own and not k.startswith(ignore)]
    shapes = [f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        where = f" in {path}" if path else ""
        parts = [f"{len(missing)} missing keys (e.g. {missing[:3]})" if missing else "",
                 f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})" if unexpected else "",
                 f"shape mismatches: {shapes[:3]}" if shapes else ""]
        raise WeightsFormatError(f"reward {reward!r}: the weights{where} do not fit the model: "
                                 + "; ".join(p for p in parts if p)
                                 + ". Is this the right file for this reward (and version)?")
    module.load_state_dict({k: state_dict[k] for k in own}, strict=True)
