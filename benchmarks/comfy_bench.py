"""Shared setup of the in-process ComfyUI benchmarks: command-line sizes, a ComfyUI with the pack loaded, the benchmark
models (a small SD3 or a FLUX-width model built from ComfyUI's own classes) with their conditioning, and timing.

Models (``--model``):

* ``sd3``: MMDiT of ``--depth`` joint blocks, hidden ``64 * depth`` (the default: depth 4, hidden 256), true CFG 4.5,
  context 4096 / pooled 2048 (SD3's text-encoder widths), 8 tokens.
* ``flux-width``: ComfyUI's FLUX at the real width (hidden 3072, 24 heads of 128, MLP 4x, context 4096, pooled 768,
  guidance embedding) with ``--depth`` double blocks and ``--depth`` single blocks (FLUX.1 has 19 + 38); CFG-free
  (guidance 3.5), as FLUX.1-dev trains. About 0.5 B parameters per depth unit.
* ``flux-dev``: FLUX.1-dev's shape: the same width with ``--depth`` double blocks and twice as many single blocks
  (default 19 + 38: 11.9 B parameters); CFG-free, guidance 3.5.
* ``qwen-image``: Qwen-Image's MMDiT (24 heads of 128, context 3584, rope axes 16/56/56) with ``--depth`` layers
  (default 60: 20.4 B parameters); true CFG 4.0 (norm rescale off, so the stock CFGGuider is the same sampler).

``--heads`` shrinks the width of the FLUX and Qwen-Image models (heads of 128; default 24, the real width) for runs
on a CPU. ``--dtype fp8`` stores the weights as ``float8_e4m3fn`` and computes in bf16 through ComfyUI's manual cast,
as ``UNETLoader`` with ``weight_dtype fp8_e4m3fn`` loads a model. With ``--device cuda`` the model is built on the GPU
and its weights are filled there (seeded), so a 12 B model never exists on the CPU; on the CPU the weights are
``flowgrpo.demo_models.init_weights_``' (the same values as before this option existed).
"""

from __future__ import annotations

import argparse
import functools
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
from flowgrpo.server import locate_comfyui  # noqa: E402

MODELS = ("sd3", "flux-width", "flux-dev", "qwen-image")
DTYPES = ("fp32", "bf16", "fp16", "fp8")
#: default depth of the full-depth models (flux-dev: double blocks, with twice as many single blocks; qwen-image: layers)
FULL_DEPTH = {"flux-dev": 19, "qwen-image": 60}
#: true CFG scale of each model (1.0: CFG-free)
CFG = {"sd3": 4.5, "flux-width": 1.0, "flux-dev": 1.0, "qwen-image": 4.0}


def parse_sizes(batch: int, parser: Optional[argparse.ArgumentParser] = None, depth: int = 4) -> argparse.Namespace:
    """``--model``, ``--depth``, ``--size`` (latent side), ``--batch``, ``--steps``, ``--repeats``, ``--tokens``,
    ``--device`` (``cpu`` / ``cuda``; default: ComfyUI's choice) and ``--dtype`` of the model weights."""
    parser = parser or argparse.ArgumentParser()
    parser.add_argument("--model", choices=MODELS, default="sd3")
    parser.add_argument("--depth", type=int, default=None,
                        help=f"sd3: joint blocks (hidden = 64 * depth); flux-width: double and single blocks each "
                             f"(both default {depth}); flux-dev: double blocks, twice as many single (default 19); "
                             f"qwen-image: layers (default 60)")
    parser.add_argument("--heads", type=int, default=24,
                        help="flux-width, flux-dev, qwen-image: attention heads of 128 (24: the real width)")
    parser.add_argument("--size", type=int, default=32, help="latent height and width")
    parser.add_argument("--batch", type=int, default=batch)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=8, help="text tokens of the conditioning")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None)
    parser.add_argument("--dtype", choices=DTYPES, default="fp32",
                        help="weight dtype of the diffusion model (fp8: float8_e4m3fn storage, bf16 compute)")
    args = parser.parse_args()
    if args.depth is None:
        args.depth = FULL_DEPTH.get(args.model, depth)
    return args


def comfy_in_process(device: Optional[str] = None):
    """``(NODE_CLASS_MAPPINGS, run)`` for an in-process ComfyUI (CPU unless ``device == "cuda"``) on a throw-away
    home; ``run(name, **inputs)`` calls a node the way the executor does."""
    home = runtime.make_home(Path(tempfile.mkdtemp(prefix="flowgrpo_bench_")), ROOT)
    runtime.setup_inprocess(locate_comfyui(ROOT), home,  # COMFYUI_PATH, else the bootstrapped runtime
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


def flux_width_config(depth: int, single_depth: Optional[int] = None, heads: int = 24) -> dict:
    """ComfyUI FLUX unet config at FLUX.1's width (``heads`` of 128: 24 is FLUX.1) with ``depth`` double and
    ``single_depth`` (default ``depth``) single blocks, fitted to the running ComfyUI's ``FluxParams`` (as the tests'
    tiny FLUX: ``tiny_models.fit_to_params``)."""
    from comfy.ldm.flux.model import FluxParams
    from tiny_models import FLUX1_VERSIONED_FIELDS, fit_to_params

    return fit_to_params(FluxParams, {
        "image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": 768, "context_in_dim": 4096,
        "hidden_size": 128 * heads, "mlp_ratio": 4.0, "num_heads": heads, "depth": depth,
        "depth_single_blocks": depth if single_depth is None else single_depth,
        "axes_dim": [16, 56, 56], "theta": 10000, "patch_size": 2, "qkv_bias": True, "guidance_embed": True,
    }, FLUX1_VERSIONED_FIELDS)


QWEN_CONTEXT_DIM = 3584


def qwen_image_config(depth: int = 60, heads: int = 24) -> dict:
    """ComfyUI Qwen-Image unet config: Qwen-Image's own (60 layers, 24 heads of 128) at ``depth`` layers and
    ``heads`` heads."""
    return {
        "image_model": "qwen_image", "patch_size": 2, "in_channels": 64, "out_channels": 16, "num_layers": depth,
        "attention_head_dim": 128, "num_attention_heads": heads, "joint_attention_dim": QWEN_CONTEXT_DIM,
        "axes_dims_rope": (16, 56, 56),
    }


def torch_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.float8_e4m3fn}[name]


def _build_patcher(config_cls, unet_config: dict, dtype, device=None, seed: int = 0, gpu_only: bool = False):
    """A ``ModelPatcher`` of ``config_cls(unet_config)`` with seeded N(0, 0.02^2) weights. On the CPU with a float
    dtype: ``flowgrpo.demo_models.build_model_patcher`` (unchanged values). Otherwise the model is built on
    ``device`` (ComfyUI's ops leave the weights uninitialised) and every parameter and floating buffer is filled
    there, in name order, from a generator on that device; fp8 storage computes in bf16 (ComfyUI's manual cast).
    ``gpu_only``: the offload device is the load device, as ComfyUI's ``--gpu-only`` makes it for diffusion models
    (switching between the model and a clone with other patches then leaves the weights on the GPU)."""
    import comfy.model_management
    import comfy.model_patcher
    import torch
    from flowgrpo.demo_models import INIT_STD, build_model_patcher

    device = torch.device(device or "cpu")
    fp8 = dtype == torch.float8_e4m3fn
    if device.type == "cpu" and not fp8 and not gpu_only:
        return build_model_patcher(config_cls, unet_config, seed, dtype=dtype)
    config = config_cls(dict(unet_config))
    config.set_inference_dtype(dtype, torch.bfloat16 if fp8 else None)
    model = config.get_model({}, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    module = model.diffusion_model
    tensors = dict(module.named_parameters())
    tensors.update((n, b) for n, b in module.named_buffers() if b.is_floating_point())
    with torch.no_grad():
        for name in sorted(tensors):
            t = tensors[name]
            fill = torch.randn(t.shape, generator=generator, device=t.device, dtype=torch.float32).mul_(INIT_STD)
            t.copy_(fill.to(t.dtype))
            del fill
    load = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=load, offload_device=load if gpu_only else
                                            comfy.model_management.unet_offload_device())


def _rows(tensor, batch: int):
    return tensor.repeat(batch, *([1] * (tensor.dim() - 1)))


def build_model(args: argparse.Namespace) -> BenchModel:
    """The ``--model`` of ``args`` at ``--depth`` / ``--heads`` / ``--dtype`` with conditioning for ``--batch``
    samples, built on ``--device`` (see :func:`build_patcher`)."""
    import torch
    import comfy.supported_models
    import tiny_models

    dtype = torch_dtype(args.dtype)
    device = "cuda" if args.device == "cuda" else None
    build_patcher = functools.partial(_build_patcher, gpu_only=getattr(args, "gpu_only", False))
    g = torch.Generator().manual_seed(1)
    latent = (args.batch, 16, args.size, args.size)
    cfg = CFG[args.model]
    with torch.inference_mode():
        if args.model == "sd3":
            patcher = build_patcher(comfy.supported_models.SD3, tiny_models.sd3_unet_config(depth=args.depth), dtype,
                                    device)
            conds = [[[_rows(c, args.batch), {"pooled_output": _rows(e["pooled_output"], args.batch)}]
                      for c, e in tiny_models.conditioning("sd3", tokens=args.tokens, seed=s)] for s in (1, 2)]
            return BenchModel("sd3", patcher, conds[0], conds[1], cfg, latent,
                              f"SD3 MMDiT depth {args.depth} (hidden {64 * args.depth}), true CFG {cfg}")
        if args.model == "qwen-image":
            patcher = build_patcher(comfy.supported_models.QwenImage, qwen_image_config(args.depth, args.heads),
                                    dtype, device)
            conds = [[[_rows(torch.randn(1, args.tokens, QWEN_CONTEXT_DIM, generator=g) * 0.5, args.batch), {}]]
                     for _ in range(2)]
            return BenchModel("qwen-image", patcher, conds[0], conds[1], cfg,
                              (args.batch, 16, 1, args.size, args.size),
                              f"Qwen-Image MMDiT, {args.depth} layers, width {128 * args.heads}, true CFG {cfg}")
        singles = 2 * args.depth if args.model == "flux-dev" else args.depth
        patcher = build_patcher(comfy.supported_models.Flux, flux_width_config(args.depth, singles, args.heads),
                                dtype, device)
        context = torch.randn(1, args.tokens, 4096, generator=g) * 0.5
        pooled = torch.randn(1, 768, generator=g) * 0.5
        positive = [[_rows(context, args.batch), {"pooled_output": _rows(pooled, args.batch), "guidance": 3.5}]]
        return BenchModel(args.model, patcher, positive, None, cfg, latent,
                          f"FLUX width {128 * args.heads}, {args.depth} double + {singles} single blocks, CFG-free")


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
