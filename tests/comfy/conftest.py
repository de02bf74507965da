"""Fixtures for tests against a real ComfyUI runtime (in-process and a server subprocess).

ComfyUI is found through ``COMFYUI_PATH`` or ``.runtime/comfyui_path`` (written by ``scripts/bootstrap.sh``); when it is
missing the tests fail (they never skip) and say how to get it.

Both runtimes share one throw-away ComfyUI home (``--base-directory``): ``custom_nodes/`` holds only a link to this
checkout, so the pack under test is loaded exactly once and no other pack is; ``models/`` holds the tiny test models.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

try:
    import torch
    import websocket  # noqa: F401  (websocket-client, used by client.py)
except ImportError as exc:  # not the pack's environment
    raise ImportError(f"{exc}: run the ComfyUI tests in the pack's venv, e.g. `bash scripts/test.sh` "
                      "or `.venv/bin/python -m pytest tests/comfy`") from exc

from client import ComfyClient  # tests/comfy/client.py (imported before ComfyUI puts comfy/ first on sys.path)
import runtime
import tiny_models

REPO_ROOT = Path(__file__).resolve().parents[2]
PACK_LINK_NAME = "flowgrpo"
SERVER_START_TIMEOUT_S = 120.0
MODEL_FOLDERS = runtime.MODEL_FOLDERS
TINY_SD3_NAME = "flowgrpo_tiny_sd3.safetensors"
TINY_CLIP_NAME = "flowgrpo_tiny_clip_l.safetensors"

_MISSING = ("ComfyUI runtime not found ({why}). Run `bash scripts/test.sh` (it bootstraps ComfyUI 0.3.75 into "
            ".runtime/ via scripts/bootstrap.sh), or set COMFYUI_PATH to a ComfyUI checkout.")


def locate_comfyui() -> Path:
    """The ComfyUI root (COMFYUI_PATH, else .runtime/comfyui_path); fails the test with instructions if absent."""
    env = os.environ.get("COMFYUI_PATH")
    if env:
        source, candidate = "COMFYUI_PATH", env
    else:
        record = REPO_ROOT / ".runtime" / "comfyui_path"
        if not record.is_file():
            pytest.fail(_MISSING.format(why=f"no COMFYUI_PATH and no {record}"), pytrace=False)
        source, candidate = str(record), record.read_text().strip()
    root = Path(candidate).expanduser().resolve()
    if not (root / "main.py").is_file() or not (root / "comfy").is_dir():
        pytest.fail(_MISSING.format(why=f"{source} points at {root}, which has no main.py and comfy/"), pytrace=False)
    return root


@pytest.fixture(scope="session")
def comfyui_root() -> Path:
    return locate_comfyui()


@pytest.fixture(scope="session")
def comfy_home(tmp_path_factory) -> Path:
    """A ComfyUI base directory: custom_nodes/flowgrpo -> this checkout, empty model folders, output/input/..."""
    return runtime.make_home(tmp_path_factory.mktemp("comfy_home"), REPO_ROOT, PACK_LINK_NAME)


# ------------------------------------------------------------------------------------------ in-process runtime
@pytest.fixture(scope="session")
def comfy_runtime(comfyui_root, comfy_home) -> SimpleNamespace:
    """ComfyUI importable in this process, on CPU, with its folders pointed at ``comfy_home``."""
    folder_paths = runtime.setup_inprocess(comfyui_root, comfy_home)
    return SimpleNamespace(root=comfyui_root, home=comfy_home, folder_paths=folder_paths)


@pytest.fixture(scope="session")
def comfy_nodes(comfy_runtime) -> dict:
    """``nodes.NODE_CLASS_MAPPINGS`` after ComfyUI's own extra nodes and the pack (from ``comfy_home``) loaded."""
    return runtime.init_nodes()


@pytest.fixture(scope="session")
def flowgrpo_pack(comfy_nodes) -> SimpleNamespace:
    """The pack's modules exactly as ComfyUI loaded them (the pack has no importable top-level name)."""
    sampler_cls = comfy_nodes.get("FlowGRPOSDESampler")
    if sampler_cls is None:
        pytest.fail("ComfyUI did not register the flowgrpo pack; see the import traceback in the log above")
    package = sampler_cls.__module__.rsplit(".nodes.", 1)[0]
    return SimpleNamespace(
        package=package,
        sampler_nodes=sys.modules[f"{package}.nodes.sampler_nodes"],
        model_adapter=sys.modules[f"{package}.nodes.model_adapter"],
        package_module=sys.modules[f"{package}.nodes"],
    )


def call_node(node_cls, **inputs) -> tuple:
    """Run one node the way ComfyUI's executor does (V3 class clone or V1 instance) under inference mode."""
    with torch.inference_mode():
        if hasattr(node_cls, "PREPARE_CLASS_CLONE"):  # V3 io.ComfyNode
            out = node_cls.PREPARE_CLASS_CLONE({}).execute(**inputs)
            if asyncio.iscoroutine(out):
                out = asyncio.run(out)
            return tuple(out.args)
        out = getattr(node_cls(), node_cls.FUNCTION)(**inputs)
        if asyncio.iscoroutine(out):
            out = asyncio.run(out)
        return tuple(out["result"]) if isinstance(out, dict) else tuple(out)


@pytest.fixture(scope="session")
def run_node(comfy_nodes):
    """``run_node("NodeName", **inputs) -> tuple of outputs``."""
    def run(name: str, **inputs) -> tuple:
        return call_node(comfy_nodes[name], **inputs)
    return run


# ------------------------------------------------------------------------------------------ model files
@pytest.fixture(scope="session")
def tiny_sd3_file(comfy_runtime) -> str:
    """Name (for UNETLoader) of the tiny SD3 file in models/diffusion_models."""
    tiny_models.write_sd3_file(comfy_runtime.home / "models" / "diffusion_models" / TINY_SD3_NAME, seed=0)
    return TINY_SD3_NAME


@pytest.fixture(scope="session")
def tiny_clip_file(comfy_runtime) -> str:
    """Name (for CLIPLoader, type sd3) of the random CLIP-L in models/text_encoders; deleted at the end (247 MB)."""
    path = tiny_models.write_clip_l_file(comfy_runtime.home / "models" / "text_encoders" / TINY_CLIP_NAME, seed=0)
    yield TINY_CLIP_NAME
    path.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------ server
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _log_tail(path: Path, chars: int = 6000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "<no log>"


@pytest.fixture(scope="session")
def comfy_server(comfyui_root, comfy_home, tiny_sd3_file, tiny_clip_file):
    """A ComfyUI server subprocess (CPU, 127.0.0.1, free port) on ``comfy_home``; killed at the end of the session."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = comfy_home / "server.log"
    cmd = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
           "--disable-auto-launch", "--disable-api-nodes", "--preview-method", "none",
           "--base-directory", str(comfy_home), "--output-directory", str(comfy_home / "output"),
           "--input-directory", str(comfy_home / "input"), "--user-directory", str(comfy_home / "user"),
           "--temp-directory", str(comfy_home / "temp"), "--database-url", "sqlite:///:memory:"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, cwd=str(comfyui_root), stdout=log, stderr=subprocess.STDOUT, env=env)
    started = time.monotonic()
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ComfyUI server exited with code {proc.returncode} during startup:\n{_log_tail(log_path)}",
                            pytrace=False)
            if time.monotonic() - started > SERVER_START_TIMEOUT_S:
                pytest.fail(f"ComfyUI server not ready after {SERVER_START_TIMEOUT_S:.0f} s:\n{_log_tail(log_path)}",
                            pytrace=False)
            try:
                with urllib.request.urlopen(url + "/system_stats", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                time.sleep(0.25)
        yield SimpleNamespace(url=url, home=comfy_home, output_dir=comfy_home / "output", log_path=log_path,
                              process=proc, startup_s=time.monotonic() - started)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)
        log.close()


@pytest.fixture()
def comfy_client(comfy_server):
    c = ComfyClient(comfy_server.url)
    try:
        yield c
    finally:
        c.close()
