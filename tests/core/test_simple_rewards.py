"""Weight-free image rewards (flowgrpo_core.simple_rewards)."""

from __future__ import annotations

import pytest
import torch

from flowgrpo_core.rewards.simple import SIMPLE_REWARDS, jpeg_size_kb, simple_reward


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


def test_the_backend_interface_checks_inputs_and_scores():
    from flowgrpo_core.rewards import RewardBackend, SimpleReward

    images = _images()
    result = SimpleReward("brightness").score(images, ["a", "b", "c"])
    torch.testing.assert_close(result.scores, simple_reward("brightness", images))
    with pytest.raises(ValueError, match="got 2 prompts for 3 images"):
        SimpleReward("brightness").score(images, ["a", "b"])
    with pytest.raises(ValueError, match="unknown simple reward"):
        SimpleReward("beauty")

    class Broken(RewardBackend):
        name = "broken"

        def _score(self, images, prompts, metadata):
            return torch.tensor([1.0, float("nan"), 0.0])

    with pytest.raises(ValueError, match=r"reward 'broken' returned NaN or infinite scores for samples \[1\]"):
        Broken().score(images, ["a"] * 3)

    class Short(RewardBackend):
        name = "short"

        def _score(self, images, prompts, metadata):
            return [1.0]

    with pytest.raises(ValueError, match="returned 1 scores for 3 images"):
        Short().score(images, ["a"] * 3)
