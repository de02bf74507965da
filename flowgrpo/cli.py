"""``python -m flowgrpo``: run, convert and validate ComfyUI workflows headlessly; run the tiny demo.

    python -m flowgrpo run WORKFLOW.json [--server URL] [--home DIR] [--timeout S] [--set NODE.INPUT=VALUE ...]
    python -m flowgrpo convert WORKFLOW.json -o OUT.json [--server URL]
    python -m flowgrpo validate WORKFLOW.json [--server URL]
    python -m flowgrpo demo

Without ``--server`` a private ComfyUI server is started on ``--home`` (see :mod:`flowgrpo.server`) and stopped at
the end. Progress goes to stdout, errors to stderr. Exit codes: 0 success, 1 a node failed (or the server did),
2 the workflow is unusable (bad file, unknown node, failed validation), 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Iterator, Optional

from .client import ComfyClient, ComfyError
from .report import Reporter
from .server import REPO_ROOT, ComfyUINotFound, ServerStartError, make_home, start_server
from .workflow import WorkflowError, apply_overrides, is_ui_format, load_workflow, ui_to_api, validate_api

EXIT_OK, EXIT_FAILED, EXIT_INVALID, EXIT_INTERRUPTED = 0, 1, 2, 130
DEFAULT_HOME = REPO_ROOT / ".runtime" / "home"
DEMO_HOME = REPO_ROOT / ".runtime" / "demo_home"
DEMO_WORKFLOW = REPO_ROOT / "example_workflows" / "flowgrpo_tiny_demo.json"
INTERRUPT_GRACE_S = 60.0


def _say(text: str) -> None:
    print(text, flush=True)


def _err(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class _Failed(Exception):
    """Stop with this exit code (the message is already printed)."""

    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


@contextlib.contextmanager
def _session(args, default_home: Path) -> Iterator[tuple[ComfyClient, Optional[object]]]:
    """A client for ``--server``, or for a private server started on ``--home`` (stopped on exit)."""
    if args.server:
        with ComfyClient(args.server) as client:
            yield client, None
        return
    home = make_home((Path(args.home) if args.home else default_home).resolve())
    _say(f"starting ComfyUI (home {home}) ...")
    with start_server(home, extra_args=args.comfy_arg or ()) as server:
        _say(f"ComfyUI is up at {server.url} after {server.startup_s:.1f} s (log {server.log_path})")
        try:
            with ComfyClient(server.url) as client:
                yield client, server
        finally:
            _say("stopping ComfyUI")


def _to_api(workflow: dict, object_info: dict) -> dict:
    return ui_to_api(workflow, object_info) if is_ui_format(workflow) else workflow


def _prepare(args, client: ComfyClient, workflow: dict) -> dict:
    """The validated API prompt (UI converted through the server's /object_info, ``--set`` applied)."""
    info = client.object_info()
    api = apply_overrides(_to_api(workflow, info), getattr(args, "set", None) or [], info)
    problems = validate_api(api, info)
    if problems:
        _err("the workflow is not valid:")
        for p in problems:
            _err(f"  - {p}")
        raise _Failed(EXIT_INVALID)
    return api


def _execute(client: ComfyClient, api: dict, workflow: dict, server, timeout: Optional[float]) -> int:
    titles = {i: (n.get("_meta") or {}).get("title") or n["class_type"] for i, n in api.items()}
    reporter = Reporter(sys.stdout, titles, server.output_dir if server is not None else None)
    extra = {"extra_pnginfo": {"workflow": workflow}} if is_ui_format(workflow) else None
    try:
        prompt_id = client.queue_prompt(api, extra)
    except ComfyError as e:
        _err(f"error: {e}")
        return EXIT_INVALID if e.kind == "rejected" else EXIT_FAILED
    _say(f"queued prompt {prompt_id} ({len(api)} nodes)")
    if client.skipped_outputs:
        _err(f"warning: the server skipped outputs that failed its validation:\n{client.skipped_outputs}")
    try:
        try:
            entry = client.wait(prompt_id, timeout, reporter)
        except KeyboardInterrupt:
            _err("Ctrl-C: interrupting the prompt (Ctrl-C again quits at once)")
            entry = _stop(client, prompt_id, reporter)
    except ComfyError as e:
        if e.kind == "interrupted":
            _err(f"interrupted: {e}")
            return EXIT_INTERRUPTED
        _err(f"error: {e}")
        return EXIT_FAILED
    except TimeoutError as e:
        client.cancel(prompt_id)
        _err(f"error: {e} (--timeout); the prompt was interrupted")
        return EXIT_FAILED
    status = (entry.get("status") or {}).get("status_str")
    if status != "success":
        _err(f"error: prompt {prompt_id} finished with status {status!r}")
        return EXIT_FAILED
    for line in reporter.summary():
        _say(line)
    return EXIT_OK


def _stop(client: ComfyClient, prompt_id: str, reporter: Reporter) -> dict:
    """Cancel the prompt (interrupt it, or drop it from the queue) and wait until the server confirms; raises
    ComfyError (kind ``interrupted``), or returns the history entry when it finished first."""
    client.connect()  # a fresh websocket (Ctrl-C may have cut the old one mid-frame) before the interrupt's events
    client.cancel(prompt_id)
    deadline = time.monotonic() + INTERRUPT_GRACE_S
    while time.monotonic() < deadline:
        try:
            return client.wait(prompt_id, 2.0, reporter)
        except TimeoutError:
            entry = client.finished_entry(prompt_id)  # its events may have come before the new websocket
            if entry is not None:
                return entry
            if not client.is_queued(prompt_id):
                raise ComfyError(f"prompt {prompt_id} was removed from the queue before it started",
                                 kind="interrupted") from None
    raise ComfyError(f"prompt {prompt_id} did not stop within {INTERRUPT_GRACE_S:.0f} s of the interrupt",
                     kind="interrupted")


def _run_workflow(args, path: Path, default_home: Path) -> int:
    workflow = load_workflow(path)
    with _session(args, default_home) as (client, server):
        api = _prepare(args, client, workflow)
        return _execute(client, api, workflow, server, args.timeout)


# ------------------------------------------------------------------------------------------------ commands
def cmd_run(args) -> int:
    return _run_workflow(args, Path(args.workflow), DEFAULT_HOME)


def cmd_convert(args) -> int:
    workflow = load_workflow(args.workflow)
    with _session(args, DEFAULT_HOME) as (client, _server):
        api = _to_api(workflow, client.object_info())
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    from flowgrpo_core.checkpoint import atomic_write_bytes  # imports torch: only here

    atomic_write_bytes(out, (json.dumps(api, indent=2) + "\n").encode("utf-8"))
    kind = "UI workflow converted" if is_ui_format(workflow) else "already an API prompt, copied"
    _say(f"{kind}: {len(api)} nodes -> {out}")
    return EXIT_OK


def cmd_validate(args) -> int:
    workflow = load_workflow(args.workflow)
    with _session(args, DEFAULT_HOME) as (client, _server):
        api = _prepare(args, client, workflow)
    _say(f"valid: {len(api)} nodes")
    return EXIT_OK


def cmd_demo(args) -> int:
    path = Path(args.workflow) if args.workflow else DEMO_WORKFLOW
    if not path.is_file():
        _err(f"error: the demo workflow {path} does not exist (yet); run a workflow of your own with "
             "`python -m flowgrpo run WORKFLOW.json`")
        return EXIT_INVALID
    from .demo_models import build_demo_models  # imports ComfyUI into this process

    home = make_home(Path(args.home) if args.home else DEMO_HOME)
    _say(f"demo models in {home / 'models'}:")
    for kind, name in build_demo_models(home / "models", log=lambda line: _say(f"  {line}")).items():
        _say(f"  {kind}: {name}")
    args.home = str(home)
    return _run_workflow(args, path, DEMO_HOME)


def cmd_runtime(args) -> int:
    from . import server

    root = server.locate_comfyui()
    v = server.runtime_versions(root)
    import torch  # the environment's, not ComfyUI's: imports no ComfyUI

    _say(f"ComfyUI {v['comfyui']} (front end {v['frontend']}) at {root}; Python {sys.version.split()[0]}, "
         f"torch {torch.__version__}")
    return EXIT_OK


# ------------------------------------------------------------------------------------------------ parser
def _add_connection(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", metavar="URL", help="use a running ComfyUI (e.g. http://127.0.0.1:8188) instead of "
                                                   "starting one")
    p.add_argument("--home", metavar="DIR", help="base directory of the server started without --server "
                                                 f"(default {DEFAULT_HOME.relative_to(REPO_ROOT)})")
    p.add_argument("--comfy-arg", action="append", metavar="FLAG",
                   help="extra flag for the started server, e.g. --comfy-arg=--cache-none (repeatable)")


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--timeout", type=float, metavar="S", help="give up (and interrupt the prompt) after S seconds")
    p.add_argument("--set", action="append", metavar="NODE.INPUT=VALUE",
                   help="override an input; NODE is a node id, title or class (VALUE is JSON when it parses, "
                        "else text), e.g. --set 3.steps=10 --set \"GRPO Train.iterations=5\" (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m flowgrpo", description="Run ComfyUI workflows headlessly.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run a workflow (UI or API format) and stream its progress")
    p.add_argument("workflow", help="the workflow JSON file")
    _add_connection(p)
    _add_run_options(p)
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("convert", help="convert a UI workflow to an API prompt")
    p.add_argument("workflow")
    p.add_argument("-o", "--output", required=True, metavar="OUT.json")
    _add_connection(p)
    p.set_defaults(func=cmd_convert)
    p = sub.add_parser("validate", help="check a workflow against the server's nodes")
    p.add_argument("workflow")
    _add_connection(p)
    p.add_argument("--set", action="append", metavar="NODE.INPUT=VALUE", help="as for run")
    p.set_defaults(func=cmd_validate)
    p = sub.add_parser("demo", help="build the tiny demo models and run the tiny GRPO demo workflow on a private "
                                    "server")
    p.add_argument("--workflow", metavar="PATH", help=f"default {DEMO_WORKFLOW.relative_to(REPO_ROOT)}")
    p.add_argument("--home", metavar="DIR", help=f"default {DEMO_HOME.relative_to(REPO_ROOT)}")
    p.add_argument("--comfy-arg", action="append", metavar="FLAG", help="extra flag for the server (repeatable)")
    _add_run_options(p)
    p.set_defaults(func=cmd_demo, server=None)
    p = sub.add_parser("runtime", help="print the ComfyUI runtime in use (COMFYUI_PATH, else the bootstrapped one), "
                                       "its front end and torch")
    p.set_defaults(func=cmd_runtime)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except _Failed as e:
        return e.code
    except WorkflowError as e:
        _err(f"error: {e}")
        return EXIT_INVALID
    except (ComfyUINotFound, ServerStartError) as e:
        _err(f"error: {e}")
        return EXIT_FAILED
    except ComfyError as e:
        _err(f"error: {e}")
        return EXIT_FAILED
    except KeyboardInterrupt:
        _err("cancelled")
        return EXIT_INTERRUPTED
