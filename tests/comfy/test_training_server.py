"""Training through a real ComfyUI server: the README's main job, and an interrupted run resumed from its checkpoint.

The main job is run exactly as the README gives it (``bash scripts/demo.sh``, here on a throw-away home). The interrupt
test queues the tiny demo's API twin on the session's server, sends ``POST /interrupt`` once a few GRPO updates are
done, checks the checkpoint the train node left, loads it with the stock ``LoraLoaderModelOnly`` and resumes.
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import uuid
from pathlib import Path

import pytest

from flowgrpo.client import ComfyClient, ComfyError
from flowgrpo.workflow import apply_overrides, load_workflow

pytestmark = [pytest.mark.comfy, pytest.mark.server]

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO_API = REPO_ROOT / "example_workflows" / "api" / "flowgrpo_tiny_demo.json"
ITER_LINE = re.compile(r"^iter +(\d+)/(\d+) +reward (-?[0-9.]+) ± ([0-9.]+)", re.M)


def moving_average(values, window=5):
    return [sum(values[max(0, i - window + 1): i + 1]) / len(values[max(0, i - window + 1): i + 1])
            for i in range(len(values))]


def test_readme_main_job_trains_and_the_reward_rises(tmp_path):
    proc = subprocess.run(["bash", str(REPO_ROOT / "scripts" / "demo.sh"), "--home", str(tmp_path / "home")],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=1200)
    out = proc.stdout
    assert proc.returncode == 0, f"exit {proc.returncode}\n{out[-4000:]}\n{proc.stderr[-4000:]}"
    rows = [(int(i), int(n), float(m), float(s)) for i, n, m, s in ITER_LINE.findall(out)]
    assert [r[0] for r in rows] == list(range(1, 21)) and all(r[1] == 20 for r in rows), out[-3000:]
    means = [r[2] for r in rows]
    avg = moving_average(means)
    assert avg[-1] > avg[4] + 0.02, f"the 5-iteration moving average must rise: {avg}"
    assert max(means[-5:]) > max(means[:5]), means
    lora = re.search(r"^LoRA: (.+\.safetensors)$", out, re.M)
    curve = re.search(r"^Reward curve: (.+\.png)$", out, re.M)
    assert lora and curve, out[-2000:]
    assert Path(lora.group(1)).name == "flowgrpo_tiny_demo_00020.safetensors" and Path(lora.group(1)).is_file()
    assert Path(curve.group(1)).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # run twice in a row: the second run succeeds under its own name, and the first run's files stay as they were
    home = tmp_path / "home"
    first = {p: p.read_bytes() for p in sorted(home.rglob("*flowgrpo_tiny_demo*"))
             + sorted((home / "output" / "flowgrpo" / "flowgrpo_tiny_demo").rglob("*")) if p.is_file()}
    assert any(p.name == "metrics.jsonl" for p in first) and any(p.suffix == ".flowgrpo-state" for p in first)
    again = subprocess.run(["bash", str(REPO_ROOT / "scripts" / "demo.sh"), "--home", str(home),
                            "--set", 'Training preset.overrides="iterations = 2"'],
                           cwd=REPO_ROOT, capture_output=True, text=True, timeout=1200)
    assert again.returncode == 0, f"exit {again.returncode}\n{again.stdout[-4000:]}\n{again.stderr[-4000:]}"
    second = re.search(r"^LoRA: (.+\.safetensors)$", again.stdout, re.M)
    assert second and Path(second.group(1)).name == "flowgrpo_tiny_demo-2_00002.safetensors", again.stdout[-2000:]
    assert (home / "output" / "flowgrpo" / "flowgrpo_tiny_demo-2" / "metrics.jsonl").is_file()
    changed = [str(p) for p, data in first.items() if not p.is_file() or p.read_bytes() != data]
    assert not changed, f"the second run changed the first run's files: {changed}"


def checkpoints(loras: Path, run_name: str) -> dict[int, Path]:
    """``{iteration: LoRA file}`` of a run's checkpoints (``<run>_<iteration:05d>.safetensors``)."""
    found = {}
    for path in loras.glob(f"{run_name}_*.safetensors"):
        match = re.fullmatch(re.escape(run_name) + r"_(\d{5})\.safetensors", path.name)
        if match:
            found[int(match.group(1))] = path
    return dict(sorted(found.items()))


def _train_prompt(demo_model_files, run_name, iterations, resume):
    """The demo's API twin, made small through its preset's overrides (a connected preset's values win over the
    train node's widgets)."""
    api = load_workflow(DEMO_API)
    small = f"iterations={iterations}\nsave_every=0\nprompts_per_iteration=1\ngroup_size=2\nwidth=64\nheight=64\nsteps=4"
    return apply_overrides(api, [f"Training preset.overrides={json.dumps(small)}",
                                 f"GRPO Train.run_name={json.dumps(run_name)}", f"GRPO Train.resume={resume}"])


def test_interrupt_leaves_a_checkpoint_and_resume_continues(comfy_server, demo_model_files, run_node,
                                                            comfy_runtime, caplog):
    run_name = f"interrupted_{uuid.uuid4().hex[:8]}"
    seen = []

    def interrupt_after_two(kind, data):
        if kind == "flowgrpo.metrics" and data.get("run") == run_name:
            seen.append(int(data["iteration"]))
            if len(seen) == 2:
                client.interrupt()

    with ComfyClient(comfy_server.url) as client:
        prompt_id = client.queue_prompt(_train_prompt(demo_model_files, run_name, 200, "none"))
        with pytest.raises(ComfyError) as err:
            client.wait(prompt_id, timeout=600, on_event=interrupt_after_two)
        with pytest.raises(ComfyError, match="was interrupted at node") as from_history:
            client.finished_entry(prompt_id, timeout=30)  # the same outcome, read back from /history
    assert err.value.kind == "interrupted" and from_history.value.kind == "interrupted", err.value
    assert len(seen) >= 2 and seen == list(range(1, len(seen) + 1))

    loras = Path(comfy_runtime.folder_paths.get_folder_paths("loras")[0])
    saved = checkpoints(loras, run_name)
    assert list(saved) == [seen[-1]], (saved, seen)
    lora_file = saved[seen[-1]]
    assert lora_file.with_suffix(".flowgrpo-state").is_file()

    # the checkpoint loads through the stock loader, every key applied
    model = run_node("UNETLoader", unet_name=demo_model_files["diffusion_model"], weight_dtype="default")[0]
    with caplog.at_level(logging.WARNING):
        patched = run_node("LoraLoaderModelOnly", model=model, lora_name=lora_file.name, strength_model=1.0)[0]
    assert not [r for r in caplog.records if "lora key not loaded" in r.getMessage()]
    assert len(patched.patches) > 0

    # resume: the run continues at the next iteration and ends at its total
    resumed = []
    result = {}

    def record(kind, data):
        if kind == "flowgrpo.metrics" and data.get("run") == run_name:
            resumed.append(int(data["iteration"]))
        if kind == "flowgrpo.result" and data.get("run") == run_name:
            result.update(data)

    total = seen[-1] + 2
    with ComfyClient(comfy_server.url) as client:
        client.run(_train_prompt(demo_model_files, run_name, total, "latest"), timeout=600, on_event=record)
    assert resumed == [seen[-1] + 1, total]
    assert Path(result["lora_path"]).name == f"{run_name}_{total:05d}.safetensors"
    assert list(checkpoints(loras, run_name)) == [seen[-1], total]


def test_composable_nodes_train_in_a_loop(comfy_client, comfy_runtime, demo_model_files):
    """LoRA Init -> Loop Start -> Prompt Source -> SDE rollout -> stock VAEDecode -> Simple Reward -> GRPO Update ->
    Loop End -> Save LoRA: the trainer is carried through 3 passes of the body."""
    from flowgrpo.graph import Graph

    run_name = f"loop_{uuid.uuid4().hex[:8]}"
    g = Graph()
    unet = g.add("UNETLoader", unet_name=demo_model_files["diffusion_model"], weight_dtype="default")
    clip = g.add("CLIPLoader", clip_name=demo_model_files["text_encoder"], type="sd3", device="default")
    vae = g.add("VAELoader", vae_name=demo_model_files["vae"])
    init = g.add("FlowGRPOLoRAInit", model=unet, rank=4, alpha=4.0, targets="attention", learning_rate=1e-2,
                 seed=0, run_name=run_name, resume="none")
    start = g.add("FlowGRPOLoopStart", value=init.out(0), iterations=3)
    prompts = g.add("FlowGRPOPromptSource", clip=clip, prompts="a red square\na blue circle", prompt_file="",
                    negative_prompt="", prompts_per_iteration=2, group_size=2, iteration=start.out(2), seed=0,
                    flux_guidance=3.5)
    rollout = g.add("FlowGRPOSDERollout", model=init.out(1), positive=prompts.out(0), negative=prompts.out(1),
                    groups=prompts.out(2), width=64, height=64, steps=4, scheduler="simple", shift=0.0,
                    sde_kind="flow_sde", noise_level=0.7, cfg=4.5, norm_rescale=False, step_mode="fraction",
                    train_fraction=0.99, window_size=2, window_start=0, window_shift_every=25, micro_batch_size=0,
                    seed=0, iteration=start.out(2))
    images = g.add("VAEDecode", samples=rollout.out(0), vae=vae)
    reward = g.add("FlowGRPOSimpleReward", images=images, reward="redness", scale=1.0)
    update = g.add("FlowGRPOUpdate", trainer=start.out(1), rollout=rollout.out(1), rewards=reward, clip_range=0.2,
                   kl_beta=0.0, adv_clip_max=5.0, max_grad_norm=1.0, std_mode="global", optimizer_steps=1,
                   gradient_checkpointing=False)
    end = g.add("FlowGRPOLoopEnd", loop=start.out(0), value=update.out(0))
    g.add("FlowGRPOSaveLoRA", trainer=end.out(0), filename_prefix="", export="comfyui")

    iterations = []

    def record(kind, data):
        if kind == "flowgrpo.metrics" and data.get("run") == run_name:
            iterations.append(int(data["iteration"]))
            assert data["first_log_ratio_abs_max"] <= 1e-5

    comfy_client.run(g.api(), timeout=600, on_event=record)
    assert iterations == [1, 2, 3]
    loras = Path(comfy_runtime.folder_paths.get_folder_paths("loras")[0])
    assert list(checkpoints(loras, run_name)) == [3]
