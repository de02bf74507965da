"""What differs between the ComfyUI versions the pack runs on, in one place.

The pack is tested on ComfyUI 0.3.75 (the registry's, November 2025) and 0.33.0 (August 2026). Code elsewhere in
``nodes/`` asks this module instead of testing versions itself. Each helper checks for the feature, never the version
number, so releases in between and after behave by what they have.

* :func:`training_mode`: since 2026 ComfyUI routes RoPE, RMS-norm and other ops to comfy-kitchen kernels that have no
  autograd formula unless the module-level flag ``comfy.model_management.in_training`` is True (its own
  ``TrainLoraNode`` sets it around its loop). Every forward that builds an autograd graph runs inside this context,
  which sets the flag and restores the previous value on exit, exceptions and interrupts included.
* :func:`interrupts_held`: since 2026 ComfyUI checks for a user's interrupt at every op of a model
  (``comfy.ops.run_every_op``), not only where a sampler or node asks. A section that must not stop halfway (an update
  of several optimizer steps) holds the interrupt: it stays pending and is raised at the first check after the section.
* :func:`latent_ratios`: 2026 latent formats state their spatial and temporal downscale ratios; 0.3.x formats do
  not (8 spatially and 4 in time, except Wan 2.2's 16 spatially, which 0.3.75's own ``Wan22ImageToVideoLatent``
  uses).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

__all__ = ["training_mode", "interrupts_held", "latent_ratios"]

#: spatial ratios of latent formats on releases whose formats do not state one
_UNSTATED_SPATIAL = {"Wan22": 16}


@contextlib.contextmanager
def training_mode() -> Iterator[None]:
    """Run the enclosed forwards and backwards with ComfyUI's training flag set (where the runtime has one), and put
    back the value it had before on exit, whatever the exit. Nests."""
    import comfy.model_management as mm

    if not hasattr(mm, "in_training"):
        yield
        return
    previous = mm.in_training
    mm.in_training = True
    try:
        yield
    finally:
        mm.in_training = previous


def _no_interrupt_check() -> None:
    """Stands in for ``throw_exception_if_processing_interrupted`` inside :func:`interrupts_held`: the request stays
    set, so the first check after the section raises it."""


@contextlib.contextmanager
def interrupts_held() -> Iterator[None]:
    """Within the context no ComfyUI interrupt check raises (a Cancel stays pending until the first check after it).
    ComfyUI runs one prompt at a time; the context is meant for the worker thread that runs it."""
    import comfy.model_management as mm

    check = mm.throw_exception_if_processing_interrupted
    mm.throw_exception_if_processing_interrupted = _no_interrupt_check
    try:
        yield
    finally:
        mm.throw_exception_if_processing_interrupted = check


def latent_ratios(latent_format: object) -> tuple[int, int]:
    """``(spatial, temporal)`` downscale ratios of a ``comfy.latent_formats`` instance (see the module doc)."""
    default = _UNSTATED_SPATIAL.get(type(latent_format).__name__, 8)
    return (int(getattr(latent_format, "spacial_downscale_ratio", default)),
            int(getattr(latent_format, "temporal_downscale_ratio", 4)))
