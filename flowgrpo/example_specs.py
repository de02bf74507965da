"""The example workflows as compact Python specs.

``scripts/make_workflows.py`` turns each spec into ``example_workflows/<name>.json`` (the UI workflow the template
browser lists) and ``example_workflows/api/<name>.json`` (its API twin, for ``python -m flowgrpo run`` and tests;
in a sub-folder because ComfyUI lists only ``example_workflows/*.json`` as templates). To add an example, write a
function that builds a :class:`~flowgrpo.graph.Graph`, register it with :func:`example`, and run the script.
Model names are those of :data:`flowgrpo.demo_models.DEMO_FILES` (``python -m flowgrpo demo`` builds the files).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .demo_models import DEMO_FILES
from .graph import Graph

__all__ = ["Example", "EXAMPLES", "example", "render", "paths", "DEMO_MODEL", "DEMO_TEXT_ENCODER", "DEMO_VAE"]

DEMO_MODEL = DEMO_FILES["diffusion_model"][1]
DEMO_TEXT_ENCODER = DEMO_FILES["text_encoder"][1]
DEMO_VAE = DEMO_FILES["vae"][1]


@dataclass(frozen=True)
class Example:
    name: str
    description: str  # Markdown, shown in a note next to the graph
    build: Callable[[], Graph]


EXAMPLES: dict[str, Example] = {}


def example(name: str, description: str):
    """Register the decorated ``() -> Graph`` function as the example ``name``."""
    def register(build: Callable[[], Graph]) -> Callable[[], Graph]:
        if name in EXAMPLES:
            raise ValueError(f"example {name!r} is defined twice")
        EXAMPLES[name] = Example(name, description, build)
        return build
    return register


@example("sd3_tiny_text_to_image", """## Text to image with the tiny demo models (stock nodes)

A plain SD3 text-to-image graph on the pack's tiny random demo models: it checks that ComfyUI, the loaders and the
headless runner work, in seconds on a CPU. The images are noise-like: the models are random.

Build the models with `python -m flowgrpo demo` (or put your own SD3 model, text encoder and VAE in the loaders).

Headless: `python -m flowgrpo run example_workflows/sd3_tiny_text_to_image.json`""")
def sd3_tiny_text_to_image() -> Graph:
    g = Graph()
    unet = g.add("UNETLoader", unet_name=DEMO_MODEL, weight_dtype="default")
    model = g.add("ModelSamplingSD3", model=unet, shift=3.0)
    clip = g.add("CLIPLoader", clip_name=DEMO_TEXT_ENCODER, type="sd3", device="default")
    positive = g.add("CLIPTextEncode", "Positive Prompt", text="a red apple on a wooden table", clip=clip)
    negative = g.add("CLIPTextEncode", "Negative Prompt", text="", clip=clip)
    latent = g.add("EmptySD3LatentImage", width=128, height=128, batch_size=1)
    sampled = g.add("KSampler", model=model, seed=0, steps=8, cfg=4.5, sampler_name="euler", scheduler="simple",
                    positive=positive, negative=negative, latent_image=latent, denoise=1.0)
    vae = g.add("VAELoader", vae_name=DEMO_VAE)
    image = g.add("VAEDecode", samples=sampled, vae=vae)
    g.add("SaveImage", images=image, filename_prefix="flowgrpo/sd3_tiny")
    return g


# ------------------------------------------------------------------------------------------------ rendering
def render(ex: Example, object_info: dict) -> tuple[dict, dict]:
    """``(ui, api)``: the UI workflow (with the description as a note) and its complete API twin."""
    from .workflow import api_to_ui, complete_api

    api = complete_api(ex.build().api(), object_info)
    return api_to_ui(api, object_info, note=ex.description), api


def paths(name: str, root) -> tuple:
    """``(ui_path, api_path)`` of the example ``name`` under the repository ``root``."""
    from pathlib import Path

    folder = Path(root) / "example_workflows"
    return folder / f"{name}.json", folder / "api" / f"{name}.json"
