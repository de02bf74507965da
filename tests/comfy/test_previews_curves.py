"""nodes/previews.py as ComfyUI loaded it: stacked metric curves with gaps, the reward curve drawn by the same
helpers, atomic JPEG writes."""

from __future__ import annotations

import importlib
import math

import pytest
from PIL import Image

pytestmark = pytest.mark.comfy

PANELS = (("reward_mean", "reward_std"), "approx_kl", "clipfrac")
MEAN, BAND, AVG = (40, 90, 200), (200, 215, 245), (220, 80, 40)


@pytest.fixture(scope="module")
def previews(flowgrpo_pack):
    return importlib.import_module(f"{flowgrpo_pack.package}.nodes.previews")


def _history(n: int) -> list[dict]:
    return [{"iteration": i + 1, "reward_mean": 0.2 + 0.05 * i * (-1) ** i, "reward_std": 0.1 + 0.01 * i,
             "approx_kl": 1e-4 * (i % 4), "clipfrac": math.nan if i in (3, 4) else 0.02 * i} for i in range(n)]


def _colours(picture: Image.Image, top: int, height: int) -> dict:
    """``{rgb: pixel count}`` of the horizontal band ``[top, top + height)``."""
    band = picture.crop((0, top, picture.width, top + height))
    return {rgb: count for count, rgb in band.getcolors(maxcolors=1 << 20)}


def test_metric_curves_draws_every_panel(previews):
    picture = previews.metric_curves(_history(12), PANELS, width=500, panel_height=180)
    assert picture.size == (500, 3 * 180) and picture.mode == "RGB"
    for k in range(3):
        colours = _colours(picture, k * 180, 180)
        assert colours.get(MEAN, 0) > 50, f"panel {k} has no data line"
        assert colours.get(AVG, 0) > 50, f"panel {k} has no moving average"
    assert _colours(picture, 0, 180).get(BAND, 0) > 200, "the (mean, std) panel has its band"
    assert _colours(picture, 180, 180).get(BAND, 0) == 0, "a single metric has no band"


def test_non_finite_values_leave_a_gap(previews):
    history = _history(12)
    picture = previews.metric_curves(history, ["clipfrac"], width=400, panel_height=160)
    whole = previews.metric_curves([dict(h, clipfrac=0.02 * i) for i, h in enumerate(history)], ["clipfrac"],
                                   width=400, panel_height=160)
    # plot area x = 60..385 over iterations 1..12: the column between iterations 4 and 5 (both missing)
    x = round(60 + (385 - 60) * (4.5 - 1) / 11)
    column = [picture.getpixel((x, y)) for y in range(25, 125)]
    assert MEAN not in column and AVG not in column
    assert MEAN in [whole.getpixel((x, y)) for y in range(25, 125)] + \
        [whole.getpixel((x + 1, y)) for y in range(25, 125)], "the same column holds the line without the gap"


@pytest.mark.parametrize("history", [[], [{"iteration": 7, "reward_mean": 0.5, "reward_std": 0.1}],
                                     [{"reward_mean": math.nan}, {"approx_kl": "n/a"}]])
def test_empty_single_and_valueless_histories_still_draw(previews, history):
    picture = previews.metric_curves(history, PANELS, width=320, panel_height=120)
    assert picture.size == (320, 360)
    for k in range(3):
        colours = _colours(picture, k * 120, 120)
        assert len(colours) > 1, f"panel {k} is blank"
    has_point = MEAN in _colours(picture, 0, 120)
    assert has_point == (len(history) == 1), "a single finite point is drawn as a dot, nothing else is"


def test_bad_panels_are_refused(previews):
    with pytest.raises(ValueError, match="panels"):
        previews.metric_curves(_history(3), [("a", "b", "c")])
    with pytest.raises(ValueError, match="width"):
        previews.metric_curves(_history(3), width=50)


def test_reward_curve_keeps_its_size_and_drawing(previews):
    means = [0.1, 0.3, math.nan, 0.35, 0.5]
    picture = previews.reward_curve(means, [0.05] * 5, width=600, height=300)
    assert picture.size == (600, 300)
    colours = _colours(picture, 0, 300)
    assert colours.get(MEAN, 0) > 30 and colours.get(BAND, 0) > 100 and colours.get(AVG, 0) > 10
    assert previews.reward_curve([]).size == (640, 360)
    assert previews.moving_average([1.0, math.nan, 3.0], 2) == [1.0, 1.0, 3.0]


def test_save_jpeg_atomic(previews, tmp_path):
    picture = previews.metric_curves(_history(5))
    path = previews.save_jpeg_atomic(picture, tmp_path / "sub" / "curves.jpg", quality=80)
    assert sorted(p.name for p in path.parent.iterdir()) == ["curves.jpg"]
    with Image.open(path) as back:
        assert back.format == "JPEG" and back.size == picture.size
    png = previews.save_png_atomic(picture.convert("RGBA"), tmp_path / "curves.png")
    with Image.open(png) as back:
        assert back.format == "PNG"
