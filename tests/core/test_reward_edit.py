"""The image-edit reward (flowgrpo_core.rewards.edit): input_similarity reads each sample's input image from its
metadata, locally and through a reward server (the client sends the tensor as a PNG string)."""

from __future__ import annotations

import pytest
import torch

from flowgrpo_core.rewards.edit import InputSimilarityReward
from flowgrpo_core.rewards.registry import BACKENDS, build_backend
from flowgrpo_core.rewards.remote import RemoteReward, decode_images, encode_images, json_metadata
from flowgrpo_core.rewards.server import RewardServer


def _images(batch: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, size, size, 3, generator=torch.Generator().manual_seed(seed))


def test_similarity_is_one_minus_the_mean_abs_difference_to_each_samples_own_input():
    inputs = _images(2)
    outputs = torch.stack([inputs[0], inputs[1], inputs[0]])
    metadata = [{"input_image": inputs[0]}, {"input_image": inputs[1]}, {"input_image": inputs[1]}]
    result = InputSimilarityReward().score(outputs, ["", "", ""], metadata)
    expected = 1.0 - (inputs[0] - inputs[1]).abs().mean()
    assert result.scores[:2].tolist() == [1.0, 1.0]
    assert result.scores[2].item() == pytest.approx(expected.item(), abs=1e-6)
    assert result.details["input_size"] == [[16, 16]] * 3


def test_inputs_of_another_size_are_resized_and_the_backend_is_registered():
    flat = torch.full((8, 12, 3), 0.25)
    result = build_backend("input_similarity", None, []).score(torch.full((1, 16, 16, 3), 0.5), [""],
                                                              [{"input_image": flat}])
    assert result.scores.item() == pytest.approx(0.75, abs=1e-6)
    assert BACKENDS["input_similarity"].weights_kind is None


def test_missing_input_images_say_how_to_provide_them():
    reward = InputSimilarityReward()
    with pytest.raises(ValueError, match="without metadata. Fix: give FlowGRPO Prompt Source edit images"):
        reward.score(_images(1), [""])
    with pytest.raises(ValueError, match="sample 1 has no 'input_image'"):
        reward.score(_images(2), ["", ""], [{"input_image": _images(1)[0]}, {"tag": "x"}])
    with pytest.raises(ValueError, match=r"shape \(16, 16\), not \[H, W, C>=3\]"):
        reward.score(_images(1), [""], [{"input_image": torch.zeros(16, 16)}])


def test_input_images_travel_to_a_reward_server_as_png():
    inputs, outputs = _images(2, seed=1), _images(3, seed=2)
    first = inputs[0]  # a group's samples share one tensor, as Prompt Source gives it
    metadata = [{"input_image": first, "tag": "a"}, {"input_image": first}, {"input_image": inputs[1]}]
    sent = json_metadata(metadata)
    assert sent[0]["tag"] == "a" and sent[0]["input_image"] == encode_images(inputs[:1])[0]
    assert sent[0]["input_image"] is sent[1]["input_image"], "one tensor is encoded once"
    with RewardServer(InputSimilarityReward()) as server:
        remote = RemoteReward(server.url, timeout=10).score(outputs, ["", "", ""], metadata)
    quantised = [{"input_image": decode_images([m["input_image"]])[0]} for m in sent]
    local = InputSimilarityReward().score(decode_images(encode_images(outputs)), ["", "", ""], quantised)
    torch.testing.assert_close(remote.scores, local.scores, rtol=0, atol=1e-6)
