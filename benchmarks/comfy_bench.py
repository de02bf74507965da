"""Shared setup of the in-process ComfyUI benchmarks: command-line sizes, a ComfyUI with the pack loaded, the benchmark
models (a small SD3 or a FLUX-width model built from ComfyUI's own classes) with their conditioning, and timing.

Models (``--model``):

* ``sd3``: MMDiT of ``--depth`` joint blocks, hidden ``64 * depth`` (the default: depth 4, hidden 256), true CFG 4.5,
  context 4096 / pooled 2048 (SD3's text-encoder widths), 8 tokens.
* ``flux-width``: ComfyUI's FLUX at the real width (hidden 3072, 24 heads of 128, MLP 4x, context 4096, pooled 768,
  guidance embedding) with ``--depth`` double blocks and ``--depth`` single blocks (FLUX.1 has 19 + 38); CFG-free
  (guidance 3.5), as FLUX.1-dev trains. About 0.5 B parameters per depth unit.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "comfy"))

import runtime  # noqa: E402  (tests/comfy/runtime.py)

MODELS = ("sd3", "flux-width")
DTYPES = ("fp32", "bf16", "fp16")


def parse_sizes(batch: int, parser: Optional[argparse.ArgumentParser] = None, depth: int = 4) -> argparse.Namespace:
    """``--model``, ``--depth``, ``--size`` (latent side), ``--batch``, ``--steps``, ``--repeats``, ``--tokens``,
    ``--device`` (``cpu`` / ``cuda``; default: ComfyUI's choice) and ``--dtype`` of the model weights."""
    parser = parser or argparse.ArgumentParser()
    parser.add_argument("--model", choices=MODELS, default="sd3")
    parser.add_argument("--depth", type=int, default=depth,
                        help="sd3: joint blocks (hidden = 64 * depth); flux-width: double and single blocks each")
    parser.add_argument("--size", type=int, default=32, help="latent height and width")
    parser.add_argument("--batch", type=int, default=batch)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=8, help="text tokens of the conditioning")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None)
    parser.add_argument("--dtype", choices=DTYPES, default="fp32", help="weight dtype of the diffusion model")
    return parser.parse_args()


def comfy_in_process(device: Optional[str] = None):
    """``(NODE_CLASS_MAPPINGS, run)`` for an in-process ComfyUI (CPU unless ``device == "cuda"``) on a throw-away
    home; ``run(name, **inputs)`` calls a node the way the executor does."""
    home = runtime.make_home(Path(tempfile.mkdtemp(prefix="flowgrpo_bench_")), ROOT)
    runtime.setup_inprocess(Path((ROOT / ".runtime" / "comfyui_path").read_text().strip()), home,
                            cpu=device != "cuda")
    node = runtime.init_nodes()
    from conftest import call_node

    def run(name, **kw):
        return call_node(node[name], **kw)

    return node, run


def pack_module(node_mappings: dict, name: str):
    """The pack's module ``name`` (e.g. ``"nodes.state"``) as ComfyUI imported it (from its path, under a package
    name of its own)."""
    package = node_mappings["FlowGRPOSDERollout"].__module__.rsplit(".nodes.", 1)[0]
    return importlib.import_module(f"{package}.{name}")


@dataclass
class BenchModel:
    """A benchmark model with what a sampler needs: CONDITIONING lists of ``batch`` rows, CFG scale, latent shape."""

    name: str
    patcher: Any
    positive: list
    negative: Optional[list]
    cfg: float
    latent_shape: tuple
    description: str

    @property
    def parameters(self) -> int:
        return sum(p.numel() for p in self.patcher.model.diffusion_model.parameters())


def flux_width_config(depth: int) -> dict:
    """ComfyUI FLUX unet config at FLUX.1's width with ``depth`` double and ``depth`` single blocks."""
    return {
        "image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": 768, "context_in_dim": 4096,
        "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24, "depth": depth, "depth_single_blocks": depth,
        "axes_dim": [16, 56, 56], "theta": 10000, "patch_size": 2, "qkv_bias": True, "guidance_embed": True,
    }


def torch_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def _rows(tensor, batch: int):
    return tensor.repeat(batch, *([1] * (tensor.dim() - 1)))


def build_model(args: argparse.Namespace) -> BenchModel:
    """The ``--model`` of ``args`` at ``--depth`` / ``--dtype`` with conditioning for ``--batch`` samples."""
    import torch
    import comfy.supported_models
    import tiny_models
    from flowgrpo.demo_models import build_model_patcher

    dtype = torch_dtype(args.dtype)
    g = torch.Generator().manual_seed(1)
    latent = (args.batch, 16, args.size, args.size)
    with torch.inference_mode():
        if args.model == "sd3":
            patcher = build_model_patcher(comfy.supported_models.SD3, tiny_models.sd3_unet_config(depth=args.depth),
                                          dtype=dtype)
            conds = [[[_rows(c, args.batch), {"pooled_output": _rows(e["pooled_output"], args.batch)}]
                      for c, e in tiny_models.conditioning("sd3", tokens=args.tokens, seed=s)] for s in (1, 2)]
            return BenchModel("sd3", patcher, conds[0], conds[1], 4.5, latent,
                              f"SD3 MMDiT depth {args.depth} (hidden {64 * args.depth}), true CFG 4.5")
        patcher = build_model_patcher(comfy.supported_models.Flux, flux_width_config(args.depth), dtype=dtype)
        context = torch.randn(1, args.tokens, 4096, generator=g) * 0.5
        pooled = torch.randn(1, 768, generator=g) * 0.5
        positive = [[_rows(context, args.batch), {"pooled_output": _rows(pooled, args.batch), "guidance": 3.5}]]
        return BenchModel("flux-width", patcher, positive, None, 1.0, latent,
                          f"FLUX width 3072, {args.depth} double + {args.depth} single blocks, CFG-free")


def describe(args: argparse.Namespace, model: BenchModel) -> str:
    import torch

    device = model.patcher.load_device
    return (f"{model.description}, {model.parameters / 1e6:.0f}M params, {args.dtype}, latent "
            f"{'x'.join(map(str, model.latent_shape))}, {args.steps} steps, {args.tokens} text tokens, device {device}"
            f"{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}, torch "
            f"{torch.__version__}, threads {torch.get_num_threads()}")


def synchronize(device) -> None:
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device=None) -> tuple[float, Any]:
    """``(seconds, fn())`` with the device synchronised before and after."""
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return time.perf_counter() - start, out


def median_ratio(rows: list[tuple[float, float]]) -> float:
    """Median over repeats of ``ours / baseline`` for ``(ours, baseline)`` pairs timed side by side."""
    return statistics.median(a / b for a, b in rows)


# ------------------------------------------------------------------- the README demo in-process (bench_window, bench_iteration)
#: demo model kind -> (stock loader, its file-name input, its other inputs), as the demo workflow loads them
DEMO_LOADERS = {
    "diffusion_model": ("UNETLoader", "unet_name", dict(weight_dtype="default")),
    "text_encoder": ("CLIPLoader", "clip_name", dict(type="sd3", device="default")),
    "vae": ("VAELoader", "vae_name", {}),
}


def bench_home() -> Path:
    """The throw-away ComfyUI home of :func:`comfy_in_process` (the caller deletes it at the end); exits if the
    running ComfyUI has another home, so a benchmark never writes into (or deletes) a user's."""
    import folder_paths

    home = Path(folder_paths.get_folder_paths("diffusion_models")[0]).parents[1]
    if not home.name.startswith("flowgrpo_bench_"):
        raise SystemExit(f"unexpected ComfyUI home {home}")
    return home


def load_demo_models(run: Callable, kinds: tuple[str, ...] = tuple(DEMO_LOADERS)) -> dict[str, Any]:
    """``{kind: MODEL / CLIP / VAE}`` of the README demo's models (``flowgrpo.demo_models``: tiny SD3, random CLIP-L,
    TAESD-16), written into :func:`bench_home`'s models folder (all three files) and loaded with the stock loaders
    the demo uses; ``run`` from :func:`comfy_in_process`, ``kinds`` a subset of :data:`DEMO_LOADERS`."""
    import folder_paths
    from flowgrpo.demo_models import build_demo_models

    bench_home()  # the check: the files go into the throw-away home only
    names = build_demo_models(Path(folder_paths.get_folder_paths("diffusion_models")[0]).parent)
    loaded = {}
    for kind in kinds:
        loader, name_input, inputs = DEMO_LOADERS[kind]
        (loaded[kind],) = run(loader, **{name_input: names[kind]}, **inputs)
    return loaded


def node_inputs(schema: tuple[dict, set], *layers: dict, **fixed) -> dict:
    """Inputs for a V3 node whose ``schema`` is ``(defaults, required ids)`` (bench_window's ``schema_inputs``): the
    defaults, then each layer's values for inputs the node has (later layers win), then ``fixed`` (all of it), so
    inputs added to a node later keep their defaults. Exits naming the required inputs left unfilled."""
    defaults, required = schema
    inputs = dict(defaults)
    for layer in layers:
        inputs.update({k: v for k, v in layer.items() if k in defaults or k in required})
    inputs.update(fixed)
    missing = required - set(inputs)
    if missing:
        raise SystemExit(f"the node has required inputs this benchmark does not fill: {sorted(missing)}")
    return inputs
