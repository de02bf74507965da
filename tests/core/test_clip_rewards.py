"""Video in the core: clip rewards (flowgrpo_core.rewards.clips) and per-sample SDE log-probs of 5-D latents."""

from __future__ import annotations

import pytest
import torch

from flowgrpo_core.rewards.base import RewardBackend
from flowgrpo_core.rewards.clips import ClipReward, FrameMean, clip_reward, frames_as_clips
from flowgrpo_core.rewards.simple import SimpleReward, simple_reward
from flowgrpo_core.sde import SDE_KINDS, sde_step


def _clips(batch=3, frames=4):
    return torch.rand(batch, frames, 8, 8, 3, generator=torch.Generator().manual_seed(0))


def test_frame_mean_is_the_mean_of_the_image_reward_over_frames():
    clips = _clips()
    result = FrameMean(SimpleReward("redness")).score_clips(clips, ["a"] * 3)
    per_frame = simple_reward("redness", clips.reshape(12, 8, 8, 3)).reshape(3, 4)
    torch.testing.assert_close(result.scores, per_frame.mean(dim=1))
    torch.testing.assert_close(torch.tensor(result.details["frame_scores"]), per_frame)


def test_frames_reach_the_image_reward_with_their_clips_prompt_and_metadata():
    seen = {}

    class Recorder(RewardBackend):
        name = "recorder"

        def _score(self, images, prompts, metadata):
            seen.update(prompts=prompts, metadata=metadata)
            return images.mean(dim=(1, 2, 3))

    FrameMean(Recorder()).score_clips(_clips(2, 3), ["x", "y"], [{"k": 1}, {"k": 2}])
    assert seen["prompts"] == ["x"] * 3 + ["y"] * 3
    assert seen["metadata"] == [{"k": 1}] * 3 + [{"k": 2}] * 3


def test_a_clip_reward_scores_whole_clips_and_is_checked():
    class Motion(ClipReward):
        name = "motion"

        def _score_clips(self, clips, prompts, metadata):
            return (clips[:, 1:] - clips[:, :-1]).abs().mean(dim=(1, 2, 3, 4))

    motion = Motion()
    assert clip_reward(motion) is motion
    still = _clips(1, 3)[:, :1].repeat(1, 3, 1, 1, 1)
    scores = motion.score_clips(torch.cat([still, _clips(1, 3)]), ["", ""]).scores
    assert scores[0] == 0 and scores[1] > 0
    with pytest.raises(ValueError, match=r"needs clips \[B, T, H, W, C>=3\]"):
        motion.score_clips(torch.rand(2, 8, 8, 3), ["", ""])
    with pytest.raises(ValueError, match="1 prompts for 2 clips"):
        motion.score_clips(_clips(2, 2), [""])
    assert isinstance(clip_reward(SimpleReward("brightness")), FrameMean)
    with pytest.raises(TypeError, match="neither a ClipReward nor an image RewardBackend"):
        clip_reward(object())


def test_frames_as_clips_regroups_a_flat_frame_batch():
    clips = _clips(3, 4)
    flat = clips.reshape(12, 8, 8, 3)
    assert torch.equal(frames_as_clips(flat, 3), clips)
    assert frames_as_clips(flat).shape == (12, 1, 8, 8, 3)
    assert frames_as_clips(clips, 3) is clips
    with pytest.raises(ValueError, match="12 frames cannot be split into 5 samples"):
        frames_as_clips(flat, 5)
    with pytest.raises(ValueError, match="holds 3 clips, not 2 samples"):
        frames_as_clips(clips, 2)


@pytest.mark.parametrize("kind", [k for k in SDE_KINDS if k != "ode"])
def test_video_latents_get_one_log_prob_per_sample(kind):
    """A step on [B, C, T, H, W] latents scores each sample over all its dims: the same as on the flattened batch."""
    g = torch.Generator().manual_seed(1)
    x, v = torch.randn(2, 4, 3, 4, 4, generator=g), torch.randn(2, 4, 3, 4, 4, generator=g)
    level = 0.7 if kind == "flow_sde" else 0.5
    video = sde_step(kind, x, v, 0.8, 0.6, level, generator=torch.Generator().manual_seed(2))
    flat = sde_step(kind, x.flatten(1), v.flatten(1), 0.8, 0.6, level, prev_sample=video.prev_sample.flatten(1))
    assert video.log_prob.shape == (2,) and bool(torch.isfinite(video.log_prob).all())
    torch.testing.assert_close(video.log_prob, flat.log_prob)
