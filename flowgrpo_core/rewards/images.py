"""Bounded decoding of images the pack did not make (the reward server's base64 PNGs): the one place where such
images are decoded, so the same limits apply everywhere.

A PNG states its size in its first 24 bytes (the IHDR chunk). :func:`decode_png_batch` reads that size and checks it
against :class:`ImageLimits` before any pixel is decompressed, so a small file that claims a huge image (a few KB of
compressed zeros can unpack to gigabytes) is refused with :class:`ImageTooLarge` without allocating it. Accepted
images are decoded one at a time straight into one ``uint8`` batch; float conversion is left to the caller, which
can do it chunk by chunk.

Peak memory of a decode is bounded by the limits: the ``uint8`` batch (``3 x max_request_pixels`` bytes) plus one
image being decoded (at most about ``12 x max_image_pixels`` bytes: Pillow's decoded frame, its RGB conversion and
the array copied into the batch) plus one PNG's compressed bytes.
"""

from __future__ import annotations

import base64
import binascii
import io
import struct
from dataclasses import dataclass
from typing import Sequence

import torch

__all__ = ["ImageLimits", "ImageTooLarge", "DEFAULT_MAX_IMAGE_PIXELS", "DEFAULT_MAX_REQUEST_PIXELS",
           "decode_png_batch", "png_size", "parse_pixels"]

#: 4096 x 4096: far above what the supported models generate (FLUX / Qwen-Image: about 2 megapixels).
DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096
#: 64 images of 1024 x 1024 (the reward client's default batch_size at SD3.5 / FLUX resolution): 192 MiB as uint8.
DEFAULT_MAX_REQUEST_PIXELS = 64 * 1024 * 1024

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class ImageTooLarge(ValueError):
    """An image, or the images of one request together, over a pixel limit. ``limit`` names the limit
    (``max_image_pixels`` or ``max_request_pixels``), ``value`` is what was asked for and ``maximum`` the limit."""

    def __init__(self, message: str, limit: str, value: int, maximum: int):
        super().__init__(message)
        self.limit = limit
        self.value = int(value)
        self.maximum = int(maximum)


@dataclass(frozen=True)
class ImageLimits:
    """Pixel limits of one decode: ``max_image_pixels`` per image (width x height), ``max_request_pixels`` for all
    the images of one call together."""

    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    max_request_pixels: int = DEFAULT_MAX_REQUEST_PIXELS

    def __post_init__(self):
        for name in ("max_image_pixels", "max_request_pixels"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def parse_pixels(text: str) -> int:
    """A pixel count written as ``N`` or ``WxH`` (``4096x4096``) -> int; ValueError otherwise."""
    text = str(text).strip().lower()
    try:
        if "x" in text:
            width, height = text.split("x")
            value = int(width) * int(height)
        else:
            value = int(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a pixel count: write a number (16777216) or WIDTHxHEIGHT "
                         f"(4096x4096)") from None
    if value < 1:
        raise ValueError(f"a pixel count must be >= 1, got {text!r}")
    return value


def png_size(data: bytes) -> tuple[int, int]:
    """``(width, height)`` from a PNG's header, without decoding it; ValueError when ``data`` is not a PNG."""
    if len(data) < 24 or not data.startswith(_PNG_SIGNATURE) or data[12:16] != b"IHDR":
        raise ValueError("not a PNG (no PNG signature and IHDR header)")
    width, height = struct.unpack(">II", data[16:24])
    if width < 1 or height < 1:
        raise ValueError(f"the PNG header states a {width}x{height} image")
    return width, height


def _b64(text: object, i: int) -> bytes:
    if not isinstance(text, str):
        raise ValueError(f"images[{i}] is not a base64 string")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ValueError(f"images[{i}] is not base64 ({e})") from None


def _too_large_image(i: int, width: int, height: int, limits: ImageLimits) -> ImageTooLarge:
    return ImageTooLarge(
        f"images[{i}] is {width}x{height} = {width * height} pixels, over the limit of {limits.max_image_pixels} "
        f"pixels per image (max_image_pixels)", "max_image_pixels", width * height, limits.max_image_pixels)


def decode_png_batch(encoded: Sequence[str], limits: ImageLimits = ImageLimits()) -> torch.Tensor:
    """``B`` base64 PNG strings, all the same size -> ``[B, H, W, 3]`` uint8 (RGB; alpha dropped, grey and palette
    images expanded).

    Every size is read from the PNG header and checked first: :class:`ImageTooLarge` when an image is over
    ``limits.max_image_pixels`` or ``B x W x H`` over ``limits.max_request_pixels`` (checked from the first image,
    before the batch is allocated). ValueError when an entry is not a base64 PNG, is truncated or corrupt, or has
    another size than the first."""
    import numpy as np
    from PIL import Image

    if not encoded:
        raise ValueError("no images to decode")
    batch = len(encoded)
    out = None
    for i, text in enumerate(encoded):
        data = _b64(text, i)
        try:
            width, height = png_size(data)
        except ValueError as e:
            raise ValueError(f"images[{i}] is not a base64-encoded PNG ({e})") from None
        if width * height > limits.max_image_pixels:
            raise _too_large_image(i, width, height, limits)
        if out is None:
            total = batch * width * height
            if total > limits.max_request_pixels:
                raise ImageTooLarge(
                    f"the request holds {batch} images of {width}x{height} = {total} pixels, over the limit of "
                    f"{limits.max_request_pixels} pixels per request (max_request_pixels)",
                    "max_request_pixels", total, limits.max_request_pixels)
            out = torch.empty(batch, height, width, 3, dtype=torch.uint8)
        elif (width, height) != (out.shape[2], out.shape[1]):
            raise ValueError(f"images[{i}] is {width}x{height} but images[0] is {out.shape[2]}x{out.shape[1]}; "
                             f"send one size per request")
        try:
            with Image.open(io.BytesIO(data), formats=["PNG"]) as image:
                if image.size != (width, height):  # cannot happen for a well-formed PNG; never decode a surprise
                    raise ValueError(f"Pillow reads {image.size[0]}x{image.size[1]}, the header says "
                                     f"{width}x{height}")
                image.load()
                rgb = image if image.mode == "RGB" else image.convert("RGB")
                out[i].numpy()[...] = np.asarray(rgb, dtype=np.uint8)
                del rgb
        except Image.DecompressionBombError as e:  # only when max_image_pixels is set above Pillow's own limit
            raise ImageTooLarge(f"images[{i}] is {width}x{height}, over Pillow's decompression-bomb limit ({e})",
                                "max_image_pixels", width * height, limits.max_image_pixels) from None
        except ValueError as e:
            raise ValueError(f"images[{i}] is not a decodable PNG ({e})") from None
        except Exception as e:  # PIL.UnidentifiedImageError, truncated or corrupt data (OSError, SyntaxError, ...)
            raise ValueError(f"images[{i}] is not a decodable PNG ({type(e).__name__}: {e})") from None
        del data
    return out

