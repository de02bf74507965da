"""Wall time and peak memory per phase of an iteration (rollout, reward, update, ...).

``timer = PhaseTimer(device)``; ``with timer.phase("rollout"): ...``; ``timer.metrics()`` ->
``{"time_rollout_s": 1.9, "peak_mem_rollout_mb": 5321.0, ..., "time_total_s": ...}``.

* Time: ``time.perf_counter`` seconds. On CUDA the device is synchronized at the start and the end of a phase, so
  queued kernels count in the phase that launched them.
* Peak memory, in MiB (2**20 bytes): on CUDA ``torch.cuda.max_memory_allocated(device)`` after
  ``reset_peak_memory_stats`` at the phase start (tensor memory of this process on that device, not the
  allocator's cache). On CPU the process's peak resident set size ``VmHWM`` from ``/proc/self/status`` after
  resetting it to the current RSS by writing ``5`` to ``/proc/self/clear_refs`` (Linux). VmHWM is process-wide:
  memory taken by other threads during the phase counts too, and the value is the whole RSS at its peak, not the
  growth. Where neither works (another OS or device, no permission) the peak is None; the timer never raises.

Phases may nest (an outer phase's peak includes its inner phases'); a name used more than once adds up its seconds
and keeps its largest peak. ``time_total_s`` is the sum over outermost phases.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator, Optional, Union

import torch

__all__ = ["PhaseTimer"]

_MB = float(2 ** 20)


class _Frame:
    __slots__ = ("name", "start", "peak")

    def __init__(self, name: str) -> None:
        self.name, self.start, self.peak = name, 0.0, None


class PhaseTimer:
    """Seconds and peak memory per named phase on ``device`` (module doc)."""

    def __init__(self, device: Union[str, torch.device, None] = "cpu") -> None:
        self.device = torch.device("cpu" if device is None else device)
        self._cuda = self.device.type == "cuda" and torch.cuda.is_available()
        self._stack: list[_Frame] = []
        self.reset()

    def reset(self) -> None:
        """Forget every recorded phase (e.g. at the start of an iteration)."""
        self.seconds: dict[str, float] = {}
        self.peak_mb: dict[str, Optional[float]] = {}
        self.total_s = 0.0

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the ``with`` body as phase ``name`` (recorded even when the body raises)."""
        frame = _Frame(str(name))
        self._sync()
        self._fold_peak()  # before the reset: open (outer) phases keep what they saw so far
        frame.peak = self._reset_peak()
        self._stack.append(frame)
        frame.start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            seconds = time.perf_counter() - frame.start
            self._fold_peak()  # this phase's peak, and its outer phases' too
            self._stack.pop()
            self.seconds[frame.name] = self.seconds.get(frame.name, 0.0) + seconds
            known = [p for p in (self.peak_mb.get(frame.name), frame.peak) if p is not None]
            self.peak_mb[frame.name] = max(known) if known else None
            if not self._stack:
                self.total_s += seconds

    def phases(self) -> dict[str, Optional[float]]:
        """``{"time_<phase>_s": seconds, "peak_mem_<phase>_mb": MiB or None, ...}`` for every phase."""
        out: dict[str, Optional[float]] = {}
        for name, seconds in self.seconds.items():
            out[f"time_{name}_s"] = seconds
            out[f"peak_mem_{name}_mb"] = self.peak_mb.get(name)
        return out

    def metrics(self) -> dict[str, Optional[float]]:
        """:meth:`phases` and ``"time_total_s"``, the seconds of the outermost phases."""
        return {**self.phases(), "time_total_s": self.total_s}

    # ------------------------------------------------------------------------------------------- device
    def _sync(self) -> None:
        if self._cuda:
            try:
                torch.cuda.synchronize(self.device)
            except Exception:  # never fail a run over a measurement
                pass

    def _fold_peak(self) -> None:
        """Fold the peak since the last reset into every open phase (a phase whose reset failed stays None)."""
        current = self._read_peak()
        for frame in self._stack:
            if frame.peak is not None:
                frame.peak = None if current is None else max(frame.peak, current)

    def _reset_peak(self) -> Optional[float]:
        """Reset the peak counter; its value right after (MiB), or None when it cannot be reset."""
        if self._cuda:
            try:
                torch.cuda.reset_peak_memory_stats(self.device)
            except Exception:  # never fail a run over a measurement
                return None
            return self._read_peak()
        if self.device.type != "cpu":
            return None
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            return None
        return self._read_peak()

    def _read_peak(self) -> Optional[float]:
        """The peak since the last reset in MiB, or None when unknown."""
        if self._cuda:
            try:
                return torch.cuda.max_memory_allocated(self.device) / _MB
            except Exception:  # never fail a run over a measurement
                return None
        if self.device.type != "cpu":
            return None
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return float(line.split()[1]) * 1024 / _MB  # the value is in kB
        except (OSError, ValueError, IndexError):
            return None
        return None
