"""Session-wide test settings: no hub access (every model comes from files the tests write), the shared test support
package (tests/support/rewardkit: tiny reward models) importable as ``rewardkit``, and a report header naming the
ComfyUI runtime and front end the run uses (``COMFYUI_PATH``, else the default runtime of ``.runtime/``)."""

import os
import sys
from pathlib import Path

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
