"""API prompt -> frontend (UI-format) workflow, for writing example workflows from compact Python specs.

``ui_to_api(api_to_ui(x, info), info) == complete_api(x, info)``, which is ``x`` itself when ``x`` gives every widget
input and a ``_meta.title`` (what :mod:`flowgrpo.graph` builds). Nodes are laid out left to right by their depth in
the graph; node ids must be integers (as strings), since the frontend numbers nodes.

The file is laid out as a current front end saves it, and it is the same whichever ComfyUI's ``/object_info`` the
export reads (0.3.75 and 0.33 differ in ways a saved workflow need not show):

* ``properties.cnr_id``: ``comfy-core`` for ComfyUI's own nodes (the front end's rule: the ``python_module`` starts
  with ``nodes``, ``comfy_extras`` or ``comfy_api_nodes``), the pack's registry id (``[project] name`` of
  ``pyproject.toml``) for nodes from ``custom_nodes``. No ``ver``: for core nodes it is the ComfyUI version.
* Output slots after a node's last linked one are not written. Both front ends (1.32 and 1.49, checked by
  ``tests/comfy/test_frontend_browser.py``) add a node's missing outputs from its definition when they load a file,
  and definitions grow: on ComfyUI 0.33 SaveImage and PreviewImage pass their images on as an output.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional

from . import schema
from .errors import UnknownNodeTypes, missing_types

__all__ = ["complete_api", "api_to_ui", "pack_registry_id", "CORE_MODULES"]

COLUMN_GAP, ROW_GAP, TITLE_H = 80, 50, 30
BAND_WIDTH = 1900  # canvas units: the automatic layout wraps into a new band past this


def _require_known(api: dict, object_info: dict) -> None:
    missing = missing_types([(i, n["class_type"]) for i, n in api.items()], object_info)
    if missing:
        raise UnknownNodeTypes(missing)


def _is_link(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


def complete_api(api: dict, object_info: dict) -> dict:
    """A copy of ``api`` in which every node has every widget input (missing ones get the frontend's default) and a
    ``_meta.title`` (default: the class's display name), i.e. what converting its UI twin gives back."""
    _require_known(api, object_info)
    out = {}
    for node_id, node in api.items():
        info = object_info[node["class_type"]]
        inputs = dict(node.get("inputs") or {})
        for name, spec in schema.widget_layout(info):
            if name is not None and name not in inputs:
                default = schema.default_value(spec)
                inputs[name] = {"__value__": default} if isinstance(default, list) else default
        meta = dict(node.get("_meta") or {})
        meta.setdefault("title", schema.display_name(info, node["class_type"]))
        out[node_id] = {"inputs": inputs, "class_type": node["class_type"], "_meta": meta}
    return json.loads(json.dumps(out))


def _depths(api: dict) -> dict[str, int]:
    """Longest distance from a source node along links (raises ValueError on a cycle)."""
    depth: dict[str, int] = {}
    visiting: set[str] = set()

    def visit(node_id: str) -> int:
        if node_id in depth:
            return depth[node_id]
        if node_id in visiting:
            raise ValueError(f"the graph has a cycle through node {node_id}")
        visiting.add(node_id)
        parents = [v[0] for v in api[node_id]["inputs"].values() if _is_link(v) and v[0] in api]
        depth[node_id] = 1 + max(map(visit, parents), default=-1)
        visiting.discard(node_id)
        return depth[node_id]

    for node_id in api:
        visit(node_id)
    return depth


def _size(info: dict, n_sockets: int, n_outputs: int) -> list[float]:
    """Width and height of a node drawn with ``n_sockets`` link-only inputs, its outputs and its widgets."""
    layout = schema.widget_layout(info)
    multiline = sum(1 for name, spec in layout if name and schema.spec_options(spec).get("multiline"))
    width = 400 if multiline else 315
    height = 26 + 22 * max(n_sockets, n_outputs) + 24 * len(layout) + 76 * multiline
    return [width, height]


#: first part of the ``python_module`` of ComfyUI's own nodes (the front end's ``getNodeSource``)
CORE_MODULES = ("nodes", "comfy_extras", "comfy_api_nodes")
PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


@lru_cache(maxsize=None)
def pack_registry_id(pyproject: Path = PYPROJECT) -> str:
    """The pack's Comfy Registry id: ``name`` in the ``[project]`` table of ``pyproject.toml``."""
    table = re.search(r"^\[project\]\s*$(.*?)(?=^\[|\Z)", pyproject.read_text(encoding="utf-8"), re.M | re.S)
    name = re.search(r'^name\s*=\s*"([^"]+)"', table.group(1), re.M) if table else None
    if name is None:
        raise ValueError(f"{pyproject}: no name in its [project] table")
    return name.group(1)


def _properties(info: dict, class_type: str, pack_id: str) -> dict:
    properties = {"Node name for S&R": class_type}
    source = str(info.get("python_module", "")).split(".")
    if source[0] in CORE_MODULES:
        properties["cnr_id"] = "comfy-core"
    elif source[0] == "custom_nodes":
        properties["cnr_id"] = pack_id
    return properties


def api_to_ui(api: dict, object_info: dict, layout: Optional[dict] = None, note: Optional[str] = None,
              pack_id: Optional[str] = None) -> dict:
    """The frontend workflow (``version 0.4``) for an API prompt.

    layout:  optional ``{node_id: [x, y]}`` positions overriding the automatic left-to-right layout.
    note:    optional Markdown text, shown in a ``MarkdownNote`` left of the graph (dropped again by ``ui_to_api``).
    pack_id: the registry id written as ``properties.cnr_id`` of custom nodes (default: this pack's,
             :func:`pack_registry_id`); core nodes get ``comfy-core``.
    """
    pack_id = pack_id or pack_registry_id()
    api = complete_api(api, object_info)
    for node_id in api:
        if not (node_id.isdigit() and str(int(node_id)) == node_id):
            raise ValueError(f"api_to_ui needs integer node ids (the frontend numbers nodes); got {node_id!r}")
    depth = _depths(api)
    order = sorted(api, key=lambda i: (depth[i], int(i)))
    links, nodes = [], {}
    consumers: dict[tuple[str, int], list[int]] = {}
    for node_id in sorted(api, key=int):
        node = api[node_id]
        info = object_info[node["class_type"]]
        inputs = node["inputs"]
        specs = schema.input_specs(info)
        known = {name for name, _, _ in specs}
        # Sockets as the front end (1.16+) lays them out: link-only inputs first, then one socket per widget, each
        # in schema order; a link's target slot is its socket's index in this list.
        named = specs + [(n, None, "extra") for n in inputs if n not in known]
        for name, spec, _ in named:
            if spec is None and not _is_link(inputs.get(name)):
                raise ValueError(f"node {node_id} ({node['class_type']}): {name!r} is not one of its inputs, so a UI "
                                 "workflow cannot hold its value")
        is_widget = {name: spec is not None and schema.is_widget(spec) for name, spec, _ in named}
        sockets = []
        for name, spec, _ in sorted(named, key=lambda entry: is_widget[entry[0]]):  # stable: schema order kept
            value = inputs.get(name)
            socket: dict[str, Any] = {"name": name, "type": schema.spec_type(spec) if spec is not None else "*"}
            if is_widget[name]:
                socket["widget"] = {"name": name}
            socket["link"] = None
            if _is_link(value):
                src, slot = value
                out_type = schema.output_types(object_info[api[src]["class_type"]])[slot]
                if spec is None:
                    socket["type"] = out_type
                link_id = len(links) + 1
                links.append([link_id, int(src), slot, int(node_id), len(sockets), out_type])
                consumers.setdefault((src, slot), []).append(link_id)
                socket["link"] = link_id
            sockets.append(socket)
        widgets_values = []
        for name, spec in schema.widget_layout(info):
            if name is None:
                widgets_values.append(spec)
                continue
            value = inputs[name]
            if _is_link(value):
                value = schema.default_value(spec)
            widgets_values.append(value["__value__"] if isinstance(value, dict) and "__value__" in value else value)
        entry = {"id": int(node_id), "type": node["class_type"], "pos": [0, 0],
                 "size": _size(info, sum(1 for s in sockets if "widget" not in s), len(info.get("output") or [])),
                 "flags": {},
                 "order": order.index(node_id), "mode": 0, "inputs": sockets, "outputs": []}
        title = node["_meta"].get("title")
        if title and title != schema.display_name(info, node["class_type"]):
            entry["title"] = title
        entry["properties"] = _properties(info, node["class_type"], pack_id)
        entry["widgets_values"] = widgets_values
        nodes[node_id] = entry
    for node_id, entry in nodes.items():
        info = object_info[entry["type"]]
        names = info.get("output_name") or info.get("output") or []
        types = schema.output_types(info)
        written = 1 + max((i for i in range(len(types)) if (node_id, i) in consumers), default=-1)
        entry["outputs"] = [{"name": str(names[i]) if i < len(names) else t, "type": t,
                             "links": consumers.get((node_id, i), []), "slot_index": i}
                            for i, t in enumerate(types[:written])]
    _place(nodes, depth, layout or {})
    ui_nodes = [nodes[i] for i in sorted(nodes, key=int)]
    if note:
        left = min(n["pos"][0] for n in ui_nodes) if ui_nodes else 0
        ui_nodes.append({"id": max(map(int, nodes), default=0) + 1, "type": "MarkdownNote",
                         "pos": [left - 420 - COLUMN_GAP, 0], "size": [420, 300], "flags": {}, "order": len(nodes),
                         "mode": 0, "inputs": [], "outputs": [], "title": "About this workflow", "properties": {},
                         "widgets_values": [note], "color": "#432", "bgcolor": "#653"})
    return {"last_node_id": max((n["id"] for n in ui_nodes), default=0), "last_link_id": len(links),
            "nodes": ui_nodes, "links": links, "groups": [], "config": {},
            "extra": {"ds": {"scale": 1.0, "offset": [0, 0]}}, "version": 0.4}


def _place(nodes: dict, depth: dict, fixed: dict) -> None:
    """Columns by depth, nodes stacked in id order within a column; a column that would end right of
    ``BAND_WIDTH`` starts a new band below the tallest column so far (a long loop body fits a screen in two or
    three rows instead of one strip); ``fixed`` positions win."""
    x = top = bottom = 0.0
    for d in sorted(set(depth.values())):
        column = sorted((i for i in nodes if depth[i] == d), key=int)
        width = max(nodes[i]["size"][0] for i in column)
        if x > 0 and x + width > BAND_WIDTH:
            x, top = 0.0, bottom + ROW_GAP
        y = top
        for node_id in column:
            nodes[node_id]["pos"] = list(fixed.get(node_id, [x, y]))
            y += nodes[node_id]["size"][1] + TITLE_H + ROW_GAP
        bottom = max(bottom, y)
        x += width + COLUMN_GAP
