"""Bring a real ComfyUI into this process (plain functions, shared by the test fixtures and benchmarks/).

Call :func:`setup_inprocess` before anything imports ``comfy.model_management``, then :func:`init_nodes`.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

_REPO_ROOT = str(Path(__file__).resolve().parents[2])
if _REPO_ROOT not in sys.path:  # the `flowgrpo` tooling package; appended so ComfyUI's `nodes` is never shadowed
    sys.path.append(_REPO_ROOT)

from flowgrpo.server import MODEL_FOLDERS, make_home  # noqa: E402,F401  (make_home: re-exported)


def setup_inprocess(comfyui_root: Path, comfy_home: Path, cpu: bool = True):
    """ComfyUI importable in this process, on CPU (``cpu=False``: ComfyUI's own device choice, for the GPU
    benchmarks), with its folders pointed at ``comfy_home``; returns folder_paths."""
    root = str(comfyui_root)
    if root not in sys.path:
        sys.path.insert(0, root)
    import comfy.cli_args  # imported as a library, ComfyUI does not parse argv: args hold the defaults

    args = comfy.cli_args.args
    if "comfy.model_management" not in sys.modules:  # it reads args.cpu once, at import
        args.cpu = cpu
    args.disable_api_nodes = True
    args.base_directory = str(comfy_home)
    # main.py imports ComfyUI's `utils` package first; nodes.py later puts comfy/ at sys.path[0], after which a bare
    # `import utils` finds comfy/utils.py and `server` (imported by comfy_extras/nodes_images.py) fails.
    import utils.extra_config  # noqa: F401
    import folder_paths

    # Point every folder at the home even if folder_paths was imported before base_directory was set.
    folder_paths.set_output_directory(str(comfy_home / "output"))
    folder_paths.set_input_directory(str(comfy_home / "input"))
    folder_paths.set_temp_directory(str(comfy_home / "temp"))
    folder_paths.set_user_directory(str(comfy_home / "user"))
    folder_paths.folder_names_and_paths["custom_nodes"] = ([str(comfy_home / "custom_nodes")], set())
    for name, sub in MODEL_FOLDERS.items():
        folder_paths.add_model_folder_path(name, str(comfy_home / "models" / sub), is_default=True)
    return folder_paths


def init_nodes() -> dict:
    """Load ComfyUI's extra nodes and the custom nodes of the home; returns ``nodes.NODE_CLASS_MAPPINGS``."""
    import nodes

    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
    return nodes.NODE_CLASS_MAPPINGS
