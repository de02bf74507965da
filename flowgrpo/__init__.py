"""Headless tooling for the flowgrpo ComfyUI pack: run saved workflows against a ComfyUI server, convert and
validate workflow files, build the tiny demo models.

This package sits next to the pack in the repository but is not part of it: ComfyUI imports the pack from its path
(under a path-derived module name), while ``flowgrpo`` is imported by name from the repository root
(``python -m flowgrpo``). It never imports ComfyUI, except :mod:`flowgrpo.demo_models`, lazily, to write model files.

Modules: :mod:`.client` (HTTP/websocket client), :mod:`.server` (a server subprocess), :mod:`.workflow` (load,
UI -> API, validate, overrides; :mod:`.ui_export` API -> UI, :mod:`.schema` reads /object_info, :mod:`.errors`),
:mod:`.graph` (API prompts from Python), :mod:`.example_specs` (the example workflows), :mod:`.demo_models`
(tiny model files), :mod:`.report` (progress lines), :mod:`.cli` (``python -m flowgrpo``).
"""

__version__ = "0.1.0"
