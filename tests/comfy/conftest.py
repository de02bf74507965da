"""Fixtures for tests against a real ComfyUI runtime (in-process and a server subprocess).

ComfyUI is found through ``COMFYUI_PATH`` or ``.runtime/comfyui_path`` (written by ``scripts/bootstrap.sh``); when it is
missing the tests fail (they never skip) and say how to get it.

Both runtimes share one throw-away ComfyUI home (``--base-directory``): ``custom_nodes/`` holds only a link to this
checkout, so the pack under test is loaded exactly once and no other pack is; ``models/`` holds the tiny test models.

The server code, the client and the model-file writers live in the repository's ``flowgrpo`` tooling package
(``flowgrpo.server``, ``flowgrpo.client``, ``flowgrpo.demo_models``), shared with ``python -m flowgrpo``.
Fixtures: comfyui_root, comfy_home, comfy_runtime, comfy_nodes, flowgrpo_pack, run_node (and ``call_node``),
tiny_sd3_file, tiny_clip_file, demo_model_files, comfy_server, comfy_server_factory (servers with extra flags),
comfy_client.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:  # the `flowgrpo` tooling package; appended so ComfyUI's `nodes` is never shadowed
    sys.path.append(str(REPO_ROOT))

try:
    import torch
    import websocket  # noqa: F401  (websocket-client, used by client.py)
except ImportError as exc:  # not the pack's environment
    raise ImportError(f"{exc}: run the ComfyUI tests in the pack's venv, e.g. `bash scripts/test.sh` "
                      "or `.venv/bin/python -m pytest tests/comfy`") from exc

from client import ComfyClient  # tests/comfy/client.py (imported before ComfyUI puts comfy/ first on sys.path)
import runtime
import tiny_models
from flowgrpo import server as comfy_server_mod

PACK_LINK_NAME = "flowgrpo"
SERVER_START_TIMEOUT_S = comfy_server_mod.START_TIMEOUT_S
MODEL_FOLDERS = runtime.MODEL_FOLDERS
TINY_SD3_NAME = "flowgrpo_tiny_sd3.safetensors"
TINY_CLIP_NAME = "flowgrpo_tiny_clip_l.safetensors"


def locate_comfyui() -> Path:
    """The ComfyUI root (COMFYUI_PATH, else .runtime/comfyui_path); fails the test with instructions if absent."""
    try:
        return comfy_server_mod.locate_comfyui(REPO_ROOT)
    except comfy_server_mod.ComfyUINotFound as e:
        pytest.fail(f"{e} (`bash scripts/test.sh` bootstraps it)", pytrace=False)


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


@pytest.fixture(scope="session")
def demo_model_files(comfy_runtime) -> dict:
    """The demo's three model files (``flowgrpo.demo_models.build_demo_models``: tiny SD3, random CLIP-L, 16-channel
    TAESD) in ``comfy_home/models``: ``{"diffusion_model": name, "text_encoder": name, "vae": name}``; the CLIP-L
    copy (247 MB) is deleted at the end."""
    from flowgrpo.demo_models import DEMO_FILES, build_demo_models

    models = comfy_runtime.home / "models"
    names = build_demo_models(models)
    yield names
    folder, name = DEMO_FILES["text_encoder"]
    (models / folder / name).unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------ server
def start_comfy_server(comfyui_root: Path, home: Path, extra_args=(), log_name: str = "server.log"):
    """A ComfyUI server subprocess (CPU, 127.0.0.1, free port) on ``home`` (``flowgrpo.server.start_server``);
    fails the test with the log tail when it does not come up. Stop it with ``.stop()`` or ``with``."""
    try:
        return comfy_server_mod.start_server(home, comfyui_root=comfyui_root, extra_args=extra_args, cpu=True,
                                             log_path=home / log_name, timeout=SERVER_START_TIMEOUT_S)
    except comfy_server_mod.ServerStartError as e:
        pytest.fail(str(e), pytrace=False)


@pytest.fixture(scope="session")
def comfy_server(comfyui_root, comfy_home, tiny_sd3_file, tiny_clip_file):
    """A ComfyUI server subprocess (CPU, 127.0.0.1, free port) on ``comfy_home``; stopped at the end of the session.
    Attributes: url, home, output_dir, log_path, process, startup_s."""
    with start_comfy_server(comfyui_root, comfy_home) as server:
        yield server


@pytest.fixture(scope="session")
def comfy_server_factory(comfyui_root, comfy_home, tiny_sd3_file, tiny_clip_file):
    """``start(extra_args=(), name="variant")``: another server on ``comfy_home`` with extra ComfyUI flags (e.g.
    ``["--cache-none"]``), logging to ``server-<name>.log``; every server it started is stopped at the end of the
    session (or earlier with ``.stop()``)."""
    started = []

    def start(extra_args=(), name: str = "variant"):
        server = start_comfy_server(comfyui_root, comfy_home, extra_args, f"server-{name}.log")
        started.append(server)
        return server

    try:
        yield start
    finally:
        for server in started:
            server.stop()


@pytest.fixture()
def comfy_client(comfy_server):
    with ComfyClient(comfy_server.url) as c:
        yield c


def pytest_terminal_summary(terminalreporter):
    """The per-family results of test_every_flow_family, when it ran."""
    import model_families

    if model_families.REPORT:
        terminalreporter.section("flow-matching families on this ComfyUI")
        for line in model_families.REPORT:
            terminalreporter.write_line(line)
