"""ComfyUI's front end in a real headless Chromium, driven by Playwright (no browser download).

The browser is the system Chromium: ``$FLOWGRPO_CHROMIUM`` if set, else Debian's ``/usr/bin/chromium`` (package
``chromium``, which ``scripts/bootstrap.sh --test`` installs when it runs as root), else a ``chromium`` /
``chromium-browser`` / ``google-chrome`` on PATH. Playwright's Python package drives it through
``executable_path``; ``playwright install`` (a download outside the package registries) is never needed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import urllib.request
from pathlib import Path
from typing import Iterator

from flowgrpo_core.checkpoint import atomic_write_bytes  # the repository root is on sys.path (tests/comfy)

#: Chromium flags for a closed network as root: no sandbox (root), no GPU, and none of the background
#: connections (updates, sync, QUIC) that this machine's network refuses.
CHROMIUM_ARGS = ("--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic")

#: Front-end settings written through the server before the page opens: no first-run Templates dialog over the
#: canvas, no minimap over the screenshots, and node text drawn at every zoom (litegraph's low-detail mode would
#: draw a fitted graph as empty boxes).
FRONTEND_SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False,
                     "LiteGraph.Canvas.MinFontSizeForLOD": 1}

#: The page is ready when the app has a graph and the pack's node definitions are registered.
READY_JS = ("() => window.app && window.app.graph && window.LiteGraph "
            "&& !!LiteGraph.registered_node_types['FlowGRPOTrain']")

INSTALL_HINT = ("install Debian's Chromium (`apt-get install chromium`, which `bash scripts/bootstrap.sh --test` "
                "does when run as root) or point FLOWGRPO_CHROMIUM at a Chromium/Chrome binary")


class BrowserUnavailable(RuntimeError):
    """No Chromium binary or no Playwright package: the message says how to install it."""


def chromium_path() -> str:
    """The Chromium binary to drive; raises :class:`BrowserUnavailable` with the fix when there is none."""
    explicit = os.environ.get("FLOWGRPO_CHROMIUM")
    if explicit:
        if not (os.path.isfile(explicit) and os.access(explicit, os.X_OK)):
            raise BrowserUnavailable(f"FLOWGRPO_CHROMIUM={explicit} is not an executable file")
        return explicit
    for candidate in ("/usr/bin/chromium", *filter(None, map(shutil.which,
                                                              ("chromium", "chromium-browser", "google-chrome")))):
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise BrowserUnavailable(f"no Chromium found: {INSTALL_HINT}")


def store_settings(server_url: str, settings: dict) -> None:
    """Write front-end settings for the server's default user (``POST /settings/<id>``, as the front end does)."""
    for key, value in settings.items():
        request = urllib.request.Request(f"{server_url}/settings/{key}", data=json.dumps(value).encode(),
                                         method="POST", headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            if response.status != 200:
                raise RuntimeError(f"storing front-end setting {key} failed: HTTP {response.status}")


@contextlib.contextmanager
def open_frontend(server_url: str, viewport: tuple[int, int] = (1600, 1000),
                  timeout_ms: int = 90_000) -> Iterator[object]:
    """A Playwright ``Page`` on ComfyUI's front end at ``server_url``, ready (graph up, pack nodes registered).

    The page records console errors in ``page.console_errors`` (list of str)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        raise BrowserUnavailable("the playwright package is missing: `bash scripts/bootstrap.sh --test` installs "
                                 "it (pip install playwright; no browser download is needed)") from exc
    executable = chromium_path()
    store_settings(server_url, FRONTEND_SETTINGS)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True, args=list(CHROMIUM_ARGS))
        try:
            page = browser.new_page(viewport={"width": viewport[0], "height": viewport[1]})
            page.console_errors = []
            page.on("console", lambda m: m.type == "error" and page.console_errors.append(m.text))
            page.set_default_timeout(timeout_ms)
            page.goto(server_url)
            page.wait_for_function(READY_JS, timeout=timeout_ms)
            yield page
        finally:
            browser.close()


def save_screenshot(page, path: Path) -> Path:
    """A PNG of the whole window at ``path`` (folders made; written atomically)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_bytes(path, page.screenshot())
