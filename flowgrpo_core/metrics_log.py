"""The metrics of a run on disk: one JSON line per iteration, and optionally TensorBoard event files.

``<folder>/metrics.jsonl``: one object per line, ``{"iteration": int, **metrics}``. Values are kept as they are
(numbers, strings, bools, lists, nested dicts); tensors and numpy values become numbers or lists, anything else its
``str()``. Non-finite floats (nan, +-inf) are written as ``null``, so every line is strict JSON.

Appends: each line is written with one ``write`` on a file opened with ``O_APPEND``, then flushed. With one writer
per run, a crash can at worst leave the last line cut short; readers (:func:`read_metrics`, :meth:`MetricsLog.resume`)
drop a malformed line with a warning instead of failing, and a new line never continues a cut one. No fsync per line:
a lost tail after a power failure is rewritten by the resumed run from its checkpoint.

``<folder>/tensorboard/`` (``tensorboard=True``): through ``torch.utils.tensorboard.SummaryWriter`` at
``step = iteration``, every numeric scalar as a scalar (nested dicts flattened to ``"a/b"``, bools and strings
skipped, nan kept) and every flat list of numbers as a histogram of its finite values (the per-sample
``advantages`` and ``rewards/<component>``).

Resume: :meth:`MetricsLog.resume` keeps the lines up to the checkpoint's iteration (an atomic rewrite) and opens
TensorBoard with ``purge_step = iteration + 1``, so TensorBoard drops the points a killed run wrote after the
checkpoint and a resumed run shows no duplicates.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from .checkpoint import atomic_write_bytes

__all__ = ["METRICS_FILE", "TENSORBOARD_DIR", "MetricsLog", "read_metrics", "jsonable"]

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"

_logger = logging.getLogger(__name__)
PathLike = Union[str, os.PathLike]


def jsonable(value: Any) -> Any:
    """``value`` as strict-JSON data: non-finite floats -> None, tensors / numpy values -> numbers or lists,
    tuples -> lists, mappings -> dicts with string keys, other objects -> ``str(value)``."""
    return _plain(value, strict=True)


def _plain(value: Any, strict: bool) -> Any:
    """Python data for ``value``; ``strict``: as :func:`jsonable`, else non-finite floats and objects stay."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return None if strict and not math.isfinite(value) else float(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v, strict) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, strict) for v in value]
    if hasattr(value, "tolist"):  # torch.Tensor, numpy arrays and scalars
        return _plain(value.tolist(), strict)
    return str(value) if strict else value


def _parse_lines(text: str, source: str) -> list[tuple[str, dict]]:
    """``(line, record)`` for each well-formed line of a metrics file; malformed ones are dropped with a warning."""
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or isinstance(record.get("iteration"), bool) or \
                    not isinstance(record.get("iteration"), int):
                raise ValueError("not an object with an integer 'iteration'")
        except ValueError as exc:
            _logger.warning("FlowGRPO metrics: dropping malformed line %d of %s (%s)", number, source, exc)
            continue
        out.append((line, record))
    return out


def read_metrics(path: PathLike) -> list[dict]:
    """The records of a ``metrics.jsonl`` file in file order ([] when it does not exist); malformed lines are
    dropped with a logged warning."""
    path = Path(path)
    if not path.is_file():
        return []
    return [record for _, record in _parse_lines(path.read_text(encoding="utf-8", errors="replace"), str(path))]


def _flatten(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, name + "/"))
        else:
            out[name] = value
    return out


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class MetricsLog:
    """Writer of ``folder/metrics.jsonl`` and, with ``tensorboard=True``, ``folder/tensorboard/`` (module doc).

    ImportError at construction when TensorBoard is asked for and not installed. Use as a context manager or call
    :meth:`close`. A fresh run that reuses a folder calls ``resume(0)`` to start from an empty log.
    """

    def __init__(self, folder: PathLike, tensorboard: bool = False) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / METRICS_FILE
        self.tensorboard = bool(tensorboard)
        self._writer = None
        self._purge_step: Optional[int] = None
        if self.tensorboard:
            _summary_writer_class()  # fail now, with the fix, rather than at the first iteration
        self._needs_newline = self._ends_without_newline()

    def _ends_without_newline(self) -> bool:
        try:
            with open(self.path, "rb") as f:
                f.seek(0, os.SEEK_END)
                if f.tell() == 0:
                    return False
                f.seek(-1, os.SEEK_END)
                return f.read(1) != b"\n"
        except FileNotFoundError:
            return False

    def log(self, iteration: int, metrics: Mapping[str, Any]) -> None:
        """Append ``{"iteration": iteration, **metrics}`` (``iteration`` wins over a key of that name in ``metrics``)
        and, with TensorBoard, its scalars and histograms at ``step = iteration``."""
        iteration = int(iteration)
        record = {"iteration": iteration, **{k: v for k, v in jsonable(dict(metrics)).items() if k != "iteration"}}
        data = json.dumps(record, allow_nan=False, separators=(",", ":")).encode("utf-8") + b"\n"
        if self._needs_newline:
            data = b"\n" + data
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        self._needs_newline = False
        if self.tensorboard:
            self._log_tensorboard(iteration, metrics)

    def _log_tensorboard(self, iteration: int, metrics: Mapping[str, Any]) -> None:
        if self._writer is None:
            self._writer = _summary_writer_class()(log_dir=str(self.folder / TENSORBOARD_DIR),
                                                   purge_step=self._purge_step)
        for name, value in _flatten(_plain(dict(metrics), strict=False)).items():
            if _is_number(value):
                self._writer.add_scalar(name, float(value), iteration)
            elif isinstance(value, list) and value and all(_is_number(v) for v in value):
                finite = [float(v) for v in value if math.isfinite(v)]
                if finite:
                    import numpy as np

                    self._writer.add_histogram(name, np.asarray(finite, dtype=np.float64), iteration)
        self._writer.flush()

    def resume(self, iteration: int) -> None:
        """Continue a run from its checkpoint at ``iteration``: atomically rewrite ``metrics.jsonl`` with only the
        lines whose iteration is ``<= iteration`` (malformed lines dropped with a warning), and have TensorBoard
        purge its points from ``iteration + 1`` on."""
        iteration = int(iteration)
        if self.path.is_file():
            text = self.path.read_text(encoding="utf-8", errors="replace")
            kept = [line for line, record in _parse_lines(text, str(self.path)) if record["iteration"] <= iteration]
            atomic_write_bytes(self.path, "".join(f"{line}\n" for line in kept).encode("utf-8"))
        self._needs_newline = False
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._purge_step = iteration + 1

    def close(self) -> None:
        """Flush and close the TensorBoard writer (the JSONL file is never held open)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> "MetricsLog":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _summary_writer_class():
    """``torch.utils.tensorboard.SummaryWriter``; ImportError naming the fix when TensorBoard is not installed."""
    try:
        import tensorboard  # noqa: F401
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise ImportError("TensorBoard logging needs the tensorboard package: pip install tensorboard "
                          f"(or turn tensorboard off) [{exc}]") from None
    return SummaryWriter
