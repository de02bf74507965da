"""User rewards: ``.py`` files in a designated folder, each defining :class:`~.base.RewardBackend` subclasses.

A user file is imported like any Python module the user installed (it is never built from strings in a
workflow, and nothing is ``eval``-ed). Every concrete ``RewardBackend`` subclass *defined in* the file becomes a
backend named ``user:<name>`` (``name`` is the class attribute; the file name when the class keeps the default).
The class is built with no arguments, or with ``device=`` / ``dtype=`` when its ``__init__`` takes them::

    # models/reward_scripts/blue_sky.py
    from flowgrpo_core.rewards import RewardBackend

    class BlueSky(RewardBackend):
        name = "blue_sky"
        def _score(self, images, prompts, metadata):      # images [B, H, W, C] in [0, 1]
            return images[:, : images.shape[1] // 2, :, 2].mean(dim=(1, 2))   # -> [B]

A file that fails to import is reported (file, line, error) and skipped; the others still load.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from .base import RewardBackend

__all__ = ["USER_PREFIX", "UserRewards", "discover_user_rewards", "build_user_reward"]

USER_PREFIX = "user:"
_MODULE_PREFIX = "flowgrpo_user_rewards"


@dataclass
class UserRewards:
    """``backends``: ``"user:<name>"`` -> class; ``errors``: one line per file that failed (file:line: error)."""

    backends: dict[str, type[RewardBackend]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


@contextmanager
def _core_visible():
    """While a user file is imported, ``import flowgrpo_core...`` resolves to *this* pack's core, whatever name the
    host imported the pack under (ComfyUI: ``<custom_nodes folder>.flowgrpo_core``), so user classes subclass the
    very classes the pack checks against. Entries that were there before are put back afterwards."""
    core = __package__.rsplit(".", 1)[0]
    if core == "flowgrpo_core":
        yield
        return
    aliases = {"flowgrpo_core" + name[len(core):]: module for name, module in list(sys.modules.items())
               if name == core or name.startswith(core + ".")}
    saved = {name: sys.modules[name] for name in aliases if name in sys.modules}
    sys.modules.update(aliases)
    try:
        yield
    finally:
        for name in aliases:
            if name in saved:
                sys.modules[name] = saved[name]
            else:
                sys.modules.pop(name, None)


def _error_line(path: Path, error: BaseException) -> str:
    line = None
    for frame in traceback.extract_tb(error.__traceback__):
        if Path(frame.filename).resolve() == path.resolve():
            line = frame.lineno
    if isinstance(error, SyntaxError) and error.lineno:
        line = error.lineno
    where = f"{path}:{line}" if line else str(path)
    return f"{where}: {type(error).__name__}: {error}"


def _import(path: Path):
    name = f"{_MODULE_PREFIX}.{path.stem}_{abs(hash(str(path.resolve()))):x}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def discover_user_rewards(folders: Sequence[Path | str]) -> UserRewards:
    """Imports every ``*.py`` (not starting with ``_``) in ``folders`` (missing folders are skipped) and collects
    their backends. Two classes with the same name: the first file (alphabetical, first folder first) wins and
    the clash is reported."""
    found = UserRewards()
    for folder in folders:
        folder = Path(folder)
        if not folder.is_dir():
            continue
        for path in sorted(folder.glob("*.py")):
            if path.name.startswith("_"):
                continue
            try:
                with _core_visible():
                    module = _import(path)
            except Exception as e:  # a broken user file must not take the pack down
                found.errors.append(_error_line(path, e))
                continue
            classes = [obj for obj in vars(module).values()
                       if inspect.isclass(obj) and issubclass(obj, RewardBackend) and obj.__module__ == module.__name__
                       and not inspect.isabstract(obj)]
            if not classes:
                found.errors.append(f"{path}: defines no RewardBackend subclass (subclass "
                                    "flowgrpo_core.rewards.RewardBackend and implement _score)")
            for cls in classes:
                if cls.name == RewardBackend.name:
                    cls.name = path.stem
                own = cls.name
                key = USER_PREFIX + own
                if key in found.backends:
                    found.errors.append(f"{path}: reward name {own!r} is already defined by "
                                        f"{inspect.getsourcefile(found.backends[key])}; rename one (class attribute "
                                        "name)")
                    continue
                found.backends[key] = cls
    return found


def build_user_reward(cls: type[RewardBackend], device: torch.device | str = "cpu",
                      dtype: torch.dtype = torch.float32) -> RewardBackend:
    """An instance of the user class: ``cls(device=..., dtype=...)`` passing only the keywords ``__init__``
    accepts."""
    params = inspect.signature(cls).parameters
    takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    kwargs = {k: v for k, v in (("device", torch.device(device)), ("dtype", dtype)) if takes_all or k in params}
    return cls(**kwargs)
