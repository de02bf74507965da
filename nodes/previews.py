"""Pictures of a training run, drawn with PIL: a grid of one iteration's groups captioned with their rewards, the
reward curve (mean per iteration, a +-1 std band and a moving average) and stacked curves of any metrics. Plus
IMAGE <-> PIL and atomic PNG / JPEG writes."""

from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from PIL import Image, ImageDraw, ImageFont

from ..flowgrpo_core.checkpoint import atomic_write_bytes

__all__ = ["to_pil", "to_image", "frame_strip", "group_grid", "reward_curve", "metric_curves", "moving_average", "save_png_atomic",
           "save_jpeg_atomic"]

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


#: at most this many frames of a clip are shown in its strip (evenly spaced, first and last included)
STRIP_FRAMES = 8


def frame_strip(clip: torch.Tensor, cell: int = 128, max_frames: int = STRIP_FRAMES) -> Image.Image:
    """A clip ``[T, H, W, C]`` as its frames side by side, each ``cell`` x ``cell`` (at most ``max_frames`` of them,
    evenly spaced); an image ``[H, W, C]`` as one cell."""
    if clip.dim() == 3:
        return to_pil(clip).resize((cell, cell))
    count = clip.shape[0]
    picks = sorted({round(i * (count - 1) / (max_frames - 1)) for i in range(max_frames)}) if count > max_frames \
        else list(range(count))
    strip = Image.new("RGB", (len(picks) * cell, cell), _BG)
    for k, t in enumerate(picks):
        strip.paste(to_pil(clip[t]).resize((cell, cell)), (k * cell, 0))
    return strip


def group_grid(images: torch.Tensor, group_ids: Sequence[int], rewards: Sequence[float],
               texts: Optional[Sequence[str]] = None, cell: int = 128) -> Image.Image:
    """One row per group (in order of first appearance), each sample captioned with its reward; the row starts with
    the group's prompt (shortened). ``images`` ``[B, H, W, C]``, or clips ``[B, T, H, W, C]`` (video): each sample
    is then a strip of its frames side by side (:func:`frame_strip`)."""
    order: dict[int, list[int]] = {}
    for i, g in enumerate(int(g) for g in group_ids):
        order.setdefault(g, []).append(i)
    rows = list(order.values())
    cols = max(len(r) for r in rows)
    video = images.dim() == 5
    width = cell * min(images.shape[1], STRIP_FRAMES) if video else cell  # one sample's cell or strip
    gap = 4 if video else 0  # strips of neighbouring samples apart
    caption, label_w = 14, 0 if texts is None else 150
    grid = Image.new("RGB", (label_w + cols * (width + gap) - gap, len(rows) * (cell + caption)), _BG)
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
            left = label_w + c * (width + gap)
            grid.paste(frame_strip(images[i], cell), (left, top))
            draw.text((left + 3, top + cell + 1), f"{float(rewards[i]):+.4f}", fill=_FG, font=_font())
    return grid


def moving_average(values: Sequence[float], window: int = 5) -> list[float]:
    """Trailing mean over the finite values among the last ``window`` values (fewer at the start; nan when the
    window holds no finite value)."""
    out = []
    for i in range(len(values)):
        chunk = [v for v in values[max(0, i - window + 1): i + 1] if math.isfinite(v)]
        out.append(sum(chunk) / len(chunk) if chunk else math.nan)
    return out


def _number(value: Any) -> float:
    """``value`` as a float, nan when it is missing or not a number."""
    if isinstance(value, (bool, str)):
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError, RuntimeError):  # None, lists, multi-element tensors
        return math.nan


def _runs(points: Sequence[tuple[float, float]]) -> list[list[tuple[float, float]]]:
    """Maximal runs of consecutive points whose coordinates are finite (a missing value is a gap)."""
    runs: list[list[tuple[float, float]]] = [[]]
    for point in points:
        if all(math.isfinite(c) for c in point):
            runs[-1].append(point)
        elif runs[-1]:
            runs.append([])
    return [r for r in runs if r]


def _plot(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], title: str, xs: Sequence[float],
          means: Sequence[float], stds: Optional[Sequence[float]], window: int) -> None:
    """One curve panel in ``box`` = (x0, y0, x1, y1): ``means`` against ``xs`` (blue), the ``means +- stds`` band
    (light blue) when ``stds`` is given, the ``window`` moving average (orange), y grid labels, the first and last
    x. Non-finite values are gaps; with no finite value the panel says so."""
    x0, y0, x1, y1 = box
    left, right, top, bottom = x0 + 60, x1 - 15, y0 + 25, y1 - 35
    draw.text((left, y0 + 6), title, fill=_FG, font=_font())
    n = len(means)
    stds = list(stds) if stds is not None else [math.nan] * n
    lows = [m - s for m, s in zip(means, stds)]
    highs = [m + s for m, s in zip(means, stds)]
    finite = [v for v in list(means) + lows + highs if math.isfinite(v)]
    if not finite:
        draw.text((left, (top + bottom) // 2), "no iterations yet" if n == 0 else "no values", fill=_FG,
                  font=_font())
        return
    lo, hi = min(finite), max(finite)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    pad = 0.05 * (hi - lo)
    lo, hi = lo - pad, hi + pad
    x_lo, x_hi = min(xs), max(xs)

    def x(v: float) -> float:
        return left + (right - left) * ((v - x_lo) / (x_hi - x_lo) if x_hi > x_lo else 0.0)

    def y(v: float) -> float:
        return bottom - (bottom - top) * (v - lo) / (hi - lo)

    for k in range(5):
        v = lo + (hi - lo) * k / 4
        draw.line([(left, y(v)), (right, y(v))], fill=_GRID)
        draw.text((x0 + 4, y(v) - 6), f"{v:+.3g}", fill=_FG, font=_font())
    draw.line([(left, top), (left, bottom), (right, bottom)], fill=_FG)
    last = f"{x_hi:g}"
    draw.text((left, bottom + 8), f"{x_lo:g}", fill=_FG, font=_font())
    draw.text((right - draw.textlength(last, font=_font()), bottom + 8), last, fill=_FG, font=_font())
    draw.text(((left + right) // 2 - 20, bottom + 18), "iteration", fill=_FG, font=_font())
    for run in _runs([(x(a), y(h), y(lw)) for a, h, lw in zip(xs, highs, lows)]):
        if len(run) > 1:
            draw.polygon([(a, h) for a, h, _ in run] + [(a, lw) for a, _, lw in reversed(run)], fill=_BAND)
    average = [a if math.isfinite(m) else math.nan for a, m in zip(moving_average(list(means), window), means)]
    for values, colour in ((means, _MEAN), (average, _AVG)):
        for run in _runs([(x(a), y(v)) for a, v in zip(xs, values)]):
            if len(run) > 1:
                draw.line(run, fill=colour, width=2)
    for run in _runs([(x(a), y(m)) for a, m in zip(xs, means)]):
        if len(run) == 1 or n <= 100:  # dots for few points, and always for an isolated one
            for a, b in run:
                draw.ellipse([a - 2, b - 2, a + 2, b + 2], fill=_MEAN)


def reward_curve(means: Sequence[float], stds: Optional[Sequence[float]] = None, width: int = 640,
                 height: int = 360, window: int = 5, title: str = "reward") -> Image.Image:
    """Mean reward per iteration (blue), +-1 std band (light blue) and the ``window``-iteration moving average
    (orange). Iterations are numbered from 1."""
    picture = Image.new("RGB", (width, height), _BG)
    means = [_number(m) for m in means]
    stds = [_number(s) for s in stds] if stds is not None else [0.0] * len(means)
    _plot(ImageDraw.Draw(picture), (0, 0, width, height),
          f"{title}: mean per iteration, +-1 std, moving average ({window})",
          list(range(1, len(means) + 1)), means, stds, window)
    return picture


Panel = Union[str, tuple[str, str]]


def metric_curves(history: Sequence[Mapping[str, Any]],
                  panels: Sequence[Panel] = (("reward_mean", "reward_std"), "approx_kl", "clipfrac"),
                  width: int = 640, panel_height: int = 200, window: int = 5) -> Image.Image:
    """Curves of a run's metrics, one panel per entry of ``panels`` stacked vertically (``width x panel_height *
    len(panels)``). ``history``: one metrics dict per iteration, x = its ``"iteration"`` (else its 1-based
    position). A panel is a metric name (its line and ``window`` moving average) or a ``(mean, std)`` pair of names
    (the mean with a +-std band). Missing or non-finite values are gaps."""
    if width < 120 or panel_height < 80:
        raise ValueError(f"metric_curves needs width >= 120 and panel_height >= 80, got {width} and {panel_height}")
    specs = [(p, None) if isinstance(p, str) else tuple(p) for p in panels]
    if not specs or any(len(sp) != 2 or not isinstance(sp[0], str) or not isinstance(sp[1], (str, type(None)))
                        for sp in specs):
        raise ValueError(f"metric_curves panels must be metric names or (mean, std) name pairs, got {panels!r}")
    picture = Image.new("RGB", (width, panel_height * len(specs)), _BG)
    draw = ImageDraw.Draw(picture)
    xs = [_number(h.get("iteration", i + 1)) for i, h in enumerate(history)]
    xs = [a if math.isfinite(a) else float(i + 1) for i, a in enumerate(xs)]
    order = sorted(range(len(xs)), key=xs.__getitem__)
    xs = [xs[i] for i in order]
    for k, (name, std_name) in enumerate(specs):
        means = [_number(history[i].get(name)) for i in order]
        stds = None if std_name is None else [_number(history[i].get(std_name)) for i in order]
        shown = [m for m in means if math.isfinite(m)]
        title = name if std_name is None else f"{name} +-{std_name}"
        if shown:
            title += f"   last {shown[-1]:.4g}  min {min(shown):.4g}  max {max(shown):.4g}"
        top = k * panel_height
        if k:
            draw.line([(0, top), (width, top)], fill=_GRID)
        _plot(draw, (0, top, width, top + panel_height), title, xs, means, stds, window)
    return picture


def _save_atomic(picture: Image.Image, path: os.PathLike, **options: Any) -> Path:
    buffer = io.BytesIO()
    picture.save(buffer, **options)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_bytes(path, buffer.getvalue())


def save_png_atomic(picture: Image.Image, path: os.PathLike) -> Path:
    """Write ``picture`` as PNG at ``path`` atomically (``flowgrpo_core.checkpoint.atomic_write_bytes``)."""
    return _save_atomic(picture, path, format="PNG")


def save_jpeg_atomic(picture: Image.Image, path: os.PathLike, quality: int = 90) -> Path:
    """Write ``picture`` as JPEG (``quality`` 1-95) at ``path`` atomically, like :func:`save_png_atomic`."""
    return _save_atomic(picture.convert("RGB"), path, format="JPEG", quality=int(quality))
