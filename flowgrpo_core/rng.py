"""The process-global random states a checkpoint carries: torch (CPU and every CUDA device), Python and numpy.

The pack's own draws (prompts, step windows, initial and SDE noise) come from generators seeded by
``(run seed, iteration)`` (:mod:`flowgrpo_core.seeding`) and need no saved state. The global streams are saved and
restored anyway, so that anything else that draws from them during a run (dropout, a user reward, a library) also
continues on resume exactly as it would have without the interruption.

:func:`capture_rng_state` returns plain JSON data and tensors (``flowgrpo_core.checkpoint.encode_tree`` stores it):

``{"torch": uint8 tensor, "cuda": [uint8 tensor per device], "python": [version, [625 ints], gauss_next],
"numpy": {"kind", "keys": int64 tensor, "pos", "has_gauss", "cached_gaussian"}}``; ``numpy`` is None without numpy.
"""

from __future__ import annotations

import random
from typing import Any, Mapping

import torch

__all__ = ["capture_rng_state", "restore_rng_state"]


def capture_rng_state() -> dict[str, Any]:
    """The current global random states (CPU tensors copied, so later draws do not change them)."""
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state().clone(),
        "cuda": [s.clone() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
        "python": [version, list(internal), gauss],
        "numpy": None,
    }
    try:
        import numpy as np
    except ImportError:
        return state
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state["numpy"] = {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Set the global random states to ``state`` (from :func:`capture_rng_state`, possibly through a checkpoint).

    CUDA states are restored for the devices both the saved run and this process have; ValueError for a state that
    is not one :func:`capture_rng_state` made.
    """
    try:
        torch.set_rng_state(state["torch"].to(torch.uint8).cpu())
        cuda = list(state.get("cuda") or [])
        if cuda and torch.cuda.is_available():
            count = min(len(cuda), torch.cuda.device_count())
            for index in range(count):
                torch.cuda.set_rng_state(cuda[index].to(torch.uint8).cpu(), index)
        version, internal, gauss = state["python"]
        random.setstate((int(version), tuple(int(v) for v in internal), gauss))
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"not a saved random state ({type(exc).__name__}: {exc})") from exc
    saved = state.get("numpy")
    if saved is None:
        return
    try:
        import numpy as np
    except ImportError:
        return
    np.random.set_state((saved["kind"], saved["keys"].numpy().astype(np.uint32), int(saved["pos"]),
                         int(saved["has_gauss"]), float(saved["cached_gaussian"])))
