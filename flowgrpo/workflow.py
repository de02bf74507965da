"""Workflow files: load them, tell the two formats apart, convert the frontend's format to an API prompt, validate.

Two formats exist:

* **UI workflow** (what the frontend saves, ``version 0.4``): ``{"nodes": [...], "links": [[id, src, src_slot, dst,
  dst_slot, type], ...], ...}``; a node's widget values are positional (``widgets_values``), UI-only nodes
  (``Note``, ``MarkdownNote``, ``Reroute``, ``PrimitiveNode``; KJNodes' ``GetNode``/``SetNode`` are followed too)
  and modes (2 muted, 4 bypassed) exist.
* **API prompt** (what ``POST /prompt`` takes): ``{"<id>": {"class_type": ..., "inputs": {name: value or [src_id,
  slot]}, "_meta": {"title": ...}}}``.

Converting needs the server's ``/object_info`` (the input order of every node class); :mod:`flowgrpo.schema` reads
it. The reverse conversion, used to write example workflows from Python specs, is :func:`api_to_ui`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from . import dynamic_inputs, schema
from .errors import UnknownNodeTypes, WorkflowError, missing_types as _missing_types
from .ui_export import api_to_ui, complete_api

__all__ = ["WorkflowError", "UnknownNodeTypes", "UI_ONLY_TYPES", "load_workflow", "is_api_format", "is_ui_format",
           "ui_to_api", "validate_api", "apply_overrides", "find_node", "api_to_ui", "complete_api"]

MODE_MUTED, MODE_BYPASS = 2, 4
UI_ONLY_TYPES = frozenset({"Note", "MarkdownNote", "Reroute", "PrimitiveNode", "GetNode", "SetNode"})


# ------------------------------------------------------------------------------------------------ loading
def is_ui_format(obj: Any) -> bool:
    """A frontend workflow: a dict with ``nodes`` and ``links`` lists."""
    return isinstance(obj, dict) and isinstance(obj.get("nodes"), list) and isinstance(obj.get("links"), list)


def is_api_format(obj: Any) -> bool:
    """An API prompt: a non-empty dict whose every value is a node ``{"class_type": str, "inputs": dict}``."""
    return (isinstance(obj, dict) and bool(obj) and not is_ui_format(obj)
            and all(isinstance(n, dict) and isinstance(n.get("class_type"), str)
                    and isinstance(n.get("inputs", {}), dict) for n in obj.values()))


def load_workflow(path: str | Path) -> dict:
    """Read a UI workflow or an API prompt (a saved ``POST /prompt`` body ``{"prompt": {...}}`` is unwrapped).

    Raises :class:`WorkflowError` naming the file for a missing or empty file, malformed JSON (with line and column)
    and JSON that is neither format.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise WorkflowError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise WorkflowError(f"{path}: cannot read it ({e})") from None
    if not text.strip():
        raise WorkflowError(f"{path}: the file is empty; export the workflow again (Workflow > Export, or "
                            "Export (API))")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise WorkflowError(f"{path}: not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}") from None
    if isinstance(obj, dict) and is_api_format(obj.get("prompt")):
        obj = obj["prompt"]
    if is_ui_format(obj) or is_api_format(obj):
        return obj
    raise WorkflowError(f"{path}: not a ComfyUI workflow: expected a UI workflow (an object with 'nodes' and "
                        "'links') or an API prompt (an object of nodes with 'class_type' and 'inputs')")


# ------------------------------------------------------------------------------------------------ UI -> API
def _links(ui: dict) -> dict[int, tuple]:
    """link id -> (src_id, src_slot, dst_id, dst_slot, type); array (0.4) or object (schema 1) links."""
    out = {}
    for link in ui.get("links") or []:
        if isinstance(link, dict):
            link = [link.get("id"), link.get("origin_id"), link.get("origin_slot"), link.get("target_id"),
                    link.get("target_slot"), link.get("type")]
        if isinstance(link, (list, tuple)) and len(link) >= 5:
            out[link[0]] = tuple(link[1:6]) + ((None,) if len(link) < 6 else ())
    return out


class _Graph:
    """The UI graph with the frontend's rules for following a link to the value or output that feeds an input."""

    def __init__(self, ui: dict):
        if (ui.get("definitions") or {}).get("subgraphs") or (ui.get("extra") or {}).get("groupNodes"):
            raise WorkflowError("the workflow contains subgraphs or group nodes, which this converter does not "
                                "expand; unpack them in the frontend (right-click > Unpack Subgraph) and save again, "
                                "or export it with Export (API)")
        self.nodes = {str(n.get("id")): n for n in ui["nodes"] if isinstance(n, dict)}
        self.links = _links(ui)
        self._vars = {}  # SetNode variable -> link id
        for n in self.nodes.values():
            if n.get("type") == "SetNode" and n.get("widgets_values") and n.get("inputs"):
                self._vars[n["widgets_values"][0]] = n["inputs"][0].get("link")

    def resolve(self, link_id: Any, depth: int = 0) -> Optional[tuple]:
        """``("link", src_id, slot)``, ``("value", v)`` or None (nothing feeds it: dangling, muted, unresolvable)."""
        if link_id is None or link_id not in self.links or depth > 200:
            return None
        src_id, src_slot = str(self.links[link_id][0]), self.links[link_id][1]
        src = self.nodes.get(src_id)
        if src is None:
            return None
        kind, mode = src.get("type"), src.get("mode", 0)
        if kind == "Reroute":
            return self.resolve(_input_link(src, 0), depth + 1)
        if kind == "PrimitiveNode":
            values = src.get("widgets_values") or []
            return ("value", values[0]) if values else None
        if kind == "GetNode":
            name = (src.get("widgets_values") or [None])[0]
            return self.resolve(self._vars.get(name), depth + 1)
        if kind == "SetNode":
            return self.resolve(_input_link(src, 0), depth + 1)
        if mode == MODE_MUTED:
            return None
        if mode == MODE_BYPASS:
            return self.resolve(self._bypass_input(src, src_slot), depth + 1)
        return ("link", src_id, int(src_slot))

    @staticmethod
    def _bypass_input(node: dict, slot: int) -> Any:
        """The link of the input a bypassed node passes to its output ``slot``: the input at the same index when its
        type fits, else the first linked input of a fitting type (the frontend's rule)."""
        outputs, inputs = node.get("outputs") or [], node.get("inputs") or []
        out_type = outputs[slot].get("type") if 0 <= slot < len(outputs) else None
        fits = [i for i, inp in enumerate(inputs)
                if inp.get("link") is not None and out_type is not None
                and schema.types_match(str(inp.get("type")), str(out_type))]
        if slot in fits:
            return inputs[slot]["link"]
        return inputs[fits[0]]["link"] if fits else None


def _input_link(node: dict, index: int) -> Any:
    inputs = node.get("inputs") or []
    return inputs[index].get("link") if index < len(inputs) else None


def _wrap(value: Any) -> Any:
    """A list literal is sent as ``{"__value__": [...]}`` so it is not read as a link (ComfyUI unwraps it)."""
    return {"__value__": value} if isinstance(value, list) else value


def _widget_inputs(node: dict, info: dict) -> dict:
    values = node.get("widgets_values")
    by_name = isinstance(values, dict)  # some packs save widgets by name
    values = values if by_name else list(values or [])
    layout = schema.widget_layout(info)
    out = {}
    pos = i = 0
    while i < len(layout):
        name, spec = layout[i]
        i += 1
        if name is None:  # a UI-only value: skip it when present (older saves may lack a control value)
            if not by_name and pos < len(values) and (spec != "fixed" or values[pos] in schema.CONTROL_VALUES):
                pos += 1
            continue
        if by_name:
            out[name] = values.get(name, schema.default_value(spec))
        else:
            out[name] = values[pos] if pos < len(values) else schema.default_value(spec)
            pos += 1
        if dynamic_inputs.is_dynamic_combo(spec):  # the selected option's widgets follow the combo's value
            layout[i:i] = dynamic_inputs.option_layout(name, spec, out[name])
    return out


def ui_to_api(ui: dict, object_info: dict) -> dict:
    """Convert a UI workflow to an API prompt, as the frontend's "Export (API)" does.

    Muted nodes are dropped, bypassed nodes pass their input of the output's type through, ``Reroute`` is followed,
    a ``PrimitiveNode``'s value goes into the input it feeds, notes are dropped. Widget values fill the inputs in
    schema order (skipping the "control after generate" values); a linked input takes the link. V3 dynamic inputs
    (ComfyUI 0.33) are expanded as the front end does (:mod:`flowgrpo.dynamic_inputs`). Dynamic-prompt syntax
    (``{a|b}``) is left as written. Checked against the frontend 1.32.9's own export on ComfyUI's bundled templates
    and on ``tests/core/fixtures/frontend_workflow.json``, and 1.49.6's on ComfyUI 0.33's templates with dynamic
    inputs. Raises :class:`UnknownNodeTypes` for node classes missing from ``object_info`` and
    :class:`WorkflowError` for subgraphs.
    """
    if not is_ui_format(ui):
        raise WorkflowError("not a UI workflow (no 'nodes' and 'links' lists)")
    graph = _Graph(ui)
    active = [n for n in graph.nodes.values()
              if n.get("type") not in UI_ONLY_TYPES and n.get("mode", 0) not in (MODE_MUTED, MODE_BYPASS)]
    missing = _missing_types([(str(n.get("id")), str(n.get("type"))) for n in active], object_info)
    if missing:
        raise UnknownNodeTypes(missing)
    api = {}
    for node in sorted(active, key=lambda n: (n.get("order") or 0, str(n.get("id")))):
        class_type = node["type"]
        info = object_info[class_type]
        inputs = {k: _wrap(v) for k, v in _widget_inputs(node, info).items()}
        for slot in node.get("inputs") or []:
            source = graph.resolve(slot.get("link"))
            if source is None:
                continue
            inputs[slot["name"]] = _wrap(source[1]) if source[0] == "value" else [source[1], source[2]]
        title = node.get("title") or schema.display_name(info, class_type)
        api[str(node["id"])] = {"inputs": inputs, "class_type": class_type, "_meta": {"title": title}}
    for node in api.values():  # links into nodes that were not emitted (e.g. an unknown-free dangling source)
        for name, value in list(node["inputs"].items()):
            if _is_link(value) and value[0] not in api:
                del node["inputs"][name]
    return api


# ------------------------------------------------------------------------------------------------ validation
def _is_link(value: Any) -> bool:
    return (isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)
            and isinstance(value[1], int) and not isinstance(value[1], bool))


def _label(node_id: str, node: dict) -> str:
    title = (node.get("_meta") or {}).get("title")
    cls = node.get("class_type")
    return f"node {node_id} ({cls}{', ' + repr(title) if title and title != cls else ''})"


def _literal_problem(name: str, value: Any, spec: Any) -> Optional[str]:
    if isinstance(value, dict) and "__value__" in value:
        value = value["__value__"]
    kind, opts = schema.spec_type(spec), schema.spec_options(spec)
    choices = schema.combo_options(spec)
    if choices is not None and kind in ("COMBO", schema.DYNAMIC_COMBO):
        if value not in choices:
            shown = ", ".join(map(repr, choices[:12])) + (", ..." if len(choices) > 12 else "")
            return f"input '{name}': {value!r} is not one of the choices [{shown}]" if choices else \
                f"input '{name}': {value!r} is not available (the list of choices is empty; is the file missing?)"
        return None
    if kind in ("INT", "FLOAT"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"input '{name}': expected a number ({kind}), got {value!r}"
        if kind == "INT" and value != int(value):
            return f"input '{name}': expected an integer, got {value!r}"
        if opts.get("min") is not None and value < opts["min"]:
            return f"input '{name}': {value} is below the minimum {opts['min']}"
        if opts.get("max") is not None and value > opts["max"]:
            return f"input '{name}': {value} is above the maximum {opts['max']}"
    if kind == "BOOLEAN" and not isinstance(value, bool):
        return f"input '{name}': expected true or false, got {value!r}"
    return None


def validate_api(api: dict, object_info: dict) -> list[str]:
    """Check an API prompt against ``object_info``; returns human-readable problems (empty: valid).

    Checks: every class is known; every required input is present; links point at existing nodes and at an output
    whose type fits the input (``*`` fits anything); combo values are among the choices; numbers are numbers within
    min/max; there is at least one output node.
    """
    if not is_api_format(api):
        return ["not an API prompt: expected an object of nodes with 'class_type' and 'inputs'"]
    problems = []
    missing = _missing_types([(i, n["class_type"]) for i, n in api.items()], object_info)
    if missing:
        problems.append(str(UnknownNodeTypes(missing)))
    for node_id, node in api.items():
        info = object_info.get(node["class_type"])
        if info is None:
            continue
        label, inputs = _label(node_id, node), node.get("inputs") or {}
        specs = {name: (spec, section)
                 for name, spec, section in dynamic_inputs.expand(schema.input_specs(info), inputs)}
        for name, (spec, section) in specs.items():
            if name not in inputs:
                if section == "required":
                    problems.append(f"{label}: required input '{name}' is missing")
                continue
            value = inputs[name]
            if isinstance(value, list) and not _is_link(value):
                problems.append(f"{label}: input '{name}': a list must be a link [node_id, output_index] "
                                f"(wrap list values as {{\"__value__\": [...]}}), got {value!r}")
            elif _is_link(value):
                problem = _link_problem(api, object_info, name, value, schema.spec_type(spec))
                if problem:
                    problems.append(f"{label}: {problem}")
            else:
                problem = _literal_problem(name, value, spec)
                if problem:
                    problems.append(f"{label}: {problem}")
    if not any((object_info.get(n["class_type"]) or {}).get("output_node") for n in api.values()):
        problems.append("the workflow has no output node (e.g. SaveImage, PreviewImage, or a FlowGRPO training "
                        "node), so ComfyUI would run nothing")
    return problems


def _link_problem(api: dict, object_info: dict, name: str, link: list, input_type: str) -> Optional[str]:
    src_id, slot = link
    src = api.get(src_id)
    if src is None:
        return f"input '{name}' is linked to node {src_id}, which is not in the workflow"
    info = object_info.get(src["class_type"])
    if info is None:
        return None  # reported as an unknown class
    outs = dynamic_inputs.output_types(info)
    if not 0 <= slot < len(outs):
        return f"input '{name}' is linked to output {slot} of {_label(src_id, src)}, which has {len(outs)} outputs"
    if not schema.types_match(outs[slot], input_type):
        return f"input '{name}' ({input_type}) is linked to output {slot} of {_label(src_id, src)}, a {outs[slot]}"
    return None


# ------------------------------------------------------------------------------------------------ overrides
def find_node(api: dict, ref: str) -> str:
    """The id of the node ``ref`` names: a node id, else a unique ``_meta.title``, else a unique class type."""
    if ref in api:
        return ref
    for key in (lambda n: (n.get("_meta") or {}).get("title"), lambda n: n.get("class_type")):
        hits = [node_id for node_id, n in api.items() if key(n) == ref]
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise WorkflowError(f"{ref!r} names several nodes ({', '.join(hits)}); use the node id instead")
    known = ", ".join(f"{i} ({(n.get('_meta') or {}).get('title') or n['class_type']})" for i, n in api.items())
    raise WorkflowError(f"no node with id, title or class {ref!r}; the nodes are: {known}")


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_overrides(api: dict, overrides: list[str], object_info: Optional[dict] = None) -> dict:
    """A copy of ``api`` with ``NODE.INPUT=VALUE`` overrides applied (NODE: id, title or class type; VALUE: JSON
    when it parses, else a string). With ``object_info``, INPUT must be one of the node's inputs."""
    api = json.loads(json.dumps(api))
    for item in overrides:
        target, sep, raw = item.partition("=")
        ref, dot, name = target.rpartition(".")
        if not sep or not dot or not ref or not name:
            raise WorkflowError(f"--set {item!r}: expected NODE.INPUT=VALUE, e.g. 3.steps=10 or \"KSampler.seed=5\"")
        node_id = find_node(api, ref)
        node = api[node_id]
        info = (object_info or {}).get(node["class_type"])
        if info is not None:
            names = [n for n, _, _ in schema.input_specs(info)]
            if name not in names:
                raise WorkflowError(f"--set {item!r}: {_label(node_id, node)} has no input {name!r}; its inputs are: "
                                    f"{', '.join(names)}")
        node.setdefault("inputs", {})[name] = _wrap(_parse_value(raw))
    return api
