"""What the browser test reads and clicks in ComfyUI's front end, for every front end the pack supports.

Front end 1.32 (ComfyUI 0.3.75) and the redesigned 1.4x (1.49 ships with ComfyUI 0.33) show the same things in
different places. Each helper finds the element a front end has (by what is on the page, not by version number) and
returns the same thing for both:

* the node search box: PrimeVue autocomplete options (1.32) or the redesigned search's result items (1.4x);
* a workflow's unknown node types: the "This workflow has missing nodes" dialog (1.32), or the "N errors found"
  overlay whose "View details" opens the errors panel with a missing-node group (1.4x);
* a node's help page: the "?" of its entry in the node library (1.32), or the Info tab of the properties panel for
  the selected node (1.4x, whose node library has no help button).
"""

from __future__ import annotations

#: the node search box's result rows (the first line of a row is the node's display name in both front ends)
SEARCH_OPTIONS = ".p-autocomplete-option, [data-testid=result-item]"
OPTION_TEXTS_JS = f"() => [...document.querySelectorAll({SEARCH_OPTIONS!r})].map(o => o.innerText).join('|')"

MISSING_NODES_DIALOG = "missing nodes"  # 1.32: "This workflow has missing nodes"
PROPERTIES_PANEL = "[data-testid=properties-panel]"  # 1.4x: the right-hand panel (errors, parameters, info)
PROPERTIES_TOGGLE = "Toggle properties panel"


def frontend_version(page) -> str:
    """The version of the front end the page runs (``window.__COMFYUI_FRONTEND_VERSION__``, set by both)."""
    return page.evaluate("() => window.__COMFYUI_FRONTEND_VERSION__")


def search_results(page, query: str) -> list[str]:
    """The display names the node search box offers for ``query``; the box is left open."""
    page.evaluate("() => window.app.extensionManager.command.execute('Workspace.SearchBox.Toggle')")
    page.locator(SEARCH_OPTIONS).first.wait_for()  # both open on popular nodes
    before = page.evaluate(OPTION_TEXTS_JS)  # wait until the query's results replaced them
    page.keyboard.insert_text(query)  # one input event, so the first new result list is the whole query's
    page.wait_for_function(f"(before) => ({OPTION_TEXTS_JS})() !== before", arg=before)
    return [text.split("\n")[0].strip() for text in page.locator(SEARCH_OPTIONS).all_inner_texts()]


def _close_properties_panel(page) -> None:
    page.get_by_role("button", name=PROPERTIES_TOGGLE).click()
    page.locator(PROPERTIES_PANEL).wait_for(state="detached")
    page.mouse.move(page.viewport_size["width"] // 2, page.viewport_size["height"] - 5)  # no tooltip in screenshots


def missing_node_report(page) -> str:
    """The front end's report of unknown node types in the workflow it has just loaded, as text ("" when it reports
    none); the report is closed again."""
    dialog = page.get_by_role("dialog").filter(has_text=MISSING_NODES_DIALOG)
    if dialog.count():
        text = dialog.first.inner_text()
        page.keyboard.press("Escape")
        dialog.wait_for(state="detached")
        return text
    details = page.get_by_role("button", name="View details")
    if not details.count():
        return ""
    details.first.click()
    page.locator(PROPERTIES_PANEL).wait_for()
    text = "\n".join(page.locator("[data-testid=error-group-missing-node]").all_inner_texts())
    _close_properties_panel(page)
    return text


def open_node_help(page, node_type: str, display_name: str):
    """Open the help page of the node ``node_type`` (titled ``display_name``); returns its rendered content (a
    locator) and a function that closes it again."""
    library = page.get_by_role("button", name="Node Library (n)")
    library.click()
    page.locator("input[placeholder^='Search']:visible").first.fill(display_name)
    entry = page.get_by_role("treeitem").filter(has=page.get_by_text(display_name, exact=True)).last
    entry.hover()
    help_button = entry.locator(".help-button")
    if help_button.count():
        help_button.click()
        close = library.click
    else:
        library.click()  # closes the library; the help is the selected node's, in the properties panel
        page.evaluate("""async (type) => {
          await window.app.extensionManager.command.execute('Comfy.NewBlankWorkflow');
          const node = LiteGraph.createNode(type);
          window.app.graph.add(node);
          window.app.canvas.selectNode(node);
          window.app.canvas.centerOnNode(node); }""", node_type)
        page.get_by_role("button", name=PROPERTIES_TOGGLE).click()
        page.get_by_role("tab", name="Info").click()

        def close():
            _close_properties_panel(page)
    page.wait_for_function("() => document.querySelector('.node-help-content')?.innerText.trim()")  # fetched, shown
    return page.locator(".node-help-content"), close
