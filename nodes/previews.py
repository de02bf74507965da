"""Pictures of a training run, drawn with PIL: a grid of one iteration's groups captioned with their rewards, and the
reward curve (mean per iteration, a +-1 std band and a moving average). Plus IMAGE <-> PIL and atomic PNG writes."""

from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import Optional, Sequence

import torch
from PIL import Image, ImageDraw, ImageFont

from ..flowgrpo_core.checkpoint import atomic_write_bytes

__all__ = ["to_pil", "to_image", "group_grid", "reward_curve", "moving_average", "save_png_atomic"]

_BG, _FG, _GRID, _MEAN, _BAND, _AVG = (250, 250, 250), (30, 30, 30), (215, 215, 215), (40, 90, 200), \
    (200, 215, 245), (220, 80, 40)


def to_pil(image: torch.Tensor) -> Image.Image:
    """One IMAGE ``[H, W, C]`` (or ``[1, H, W, C]``) in ``[0, 1]`` as an RGB PIL image."""
    image = image.reshape(*image.shape[-3:])[..., :3]
    return Image.fromarray((image.float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy(), "RGB")


def to_image(picture: Image.Image) -> torch.Tensor:
    """A PIL image as an IMAGE batch ``[1, H, W, 3]`` fp32 in ``[0, 1]``."""
    data = torch.frombuffer(bytearray(picture.convert("RGB").tobytes()), dtype=torch.uint8)
    return (data.reshape(1, picture.height, picture.width, 3).float() / 255.0)


def _font() -> ImageFont.ImageFont:
    return ImageFont.load_default()


def group_grid(images: torch.Tensor, group_ids: Sequence[int], rewards: Sequence[float],
               texts: Optional[Sequence[str]] = None, cell: int = 128) -> Image.Image:
    """One row per group (in order of first appearance), each image captioned with its reward; the row starts with
    the group's prompt (shortened). ``images`` ``[B, H, W, C]``."""
    order: dict[int, list[int]] = {}
    for i, g in enumerate(int(g) for g in group_ids):
        order.setdefault(g, []).append(i)
    rows = list(order.values())
    cols = max(len(r) for r in rows)
    caption, label_w = 14, 0 if texts is None else 150
    grid = Image.new("RGB", (label_w + cols * cell, len(rows) * (cell + caption)), _BG)
    draw = ImageDraw.Draw(grid)
    for r, members in enumerate(rows):
        top = r * (cell + caption)
        if texts is not None:
            words, line, lines = texts[members[0]].split(), "", []
            for w in words:
                if len(line) + len(w) + 1 > 24:
                    lines.append(line)
                    line = w
                else:
                    line = f"{line} {w}".strip()
            lines.append(line)
            draw.multiline_text((4, top + 4), "\n".join(lines[:8]), fill=_FG, font=_font())
        for c, i in enumerate(members):
            left = label_w + c * cell
            grid.paste(to_pil(images[i]).resize((cell, cell)), (left, top))
            draw.text((left + 3, top + cell + 1), f"{float(rewards[i]):+.4f}", fill=_FG, font=_font())
    return grid


def moving_average(values: Sequence[float], window: int = 5) -> list[float]:
    """Trailing mean over the last ``window`` values (fewer at the start)."""
    out = []
    for i in range(len(values)):
        chunk = values[max(0, i - window + 1): i + 1]
        out.append(sum(chunk) / len(chunk))
    return out


def reward_curve(means: Sequence[float], stds: Optional[Sequence[float]] = None, width: int = 640,
                 height: int = 360, window: int = 5, title: str = "reward") -> Image.Image:
    """Mean reward per iteration (blue), +-1 std band (light blue) and the ``window``-iteration moving average
    (orange). Iterations are numbered from 1."""
    picture = Image.new("RGB", (width, height), _BG)
    draw = ImageDraw.Draw(picture)
    left, right, top, bottom = 60, width - 15, 25, height - 35
    draw.text((left, 6), f"{title}: mean per iteration, +-1 std, moving average ({window})", fill=_FG, font=_font())
    n = len(means)
    if n == 0:
        draw.text((left, (top + bottom) // 2), "no iterations yet", fill=_FG, font=_font())
        return picture
    stds = list(stds) if stds is not None else [0.0] * n
    lows = [m - s for m, s in zip(means, stds)]
    highs = [m + s for m, s in zip(means, stds)]
    finite = [v for v in lows + highs if math.isfinite(v)] or [0.0]
    lo, hi = min(finite), max(finite)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    pad = 0.05 * (hi - lo)
    lo, hi = lo - pad, hi + pad

    def x(i: int) -> float:
        return left + (right - left) * (i / max(n - 1, 1))

    def y(v: float) -> float:
        return bottom - (bottom - top) * (v - lo) / (hi - lo)

    for k in range(5):
        v = lo + (hi - lo) * k / 4
        draw.line([(left, y(v)), (right, y(v))], fill=_GRID)
        draw.text((4, y(v) - 6), f"{v:+.3g}", fill=_FG, font=_font())
    draw.line([(left, top), (left, bottom), (right, bottom)], fill=_FG)
    draw.text((left, bottom + 8), "1", fill=_FG, font=_font())
    draw.text((right - 20, bottom + 8), str(n), fill=_FG, font=_font())
    draw.text(((left + right) // 2 - 20, bottom + 18), "iteration", fill=_FG, font=_font())
    if n > 1:
        band = [(x(i), y(h)) for i, h in enumerate(highs)] + [(x(i), y(lw)) for i, lw in reversed(list(enumerate(lows)))]
        draw.polygon(band, fill=_BAND)
        draw.line([(x(i), y(m)) for i, m in enumerate(means)], fill=_MEAN, width=2)
        draw.line([(x(i), y(m)) for i, m in enumerate(moving_average(list(means), window))], fill=_AVG, width=2)
    for i, m in enumerate(means):
        draw.ellipse([x(i) - 2, y(m) - 2, x(i) + 2, y(m) + 2], fill=_MEAN)
    return picture


def save_png_atomic(picture: Image.Image, path: os.PathLike) -> Path:
    """Write ``picture`` as PNG at ``path`` atomically (``flowgrpo_core.checkpoint.atomic_write_bytes``)."""
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_bytes(path, buffer.getvalue())
