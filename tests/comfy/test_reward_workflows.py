"""Reward models in training workflows through a real ComfyUI server: the train node scoring through a reward
server that breaks mid-run (the last good update is kept and resumes), and a graph with two reward models combined
in both aggregation modes (advantages checked by hand)."""

from __future__ import annotations

import shutil
import threading
import uuid
from pathlib import Path

import pytest
import torch

from flowgrpo.client import ComfyClient, ComfyError
from flowgrpo_core.rewards import RewardBackend, RewardServer, simple_reward
from test_training_server import _train_prompt, checkpoints

pytestmark = [pytest.mark.comfy, pytest.mark.server]


class BreaksAfter(RewardBackend):
    """Redness that fails (an exception inside the server, answered with HTTP 500) from call ``healthy + 1`` on."""

    name = "redness_then_broken"

    def __init__(self, healthy: int):
        self.healthy, self.calls, self.lock = healthy, 0, threading.Lock()

    def _score(self, images, prompts, metadata):
        with self.lock:
            self.calls += 1
            if self.calls > self.healthy:
                raise RuntimeError("reward model crashed")
        return simple_reward("redness", images)


def _with_reward_server(prompt: dict, url: str) -> dict:
    train = next(k for k, v in prompt.items() if v["class_type"] == "FlowGRPOTrain")
    prompt["100"] = {"class_type": "FlowGRPORewardServer",
                     "inputs": {"url": url, "api_key": "", "timeout": 60.0, "retries": 1, "batch_size": 64,
                                "needs_prompt": True}}
    prompt[train]["inputs"]["reward_model"] = ["100", 0]
    return prompt


def test_reward_server_failure_mid_run_keeps_the_last_update_and_resume_continues(comfy_server, demo_model_files,
                                                                                 comfy_runtime):
    run_name = f"server_fail_{uuid.uuid4().hex[:8]}"
    loras = Path(comfy_runtime.folder_paths.get_folder_paths("loras")[0])
    seen = []

    def record(kind, data):
        if kind == "flowgrpo.metrics" and data.get("run") == run_name:
            seen.append(int(data["iteration"]))
            assert data["rewards"]["remote"] == pytest.approx(data["rewards"]["remote"])  # finite per-sample list

    backend = BreaksAfter(healthy=2)
    with RewardServer(backend) as server, ComfyClient(comfy_server.url) as client:
        prompt = _with_reward_server(_train_prompt(demo_model_files, run_name, 5, "none"), server.url)
        with pytest.raises(ComfyError) as err:
            client.run(prompt, timeout=600, on_event=record)
        calls, url = backend.calls, server.url
    message = str(err.value)
    assert err.value.kind == "execution" and "FlowGRPO GRPO Train" in message and url in message, message
    assert "500" in message or "server error" in message.lower(), message
    assert seen == [1, 2] and calls == 2 + 2  # the third scoring call and its one retry failed
    saved = checkpoints(loras, run_name)
    assert list(saved) == [2] and saved[2].with_suffix(".flowgrpo-state").is_file()

    # resume=latest against a healthy server: the run continues at iteration 3, and the train node's reward_model
    # input sends every image's prompt (a prompt-reading reward: its length plus redness)
    resumed, prompts = [], []

    class PromptLength(RewardBackend):
        name, needs_prompt = "prompt_length", True

        def _score(self, images, texts, metadata):
            prompts.append(list(texts))
            return torch.tensor([float(len(p)) for p in texts]) + simple_reward("redness", images)

    with RewardServer(PromptLength()) as server, ComfyClient(comfy_server.url) as client:
        prompt = _with_reward_server(_train_prompt(demo_model_files, run_name, 4, "latest"), server.url)
        client.run(prompt, timeout=600, on_event=lambda k, d: resumed.append(d)
                   if k == "flowgrpo.metrics" and d.get("run") == run_name else None)
    assert [int(d["iteration"]) for d in resumed] == [3, 4] and list(checkpoints(loras, run_name)) == [2, 4]
    for metrics, texts in zip(resumed, prompts):
        assert len(texts) == 2 and all(texts)
        assert [int(s) for s in metrics["rewards"]["remote"]] == [len(t) for t in texts]


@pytest.fixture(scope="module")
def two_reward_models(comfy_runtime):
    """A tiny PickScore folder and a tiny aesthetic head (+ its CLIP backbone) in the server's models/reward_models,
    real formats, loaded by the production code inside the server."""
    from rewardkit.hf_clip_tiny import build_tiny_aesthetic, build_tiny_pickscore

    tag = uuid.uuid4().hex[:6]
    models = comfy_runtime.home / "models"
    pick = build_tiny_pickscore(models, name=f"PickScore_{tag}")
    head = build_tiny_aesthetic(models, head_name=f"aesthetic_{tag}.pth")
    yield {"pickscore": pick.name, "aesthetic": head.name}
    shutil.rmtree(pick, ignore_errors=True)
    head.unlink(missing_ok=True)


def _hand_advantages(a, b, weights, mode, group_ids, eps=1e-4, clip=5.0):
    """Group-centred, globally scaled advantages (std_mode global, ddof 0) in Flow-GRPO's or DanceGRPO's order."""
    a, b, ids = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64), torch.tensor(group_ids)

    def normalised(r):
        centred = r.clone()
        for g in ids.unique():
            centred[ids == g] -= r[ids == g].mean()
        return centred / (r.std(unbiased=False) + eps)

    if mode == "weighted_sum":
        adv = normalised(weights[0] * a + weights[1] * b)
    else:
        adv = weights[0] * normalised(a) + weights[1] * normalised(b)
    return adv.clamp(-clip, clip)


@pytest.mark.parametrize("mode", ["weighted_sum", "advantage_sum"])
def test_two_reward_models_train_with_hand_computed_advantages(mode, comfy_client, demo_model_files,
                                                               two_reward_models):
    """Prompt Source -> SDE rollout -> VAEDecode -> (PickScore, aesthetic) -> Combine Rewards -> GRPO Update, one
    server prompt; the update's advantages equal the hand-computed ones from the two reported score lists."""
    from flowgrpo.graph import Graph

    weights = (1.0, 0.5)
    g = Graph()
    unet = g.add("UNETLoader", unet_name=demo_model_files["diffusion_model"], weight_dtype="default")
    clip = g.add("CLIPLoader", clip_name=demo_model_files["text_encoder"], type="sd3", device="default")
    vae = g.add("VAELoader", vae_name=demo_model_files["vae"])
    init = g.add("FlowGRPOLoRAInit", model=unet, rank=4, alpha=4.0, targets="attention", learning_rate=1e-3,
                 seed=0, run_name=f"two_models_{mode}", resume="none")
    prompts = g.add("FlowGRPOPromptSource", clip=clip, prompts="a red square\na blue circle", prompt_file="",
                    negative_prompt="", prompts_per_iteration=2, group_size=2, iteration=0, seed=0,
                    flux_guidance=3.5)
    rollout = g.add("FlowGRPOSDERollout", model=init.out(1), positive=prompts.out(0), negative=prompts.out(1),
                    groups=prompts.out(2), width=64, height=64, steps=4, scheduler="simple", shift=0.0,
                    sde_kind="flow_sde", noise_level=0.7, cfg=1.0, norm_rescale=False, step_mode="fraction",
                    train_fraction=0.5, window_size=2, window_start=0, window_shift_every=25, micro_batch_size=0,
                    seed=0, iteration=0)
    images = g.add("VAEDecode", samples=rollout.out(0), vae=vae)
    scored = []
    for backend, name in (("pickscore", "pick"), ("aesthetic", "beauty")):
        model = g.add("FlowGRPOLoadRewardModel", backend=backend, weights=two_reward_models[backend], device="auto",
                      dtype="float32")
        scored.append(g.add("FlowGRPOScoreImages", reward_model=model, images=images, groups=prompts.out(2),
                            name=name, scale=1.0))
    combined = g.add("FlowGRPOCombineRewards", rewards_1=scored[0], weight_1=weights[0], rewards_2=scored[1],
                     weight_2=weights[1], weight_3=1.0, weight_4=1.0, mode=mode)
    update = g.add("FlowGRPOUpdate", trainer=init.out(0), rollout=rollout.out(1), rewards=combined, clip_range=0.2,
                   kl_beta=0.0, adv_clip_max=5.0, max_grad_norm=1.0, std_mode="global", optimizer_steps=1,
                   gradient_checkpointing=False)
    g.add("PreviewAny", source=update.out(1))

    events = []
    comfy_client.run(g.api(), timeout=600,
                     on_event=lambda k, d: events.append(d) if k == "flowgrpo.metrics" else None)
    (metrics,) = [e for e in events if e.get("run") == f"two_models_{mode}"]
    pick, beauty = metrics["rewards"]["pick"], metrics["rewards"]["beauty"]
    assert len(pick) == len(beauty) == 4 and len(set(pick)) > 1 and len(set(beauty)) > 1
    assert all(0 < abs(p) < 10 for p in pick)  # 100 * cosine / 26 of a random tiny CLIP
    expected = _hand_advantages(pick, beauty, weights, mode, [0, 0, 1, 1])
    torch.testing.assert_close(torch.tensor(metrics["advantages"], dtype=torch.float64), expected,
                               rtol=0, atol=1e-5)
    assert metrics["reward_pick"] == pytest.approx(sum(pick) / 4)
    assert metrics["first_log_ratio_abs_max"] <= 1e-5 and metrics["grad_norm"] > 0
