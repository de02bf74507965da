#!/usr/bin/env python
"""Write the example workflows from their Python specs (flowgrpo/example_specs.py).

For every example: example_workflows/<name>.json (UI workflow, listed by ComfyUI's template browser) and
example_workflows/api/<name>.json (its API twin). The node schemas come from a ComfyUI server: --server URL, or one
started here on --home (default .runtime/demo_home, where the demo models are built first and empty stand-ins for
the real-model examples' files are listed, so that the model names validate). Every workflow is validated before anything is written.

    .venv/bin/python scripts/make_workflows.py [--only NAME ...] [--check] [--server URL]

--check writes nothing and exits 1 when a committed file differs from what the spec gives.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flowgrpo.client import ComfyClient  # noqa: E402
from flowgrpo_core.checkpoint import atomic_write_bytes  # noqa: E402
from flowgrpo.example_specs import EXAMPLES, paths, render, write_placeholders  # noqa: E402
from flowgrpo.server import make_home, start_server  # noqa: E402
from flowgrpo.workflow import ui_to_api, validate_api  # noqa: E402


def dump(obj: dict) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def object_info_source(args):
    if args.server:
        with ComfyClient(args.server) as client:
            yield client.object_info()
        return
    from flowgrpo.demo_models import build_demo_models

    home = make_home(Path(args.home))
    build_demo_models(home / "models", log=lambda line: print(line, flush=True))
    write_placeholders(home / "models")  # the real-model examples' file names, as empty stand-ins
    print(f"starting ComfyUI on {home} ...", flush=True)
    with start_server(home) as server, ComfyClient(server.url) as client:
        yield client.object_info()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=sorted(EXAMPLES), help="only these examples")
    parser.add_argument("--check", action="store_true", help="compare with the committed files, write nothing")
    parser.add_argument("--server", metavar="URL", help="take the node schemas from this running ComfyUI")
    parser.add_argument("--home", default=str(ROOT / ".runtime" / "demo_home"), help="home of the started server")
    args = parser.parse_args()
    with object_info_source(args) as info:
        rendered = {}
        for name in args.only or sorted(EXAMPLES):
            ui, api = render(EXAMPLES[name], info)
            problems = validate_api(api, info)
            if ui_to_api(ui, info) != api:
                problems.append("the UI workflow does not convert back to the API twin")
            if problems:
                print(f"{name}: not valid:\n  - " + "\n  - ".join(problems), file=sys.stderr)
                return 1
            rendered[name] = (ui, api)
    stale = []
    for name, (ui, api) in rendered.items():
        for path, obj in zip(paths(name, ROOT), (ui, api)):
            current = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
            if current == obj:
                continue
            stale.append(path)
            if not args.check:
                write(path, dump(obj))
                print(f"wrote {path.relative_to(ROOT)}")
    if args.check and stale:
        print("out of date: " + ", ".join(str(p.relative_to(ROOT)) for p in stale), file=sys.stderr)
        return 1
    print(f"{len(rendered)} example(s) {'checked' if args.check else 'up to date'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
