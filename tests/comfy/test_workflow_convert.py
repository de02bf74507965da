"""Workflow conversion against a live server's /object_info: the committed example workflows are up to date and
valid, ComfyUI lists only their UI forms as templates, and ComfyUI's own bundled templates convert cleanly."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from flowgrpo import dynamic_inputs, schema
from flowgrpo.client import ComfyClient
from flowgrpo.example_specs import EXAMPLES, paths, render, write_placeholders
from flowgrpo.workflow import UnknownNodeTypes, WorkflowError, is_ui_format, load_workflow, ui_to_api, validate_api

pytestmark = [pytest.mark.comfy, pytest.mark.server]

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def client(comfy_server, demo_model_files):
    write_placeholders(comfy_server.home / "models")  # names of the real-model examples' files (empty stand-ins)
    with ComfyClient(comfy_server.url) as c:
        yield c


@pytest.fixture(scope="module")
def object_info(client):
    return client.object_info()


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_committed_examples_match_their_specs_and_validate(name, object_info):
    ui_path, api_path = paths(name, REPO_ROOT)
    ui, api = load_workflow(ui_path), load_workflow(api_path)
    fresh_ui, fresh_api = render(EXAMPLES[name], object_info)
    assert (ui, api) == (fresh_ui, fresh_api), f"run `.venv/bin/python scripts/make_workflows.py` to update {name}"
    assert is_ui_format(ui) and ui_to_api(ui, object_info) == api
    assert validate_api(api, object_info) == []


def test_comfyui_lists_the_ui_examples_only(client):
    listed = client.get_json("/workflow_templates")["flowgrpo"]
    ui_names = sorted(p.stem for p in (REPO_ROOT / "example_workflows").glob("*.json"))
    assert sorted(listed) == ui_names and len(set(listed)) == len(listed)  # api/ twins share names: not listed
    assert (REPO_ROOT / "example_workflows" / "api").is_dir()
    for name in listed:
        served = client.get_json(f"/api/workflow_templates/flowgrpo/{name}.json")
        assert is_ui_format(served)


def bundled_templates() -> list[tuple[Path, dict]]:
    """``(file, UI workflow)`` of every template of the comfyui-workflow-templates packages of this runtime."""
    import comfyui_workflow_templates_media_image as media_image

    root = Path(media_image.__file__).parents[1]
    loaded = [(f, json.loads(f.read_text(encoding="utf-8")))
              for f in sorted(root.glob("comfyui_workflow_templates*/templates/*.json"))]
    return [(f, workflow) for f, workflow in loaded if is_ui_format(workflow)]


def test_comfyuis_bundled_templates_convert_and_validate(object_info):
    """Every template of the pinned comfyui-workflow-templates packages whose nodes this server has converts, and
    validation then only complains about model or media files this test home lacks."""
    converted = 0
    for f, workflow in bundled_templates():
        try:
            api = ui_to_api(workflow, object_info)
        except UnknownNodeTypes:
            continue  # API nodes (disabled here) or nodes of newer ComfyUI versions
        except WorkflowError as e:
            assert "subgraph" in str(e).lower(), f"{f.name}: {e}"
            continue
        converted += 1
        problems = [p for p in validate_api(api, object_info)
                    if not re.search(r"'[^']*\.[A-Za-z0-9]{2,12}' is not (one of the choices|available)", p)]
        assert problems == [], f"{f.name}: {problems}"
    assert converted >= 50


def test_templates_with_v3_dynamic_inputs_convert(object_info):
    """V3 dynamic inputs (dynamic combos, autogrow socket lists, match-type sockets) exist from ComfyUI 0.33 on. On a
    runtime that has them, its bundled templates that use them convert with each input expanded as front end 1.49.6
    exports it, e.g. the Math Expression nodes of basic_datatype_conversion.json (its linked ``values.a`` socket).
    A runtime without them (0.3.75) has neither such a node type nor a template that uses one: checked instead."""
    kinds = {dynamic_inputs.DYNAMIC_COMBO, dynamic_inputs.AUTOGROW, dynamic_inputs.MATCHTYPE}
    dynamic = {name for name, info in object_info.items()
               if any(schema.spec_type(spec) in kinds for _, spec, _ in schema.input_specs(info))}
    using = [(f, w) for f, w in bundled_templates() if any(n.get("type") in dynamic for n in w["nodes"])]
    print(f"runtime: {len(dynamic)} node types with dynamic inputs, {len(using)} bundled templates use them")
    assert bool(dynamic) == bool(using)
    if "ComfyMathExpression" in dynamic:
        (math_template,) = [w for f, w in using if f.name == "basic_datatype_conversion.json"]
        api = ui_to_api(math_template, object_info)
        assert api["14"]["inputs"] == {"expression": "a", "values.a": ["8", 0]}
    for f, workflow in using:
        try:
            api = ui_to_api(workflow, object_info)
        except (UnknownNodeTypes, WorkflowError):
            continue  # nodes this server lacks, or subgraphs: the test above covers them
        for node in workflow["nodes"]:
            if node.get("type") in dynamic and node.get("mode", 0) == 0:
                inputs = api[str(node["id"])]["inputs"]
                linked = {s["name"] for s in node.get("inputs") or [] if s.get("link") is not None}
                assert linked <= set(inputs), f"{f.name} node {node['id']}: {sorted(linked - set(inputs))}"
