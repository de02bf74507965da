"""Training-grade runs through a real ComfyUI server: bitwise resume after an interrupt, EMA, the run's metrics log
(JSONL, TensorBoard, curve images in ``/history``), samples and evaluation images.

Every run is the tiny-demo preset (``FlowGRPO Training Preset``) with overrides that make it small, driving
``FlowGRPO GRPO Train`` on the demo's model files.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from flowgrpo.client import ComfyClient, ComfyError
from flowgrpo.graph import Graph
from flowgrpo.ui_export import complete_api
from flowgrpo_core.checkpoint import load_training_state
from flowgrpo_core.metrics_log import read_metrics

from test_training_server import checkpoints

pytestmark = [pytest.mark.comfy, pytest.mark.server]

SMALL = "prompts_per_iteration=1\ngroup_size=2\nwidth=64\nheight=64\nsteps=4\nsave_every=0"


def train_prompt(client: ComfyClient, files: dict, run_name: str, overrides: str, resume: str = "none",
                 **train_inputs) -> dict:
    """The API prompt of a tiny-demo-preset run of GRPO Train (every other widget at its default)."""
    g = Graph()
    model = g.add("UNETLoader", unet_name=files["diffusion_model"], weight_dtype="default")
    clip = g.add("CLIPLoader", clip_name=files["text_encoder"], type="sd3", device="default")
    vae = g.add("VAELoader", vae_name=files["vae"])
    preset = g.add("FlowGRPOPreset", "Training preset", preset="tiny_demo", overrides=f"{SMALL}\n{overrides}")
    g.add("FlowGRPOTrain", "GRPO Train", model=model, clip=clip, vae=vae, preset=preset.out(0), run_name=run_name,
          resume=resume, seed=0, **train_inputs)
    return complete_api(g.api(), client.object_info())


def lora_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def assert_bitwise_equal(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{what}: {len(differ)} tensors differ, e.g. {differ[:3]}"


def test_interrupted_and_resumed_run_is_bitwise_the_uninterrupted_one(comfy_server, demo_model_files, comfy_runtime):
    tag = uuid.uuid4().hex[:8]
    broken, straight = f"broken_{tag}", f"straight_{tag}"
    ema = "ema_decay=0.5\nema_every=1"
    seen = []

    def interrupt_after_two(kind, data):
        if kind == "flowgrpo.metrics" and data.get("run") == broken:
            seen.append(int(data["iteration"]))
            if len(seen) == 2:
                client.interrupt()

    with ComfyClient(comfy_server.url) as client:
        prompt_id = client.queue_prompt(train_prompt(client, demo_model_files, broken, f"iterations=200\n{ema}"))
        with pytest.raises(ComfyError) as err:
            client.wait(prompt_id, timeout=600, on_event=interrupt_after_two)
        assert err.value.kind == "interrupted", err.value
        loras = Path(comfy_runtime.folder_paths.get_folder_paths("loras")[0])
        (stopped_at,) = checkpoints(loras, broken)  # the interrupt left exactly one checkpoint
        assert stopped_at >= 2
        total = stopped_at + 2
        client.run(train_prompt(client, demo_model_files, straight, f"iterations={total}\n{ema}"), timeout=600)
        client.run(train_prompt(client, demo_model_files, broken, f"iterations={total}\n{ema}", resume="latest"),
                   timeout=600)

    resumed, uninterrupted = checkpoints(loras, broken)[total], checkpoints(loras, straight)[total]
    assert_bitwise_equal(lora_tensors(resumed), lora_tensors(uninterrupted), "the saved (EMA) LoRA")
    a, b = load_training_state(resumed.with_suffix(".flowgrpo-state")), \
        load_training_state(uninterrupted.with_suffix(".flowgrpo-state"))
    assert_bitwise_equal(a.extra["live_lora"], b.extra["live_lora"], "the live LoRA")
    assert_bitwise_equal(a.extra["ema"]["shadow"], b.extra["ema"]["shadow"], "the EMA")
    assert a.iteration == b.iteration == total
    moments = [(k, t) for k, t in a.optimizer_state["state"].items()]
    assert moments and all(torch.equal(t["exp_avg_sq"], b.optimizer_state["state"][k]["exp_avg_sq"])
                           for k, t in moments)
    # the saved file holds the EMA, not the live weights
    live = a.extra["live_lora"]
    saved = lora_tensors(resumed)
    assert any(not torch.equal(saved[k], live[k]) for k in saved if k.endswith("lora_up.weight"))
    with safe_open(str(resumed), "pt") as f:
        assert f.metadata()["flowgrpo.weights"] == "ema"

    # the logs agree too: one line per iteration, no duplicates from the interrupted pass, the same rewards
    output = Path(comfy_runtime.folder_paths.get_output_directory()) / "flowgrpo"
    log_b, log_a = read_metrics(output / broken / "metrics.jsonl"), read_metrics(output / straight / "metrics.jsonl")
    assert [m["iteration"] for m in log_b] == [m["iteration"] for m in log_a] == list(range(1, total + 1))
    assert [m["reward_mean"] for m in log_b] == [m["reward_mean"] for m in log_a]
    assert [m["advantages"] for m in log_b] == [m["advantages"] for m in log_a]


def test_metrics_log_tensorboard_curves_samples_and_evaluation(comfy_server, demo_model_files, comfy_runtime):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = f"logged_{uuid.uuid4().hex[:8]}"
    with ComfyClient(comfy_server.url) as client:
        prompt = train_prompt(client, demo_model_files, run, "iterations=2\neval_steps=3\neval_every=1\nsample_every=1",
                              tensorboard=True)
        prompt_id = client.queue_prompt(prompt)
        client.wait(prompt_id, timeout=600)
        entry = client.finished_entry(prompt_id, timeout=30)
        train_id = next(k for k, n in prompt.items() if n["class_type"] == "FlowGRPOTrain")
        images = entry["outputs"][train_id]["images"]
        curves = [i for i in images if i["filename"] == "curves.png"]
        assert curves and curves[0]["subfolder"] == f"flowgrpo/{run}" and curves[0]["type"] == "output"
        assert client.view(**curves[0])[:8] == b"\x89PNG\r\n\x1a\n"
        assert any(i["filename"] == f"{run}_reward_curve.png" for i in images)

    folder = Path(comfy_runtime.folder_paths.get_output_directory()) / "flowgrpo" / run
    lines = read_metrics(folder / "metrics.jsonl")
    assert [m["iteration"] for m in lines] == [1, 2]
    for m in lines:
        for key in ("reward_mean", "reward_std", "loss", "approx_kl", "clipfrac", "ratio_mean", "ratio_min",
                    "ratio_max", "grad_norm", "zero_std_ratio", "time_rollout_s", "time_decode_s", "time_reward_s",
                    "time_update_s", "time_prompts_s", "eval_reward_mean", "time_eval_s"):
            assert isinstance(m[key], (int, float)), (key, m.get(key))
        assert all(m[f"time_{p}_s"] > 0 for p in ("rollout", "decode", "update", "eval"))
        assert "peak_mem_update_mb" in m and "peak_mem_rollout_mb" in m
        assert len(m["advantages"]) == 2 and list(m["rewards"]) == ["redness"] and len(m["rewards"]["redness"]) == 2
        assert m["sde_steps"] == [0, 1, 2] and m["train_steps"] == [0, 1, 2]
        assert m["eval_steps"] == 3 and m["eval_weights"] == "live"
    for it in (1, 2):
        assert (folder / "samples" / f"iter_{it:05d}.jpg").read_bytes()[:2] == b"\xff\xd8"
        assert (folder / "eval" / f"iter_{it:05d}.jpg").read_bytes()[:2] == b"\xff\xd8"

    events = EventAccumulator(str(folder / "tensorboard"))
    events.Reload()
    scalars = events.Scalars("reward_mean")
    assert [s.step for s in scalars] == [1, 2]
    assert [s.value for s in scalars] == pytest.approx([m["reward_mean"] for m in lines], rel=1e-6)


def test_composable_loop_logs_metrics_and_shows_curves(comfy_client, comfy_runtime, demo_model_files):
    """LoRA Init (EMA) -> Loop Start -> ... -> GRPO Update -> Log Metrics -> Loop End -> Save LoRA: one JSONL line per
    pass and the curves image in the Log Metrics node's UI output."""
    run = f"loop_logged_{uuid.uuid4().hex[:8]}"
    g = Graph()
    unet = g.add("UNETLoader", unet_name=demo_model_files["diffusion_model"], weight_dtype="default")
    clip = g.add("CLIPLoader", clip_name=demo_model_files["text_encoder"], type="sd3", device="default")
    vae = g.add("VAELoader", vae_name=demo_model_files["vae"])
    init = g.add("FlowGRPOLoRAInit", model=unet, rank=4, alpha=4.0, learning_rate=1e-2, run_name=run,
                 ema_decay=0.9, ema_every=2)
    start = g.add("FlowGRPOLoopStart", value=init.out(0), iterations=3)
    prompts = g.add("FlowGRPOPromptSource", clip=clip, prompts="a red square\na blue circle",
                    prompts_per_iteration=1, group_size=2, iteration=start.out(2))
    rollout = g.add("FlowGRPOSDERollout", model=init.out(1), positive=prompts.out(0), negative=prompts.out(1),
                    groups=prompts.out(2), width=64, height=64, steps=4, iteration=start.out(2))
    images = g.add("VAEDecode", samples=rollout.out(0), vae=vae)
    reward = g.add("FlowGRPOSimpleReward", images=images, reward="redness")
    update = g.add("FlowGRPOUpdate", trainer=start.out(1), rollout=rollout.out(1), rewards=reward, clip_range=0.2)
    logged = g.add("FlowGRPOLogMetrics", "Log Metrics", trainer=update.out(0))
    end = g.add("FlowGRPOLoopEnd", loop=start.out(0), value=logged.out(0))
    g.add("FlowGRPOSaveLoRA", trainer=end.out(0))  # an output after Loop End, so ComfyUI runs the loop
    prompt = complete_api(g.api(), comfy_client.object_info())
    prompt_id = comfy_client.queue_prompt(prompt)
    comfy_client.wait(prompt_id, timeout=600)
    entry = comfy_client.finished_entry(prompt_id, timeout=30)
    shown = [img for out in entry["outputs"].values() for img in out.get("images", [])]
    assert any(i["filename"] == "curves.png" and i["subfolder"] == f"flowgrpo/{run}" for i in shown), shown

    folder = Path(comfy_runtime.folder_paths.get_output_directory()) / "flowgrpo" / run
    lines = read_metrics(folder / "metrics.jsonl")
    assert [m["iteration"] for m in lines] == [1, 2, 3]
    assert [m["ema_updated"] for m in lines] == [False, True, False]  # every 2nd update: n = 1
    assert all(m["offloaded"] >= 1 for m in lines)  # at least the VAE went off before each update
    assert json.loads(json.dumps(lines))  # plain JSON throughout
