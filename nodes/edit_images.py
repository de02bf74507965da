"""Edit images for image-edit RL: the input image of every prompt, encoded as ComfyUI's edit nodes encode it.

Prompt Source takes the images as an IMAGE input (one per prompt of the list, in list order, or one for all prompts)
or as ``"image"`` paths in the ``.jsonl`` records (relative to ComfyUI's input folder), plus the VAE of the edit
model. :class:`EditImages` holds them; each iteration encodes the drawn prompts' images one by one with
``vae.encode`` (as ``TextEncodeQwenImageEdit`` / ``ReferenceLatent`` do; a video VAE would read a batch as frames)
and :func:`with_reference_latents` adds them to the batched conditionings as ``reference_latents = [latent [B, ...]]``
(one reference image, a row per sample), which the model's own ``extra_conds`` turns into ``ref_latents`` for
Qwen-Image-Edit and FLUX Kontext. Every sample's metadata gets ``input_image`` (``[H, W, 3]`` in ``[0, 1]``) and, for a
file, ``input_image_path``, for rewards that compare with the input (``flowgrpo_core.rewards.edit``).

The text encoder sees only the text (``TextEncodeQwenImageEdit`` also shows the image to Qwen2.5-VL; that is not
done here).
"""

from __future__ import annotations

import os
from typing import Any, Optional, Sequence

import torch

from ..flowgrpo_core.prompts import Prompt
from ..flowgrpo_core.rewards.edit import INPUT_IMAGE_KEY
from .input_files import input_path
from .state import node_error

__all__ = ["IMAGE_FIELD", "EditImages", "edit_images", "load_image", "resolve_input_image", "with_reference_latents"]

#: the ``.jsonl`` record field naming a prompt's input image
IMAGE_FIELD = "image"
_VAE_FIX = "connect the VAE of your edit model (Load VAE, or the VAE output of Load Checkpoint) to vae"


def resolve_input_image(name: Any, prompt_number: int, node: str) -> str:
    """The real path of the ``"image"`` field ``name`` of prompt ``prompt_number`` (1-based) inside ComfyUI's input
    folder; node errors for a non-string, an absolute path, a path outside the folder or a missing file."""
    where = f"the \"image\" of prompt {prompt_number} in the prompt file"
    if not isinstance(name, str) or not name.strip():
        raise node_error(node, f"{where} is {name!r}, not a file name",
                         "write the image's path relative to ComfyUI's input folder, e.g. \"image\": \"edit/cat.png\"")
    name = name.strip()
    return input_path(name, node, f"{where}, {name!r},",
                      "put the image there (paths are relative to the input folder) or correct the name")


def load_image(path: str, node: str) -> torch.Tensor:
    """``[H, W, 3]`` float32 in ``[0, 1]`` as stock LoadImage reads a file (EXIF rotation applied, RGB, first frame)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)
            if img.mode == "I":
                img = img.point(lambda v: v * (1 / 255))
            pixels = torch.frombuffer(bytearray(img.convert("RGB").tobytes()), dtype=torch.uint8)
            return pixels.reshape(img.height, img.width, 3).float() / 255.0
    except (OSError, UnidentifiedImageError) as e:
        raise node_error(node, f"the input image {os.path.basename(path)!r} cannot be read ({e})",
                         "save it as PNG, JPEG or WebP") from None


class EditImages:
    """The input image of every prompt of a prompt list: an IMAGE batch (``[N, H, W, C]``, ``N`` = 1 or the list's
    length) or the records' ``"image"`` paths, with the ``vae`` that encodes them."""

    def __init__(self, vae: Any, prompts: Sequence[str], node: str, images: Optional[torch.Tensor] = None,
                 paths: Optional[list[str]] = None):
        self.vae, self.node = vae, node
        self.images, self.paths = images, paths
        if images is not None:
            self.keys = [(str(p), i if images.shape[0] > 1 else 0) for i, p in enumerate(prompts)]
        else:
            self.keys = [(str(p), path) for p, path in zip(prompts, paths)]

    def distinct(self) -> int:
        """How many different (prompt, image) pairs the list holds: what the draw needs ``prompts_per_iteration`` of."""
        return len(set(self.keys))

    def image(self, index: int) -> torch.Tensor:
        """The input image of prompt ``index`` (0-based): ``[H, W, 3]`` float32 on the CPU."""
        if self.images is not None:
            picked = self.images[index if self.images.shape[0] > 1 else 0]
            return picked[..., :3].float().cpu()
        return load_image(self.paths[index], self.node)

    def encode(self, indices: Sequence[int]) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """``(latents [P, ...], {index: image})``: the images of prompts ``indices`` (the draw, one per group),
        encoded one by one with the VAE. Node error when they differ in size (one batch needs one size)."""
        images = {i: self.image(i) for i in dict.fromkeys(indices)}
        sizes = {i: tuple(img.shape[:2]) for i, img in images.items()}
        if len(set(sizes.values())) > 1:
            named = ", ".join(f"prompt {i + 1}: {w}x{h}" for i, (h, w) in sizes.items())
            raise node_error(self.node, f"the input images drawn for this iteration have different sizes ({named}); "
                                        "one batch needs one size",
                             "scale the input images to one size (e.g. with ImageScale before the images input, "
                             "or in the image files)")
        encoded = {}
        for i, img in images.items():
            try:
                encoded[i] = self.vae.encode(img[None])
            except Exception as e:  # the VAE's own message; the node name and the fix around it
                raise node_error(self.node, f"the vae could not encode the input image of prompt {i + 1} "
                                            f"({type(e).__name__}: {e})", _VAE_FIX) from None
        latents = torch.cat([encoded[i][:1] for i in indices])
        return latents, images

    def prompt(self, prompts: Sequence[str], index: int, image: torch.Tensor) -> Prompt:
        """Prompt ``index`` carrying its record plus ``input_image`` (and ``input_image_path`` for a file)."""
        text = prompts[index]
        meta = dict(getattr(text, "metadata", None) or {})
        meta[INPUT_IMAGE_KEY] = image
        if self.paths is not None:
            meta["input_image_path"] = self.paths[index]
        return Prompt(str(text), meta)


def edit_images(prompts: Sequence[str], images: Optional[torch.Tensor], vae: Any, node: str) -> Optional[EditImages]:
    """The :class:`EditImages` of ``prompts`` from the IMAGE input or the records' ``"image"`` fields, or None when
    neither gives images. Node errors for a batch of the wrong size, records with and without images, paths that do
    not resolve (checked now, not when a prompt is drawn), images without a VAE, or both sources at once."""
    named = [getattr(p, "metadata", {}).get(IMAGE_FIELD) is not None for p in prompts]
    if images is None and not any(named):
        return None
    if images is not None and any(named):
        raise node_error(node, "edit images come from both the images input and \"image\" fields of the prompt file",
                         "use one source: disconnect the images input, or remove the \"image\" fields")
    if vae is None:
        raise node_error(node, "edit images are given (" + ("the images input" if images is not None else
                         "\"image\" fields in the prompt file") + ") but the vae input is empty; the images reach "
                         "the model as VAE latents", _VAE_FIX)
    if images is not None:
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[-1] < 3:
            raise node_error(node, f"the images input is not an IMAGE batch [N, H, W, 3] (got "
                                   f"{tuple(getattr(images, 'shape', ()))})", "connect a Load Image or image batch")
        if images.shape[0] not in (1, len(prompts)):
            raise node_error(node, f"the images input holds {images.shape[0]} images for {len(prompts)} prompts",
                             "give one image per prompt, in the order of the prompt list, or a single image for "
                             "every prompt")
        return EditImages(vae, prompts, node, images=images)
    missing = [i + 1 for i, has in enumerate(named) if not has]
    if missing:
        raise node_error(node, f"prompts {missing[:10]} of the prompt file have no \"image\" field while others do",
                         "give every record an \"image\" (its path in the input folder), or none")
    paths = [resolve_input_image(p.metadata[IMAGE_FIELD], i + 1, node) for i, p in enumerate(prompts)]
    return EditImages(vae, prompts, node, paths=paths)


def with_reference_latents(conditioning: list, latents: torch.Tensor, repeats: int) -> list:
    """``conditioning`` (one batched entry of ``P * repeats`` rows) with ``reference_latents = [latent rows]``:
    ``latents`` ``[P, ...]`` (one per drawn prompt) repeated ``repeats`` times in a row, as new dicts."""
    rows = latents.repeat_interleave(int(repeats), dim=0)
    return [[c, {**extra, "reference_latents": [rows]}] for c, extra in conditioning]
