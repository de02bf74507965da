"""V3 dynamic inputs (ComfyUI 0.33 and later): inputs whose sockets and widgets depend on the workflow itself.

* ``COMFY_DYNAMICCOMBO_V3``: a combo whose selected option brings that option's inputs, named ``<combo>.<input>``
  (an option's own dynamic combo nests the prefix: ``format.codec.encoding``). The front end lays the option's widgets
  out right after the combo's value in ``widgets_values``, and its link inputs are sockets of the same names.
* ``COMFY_AUTOGROW_V3``: a list of sockets that grows as they are linked, each a copy of the template input named
  ``<input>.<name>`` (``names`` from the template, or ``<prefix>0``, ``<prefix>1``, ...); the first ``min`` are
  required when the template input is.
* ``COMFY_MATCHTYPE_V3``: one socket that takes any of the template's ``allowed_types``; an output of this type
  (``output_matchtypes`` names the template) gives what that socket takes.

ComfyUI expands a prompt's dynamic inputs the same way before it validates it; :func:`expand` gives the inputs a
node then has, for :func:`flowgrpo.workflow.validate_api`, and :func:`option_layout` the widgets a selected option
adds, for reading ``widgets_values``.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

from . import schema

__all__ = ["DYNAMIC_COMBO", "AUTOGROW", "MATCHTYPE", "is_dynamic_combo", "option_inputs", "option_layout", "expand",
           "output_types"]

DYNAMIC_COMBO = schema.DYNAMIC_COMBO  # a widget whose choices are its options' keys (flowgrpo.schema)
AUTOGROW, MATCHTYPE = "COMFY_AUTOGROW_V3", "COMFY_MATCHTYPE_V3"


def is_dynamic_combo(spec: Any) -> bool:
    return schema.spec_type(spec) == DYNAMIC_COMBO


def _sections(inputs: dict) -> list[tuple[str, Any, str]]:
    return [(name, spec, section) for section in ("required", "optional")
            for name, spec in (inputs.get(section) or {}).items()]


def option_inputs(name: str, spec: Any, key: Any) -> list[tuple[str, Any, str]]:
    """``[(name.input, spec, section)]`` of the option ``key`` of the dynamic combo ``name`` (none for an unknown
    key), in the option's order, required first."""
    for option in schema.spec_options(spec).get("options") or []:
        if option.get("key") == key:
            return [(f"{name}.{sub}", sub_spec, section)
                    for sub, sub_spec, section in _sections(option.get("inputs") or {})]
    return []


def option_layout(name: str, spec: Any, key: Any) -> list[tuple[Optional[str], Any]]:
    """The ``widgets_values`` entries (as :func:`flowgrpo.schema.widget_layout` gives them) that the option ``key``
    of the dynamic combo ``name`` adds after the combo's own value."""
    return [entry for sub, sub_spec, _ in option_inputs(name, spec, key) if schema.is_widget(sub_spec)
            for entry in schema.widget_entries(sub, sub_spec)]


def _autogrow_inputs(name: str, spec: Any) -> list[tuple[str, Any, str]]:
    template = schema.spec_options(spec).get("template") or {}
    entries = _sections(template.get("input") or {})
    if not entries:
        return []
    _, item_spec, item_section = entries[0]
    if "names" in template:
        names = list(template["names"])
    else:
        names = [f"{template.get('prefix', '')}{i}" for i in range(int(template.get("max", 0)))]
    required = int(template.get("min", 0)) if item_section == "required" else 0
    return [(f"{name}.{item}", item_spec, "required" if i < required else "optional") for i, item in enumerate(names)]


def _allowed_types(spec: Any) -> str:
    return (schema.spec_options(spec).get("template") or {}).get("allowed_types") or "*"


def output_types(info: dict) -> list[str]:
    """:func:`flowgrpo.schema.output_types` with each match-type output given its template's allowed types."""
    templates = {(schema.spec_options(spec).get("template") or {}).get("template_id"): _allowed_types(spec)
                 for _, spec, _ in schema.input_specs(info) if schema.spec_type(spec) == MATCHTYPE}
    matched = info.get("output_matchtypes") or []
    return [templates.get(matched[i] if i < len(matched) else None, "*") if kind == MATCHTYPE else kind
            for i, kind in enumerate(schema.output_types(info))]


def expand(specs: Iterable[tuple[str, Any, str]], inputs: dict) -> list[tuple[str, Any, str]]:
    """A node's inputs ``[(name, spec, section)]`` with its dynamic inputs replaced by what they stand for, given
    the node's API ``inputs``: a dynamic combo stays (a combo of its options' keys) followed by its selected
    option's inputs, expanded in turn; an autogrow input becomes its sockets; a match-type socket takes its allowed
    types."""
    out = []
    for name, spec, section in specs:
        kind = schema.spec_type(spec)
        if kind == AUTOGROW:
            out += _autogrow_inputs(name, spec)
        elif kind == MATCHTYPE:
            out.append((name, [_allowed_types(spec), schema.spec_options(spec)], section))
        elif kind == DYNAMIC_COMBO:
            out.append((name, spec, section))
            value = inputs.get(name, schema.default_value(spec))
            out += expand(option_inputs(name, spec, value), inputs)
        else:
            out.append((name, spec, section))
    return out
