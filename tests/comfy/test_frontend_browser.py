"""The pack in ComfyUI's real front end: a ComfyUI server with the pack, opened in headless Chromium.

Every example workflow loads with no missing node (and the same nodes, links and widget values as the file), every
pack node is registered and found by the node search, a node's help page opens in the node library, and the
screenshots are saved: in ``$FLOWGRPO_SCREENSHOTS`` if set, else ``.runtime/screenshots/`` (git-ignored).
``FLOWGRPO_SCREENSHOTS=docs/images bash scripts/test.sh tests/comfy/test_frontend_browser.py`` refreshes the
pictures the README and the guide show.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from client import ComfyClient
from frontend_browser import BrowserUnavailable, open_frontend, save_screenshot

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
    widgets: Object.fromEntries(saved.nodes.map(n => [n.id, n.widgets_values ?? null])),
    page_text: document.body.innerText,
  };
}"""

FIT_VIEW_JS = """() => {
  const canvas = window.app.canvas;
  canvas.selectItems();
  canvas.fitViewToSelectionAnimated({duration: 1});
  canvas.deselectAll();
  canvas.setDirty(true, true);
}"""

MISSING_NODES_TEXT = "missing nodes"  # the front end's dialog: "This workflow has missing nodes"


def screenshot_dir() -> Path:
    return Path(os.environ.get("FLOWGRPO_SCREENSHOTS") or REPO_ROOT / ".runtime" / "screenshots")


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, f"{path} is not a real screenshot"


@pytest.fixture(scope="module")
def frontend(comfy_server):
    """One browser page on the session's ComfyUI server, for the whole module."""
    try:
        with open_frontend(comfy_server.url) as page:
            banner = page.get_by_text("Introducing Nodes 2.0")
            if banner.count():  # the front end's announcement bar sits over the top of every screenshot
                banner.locator("xpath=../..").locator("button").last.click()
            yield page
    except BrowserUnavailable as exc:
        pytest.fail(f"the front-end test needs a browser: {exc}")


@pytest.fixture(scope="module")
def pack_nodes(comfy_server) -> dict[str, str]:
    """``{node id: display name}`` of every node the server says comes from the pack."""
    with ComfyClient(comfy_server.url) as client:
        info = client.object_info()
    nodes = {name: spec["display_name"] for name, spec in info.items() if spec.get("python_module") == PACK_MODULE}
    assert len(nodes) >= 18, f"the server lists only {sorted(nodes)} from {PACK_MODULE}"
    return nodes


def test_frontend_registers_every_pack_node(frontend, pack_nodes):
    titles = frontend.evaluate("(ids) => ids.map(id => LiteGraph.registered_node_types[id]?.title ?? null)",
                               list(pack_nodes))
    assert dict(zip(pack_nodes, titles)) == pack_nodes


def test_a_missing_node_is_reported(frontend):
    """The control for the workflow test: an unknown node type is flagged and the missing-nodes dialog opens."""
    workflow = json.loads(UI_WORKFLOWS[0].read_text())
    workflow["nodes"][0]["type"] = "FlowGRPONoSuchNode"
    report = frontend.evaluate(LOAD_JS, [workflow, "missing_node"])
    assert report["missing"] == ["FlowGRPONoSuchNode"]
    assert MISSING_NODES_TEXT in report["page_text"]
    frontend.keyboard.press("Escape")
    frontend.wait_for_function("(text) => !document.body.innerText.includes(text)", arg=MISSING_NODES_TEXT)


@pytest.mark.parametrize("path", UI_WORKFLOWS, ids=[p.stem for p in UI_WORKFLOWS])
def test_example_workflow_loads_without_missing_nodes(frontend, path):
    workflow = json.loads(path.read_text())
    report = frontend.evaluate(LOAD_JS, [workflow, path.stem])
    assert report["missing"] == [] and report["with_errors"] == []
    assert MISSING_NODES_TEXT not in report["page_text"]
    # the front end read the file as written: same nodes, links and widget values (the export's widget order,
    # including the seed's "control after generate" slot, is the front end's)
    assert report["types"] == {str(n["id"]): n["type"] for n in workflow["nodes"]}
    assert sorted(report["links"]) == sorted(link[:5] for link in workflow["links"])
    assert report["widgets"] == {str(n["id"]): n.get("widgets_values") for n in workflow["nodes"]}
    frontend.evaluate(FIT_VIEW_JS)
    frontend.wait_for_timeout(300)  # one animation frame of the 1 ms fit and a redraw
    assert_png(save_screenshot(frontend, screenshot_dir() / f"workflow_{path.stem}.png"))


OPTION_TEXTS_JS = "() => [...document.querySelectorAll('.p-autocomplete-option')].map(o => o.innerText).join('|')"


def search_results(page, query: str) -> list[str]:
    """The display names the node search box offers for ``query`` (first line of each option)."""
    page.evaluate("() => window.app.extensionManager.command.execute('Workspace.SearchBox.Toggle')")
    options = page.locator(".p-autocomplete-option")
    options.first.wait_for()
    before = page.evaluate(OPTION_TEXTS_JS)  # the box opens on the popular nodes; wait until the query replaced them
    page.keyboard.insert_text(query)  # one input event, so the first new result list is the whole query's
    page.wait_for_function(f"(before) => ({OPTION_TEXTS_JS})() !== before", arg=before)
    return [text.split("\n")[0].strip() for text in options.all_inner_texts()]


def test_node_search_finds_every_pack_node(frontend, pack_nodes):
    for node_id, name in pack_nodes.items():
        results = search_results(frontend, name)
        assert name in results[:3], f"searching {name!r} offers {results[:5]}"
        frontend.keyboard.press("Escape")
    results = search_results(frontend, "FlowGRPO")
    assert all(r.startswith("FlowGRPO") for r in results[:5]) and len(results) >= 5, results
    assert_png(save_screenshot(frontend, screenshot_dir() / "node_search.png"))
    frontend.keyboard.press("Escape")


def test_help_page_opens_from_the_node_library(frontend):
    """The "?" of a node in the node library shows the pack's web/docs/<NodeId>.md, rendered."""
    page_source = (REPO_ROOT / "web" / "docs" / "FlowGRPOTrain.md").read_text()
    title = next(line[2:].strip() for line in page_source.splitlines() if line.startswith("# "))
    frontend.get_by_role("button", name="Node Library (n)").click()
    frontend.locator("input.search-box-input").first.fill("GRPO Train")
    leaf = frontend.locator(".tree-leaf", has_text="FlowGRPO GRPO Train").first
    leaf.hover()
    leaf.locator("button").last.click()  # bookmark, then help
    help_panel = frontend.locator(".node-help-content")
    help_panel.wait_for()
    text = help_panel.inner_text()
    assert title in text and "Inputs" in text and "group_size" in text
    assert_png(save_screenshot(frontend, screenshot_dir() / "help_page.png"))
