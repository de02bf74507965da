"""Reward model nodes (nodes/reward_model_nodes.py) in a real ComfyUI: local backends, a real reward server over
loopback HTTP, FLOAT lists turned into rewards, and one prompt through a ComfyUI server."""

from __future__ import annotations

import importlib
import math
import sys
from types import SimpleNamespace

import pytest
import torch


@pytest.fixture(scope="module")
def mods(flowgrpo_pack):
    package = flowgrpo_pack.package
    return SimpleNamespace(
        nodes=importlib.import_module(f"{package}.nodes.reward_model_nodes"),
        state=sys.modules[f"{package}.nodes.state"],
        rewards=importlib.import_module(f"{package}.flowgrpo_core.rewards"),
    )


@pytest.fixture(scope="module")
def run(comfy_nodes):
    """``run(node_id, **inputs)``; unlike ``run_node`` an input may be called ``name``."""
    from conftest import call_node

    def run_one(node_id: str, /, **inputs) -> tuple:
        return call_node(comfy_nodes[node_id], **inputs)
    return run_one


def _images(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def _groups(mods, texts: list[str]):
    ids = torch.arange(len(texts))
    return mods.state.PromptBatch(texts=tuple(texts), group_ids=ids, prompt_indices=tuple(range(len(texts))),
                                  iteration=0, group_size=1)


@pytest.mark.parametrize("backend", ["jpeg_compressibility", "brightness", "redness"])
def test_load_and_score_match_the_core_reward(mods, run, backend):
    (model,) = run("FlowGRPOLoadRewardModel", backend=backend)
    assert isinstance(model, mods.rewards.RewardBackend) and model.name == backend
    images = _images(3, 16, 16, 3)
    rewards, scores, summary = run("FlowGRPOScoreImages", reward_model=model, images=images, scale=-2.5)
    expected = mods.rewards.simple_reward(backend, images) * -2.5
    assert torch.equal(rewards.values, expected) and rewards.batch_size == 3
    assert [name for name, _ in rewards.components] == [backend]
    assert scores == pytest.approx(expected.tolist(), rel=1e-6) and len(scores) == 3
    v = expected.double()
    assert summary.startswith(f"{backend}: {v.mean().item():.4g} ± {v.std(unbiased=False).item():.4g} (")
    assert summary.endswith(f"({v.min().item():.4g} .. {v.max().item():.4g})")


def test_score_averages_clip_frames_names_components_and_spreads_prompts(mods, run):
    (model,) = run("FlowGRPOLoadRewardModel", backend="saturation")
    video = _images(2, 3, 8, 8, 3, seed=1)  # [B, T, H, W, C]
    rewards, scores, summary = run("FlowGRPOScoreImages", reward_model=model, images=video,
                                        groups=_groups(mods, ["a", "b"]), name="colour", scale=1.0)
    expected = mods.rewards.simple_reward("saturation", video.reshape(6, 8, 8, 3)).reshape(2, 3).mean(dim=1)
    torch.testing.assert_close(rewards.values, expected)
    assert len(scores) == 2, "one reward per sample: the mean over its frames"
    assert rewards.components[0][0] == "colour" and summary.startswith("colour: ")
    assert mods.nodes.prompts_for(model, _groups(mods, ["a", "b"]), 2) == ["a", "b"]
    flat, *_ = run("FlowGRPOScoreImages", reward_model=model, images=video.reshape(6, 8, 8, 3),
                   groups=_groups(mods, ["a", "b"]), name="colour", scale=1.0)
    torch.testing.assert_close(flat.values, expected)  # VAEDecode's B * T frames, regrouped by the groups
    with pytest.raises(mods.state.NodeInputError, match="FlowGRPO Score Images: groups hold 3 prompts"):
        run("FlowGRPOScoreImages", reward_model=model, images=video, groups=_groups(mods, ["a", "b", "c"]))


def test_reward_server_node_scores_like_local_quantised_images(mods, run):
    rewards_mod = mods.rewards
    with pytest.raises(mods.state.NodeInputError, match="FlowGRPO Reward Server: .*http://127.0.0.1:8000"):
        run("FlowGRPORewardServer", url="ftp://nowhere", api_key="", timeout=5.0, retries=0, batch_size=2)

    images = _images(5, 8, 8, 3, seed=2)
    quantised = (images * 255.0).round() / 255.0
    server = rewards_mod.RewardServer(rewards_mod.SimpleReward("brightness")).start()
    url = server.url
    try:
        (remote,) = run("FlowGRPORewardServer", url=server.url, api_key="", timeout=30.0, retries=0,
                             batch_size=2)
        assert isinstance(remote, rewards_mod.RemoteReward) and server.score_requests == 0  # no call yet
        with pytest.raises(mods.state.NodeInputError, match="FlowGRPO Score Images: .*connect the groups"):
            run("FlowGRPOScoreImages", reward_model=remote, images=images)
        assert server.score_requests == 0
        groups = _groups(mods, [f"prompt {i}" for i in range(5)])
        rewards, scores, _ = run("FlowGRPOScoreImages", reward_model=remote, images=images, groups=groups,
                                      scale=3.0)
        expected = rewards_mod.simple_reward("brightness", quantised) * 3.0
        assert torch.allclose(rewards.values, expected, atol=1e-6)
        assert rewards.components[0][0] == "remote" and server.score_requests == 3  # batch_size 2: 2 + 2 + 1
        (image_only,) = run("FlowGRPORewardServer", url=server.url, api_key="", timeout=30.0, retries=0,
                                 batch_size=64, needs_prompt=False)
        rewards, _, _ = run("FlowGRPOScoreImages", reward_model=image_only, images=images, name="bright")
        assert torch.allclose(rewards.values, expected / 3.0, atol=1e-6)
    finally:
        server.stop()
    with pytest.raises(mods.state.NodeInputError) as info:
        run("FlowGRPOScoreImages", reward_model=image_only, images=images)
    message = str(info.value)
    assert message.startswith("FlowGRPO Score Images: ") and f"{url}/score" in message
    assert "Start the server" in message


def test_rewards_from_floats_list_text_and_errors(mods, run):
    node = "FlowGRPORewardsFromFloats"
    values = [0.25, -1.5, 3.0, 1e-3]
    (rewards,) = run(node, values=values, name=["mine"])
    assert rewards.values.tolist() == pytest.approx(values) and rewards.values.dtype == torch.float32
    assert rewards.components[0][0] == "mine" and torch.equal(rewards.components[0][1], rewards.values)
    (typed,) = run(node, values=[9.0], text=["0.5, 2\n-1e-2   7;8"], name=["custom"])
    assert typed.values.tolist() == pytest.approx([0.5, 2.0, -0.01, 7.0, 8.0])
    (blank,) = run(node, values=values, text=["  \n"], name=["custom"])
    assert blank.values.tolist() == pytest.approx(values)

    with pytest.raises(mods.state.NodeInputError, match=r"FlowGRPO Rewards From Floats: text entry 2 \('abc'\)"):
        run(node, text=["1, 2, abc, 4"], name=["custom"])
    with pytest.raises(mods.state.NodeInputError, match=r"samples \[1, 3\] are NaN or infinite"):
        run(node, values=[1.0, math.nan, 2.0, math.inf], name=["custom"])
    with pytest.raises(mods.state.NodeInputError, match=r"samples \[0\]"):
        run(node, text=["-inf 1"], name=["custom"])
    with pytest.raises(mods.state.NodeInputError, match="no values"):
        run(node, name=["custom"])


def test_server_prompt_scores_and_passes_the_float_list_on(mods, comfy_client):
    colours = (0x336699, 0xF0E010)
    prompt = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 2, "color": colours[0]}},
        "2": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": colours[1]}},
        "3": {"class_type": "ImageBatch", "inputs": {"image1": ["1", 0], "image2": ["2", 0]}},
        "4": {"class_type": "FlowGRPOLoadRewardModel",
              "inputs": {"backend": "brightness", "weights": "(default)", "device": "auto", "dtype": "auto"}},
        "5": {"class_type": "FlowGRPOScoreImages",
              "inputs": {"reward_model": ["4", 0], "images": ["3", 0], "name": "", "scale": 2.0}},
        "6": {"class_type": "FlowGRPORewardsFromFloats", "inputs": {"values": ["5", 1], "name": "copied"}},
    }
    result = comfy_client.run(prompt)

    def pixels(colour: int, n: int) -> torch.Tensor:
        rgb = torch.tensor([(colour >> s) & 0xFF for s in (16, 8, 0)], dtype=torch.float32) / 255.0
        return rgb.expand(n, 8, 8, 3)

    images = torch.cat([pixels(colours[0], 2), pixels(colours[1], 1)])
    expected = mods.rewards.simple_reward("brightness", images) * 2.0
    assert result["outputs"]["5"]["text"][0] == mods.nodes.summarize("brightness", expected)
    assert result["outputs"]["6"]["text"][0] == mods.nodes.summarize("copied", expected)
    assert expected[0] != expected[2]  # the list carried distinct values
