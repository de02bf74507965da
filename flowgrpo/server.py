"""Start a throw-away ComfyUI server subprocess for headless runs and tests.

The server runs ``main.py`` of the ComfyUI found through ``COMFYUI_PATH`` (else ``<repo>/.runtime/comfyui_path``, written
by ``scripts/bootstrap.sh``), on 127.0.0.1 and a free port, with every folder inside one *home* directory (made by
:func:`make_home`): ``custom_nodes/flowgrpo`` is a link to this checkout, so the pack is loaded exactly once and no
other pack is; ``models/`` holds the model folders; ``output/``, ``input/``, ``user/``, ``temp/`` keep runs apart.

    with start_server(make_home(Path(".runtime/home"))) as server:
        ComfyClient(server.url).run(prompt)
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

__all__ = ["REPO_ROOT", "MODEL_FOLDERS", "ComfyUINotFound", "ServerStartError", "ComfyServer", "locate_comfyui",
           "runtime_versions", "make_home", "free_port", "default_cpu", "start_server"]

REPO_ROOT = Path(__file__).resolve().parents[1]

#: model folder name (``folder_paths``) -> sub-folder of ``<home>/models``
MODEL_FOLDERS = {"diffusion_models": "diffusion_models", "text_encoders": "text_encoders", "loras": "loras",
                 "vae": "vae", "reward_models": "reward_models", "reward_scripts": "reward_scripts"}

START_TIMEOUT_S = 120.0

_HOW_TO_GET = ("Run `bash scripts/bootstrap.sh` (it installs ComfyUI 0.3.75 into .runtime/ and records its path), "
               "or set COMFYUI_PATH to a ComfyUI checkout.")


class ComfyUINotFound(RuntimeError):
    """No ComfyUI installation could be located."""


class ServerStartError(RuntimeError):
    """The ComfyUI server exited or did not answer during startup (the message ends with its log tail)."""


def locate_comfyui(repo_root: Path = REPO_ROOT) -> Path:
    """The ComfyUI root: ``COMFYUI_PATH``, else the path recorded in ``<repo_root>/.runtime/comfyui_path``."""
    env = os.environ.get("COMFYUI_PATH")
    if env:
        source, candidate = "COMFYUI_PATH", env
    else:
        record = repo_root / ".runtime" / "comfyui_path"
        if not record.is_file():
            raise ComfyUINotFound(f"ComfyUI not found: no COMFYUI_PATH and no {record}. {_HOW_TO_GET}")
        source, candidate = str(record), record.read_text().strip()
    root = Path(candidate).expanduser().resolve()
    if not (root / "main.py").is_file() or not (root / "comfy").is_dir():
        raise ComfyUINotFound(f"ComfyUI not found: {source} points at {root}, which has no main.py and comfy/. "
                              f"{_HOW_TO_GET}")
    return root


def runtime_versions(root: Path) -> dict[str, str]:
    """``{"comfyui": ..., "frontend": ...}``: the version of the ComfyUI tree at ``root`` (its
    ``comfyui_version.py``) and of the front-end package installed in this environment ("unknown" where absent).
    Reads files and package metadata only; imports nothing of ComfyUI."""
    try:
        text = (Path(root) / "comfyui_version.py").read_text()
    except OSError:
        text = ""
    found = re.search(r"""^__version__\s*=\s*["']([^"']+)["']""", text, re.MULTILINE)
    try:
        frontend = importlib.metadata.version("comfyui-frontend-package")
    except importlib.metadata.PackageNotFoundError:
        frontend = "unknown"
    return {"comfyui": found.group(1) if found else "unknown", "frontend": frontend}


def make_home(home: Path, pack_root: Path = REPO_ROOT, link_name: str = "flowgrpo") -> Path:
    """Create a ComfyUI base directory: ``custom_nodes/<link_name> -> pack_root``, the model folders of
    :data:`MODEL_FOLDERS` and ``output/ input/ user/ temp/``. Idempotent; returns ``home``."""
    home = Path(home)
    for sub in ("output", "input", "user", "temp", "custom_nodes", *(f"models/{d}" for d in MODEL_FOLDERS.values())):
        (home / sub).mkdir(parents=True, exist_ok=True)
    link = home / "custom_nodes" / link_name
    if link.is_symlink() and link.resolve() != Path(pack_root).resolve():
        link.unlink()  # a stale link (e.g. the checkout moved)
    if not link.exists():
        link.symlink_to(Path(pack_root).resolve(), target_is_directory=True)
    return home


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_cpu() -> bool:
    """True when this machine has no CUDA or MPS device torch can use (the server then gets ``--cpu``)."""
    try:
        import torch
    except ImportError:
        return True
    mps = getattr(torch.backends, "mps", None)
    return not (torch.cuda.is_available() or (mps is not None and mps.is_available()))


def _log_tail(path: Path, chars: int = 6000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "<no log>"


@dataclass
class ComfyServer:
    """A running server subprocess; a context manager that stops it on exit."""

    url: str
    home: Path
    output_dir: Path
    log_path: Path
    process: subprocess.Popen
    startup_s: float
    command: list = field(default_factory=list)

    def log_tail(self, chars: int = 6000) -> str:
        return _log_tail(self.log_path, chars)

    def stop(self, timeout: float = 15.0) -> None:
        """Terminate the server (SIGTERM, then SIGKILL after ``timeout`` seconds) and wait for it."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=timeout)

    def __enter__(self) -> "ComfyServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/system_stats", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


def start_server(home: Path, *, comfyui_root: Optional[Path] = None, extra_args: Iterable[str] = (),
                 cpu: Optional[bool] = None, port: Optional[int] = None, log_path: Optional[Path] = None,
                 timeout: float = START_TIMEOUT_S, python: Optional[str] = None) -> ComfyServer:
    """Start ``main.py`` on ``home`` (see :func:`make_home`) and wait until ``/system_stats`` answers.

    ``cpu``: pass ``--cpu`` (default: when :func:`default_cpu`). ``extra_args``: more ComfyUI flags, e.g.
    ``["--cache-none"]``. ``python``: the interpreter (default: this one). The log goes to ``log_path`` (default ``<home>/server.log``). The server runs in its own
    session, so a Ctrl-C meant for the caller does not kill it; stop it with :meth:`ComfyServer.stop` or ``with``.
    Raises :class:`ComfyUINotFound` or :class:`ServerStartError` (with the log tail).
    """
    home = Path(home).resolve()
    root = Path(comfyui_root) if comfyui_root else locate_comfyui()
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = Path(log_path) if log_path else home / "server.log"
    cmd = [python or sys.executable, "main.py", "--listen", "127.0.0.1", "--port", str(port), "--disable-auto-launch",
           "--disable-api-nodes", "--preview-method", "none", "--database-url", "sqlite:///:memory:",
           "--base-directory", str(home), "--output-directory", str(home / "output"),
           "--input-directory", str(home / "input"), "--user-directory", str(home / "user"),
           "--temp-directory", str(home / "temp")]
    if default_cpu() if cpu is None else cpu:
        cmd.append("--cpu")
    cmd += list(extra_args)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    started = time.monotonic()
    with open(log_path, "w") as log:  # the child keeps its own descriptor
        proc = subprocess.Popen(cmd, cwd=str(root), stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    server = ComfyServer(url=url, home=home, output_dir=home / "output", log_path=log_path, process=proc,
                         startup_s=0.0, command=cmd)
    try:
        while not _ready(url):
            if proc.poll() is not None:
                raise ServerStartError(f"ComfyUI server exited with code {proc.returncode} during startup "
                                       f"(log {log_path}):\n{_log_tail(log_path)}")
            if time.monotonic() - started > timeout:
                raise ServerStartError(f"ComfyUI server not ready after {timeout:.0f} s (log {log_path}):\n"
                                       f"{_log_tail(log_path)}")
            time.sleep(0.25)
    except BaseException:
        server.stop()
        raise
    server.startup_s = time.monotonic() - started
    return server
