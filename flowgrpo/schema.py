"""Reading node schemas from ComfyUI's ``/object_info`` (one entry per node class).

An entry looks like ``{"input": {"required": {name: spec}, "optional": {...}, "hidden": {...}}, "input_order": {...},
"output": [types], "output_name": [...], "display_name": ..., "output_node": bool, "python_module": ...}``, and an
input ``spec`` is ``[TYPE, {options}]`` where ``TYPE`` is a type name (``"INT"``, ``"MODEL"``, ``"COMBO"`` with
``options["options"]``, ``"A,B"`` for either, ``"*"`` for any) or, for a V1 combo, the list of choices itself.

The functions here also encode how the ComfyUI frontend (1.32) lays out a node's widgets, which is what the
positional ``widgets_values`` of a UI-format workflow follow:

* a widget for every required, then every optional input whose type is INT, FLOAT, STRING, BOOLEAN or a combo and
  that is not ``forceInput``, in ``input_order``;
* an INT with ``control_after_generate`` (or, when the flag is absent, an INT named ``seed`` / ``noise_seed``) is
  followed by its "control after generate" value (``"fixed"``, ``"randomize"``, ...); a combo with
  ``control_after_generate`` by that value and a filter string;
* a node with a media-upload combo (``image_upload``/``video_upload``/``animated_image_upload``, or ``audio_upload``
  on its ``audio`` input) gets an "upload" button widget after its required inputs;
* a V3 dynamic combo (``COMFY_DYNAMICCOMBO_V3``, ComfyUI 0.33) is a combo of its options' keys, followed by the widgets
  of the selected option (:mod:`flowgrpo.dynamic_inputs`).
"""

from __future__ import annotations

from typing import Any, Optional

__all__ = ["WIDGET_TYPES", "DYNAMIC_COMBO", "CONTROL_VALUES", "SEED_NAMES", "input_specs", "spec_type",
           "spec_options", "combo_options", "is_widget", "control_slots", "widget_entries", "widget_layout",
           "output_types", "display_name", "types_match", "default_value"]

DYNAMIC_COMBO = "COMFY_DYNAMICCOMBO_V3"
WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO", DYNAMIC_COMBO})
CONTROL_VALUES = frozenset({"fixed", "increment", "decrement", "randomize", "increment-wrap"})
SEED_NAMES = frozenset({"seed", "noise_seed"})
_MEDIA_UPLOAD_FLAGS = ("image_upload", "video_upload", "animated_image_upload")


def input_specs(info: dict, sections: tuple = ("required", "optional")) -> list[tuple[str, Any, str]]:
    """``[(name, spec, section)]`` of a node's inputs: required first, then optional, each in ``input_order``."""
    inputs = info.get("input") or {}
    order = info.get("input_order") or {}
    out = []
    for section in sections:
        specs = inputs.get(section) or {}
        listed = [n for n in (order.get(section) or []) if n in specs]
        out += [(n, specs[n], section) for n in listed + [n for n in specs if n not in listed]]
    return out


def spec_type(spec: Any) -> str:
    """The input's type name; ``"COMBO"`` for a V1 combo (a list of choices)."""
    t = spec[0] if isinstance(spec, (list, tuple)) and spec else spec
    return "COMBO" if isinstance(t, (list, tuple)) else str(t)


def spec_options(spec: Any) -> dict:
    if isinstance(spec, (list, tuple)) and len(spec) > 1 and isinstance(spec[1], dict):
        return spec[1]
    return {}


def combo_options(spec: Any) -> Optional[list]:
    """The choices of a combo input (V1 list, V3 ``COMBO`` with ``options``, or the option keys of a dynamic combo);
    None for other inputs."""
    t = spec[0] if isinstance(spec, (list, tuple)) and spec else None
    if isinstance(t, (list, tuple)):
        return list(t)
    if t == "COMBO":
        return list(spec_options(spec).get("options") or [])
    if t == DYNAMIC_COMBO:
        return [option.get("key") for option in spec_options(spec).get("options") or []]
    return None


def is_widget(spec: Any) -> bool:
    """Whether the frontend shows this input as a widget (and keeps a ``widgets_values`` slot for it): a widget type
    that is not forced to a socket, or a ``socketless`` input (ComfyUI 0.33: a widget of its own type, e.g. COLOR)."""
    opts = spec_options(spec)
    if opts.get("forceInput") or opts.get("defaultInput"):
        return False
    return spec_type(spec) in WIDGET_TYPES or bool(opts.get("socketless"))


def control_slots(name: str, spec: Any) -> int:
    """How many UI-only values follow this widget in ``widgets_values`` (control after generate, filter list)."""
    t, flag = spec_type(spec), spec_options(spec).get("control_after_generate")
    if t == "INT":
        return 1 if (flag if flag is not None else name in SEED_NAMES) else 0
    if t == "COMBO" and flag:
        return 2
    return 0


def _has_media_upload(info: dict) -> bool:
    required = (info.get("input") or {}).get("required") or {}
    for name, spec in required.items():
        opts = spec_options(spec)
        if spec_type(spec) == "COMBO" and any(opts.get(f) for f in _MEDIA_UPLOAD_FLAGS):
            return True
        if name == "audio" and opts.get("audio_upload"):
            return True
    return False


def widget_entries(name: str, spec: Any) -> list[tuple[Optional[str], Any]]:
    """The ``widgets_values`` entries of one widget input: itself, then its UI-only slots (see widget_layout)."""
    return [(name, spec)] + [(None, "fixed"), (None, "")][:control_slots(name, spec)]


def widget_layout(info: dict) -> list[tuple[Optional[str], Any]]:
    """The node's ``widgets_values`` layout: ``(input name, spec)`` for a real widget, ``(None, ui_value)`` for a
    UI-only slot (``ui_value`` is what :func:`api_to_ui` writes there: ``"fixed"``, ``""`` or ``"image"``)."""
    layout: list[tuple[Optional[str], Any]] = []
    specs = input_specs(info)
    n_required = sum(1 for _, _, section in specs if section == "required")
    for i, (name, spec, _section) in enumerate(specs):
        if i == n_required and _has_media_upload(info):
            layout.append((None, "image"))
        if is_widget(spec):
            layout += widget_entries(name, spec)
    if n_required == len(specs) and _has_media_upload(info):
        layout.append((None, "image"))
    return layout


def output_types(info: dict) -> list[str]:
    return ["COMBO" if isinstance(t, (list, tuple)) else str(t) for t in info.get("output") or []]


def display_name(info: dict, class_type: str) -> str:
    return info.get("display_name") or class_type


def types_match(output_type: str, input_type: str) -> bool:
    """Whether an output of ``output_type`` may feed an input of ``input_type`` (``*`` matches anything;
    ``"A,B"`` matches either)."""
    if output_type == input_type or "*" in (output_type, input_type):
        return True
    outs = {t.strip() for t in str(output_type).split(",")}
    ins = {t.strip() for t in str(input_type).split(",")}
    return bool(outs & ins) or "*" in outs or "*" in ins


def default_value(spec: Any) -> Any:
    """The value the frontend gives a fresh widget: the declared default, else the first choice / 0 / "" / False."""
    opts = spec_options(spec)
    if "default" in opts:
        return opts["default"]
    choices = combo_options(spec)
    if choices is not None:
        return choices[0] if choices else None
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}.get(spec_type(spec))
