"""The nodes' help pages (``web/docs/<NodeId>.md``): one per registered node, tables that match the node schemas,
served by a real ComfyUI server where the front end fetches them.

ComfyUI's front end (comfyui_frontend_package 1.32.9, ``NodeHelpService.fetchCustomNodeHelp``) takes the pack folder
from a node's ``python_module`` (``custom_nodes.<folder>``, anything after ``@`` dropped), asks for
``/extensions/<folder>/docs/<NodeId>/<locale>.md`` and falls back to ``/extensions/<folder>/docs/<NodeId>.md``; the
server serves the pack's ``WEB_DIRECTORY`` (``./web``) under ``/extensions/<folder>/``. The pack keeps one flat page
per node, so no locale folder may shadow it.

Page conventions checked here (Markdown tables parsed by :func:`section_table`):

* the first line is ``# <display name>``;
* ``## Inputs``: ``| Input | Type | Default | What it does |``, one row per schema input in schema order, the id in
  backticks; Type is the input's io type (``COMBO`` for a combo, ``*`` for any type); Default is the widget default
  (``—`` where the input has none; a multiline text default is described in words and not compared); the row of an
  optional input says "optional". Hidden inputs (``io.Hidden``) are not inputs of the schema and get no row;
* ``## Outputs``: ``| Output | Type | What it is |``, one row per output in order, named by what the node shows
  (its display name, else its io type: ``/object_info``'s ``output_name``), in backticks.

The tooltip on every input is checked by ``test_comfy_inprocess.test_pack_nodes_follow_the_conventions``; here
every output must have one too.
"""

from __future__ import annotations

import math
import re
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.comfy

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCS = REPO_ROOT / "web" / "docs"
NO_DEFAULT = ("—", "-")
INPUT_HEADER = ["Input", "Type", "Default", "What it does"]
OUTPUT_HEADER = ["Output", "Type", "What it is"]


# ------------------------------------------------------------------------------------------ Markdown helpers
def _cells(line: str) -> list[str]:
    """The cells of a table row ``| a | b |`` (``\\|`` is a literal pipe inside a cell)."""
    inner = line.strip()
    inner = inner[1:] if inner.startswith("|") else inner
    inner = inner[:-1] if inner.endswith("|") and not inner.endswith("\\|") else inner
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", inner)]


def sections(markdown: str) -> dict[str, list[str]]:
    """``{"## title": lines}`` for every level-2 heading outside code fences (lines up to the next one)."""
    out: dict[str, list[str]] = {}
    current, fenced = None, False
    for line in markdown.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        if not fenced and line.startswith("## "):
            current = line[3:].strip()
            if current in out:
                raise AssertionError(f"section '## {current}' appears twice")
            out[current] = []
        elif current is not None:
            out[current].append(line)
    return out


def section_table(markdown: str, title: str) -> tuple[list[str], list[list[str]]]:
    """``(header, rows)`` of the first table in section ``## title``; AssertionError when there is none or a row has
    another number of cells than the header."""
    lines = sections(markdown).get(title)
    assert lines is not None, f"no '## {title}' section"
    start = next((i for i, line in enumerate(lines) if line.lstrip().startswith("|")), None)
    assert start is not None, f"'## {title}' has no table"
    block = []
    for line in lines[start:]:
        if not line.lstrip().startswith("|"):
            break
        block.append(_cells(line))
    assert len(block) >= 2 and all(re.fullmatch(r":?-{3,}:?", c) for c in block[1]), \
        f"'## {title}': the table's second line is not a |---| separator"
    header, rows = block[0], block[2:]
    for row in rows:
        assert len(row) == len(header), f"'## {title}': row {row} has {len(row)} cells, the header {len(header)}"
    return header, rows


def code_span(cell: str) -> str | None:
    """``x`` for a cell that is exactly one code span ``\\`x\\```, else None."""
    m = re.fullmatch(r"`([^`]+)`", cell.strip())
    return m.group(1) if m else None


def default_problem(cell: str, default) -> str | None:
    """Why the Default cell does not state ``default`` (None: it does, or it is a described multiline text)."""
    text = code_span(cell) or cell.strip()
    if default is None:
        return None if cell.strip() in NO_DEFAULT else f"the input has no default, write {NO_DEFAULT[0]}"
    if isinstance(default, bool):
        return None if text.lower() == str(default).lower() else f"the default is {str(default).lower()}"
    if isinstance(default, (int, float)):
        try:
            ok = math.isclose(float(text), float(default), rel_tol=1e-9, abs_tol=0.0)
        except ValueError:
            ok = False
        return None if ok else f"the default is {default!r}"
    if isinstance(default, str):
        if "\n" in default:
            return None
        if default == "":
            return None if text in ('""', "''") else 'the default is the empty string, write `""`'
        return None if text == default else f"the default is {default!r}"
    return f"cannot compare a default of type {type(default).__name__}"


# ------------------------------------------------------------------------------------------ the pack's nodes
@pytest.fixture(scope="module")
def pack_nodes(comfy_nodes, flowgrpo_pack) -> dict:
    """``{node_id: class}`` of every node the pack registers (``nodes.NODE_CLASSES``), as ComfyUI registered it."""
    nodes = {cls.GET_SCHEMA().node_id: cls for cls in flowgrpo_pack.package_module.NODE_CLASSES}
    assert len(nodes) == len(flowgrpo_pack.package_module.NODE_CLASSES), "two node classes share a node id"
    for node_id, cls in nodes.items():
        assert comfy_nodes.get(node_id) is cls, f"{node_id} is not registered with ComfyUI under its id"
    return nodes


def output_name(output) -> str:
    """What the node shows for an output (``/object_info``'s ``output_name``)."""
    return output.display_name or output.get_io_type()


def test_every_node_has_one_help_page_and_every_page_a_node(pack_nodes):
    assert DOCS.is_dir(), f"{DOCS} is missing"
    entries = sorted(DOCS.iterdir())
    strays = [p.name for p in entries if not (p.is_file() and p.suffix == ".md")]
    assert not strays, f"web/docs holds more than <NodeId>.md files (a folder would shadow a page): {strays}"
    pages = {p.stem for p in entries}
    assert pages - set(pack_nodes) == set(), f"help pages for nodes that do not exist: {sorted(pages - set(pack_nodes))}"
    assert set(pack_nodes) - pages == set(), f"nodes without a help page: {sorted(set(pack_nodes) - pages)}"


def _page_problems(node_id: str, cls) -> list[str]:
    """Everything on ``web/docs/<node_id>.md`` that does not match the node's schema."""
    schema = cls.GET_SCHEMA()
    text = (DOCS / f"{node_id}.md").read_text(encoding="utf-8")
    problems = []
    title = text.splitlines()[0] if text else ""
    if title != f"# {schema.display_name}":
        problems.append(f"first line {title!r}, expected '# {schema.display_name}'")

    header, rows = section_table(text, "Inputs")
    if header != INPUT_HEADER:
        problems.append(f"Inputs header {header}, expected {INPUT_HEADER}")
    documented = {}
    for row in rows:
        name = code_span(row[0])
        if name is None:
            problems.append(f"Inputs row {row[0]!r}: the input id must be one code span")
        elif name in documented:
            problems.append(f"input {name} has two rows")
        else:
            documented[name] = row
    wanted = [i.id for i in schema.inputs]
    missing, extra = set(wanted) - set(documented), set(documented) - set(wanted)
    if missing or extra:
        problems.append(f"Inputs table: missing {sorted(missing)}, not inputs of the node {sorted(extra)}")
    elif list(documented) != wanted:
        problems.append(f"Inputs table order {list(documented)}, schema order {wanted}")
    for inp in schema.inputs:
        row = documented.get(inp.id)
        if row is None:
            continue
        _, type_cell, default_cell, what = row
        if (code_span(type_cell) or type_cell) != inp.get_io_type():
            problems.append(f"input {inp.id}: Type {type_cell!r}, the schema says {inp.get_io_type()!r}")
        why = default_problem(default_cell, getattr(inp, "default", None))
        if why:
            problems.append(f"input {inp.id}: Default {default_cell!r}: {why}")
        if not what.strip():
            problems.append(f"input {inp.id}: empty description")
        if inp.optional and "optional" not in what.lower():
            problems.append(f"input {inp.id} is optional but its row does not say so")

    header, rows = section_table(text, "Outputs")
    if header != OUTPUT_HEADER:
        problems.append(f"Outputs header {header}, expected {OUTPUT_HEADER}")
    got = [(code_span(r[0]) or r[0], code_span(r[1]) or r[1]) for r in rows]
    want = [(output_name(o), o.get_io_type()) for o in schema.outputs]
    if got != want:
        problems.append(f"Outputs table (name, type) {got}, the schema has {want}")
    problems += [f"output {output_name(o)} has no tooltip" for o in schema.outputs if not (o.tooltip or "").strip()]
    problems += [f"output {r[0]}: empty description" for r in rows if not r[2].strip()]
    return problems


def test_help_tables_match_the_node_schemas(pack_nodes):
    problems = {node_id: p for node_id, cls in sorted(pack_nodes.items())
                if (DOCS / f"{node_id}.md").is_file() and (p := _page_problems(node_id, cls))}
    assert not problems, "help pages out of step with the schemas:\n" + "\n".join(
        f"  {node_id}: {p}" for node_id, ps in problems.items() for p in ps)


def test_table_parser_sees_a_missing_row():
    """The checks above can fail: a page without one input row, or with a wrong type, is reported."""
    page = "\n".join(["# X", "", "## Inputs", "", "| Input | Type | Default | What it does |", "|---|---|---|---|",
                      "| `a` | `INT` | `3` | A. |", "| `b` | `STRING` | `\"\"` | B (optional). |",
                      "", "```", "## Outputs", "```", "## Outputs", "", "| Output | Type | What it is |",
                      "|---|---|---|", "| `out` | `FLOAT` | pipe \\| inside |"])
    header, rows = section_table(page, "Inputs")
    assert header == INPUT_HEADER and [code_span(r[0]) for r in rows] == ["a", "b"]
    assert section_table(page, "Outputs")[1] == [["`out`", "`FLOAT`", "pipe | inside"]]
    assert default_problem(rows[0][2], 3) is None and default_problem(rows[0][2], 4) is not None
    assert default_problem(rows[1][2], "") is None and default_problem(rows[1][2], "x") is not None
    assert default_problem("—", None) is None and default_problem("`0`", None) is not None
    assert default_problem("`false`", False) is None and default_problem("`true`", False) is not None
    with pytest.raises(AssertionError, match="no '## Notes' section"):
        section_table(page, "Notes")


# ------------------------------------------------------------------------------------------ through the server
def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, b""


def test_server_serves_each_help_page_where_the_front_end_looks(comfy_server, comfy_client, pack_nodes):
    info = comfy_client.object_info()
    folders = set()
    for node_id in sorted(pack_nodes):
        module = info[node_id]["python_module"]
        parts = module.split(".")
        assert len(parts) >= 2 and parts[0] == "custom_nodes", f"{node_id}: python_module {module!r}"
        folder = parts[1].split("@")[0]
        folders.add(folder)
        assert (comfy_server.home / "custom_nodes" / folder).resolve() == REPO_ROOT, \
            f"{node_id}: python_module {module!r} names a folder that is not this checkout"
        status, body = _get(f"{comfy_client.base_url}/extensions/{folder}/docs/{node_id}.md")
        assert status == 200, f"{node_id}: GET /extensions/{folder}/docs/{node_id}.md answered {status}"
        assert body == (DOCS / f"{node_id}.md").read_bytes(), f"{node_id}: the served page is not web/docs/{node_id}.md"
    assert len(folders) == 1, f"the pack's nodes name several folders: {folders}"
    (folder,) = folders
    status, _ = _get(f"{comfy_client.base_url}/extensions/{folder}/docs/FlowGRPONoSuchNode.md")
    assert status == 404, f"a page for a node that does not exist answered {status}"
