"""V3 dynamic inputs (ComfyUI 0.33) in UI -> API conversion and validation, without ComfyUI.

The node schema below has the shape ComfyUI 0.33's ``/object_info`` gives such inputs; the widget layout is the one
front end 1.49.6 saves and exports (checked against its own Export (API) on the 34 bundled templates of ComfyUI 0.33
that use dynamic inputs; ``tests/comfy/test_workflow_convert.py`` converts and validates them on that runtime).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

from flowgrpo.workflow import ui_to_api, validate_api  # noqa: E402

INT = ["INT", {"default": 512, "min": 0, "max": 4096}]
RESIZE = ["COMFY_DYNAMICCOMBO_V3", {"options": [
    {"key": "dimensions", "inputs": {"required": {"width": INT, "height": INT},
                                     "optional": {"crop": ["COMBO", {"options": ["none", "center"]}]}}},
    {"key": "nested", "inputs": {"required": {"inner": ["COMFY_DYNAMICCOMBO_V3", {"options": [
        {"key": "a", "inputs": {"required": {}}},
        {"key": "b", "inputs": {"required": {"factor": ["FLOAT", {"default": 2.0, "min": 1.0}]}}}]}]}}},
    {"key": "match", "inputs": {"required": {"reference": ["IMAGE", {}]}}}]}]
VALUES = ["COMFY_AUTOGROW_V3", {"template": {"input": {"required": {"value": ["FLOAT,INT", {}]}},
                                             "names": ["a", "b", "c"], "min": 2}}]
ANY_IMAGE = ["COMFY_MATCHTYPE_V3", {"template": {"template_id": "t", "allowed_types": "IMAGE,MASK"}}]
INFO = {
    "Dyn": {"input": {"required": {"image": ANY_IMAGE, "resize": RESIZE, "values": VALUES,
                                   "method": ["COMBO", {"options": ["nearest", "bilinear"]}]}},
            "input_order": {"required": ["image", "resize", "values", "method"]},
            "output": ["COMFY_MATCHTYPE_V3"], "output_name": ["out"], "output_matchtypes": ["t"]},
    "Src": {"input": {}, "output": ["IMAGE", "FLOAT", "LATENT"], "output_name": ["image", "x", "latent"]},
    "Sink": {"input": {"required": {"images": ["IMAGE", {}]}}, "output": [], "output_node": True},
}


def workflow(widgets: list, value_links: tuple = ("a", "b"), extra_sockets: tuple = ()) -> dict:
    """Src -> Dyn -> Sink, Dyn's image and autogrow values linked from Src."""
    sockets = [{"name": "image", "type": "IMAGE,MASK", "link": 1}]
    sockets += [{"name": f"values.{n}", "type": "FLOAT,INT", "link": 2 + i} for i, n in enumerate(value_links)]
    sockets += [{"name": name, "type": kind, "link": 10 + i} for i, (name, kind) in enumerate(extra_sockets)]
    links = [[1, 1, 0, 2, 0, "IMAGE"]] + [[2 + i, 1, 1, 2, 1 + i, "FLOAT"] for i in range(len(value_links))]
    links += [[10 + i, 1, 0, 2, 9, "IMAGE"] for i in range(len(extra_sockets))] + [[20, 2, 0, 3, 0, "IMAGE"]]
    return {"nodes": [{"id": 1, "type": "Src", "mode": 0, "inputs": [], "widgets_values": []},
                      {"id": 2, "type": "Dyn", "mode": 0, "order": 1, "inputs": sockets, "widgets_values": widgets},
                      {"id": 3, "type": "Sink", "mode": 0, "order": 2,
                       "inputs": [{"name": "images", "type": "IMAGE", "link": 20}]}], "links": links}


def test_a_dynamic_combo_takes_its_selected_options_widgets_from_after_its_value():
    api = ui_to_api(workflow(["dimensions", 640, 480, "center", "bilinear"]), INFO)
    assert api["2"]["inputs"] == {"resize": "dimensions", "resize.width": 640, "resize.height": 480,
                                  "resize.crop": "center", "method": "bilinear", "image": ["1", 0],
                                  "values.a": ["1", 1], "values.b": ["1", 1]}
    assert validate_api(api, INFO) == []


def test_nested_options_nest_their_names_and_missing_values_take_defaults():
    api = ui_to_api(workflow(["nested", "b"]), INFO)
    assert {k: v for k, v in api["2"]["inputs"].items() if not isinstance(v, list)} == {
        "resize": "nested", "resize.inner": "b", "resize.inner.factor": 2.0, "method": "nearest"}
    api["2"]["inputs"]["resize.inner.factor"] = 0.5
    assert validate_api(api, INFO) == ["node 2 (Dyn): input 'resize.inner.factor': 0.5 is below the minimum 1.0"]


def test_an_options_link_input_is_a_socket_of_its_name():
    ui = workflow(["match", "bilinear"], extra_sockets=[("resize.reference", "IMAGE")])
    api = ui_to_api(ui, INFO)
    assert api["2"]["inputs"]["resize.reference"] == ["1", 0] and validate_api(api, INFO) == []
    del api["2"]["inputs"]["resize.reference"]
    assert validate_api(api, INFO) == ["node 2 (Dyn): required input 'resize.reference' is missing"]


def test_autogrow_needs_its_minimum_of_linked_sockets_and_checks_their_types():
    api = ui_to_api(workflow(["dimensions", 64, 64, "none", "nearest"], value_links=("a",)), INFO)
    assert validate_api(api, INFO) == ["node 2 (Dyn): required input 'values.b' is missing"]
    api["2"]["inputs"]["values.b"] = ["1", 2]
    assert validate_api(api, INFO) == ["node 2 (Dyn): input 'values.b' (FLOAT,INT) is linked to output 2 of node 1 "
                                       "(Src), a LATENT"]


def test_a_match_type_output_gives_what_its_socket_takes():
    api = ui_to_api(workflow(["dimensions", 64, 64, "none", "nearest"]), INFO)
    assert validate_api(api, INFO) == []  # Sink's IMAGE input takes Dyn's IMAGE,MASK output
    INFO_LATENT_SINK = {**INFO, "Sink": {**INFO["Sink"], "input": {"required": {"images": ["LATENT", {}]}}}}
    assert validate_api(api, INFO_LATENT_SINK) == [
        "node 3 (Sink): input 'images' (LATENT) is linked to output 0 of node 2 (Dyn), a IMAGE,MASK"]
