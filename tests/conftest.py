"""Session-wide test settings: no hub access (every model comes from files the tests write), the shared test support
package (tests/support: ``rewardkit`` tiny reward models, ``faulty_folders``) importable, the fixtures
``full_folder`` / ``read_only_folder`` (folders where writes really fail), and a report header naming the ComfyUI
runtime and front end the run uses (``COMFYUI_PATH``, else the default runtime of ``.runtime/``)."""

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
_SUPPORT = str(Path(__file__).resolve().parent / "support")
if _SUPPORT not in sys.path:
    sys.path.append(_SUPPORT)


def pytest_report_header(config):
    repo = Path(__file__).resolve().parents[1]
    if str(repo) not in sys.path:
        sys.path.append(str(repo))
    from flowgrpo import server

    try:
        root = server.locate_comfyui(repo)
    except server.ComfyUINotFound as e:
        return f"ComfyUI runtime: none ({e})"
    v = server.runtime_versions(root)
    return f"ComfyUI runtime: {v['comfyui']} at {root}; front end {v['frontend']}"


@pytest.fixture
def full_folder(tmp_path):
    """A folder on a file system too small for ``.too_big`` bytes (tests/support/faulty_folders.py)."""
    import faulty_folders

    with faulty_folders.full_folder(tmp_path / "full") as folder:
        yield folder


@pytest.fixture
def read_only_folder(tmp_path):
    """A read-only folder holding one file, ``keep.safetensors`` (tests/support/faulty_folders.py)."""
    import faulty_folders

    with faulty_folders.read_only_folder(tmp_path / "read_only", {"keep.safetensors": b"kept" * 64}) as folder:
        yield folder
