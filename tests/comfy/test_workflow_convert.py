"""Workflow conversion against a live server's /object_info: the committed example workflows are up to date and
valid, ComfyUI lists only their UI forms as templates, and ComfyUI's own bundled templates convert cleanly."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

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


def test_comfyuis_bundled_templates_convert_and_validate(object_info):
    """Every template of the pinned comfyui-workflow-templates packages whose nodes this server has converts, and
    validation then only complains about model or media files this test home lacks."""
    import comfyui_workflow_templates_media_image as media_image

    roots = [Path(media_image.__file__).parents[1]]
    files = [f for root in roots for f in root.glob("comfyui_workflow_templates*/templates/*.json")]
    converted = 0
    for f in sorted(files):
        workflow = json.loads(f.read_text(encoding="utf-8"))
        if not is_ui_format(workflow):
            continue
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
