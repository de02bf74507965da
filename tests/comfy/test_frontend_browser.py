"""The pack in ComfyUI's real front end: a ComfyUI server with the pack, opened in headless Chromium.

Every example workflow loads with no missing node and no error (and the same nodes, links and widget values as the
file, and the outputs of each node's definition), every pack node is registered and found by the node search, a
node's help page opens, and the screenshots are saved per front end: in ``$FLOWGRPO_SCREENSHOTS/frontend-<version>/``
if set, else ``.runtime/screenshots/frontend-<version>/`` (git-ignored). The same test runs on front end 1.32
(ComfyUI 0.3.75) and 1.4x (ComfyUI 0.33); ``tests/support/frontend_ui.py`` finds what each of them shows where. The
README and the guide show the 1.49.6 screenshots, copied into docs/images (the README says how).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from client import ComfyClient
from flowgrpo.example_specs import write_placeholders
from frontend_browser import BrowserUnavailable, open_frontend, save_screenshot
from frontend_ui import frontend_version, missing_node_report, open_node_help, search_results

pytestmark = [pytest.mark.comfy, pytest.mark.server]

REPO_ROOT = Path(__file__).resolve().parents[2]
UI_WORKFLOWS = sorted((REPO_ROOT / "example_workflows").glob("*.json"))
PACK_MODULE = "custom_nodes.flowgrpo"  # conftest links the checkout as custom_nodes/flowgrpo

#: Load a UI workflow and report what the front end made of it.
LOAD_JS = """async ([wf, name]) => {
  await window.app.loadGraphData(wf, true, true, name);
  const types = LiteGraph.registered_node_types;
  const graph = window.app.graph;
  const saved = graph.serialize();
  return {
    missing: graph._nodes.filter(n => !types[n.type]).map(n => n.type),
    with_errors: graph._nodes.filter(n => n.has_errors).map(n => n.type),
    types: Object.fromEntries(saved.nodes.map(n => [n.id, n.type])),
    links: saved.links.map(l => l.slice(0, 5)),
    outputs: Object.fromEntries(graph._nodes.map(n => [n.id, (n.outputs ?? []).map(o => o.name)])),
    widgets: Object.fromEntries(saved.nodes.map(n => [n.id, n.widgets_values ?? []])),  // 1.4x leaves out []
  };
}"""

FIT_VIEW_JS = """() => {
  const canvas = window.app.canvas;
  canvas.selectItems();
  canvas.fitViewToSelectionAnimated({duration: 1});
  canvas.deselectAll();
  canvas.setDirty(true, true);
}"""


def screenshot_dir(page) -> Path:
    base = Path(os.environ.get("FLOWGRPO_SCREENSHOTS") or REPO_ROOT / ".runtime" / "screenshots")
    return base / f"frontend-{frontend_version(page)}"


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, f"{path} is not a real screenshot"


@pytest.fixture(scope="module")
def frontend(comfy_server, demo_model_files):
    """One browser page on the session's ComfyUI server, for the whole module. Every model file the examples name is
    listed by the server before the page opens (front end 1.4x marks loaders whose file is missing as errors)."""
    write_placeholders(comfy_server.home / "models")
    try:
        with open_frontend(comfy_server.url) as page:
            banner = page.get_by_text("Introducing Nodes 2.0")
            if banner.count():  # the front end's announcement bar sits over the top of every screenshot
                banner.locator("xpath=../..").locator("button").last.click()
            yield page
    except BrowserUnavailable as exc:
        pytest.fail(f"the front-end test needs a browser: {exc}")


@pytest.fixture(scope="module")
def object_info(comfy_server) -> dict:
    with ComfyClient(comfy_server.url) as client:
        return client.object_info()


@pytest.fixture(scope="module")
def pack_nodes(object_info) -> dict[str, str]:
    """``{node id: display name}`` of every node the server says comes from the pack."""
    nodes = {name: spec["display_name"] for name, spec in object_info.items()
             if spec.get("python_module") == PACK_MODULE}
    assert len(nodes) >= 18, f"the server lists only {sorted(nodes)} from {PACK_MODULE}"
    return nodes


def test_frontend_registers_every_pack_node(frontend, pack_nodes):
    titles = frontend.evaluate("(ids) => ids.map(id => LiteGraph.registered_node_types[id]?.title ?? null)",
                               list(pack_nodes))
    assert dict(zip(pack_nodes, titles)) == pack_nodes


def test_a_missing_node_is_reported(frontend):
    """The control for the workflow test: an unknown node type is flagged, and the front end reports it by name."""
    workflow = json.loads(UI_WORKFLOWS[0].read_text())
    workflow["nodes"][0]["type"] = "FlowGRPONoSuchNode"
    report = frontend.evaluate(LOAD_JS, [workflow, "missing_node"])
    assert report["missing"] == ["FlowGRPONoSuchNode"]
    assert "FlowGRPONoSuchNode" in missing_node_report(frontend)


@pytest.mark.parametrize("path", UI_WORKFLOWS, ids=[p.stem for p in UI_WORKFLOWS])
def test_example_workflow_loads_without_missing_nodes(frontend, object_info, path):
    workflow = json.loads(path.read_text())
    report = frontend.evaluate(LOAD_JS, [workflow, path.stem])
    assert report["missing"] == [] and report["with_errors"] == []
    assert missing_node_report(frontend) == ""
    # the front end read the file as written: same nodes, links and widget values (the export's widget order,
    # including the seed's "control after generate" slot, is the front end's)
    assert report["types"] == {str(n["id"]): n["type"] for n in workflow["nodes"]}
    assert sorted(report["links"]) == sorted(link[:5] for link in workflow["links"])
    assert report["widgets"] == {str(n["id"]): n.get("widgets_values", []) for n in workflow["nodes"]}
    # every node has its definition's outputs: none left out, none the server does not have (the export leaves
    # unlinked trailing outputs to the front end, which adds them from the definition)
    assert report["outputs"] == {str(n["id"]): [str(name) for name in object_info[n["type"]]["output_name"]]
                                 if n["type"] in object_info else [] for n in workflow["nodes"]}
    frontend.evaluate(FIT_VIEW_JS)
    frontend.wait_for_timeout(300)  # one animation frame of the 1 ms fit and a redraw
    assert_png(save_screenshot(frontend, screenshot_dir(frontend) / f"workflow_{path.stem}.png"))


def test_node_search_finds_every_pack_node(frontend, pack_nodes):
    for node_id, name in pack_nodes.items():
        results = search_results(frontend, name)
        assert name in results[:3], f"searching {name!r} offers {results[:5]}"
        frontend.keyboard.press("Escape")
    results = search_results(frontend, "FlowGRPO")
    assert all(r.startswith("FlowGRPO") for r in results[:5]) and len(results) >= 5, results
    assert_png(save_screenshot(frontend, screenshot_dir(frontend) / "node_search.png"))
    frontend.keyboard.press("Escape")


def test_help_page_opens(frontend, pack_nodes):
    """The front end's help for a pack node shows the pack's web/docs/<NodeId>.md, rendered."""
    page_source = (REPO_ROOT / "web" / "docs" / "FlowGRPOTrain.md").read_text()
    title = next(line[2:].strip() for line in page_source.splitlines() if line.startswith("# "))
    help_panel, close = open_node_help(frontend, "FlowGRPOTrain", pack_nodes["FlowGRPOTrain"])
    text = help_panel.inner_text()
    assert title in text and "Inputs" in text and "group_size" in text
    assert_png(save_screenshot(frontend, screenshot_dir(frontend) / "help_page.png"))
    close()
