"""Shared setup of the in-process ComfyUI benchmarks: command-line sizes and a ComfyUI with the pack loaded."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "comfy"))

import runtime  # noqa: E402  (tests/comfy/runtime.py)


def parse_sizes(batch: int) -> argparse.Namespace:
    """``--depth`` (MMDiT depth, hidden = 64 * depth), ``--size`` (latent side), ``--batch``, ``--steps``,
    ``--repeats``."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--depth", type=int, default=4, help="MMDiT depth (hidden = 64 * depth)")
    parser.add_argument("--size", type=int, default=32, help="latent height and width")
    parser.add_argument("--batch", type=int, default=batch)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    return parser.parse_args()


def comfy_in_process():
    """``(NODE_CLASS_MAPPINGS, run)`` for a CPU ComfyUI on a throw-away home; ``run(name, **inputs)`` calls a node
    the way the executor does."""
    home = runtime.make_home(Path(tempfile.mkdtemp(prefix="flowgrpo_bench_")), ROOT)
    runtime.setup_inprocess(Path((ROOT / ".runtime" / "comfyui_path").read_text().strip()), home)
    node = runtime.init_nodes()
    from conftest import call_node

    def run(name, **kw):
        return call_node(node[name], **kw)

    return node, run
