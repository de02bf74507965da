"""Files the user names relative to ComfyUI's input folder (a prompt file, an edit image), resolved safely."""

from __future__ import annotations

import os

from .state import node_error

__all__ = ["input_path"]


def input_path(name: str, node: str, what: str, missing_fix: str) -> str:
    """The real path of ``name`` inside ComfyUI's input folder. ``what`` names it in the messages (``"prompt_file
    'x.txt'"``); node errors for an absolute path, a path that resolves outside the folder (``..``, symlinks) and a
    missing file (fixed by ``missing_fix``)."""
    import folder_paths

    input_dir = os.path.realpath(folder_paths.get_input_directory())
    if os.path.isabs(name) or os.path.splitdrive(name)[0] or name.startswith(("/", "\\")):
        raise node_error(node, f"{what} is an absolute path; it must be relative to ComfyUI's input folder "
                               f"({input_dir})", "copy the file into the input folder and give its name")
    path = os.path.realpath(os.path.join(input_dir, name))
    if os.path.commonpath([path, input_dir]) != input_dir:
        raise node_error(node, f"{what} points outside ComfyUI's input folder ({input_dir})",
                         "put the file inside the input folder and give its path relative to it, without '..'")
    if not os.path.isfile(path):
        raise node_error(node, f"{what} was not found in ComfyUI's input folder ({input_dir})", missing_fix)
    return path
