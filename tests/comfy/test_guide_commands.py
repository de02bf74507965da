"""The guide ``docs/rl-for-flow-models.md`` runs as written.

Every shell block of the guide is marked for CI (``<!-- ci: run -->`` or ``<!-- ci: skip (reason) -->``, see
``tests/support/guide_blocks.py``). The ``run`` blocks are executed in order with bash from the repository root, as a
reader types them after ``bash scripts/bootstrap.sh`` (they start real ComfyUI servers through ``python -m flowgrpo``
and write only to git-ignored ``.runtime/``); each must exit with 0 and print the lines of the ``output`` block the
guide shows after it. The local links and images of the guide must exist, and it must show every example workflow.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from guide_blocks import ci_commands, fenced_blocks, image_paths, linked_paths, missing_lines, \
    unclassified_shell_blocks

REPO_ROOT = Path(__file__).resolve().parents[2]
GUIDE = REPO_ROOT / "docs" / "rl-for-flow-models.md"
IMAGES = REPO_ROOT / "docs" / "images"
#: one command's limit; the whole guide runs in about a minute on 2 CPU cores
COMMAND_TIMEOUT_S = 300
OUTPUT_TAIL = 4000


def _guide() -> str:
    return GUIDE.read_text(encoding="utf-8")


#: the virtualenv of this run: ``.venv`` on the default runtime, ``.venv-<version>`` with COMFYUI_PATH (see
#: scripts/runtime_env.sh); the guide's ``.venv/bin/`` commands run in it, as the guide tells such users to.
VENV = Path(sys.prefix).name if Path(sys.prefix).parent == REPO_ROOT else ".venv"


def _env() -> dict:
    venv_bin = REPO_ROOT / VENV / "bin"
    return dict(os.environ, PATH=f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}", PYTHONUNBUFFERED="1")


def _as_run_here(body: str) -> str:
    return body.replace(".venv/bin/", f"{VENV}/bin/")


def test_every_shell_block_is_marked_run_or_skip():
    blocks = fenced_blocks(_guide())
    unmarked = unclassified_shell_blocks(blocks)
    assert not unmarked, "shell blocks without <!-- ci: run --> or <!-- ci: skip (reason) --> at lines " + \
        ", ".join(str(b.line) for b in unmarked)
    commands = ci_commands(blocks)  # raises on misplaced markers
    skipped = [b for b in blocks if b.marker == "skip"]
    assert commands and skipped, "the guide should have commands CI runs and commands it cannot run"
    assert all(b.reason for b in skipped)


@pytest.fixture
def fresh_demo_home():
    """The guide's commands as on a fresh checkout: an existing ``.runtime/demo_home`` (a developer's demo runs, or
    the other runtime's pass) is set aside for the test and put back after it, so its files are kept and the guide's
    first run is the run the guide shows."""
    home = REPO_ROOT / ".runtime" / "demo_home"
    aside = home.with_name("demo_home.before-guide-test")
    if aside.exists():
        shutil.rmtree(aside)
    if home.exists():
        home.rename(aside)
    try:
        yield home
    finally:
        shutil.rmtree(home, ignore_errors=True)
        if aside.exists():
            aside.rename(home)


def test_the_guides_commands_run_as_written(fresh_demo_home):
    commands = ci_commands(fenced_blocks(_guide()))
    for command in commands:
        block = command.block
        proc = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", _as_run_here(block.body)], cwd=REPO_ROOT,
                              env=_env(),
                              capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
        shown = f"\n--- command (guide line {block.line}) ---\n{block.body}\n--- stdout+stderr (tail) ---\n" \
                f"{(proc.stdout + proc.stderr)[-OUTPUT_TAIL:]}"
        assert proc.returncode == 0, f"exit status {proc.returncode}{shown}"
        missing = missing_lines(proc.stdout + proc.stderr, command.expected)
        assert not missing, f"the output lacks the lines the guide shows: {missing}{shown}"


def test_local_links_resolve():
    text = _guide()
    missing = [target for target in linked_paths(text)
               if target not in image_paths(text) and not (GUIDE.parent / target).resolve().exists()]
    assert not missing, f"links to files that do not exist: {missing}"


def test_the_guide_shows_every_example_workflow_and_its_images_exist():
    """The screenshots come from the browser test (tests/comfy/test_frontend_browser.py), committed to docs/images."""
    images = image_paths(_guide())
    stems = sorted(p.stem for p in (REPO_ROOT / "example_workflows").glob("*.json"))
    assert stems, "no example workflows found"
    expected = [f"images/workflow_{stem}.png" for stem in stems] + ["images/node_search.png", "images/help_page.png"]
    not_shown = [path for path in expected if path not in images]
    assert not not_shown, f"the guide does not show {not_shown}"
    outside = [path for path in images if (GUIDE.parent / path).resolve().parent != IMAGES]
    assert not outside, f"images outside docs/images: {outside}"
    absent = [path for path in images if not (GUIDE.parent / path).is_file()]
    assert not absent, f"images the guide shows are missing from docs/images: {absent}"


def test_readme_links_and_screenshots_exist():
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    targets = linked_paths(readme) + image_paths(readme)
    assert "docs/rl-for-flow-models.md" in targets and "docs/images/workflow_flowgrpo_tiny_demo.png" in targets
    missing = [t for t in targets if not (REPO_ROOT / t).exists()]
    assert not missing, f"README links to files that do not exist: {missing}"
