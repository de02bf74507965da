"""Training presets in the graph: the ``FlowGRPO Training Preset`` node and :func:`apply_preset` for the nodes that
take a preset.

Presets come from :mod:`flowgrpo_core.presets`: the built-ins (``flowgrpo_core/preset_files``) and the user's JSON
files in ``models/flowgrpo_presets`` (the ``flowgrpo_presets`` folder of ``folder_paths``, so
``extra_model_paths.yaml`` can add more), listed as ``user/<file stem>`` so a user file never shadows a built-in.
The node resolves a preset with its overrides into a :class:`ResolvedPreset`; a node with a ``preset`` input
(:func:`preset_input`) calls :func:`apply_preset` on its keyword arguments, so every preset field the node has
replaces the widget value and the other widgets stay as they are.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Iterable, Mapping, Optional

from comfy_api.latest import io

from ..flowgrpo_core.presets import Preset, PresetError, builtin_presets, load_preset_file, resolve
from .state import node_error

__all__ = ["PRESET", "USER_FOLDER", "USER_PREFIX", "ResolvedPreset", "register_folder", "user_preset_files",
           "preset_options", "load_preset", "resolve_preset", "preset_document", "apply_preset", "preset_input",
           "FlowGRPOPreset", "NODES"]

log = logging.getLogger("flowgrpo")

NODE = "FlowGRPO Training Preset"
PRESET = "FLOWGRPO_PRESET"
USER_FOLDER = "flowgrpo_presets"
USER_PREFIX = "user/"
DEFAULT_PRESET = "sd35_medium_flowgrpo"
FAMILY_NAMES = {"sd3": "SD3", "flux": "FLUX", "flux2": "FLUX.2", "qwen_image": "Qwen-Image / Qwen-Image-Edit",
                "z_image": "Z-Image", "wan22_t2v": "Wan 2.2 TI2V-5B"}

OVERRIDES_TOOLTIP = (
    "Changes to the preset, one 'field = value' per line or several separated by commas; '#' starts a comment. "
    "Numbers like 3e-4, booleans true/false, strings bare or in quotes (\"a, b\" keeps its comma). Fields are the "
    "FlowGRPO GRPO Train inputs (steps, group_size, learning_rate, ...). Example:\n"
    "group_size = 8, prompts_per_iteration = 4\nlearning_rate = 1e-4  # slower\nnegative_prompt = \"blurry, lowres\""
)


@dataclass(frozen=True)
class ResolvedPreset:
    """A preset with its overrides applied: ``values`` (read-only) maps FlowGRPO GRPO Train input names to values."""

    name: str
    family: str
    values: Mapping[str, Any]

    def __post_init__(self) -> None:
        object.__setattr__(self, "values", MappingProxyType(dict(self.values)))


def register_folder() -> None:
    """Adds ``models/flowgrpo_presets`` to ``folder_paths`` (idempotent)."""
    import folder_paths

    if USER_FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.add_model_folder_path(USER_FOLDER, os.path.join(folder_paths.models_dir, USER_FOLDER))


def user_preset_files() -> dict[str, Path]:
    """``{"user/<stem>": path}`` for every ``*.json`` in the preset folders (sub-folders give ``user/<dir>/<stem>``);
    the first folder wins when two hold the same name."""
    import folder_paths

    register_folder()
    found: dict[str, Path] = {}
    for folder in folder_paths.get_folder_paths(USER_FOLDER):
        root = Path(folder)
        if not root.is_dir():
            continue
        for path in sorted(root.rglob("*.json")):
            if path.is_file():
                found.setdefault(USER_PREFIX + path.relative_to(root).with_suffix("").as_posix(), path)
    return found


def preset_options() -> list[str]:
    """The combo of the preset node: the built-ins, then the user presets."""
    return [*builtin_presets(), *user_preset_files()]


def load_preset(name: str, node: str = NODE) -> Preset:
    """The built-in or user preset ``name``; a node error when it is unknown or its file is invalid."""
    if name in builtin_presets():
        return builtin_presets()[name]
    path = user_preset_files().get(name)
    if path is None:
        raise node_error(node, f"there is no preset {name!r}",
                         f"pick one of {', '.join(preset_options())}, or put {name.removeprefix(USER_PREFIX)}.json "
                         f"into models/{USER_FOLDER}")
    try:
        return load_preset_file(path, name=name)
    except PresetError as e:
        raise node_error(node, f"the preset file is invalid: {e.problem}", e.fix) from None


def resolve_preset(name: str, overrides: str = "", node: str = NODE) -> tuple[Preset, ResolvedPreset]:
    """The preset ``name`` and its values with ``overrides`` applied; a node error naming the field and the fix."""
    preset = load_preset(name, node=node)
    try:
        values = resolve(preset, overrides)
    except PresetError as e:
        raise node_error(node, e.problem, e.fix) from None
    return preset, ResolvedPreset(name=preset.name, family=preset.family, values=values)


def preset_document(preset: Preset, resolved: ResolvedPreset) -> str:
    """The resolved preset as pretty JSON in the preset-file format (save it into models/flowgrpo_presets to reuse
    it)."""
    changed = sorted(k for k, v in resolved.values.items() if preset.values.get(k, object()) != v)
    description = preset.description + (f" Overridden: {', '.join(changed)}." if changed else "")
    doc = {"title": preset.title, "family": preset.family, "description": description.strip(),
           "source": preset.source, "values": dict(resolved.values)}
    return json.dumps(doc, indent=2, ensure_ascii=False)


def apply_preset(preset: Optional[ResolvedPreset], inputs: dict, node: str, family: Optional[str] = None,
                 names: Optional[Iterable[str]] = None) -> dict:
    """A copy of ``inputs`` (a node's keyword arguments) where every preset field that is one of the node's inputs
    takes the preset's value; fields the node does not have are ignored. ``names``: the node's input names (default:
    the keys of ``inputs``; pass them so that optional inputs a saved workflow leaves out are set too). With
    ``family`` (the MODEL's, e.g. from ``lora_targets.model_family``) a preset for another family is a node error."""
    out = dict(inputs)
    if preset is None:
        return out
    if family is not None and family != preset.family:
        same = [n for n, p in builtin_presets().items() if p.family == family]
        raise node_error(node, f"preset {preset.name!r} is for {FAMILY_NAMES.get(preset.family, preset.family)} "
                               f"models but this MODEL is {FAMILY_NAMES.get(family, family)}",
                         f"pick a preset for {FAMILY_NAMES.get(family, family)} ({', '.join(same) or 'a user preset'})"
                         " or disconnect the preset input")
    known = set(out) if names is None else set(names) | set(out)
    applied = [k for k in preset.values if k in known]
    out.update({k: preset.values[k] for k in applied})
    if applied:
        log.info("FlowGRPO %s: preset %s sets %s", node, preset.name, ", ".join(applied))
    return out


def preset_input() -> io.Input:
    """The optional ``preset`` input every node that takes a preset declares."""
    return io.Custom(PRESET).Input(
        "preset", optional=True,
        tooltip="A FlowGRPO Training Preset: each of its fields that this node has replaces the widget of the same "
                "name (the widgets it does not set keep their values).")


class FlowGRPOPreset(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        options = preset_options()
        return io.Schema(
            node_id="FlowGRPOPreset",
            display_name=NODE,
            category="FlowGRPO/training",
            description="Reference training settings per model (Flow-GRPO, Flow-GRPO-Fast, MixGRPO, DanceGRPO) "
                        "with field-by-field overrides. Connect it to the preset input of FlowGRPO GRPO Train: the "
                        "preset's fields replace the node's widgets.",
            inputs=[
                io.Combo.Input("preset", options=options,
                               default=DEFAULT_PRESET if DEFAULT_PRESET in options else options[0],
                               tooltip="Built-in presets by model and method (see docs/presets.md), then your own "
                                       f"JSON presets from models/{USER_FOLDER} as user/<name>."),
                io.String.Input("overrides", multiline=True, default="", tooltip=OVERRIDES_TOOLTIP),
            ],
            outputs=[
                io.Custom(PRESET).Output(display_name="preset",
                                         tooltip="The preset with the overrides applied (connect to the preset "
                                                 "input of FlowGRPO GRPO Train)."),
                io.String.Output(display_name="values",
                                 tooltip="The resolved preset as JSON in the preset-file format (save it into "
                                         f"models/{USER_FOLDER} to reuse it)."),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, preset: str = "", overrides: str = "", **kwargs) -> Any:
        """Re-run when a user preset file changes (the widgets are part of ComfyUI's cache key)."""
        path = user_preset_files().get(preset) if isinstance(preset, str) else None
        if path is None:
            return ""
        try:
            return hashlib.sha256(path.read_bytes()).hexdigest()
        except OSError:
            return math.nan  # execute reports the problem

    @classmethod
    def execute(cls, preset: str, overrides: str = "") -> io.NodeOutput:
        loaded, resolved = resolve_preset(preset, overrides)
        return io.NodeOutput(resolved, preset_document(loaded, resolved))


NODES = [FlowGRPOPreset]
