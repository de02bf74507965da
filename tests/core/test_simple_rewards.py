"""Weight-free image rewards (flowgrpo_core.simple_rewards)."""

from __future__ import annotations

import pytest
import torch

from flowgrpo_core.simple_rewards import SIMPLE_REWARDS, jpeg_size_kb, simple_reward


def _images():
    g = torch.Generator().manual_seed(0)
    flat = torch.full((1, 32, 32, 3), 0.5)
    noise = torch.rand(1, 32, 32, 3, generator=g)
    red = torch.zeros(1, 32, 32, 3)
    red[..., 0] = 1.0
    return torch.cat([flat, noise, red])


def test_jpeg_compressibility_prefers_simple_images():
    images = _images()
    sizes = jpeg_size_kb(images)
    assert sizes.shape == (3,) and bool((sizes > 0).all())
    assert float(sizes[1]) > 2 * float(sizes[0]), "noise compresses far worse than a flat image"
    torch.testing.assert_close(simple_reward("jpeg_compressibility", images), -sizes)
    torch.testing.assert_close(simple_reward("jpeg_incompressibility", images), sizes)


def test_colour_statistics_match_their_definitions():
    images = _images()
    rgb = images.clamp(0, 1)
    torch.testing.assert_close(simple_reward("brightness", images), rgb.mean(dim=(1, 2, 3)))
    torch.testing.assert_close(simple_reward("saturation", images),
                               (rgb.amax(-1) - rgb.amin(-1)).mean(dim=(1, 2)))
    redness = simple_reward("redness", images)
    assert redness.argmax() == 2 and float(redness[2]) == pytest.approx(1.0)
    assert float(redness[0]) == pytest.approx(0.0)


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match="unknown simple reward 'beauty'"):
        simple_reward("beauty", _images())
    with pytest.raises(ValueError, match=r"images must be \[B, H, W, C>=3\]"):
        simple_reward("brightness", torch.zeros(2, 8, 8))
    assert set(SIMPLE_REWARDS) >= {"jpeg_compressibility", "brightness", "saturation", "redness"}
