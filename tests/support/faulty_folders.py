"""Folders where writes really fail, for the tests of failed saves: a full file system and a read-only folder.

As root (CI, the development machines) each is a small tmpfs mounted for the test: root writes through permission
bits, so only a mount makes a folder read-only or full for it. Elsewhere a folder is made read-only with its mode
bits, and "full" is a file-size limit of the process (``RLIMIT_FSIZE``: a write past it fails with EFBIG, like a
write to a full disk fails with ENOSPC). Neither can be had: the test fails and says why (it never skips).
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

#: the size of the "full" file system; a write of ``FULL_TOO_BIG`` bytes does not fit in it
FULL_SIZE = 256 * 1024
FULL_TOO_BIG = 4 * 1024 * 1024


@dataclass
class FullFolder:
    path: Path
    too_big: int  # bytes that cannot be written there


def _mount(*args: str) -> None:
    proc = subprocess.run(["mount", *args], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"`mount {' '.join(args)}` failed ({proc.stderr.strip()}): the failed-save tests need root "
                           "with mount rights, or a non-root user (then mode bits and a file-size limit are used)")


@contextlib.contextmanager
def _tmpfs(path: Path, size: int) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    _mount("-t", "tmpfs", "-o", f"size={size},mode=0777", "tmpfs", str(path))
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


@contextlib.contextmanager
def full_folder(path: Path) -> Iterator[FullFolder]:
    """``path`` (created) on a file system where ``too_big`` bytes do not fit; other writes there work."""
    if os.geteuid() == 0:
        with _tmpfs(path, FULL_SIZE):
            yield FullFolder(path, FULL_TOO_BIG)
        return
    path.mkdir(parents=True, exist_ok=True)
    previous_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (FULL_SIZE, hard))
    try:
        yield FullFolder(path, FULL_TOO_BIG)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous_handler)


@contextlib.contextmanager
def read_only_folder(path: Path, files: dict[str, bytes]) -> Iterator[Path]:
    """``path`` holding ``files`` (name -> bytes), then made read-only for this process."""
    if os.geteuid() == 0:
        with _tmpfs(path, FULL_TOO_BIG):
            for name, data in files.items():
                (path / name).write_bytes(data)
            _mount("-o", "remount,ro", str(path))
            yield path
        return
    path.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (path / name).write_bytes(data)
    path.chmod(0o555)
    try:
        yield path
    finally:
        path.chmod(0o755)


@contextlib.contextmanager
def filled_folder(path: Path) -> Iterator[Callable[[], None]]:
    """``path`` on a small tmpfs filled to the brim by a ballast file (nothing more fits); yields ``free()``, which
    deletes the ballast, as a user frees disk space. Needs root with mount rights (the test says so otherwise): a
    file-size limit cannot stand in here, as it would stop the run's other writes too."""
    with _tmpfs(path, FULL_TOO_BIG):
        ballast = path / "ballast"
        fd = os.open(ballast, os.O_WRONLY | os.O_CREAT)
        try:
            while True:
                os.write(fd, b"\0" * 4096)
        except OSError:
            pass
        finally:
            os.close(fd)
        yield lambda: ballast.unlink(missing_ok=True)
