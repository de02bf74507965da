"""ComfyUI glue for reward models: their folders, the backends Load Reward Model offers, and memory management.

* Folders: ``models/reward_models/`` (weights; ``reward_models`` in ``extra_model_paths.yaml``) and
  ``models/reward_scripts/`` (user reward ``.py`` files), registered with ``folder_paths`` at import.
* Backends: the weight-free statistics, every :data:`flowgrpo_core.rewards.registry.BACKENDS` entry, and the user
  rewards discovered in the scripts folders (re-scanned when a file changes).
* Memory: a torch reward is wrapped in a ComfyUI ``ModelPatcher`` and loaded with ``load_models_gpu`` right
  before it scores, so ComfyUI frees VRAM for it like for any model; before a GRPO update trains the diffusion
  model, ``offload.offload_all_but`` hands its weights (and every other model's) back to the offload device.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..flowgrpo_core.rewards import SIMPLE_REWARDS, RewardBackend, RewardResult, SimpleReward
from ..flowgrpo_core.rewards.base import TorchReward
from ..flowgrpo_core.rewards.registry import BACKENDS, build_backend
from ..flowgrpo_core.rewards.user import UserRewards, build_user_reward, discover_user_rewards
from ..flowgrpo_core.rewards.weights import WEIGHT_SUFFIXES

__all__ = ["WEIGHTS_FOLDER", "SCRIPTS_FOLDER", "DEFAULT_WEIGHTS", "register_folders", "weights_folders",
           "weights_options", "user_rewards", "backend_options", "build_reward", "ManagedReward",
           "DEVICES", "DTYPES"]

log = logging.getLogger("flowgrpo")

WEIGHTS_FOLDER = "reward_models"
SCRIPTS_FOLDER = "reward_scripts"
DEFAULT_WEIGHTS = "(default)"
DEVICES = ["auto", "cpu"]
DTYPES = {"auto": None, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def register_folders() -> None:
    """Adds ``models/reward_models`` and ``models/reward_scripts`` to ``folder_paths`` (idempotent)."""
    import folder_paths

    for name in (WEIGHTS_FOLDER, SCRIPTS_FOLDER):
        if name not in folder_paths.folder_names_and_paths:
            folder_paths.add_model_folder_path(name, os.path.join(folder_paths.models_dir, name))


def _folders(name: str) -> list[Path]:
    import folder_paths

    register_folders()
    return [Path(p) for p in folder_paths.get_folder_paths(name)]


def weights_folders() -> list[Path]:
    """The reward-model weight folders, the default ``models/reward_models`` first."""
    return _folders(WEIGHTS_FOLDER)


def weights_options() -> list[str]:
    """``(default)``, then every weights file and model folder (a folder holding ``config.json`` or
    ``open_clip_config.json``) under the reward-model folders, as paths relative to their folder."""
    found: set[str] = set()
    for root in weights_folders():
        if not root.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            rel = Path(dirpath).relative_to(root)
            if rel != Path(".") and {"config.json", "open_clip_config.json"} & set(filenames):
                found.add(rel.as_posix())
                dirnames.clear()  # a model folder's files are not offered one by one
                continue
            found.update((rel / f).as_posix() for f in filenames if f.endswith(WEIGHT_SUFFIXES))
    return [DEFAULT_WEIGHTS, *sorted(found)]


_user_cache: dict[tuple, UserRewards] = {}


def _mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:  # deleted between listing and stat
        return -1


def user_rewards() -> UserRewards:
    """The user rewards of the scripts folders; files are imported again only when one is added, removed or
    changed. Import errors are logged once per change."""
    folders = _folders(SCRIPTS_FOLDER)
    key = tuple(sorted((str(p), _mtime(p)) for f in folders if f.is_dir() for p in f.glob("*.py")))
    if key not in _user_cache:
        _user_cache.clear()
        found = discover_user_rewards(folders)
        for error in found.errors:
            log.warning("flowgrpo: user reward skipped: %s", error)
        _user_cache[key] = found
    return _user_cache[key]


def backend_options() -> list[str]:
    """The backend combo: weight-free statistics, model backends, then ``user:<name>`` rewards."""
    return [*SIMPLE_REWARDS, *BACKENDS, *user_rewards().backends]


def _device(choice: str) -> torch.device:
    import comfy.model_management

    return torch.device("cpu") if choice == "cpu" else comfy.model_management.get_torch_device()


def _dtype(choice: str, device: torch.device) -> torch.dtype:
    if DTYPES.get(choice) is not None:
        return DTYPES[choice]
    import comfy.model_management

    return torch.float16 if device.type != "cpu" and comfy.model_management.should_use_fp16(device) else torch.float32


def build_reward(backend: str, weights: str = DEFAULT_WEIGHTS, device: str = "auto",
                 dtype: str = "auto") -> RewardBackend:
    """The scorer ``backend`` with its weights; torch rewards come wrapped in :class:`ManagedReward`. Raises
    ValueError (unknown backend), MissingWeightsError, WeightsFormatError or MissingDependencyError."""
    load_device = _device(device)
    compute_dtype = _dtype(dtype, load_device)
    if backend in SIMPLE_REWARDS:
        return SimpleReward(backend)
    users = user_rewards().backends
    if backend in users:
        cls = users[backend]  # a TorchReward is built on the CPU and moved by model management; others get the device
        reward = build_user_reward(cls, device="cpu" if issubclass(cls, TorchReward) else load_device,
                                   dtype=compute_dtype)
    elif backend in BACKENDS:
        choice = "" if weights in ("", DEFAULT_WEIGHTS) else weights
        reward = build_backend(backend, choice, weights_folders(), torch.device("cpu"), compute_dtype)
    else:
        raise ValueError(f"unknown reward backend {backend!r}; available: {', '.join(backend_options())}")
    return ManagedReward(reward, load_device) if isinstance(reward, TorchReward) else reward



class ManagedReward(RewardBackend):
    """A :class:`TorchReward` under ComfyUI's model management: loaded onto ``load_device`` by
    ``load_models_gpu`` before each scoring call (freeing VRAM like any model load), offloaded again before an
    update (``offload.offload_all_but``)."""

    def __init__(self, inner: TorchReward, load_device: torch.device):
        import comfy.model_management
        import comfy.model_patcher

        self.inner = inner
        self.name, self.needs_prompt = inner.name, inner.needs_prompt
        # a plain container: ModelPatcher sets attributes such as `device` on its module, which transformers models
        # expose as read-only properties
        holder = torch.nn.Module()
        holder.add_module("reward", inner.model)
        self.patcher = comfy.model_patcher.ModelPatcher(
            holder, load_device=load_device, offload_device=comfy.model_management.unet_offload_device())

    def _score(self, images: torch.Tensor, prompts: list[str],
               metadata: Optional[Sequence[dict]]) -> RewardResult:
        import comfy.model_management

        # fully: reward towers are plain modules (no ComfyUI cast-on-the-fly layers), so a partial load would leave
        # some weights on the offload device
        comfy.model_management.load_models_gpu([self.patcher], force_full_load=True)
        return self.inner.score(images, prompts, metadata)

    @property
    def device(self) -> torch.device:
        """Where the reward scores (ComfyUI loads it there before each call)."""
        return self.patcher.load_device

    @property
    def loaded(self) -> bool:
        """Whether ComfyUI holds the weights as a loaded model right now."""
        import comfy.model_management

        return any(m is self.patcher for m in comfy.model_management.loaded_models())

