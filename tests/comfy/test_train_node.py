"""The all-in-one ``FlowGRPOTrain`` node in-process: a real run on the tiny SD3 + random CLIP-L + TAESD-16 VAE loaded
by stock loaders; checkpoints, resume, reward curve and the bad-input errors."""

from __future__ import annotations

import importlib

import pytest
import safetensors.torch
import torch

from flowgrpo import demo_models

pytestmark = pytest.mark.comfy

VAE_NAME = "flowgrpo_test_taesd16.safetensors"

TRAIN = dict(prompts="a red square\na blue circle\na green triangle", prompt_file="", negative_prompt="",
             prompts_per_iteration=2, group_size=2, flux_guidance=3.5, width=64, height=64, steps=4,
             scheduler="simple", shift=0.0, sde_kind="flow_sde", noise_level=0.7, cfg=4.5, norm_rescale=False,
             step_mode="fraction", train_fraction=0.99, window_size=2, window_start=0, window_shift_every=25,
             micro_batch_size=0, reward="brightness", reward_scale=1.0, clip_range=0.2, kl_beta=0.0,
             adv_clip_max=5.0, max_grad_norm=1.0, std_mode="global", optimizer_steps=1,
             gradient_checkpointing=False, rank=4, alpha=4.0, targets="attention", learning_rate=1e-3,
             iterations=3, save_every=2, resume="none", seed=5)


@pytest.fixture(scope="module")
def parts(comfy_runtime, run_node, tiny_sd3_file, tiny_clip_file):
    vae_path = comfy_runtime.home / "models" / "vae" / VAE_NAME
    if not vae_path.exists():
        demo_models.write_taesd_file(vae_path, seed=0)
    model = run_node("UNETLoader", unet_name=tiny_sd3_file, weight_dtype="default")[0]
    clip = run_node("CLIPLoader", clip_name=tiny_clip_file, type="sd3", device="default")[0]
    vae = run_node("VAELoader", vae_name=VAE_NAME)[0]
    return dict(model=model, clip=clip, vae=vae)


def test_train_runs_saves_and_resumes(parts, run_node, comfy_runtime, flowgrpo_pack):
    state_mod = importlib.import_module(f"{flowgrpo_pack.package}.nodes.state")
    trained, state, lora_path, curve, samples = run_node("FlowGRPOTrain", **parts, run_name="train_node", **TRAIN)
    assert isinstance(state, state_mod.TrainerState) and state.iteration == 3 and len(state.history) == 3
    assert all(m["first_log_ratio_abs_max"] <= 1e-5 for m in state.history)
    assert lora_path.endswith("train_node_00003.safetensors")
    saved = safetensors.torch.load_file(lora_path)
    assert saved and all(k.startswith("diffusion_model.") for k in saved)
    loras = comfy_runtime.folder_paths.get_folder_paths("loras")[0]
    names = sorted(p.name for p in __import__("pathlib").Path(loras).glob("train_node_*.safetensors"))
    assert names == ["train_node_00002.safetensors", "train_node_00003.safetensors"], names  # save_every=2 + end
    assert curve.shape[0] == 1 and curve.shape[-1] == 3 and samples.shape[-1] == 3
    curve_file = __import__("pathlib").Path(comfy_runtime.folder_paths.get_output_directory()) / "flowgrpo" / \
        "train_node_reward_curve.png"
    assert curve_file.is_file()
    for k, v in saved.items():
        torch.testing.assert_close(v, state.lora_params[k].detach().float().cpu())

    # the MODEL output is the input model with the LoRA applied through the stock path: it differs from the input
    x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.7])
    kw = {"c_crossattn": torch.randn(1, 77, 4096, generator=torch.Generator().manual_seed(1)) * 0.1,
          "y": torch.zeros(1, 2048)}

    def denoise(m):
        import comfy.model_management
        with torch.inference_mode():
            comfy.model_management.load_models_gpu([m])
            return m.model.apply_model(x, sigma, **kw)

    assert (denoise(trained) - denoise(parts["model"])).abs().max() > 0

    resumed = run_node("FlowGRPOTrain", **parts, run_name="train_node", **dict(TRAIN, iterations=4, resume="latest"))
    r_state = resumed[1]
    assert r_state.iteration == 4 and len(r_state.history) == 4
    assert [m["reward_mean"] for m in r_state.history[:3]] == [m["reward_mean"] for m in state.history]
    assert resumed[2].endswith("train_node_00004.safetensors")


def test_train_bad_inputs_name_the_node(parts, run_node, flowgrpo_pack):
    import tiny_models

    err = importlib.import_module(f"{flowgrpo_pack.package}.nodes.state").NodeInputError
    with pytest.raises(err, match="FlowGRPO GRPO Train: group_size is 1"):
        run_node("FlowGRPOTrain", **parts, run_name="bad", **dict(TRAIN, group_size=1))
    with pytest.raises(err, match="FlowGRPO GRPO Train: .*prompts_per_iteration is 4"):
        run_node("FlowGRPOTrain", **parts, run_name="bad", **dict(TRAIN, prompts_per_iteration=4))
    with pytest.raises(err, match="FlowGRPO GRPO Train: .*eps"):
        run_node("FlowGRPOTrain", **dict(parts, model=tiny_models.build_sd15_eps()), run_name="bad", **TRAIN)


def test_a_failed_periodic_save_keeps_training_and_the_next_save_writes_everything(parts, run_node, comfy_runtime,
                                                                                   flowgrpo_pack, monkeypatch, caplog):
    """The disk is full at the first checkpoint: the run goes on in memory, and once space is freed the next
    checkpoint holds every iteration (nothing lost, no orphan of the failed save)."""
    import logging
    from pathlib import Path

    import faulty_folders

    train_loop = importlib.import_module(f"{flowgrpo_pack.package}.nodes.train_loop")
    loras = Path(comfy_runtime.folder_paths.get_folder_paths("loras")[0])
    report = train_loop._report
    with faulty_folders.filled_folder(loras / "full_disk") as free:
        def report_then_free(state, *args, **kwargs):  # the user frees space while iteration 2 runs
            report(state, *args, **kwargs)
            if state.iteration == 2:
                free()
        monkeypatch.setattr(train_loop, "_report", report_then_free)
        with caplog.at_level(logging.WARNING):
            _, state, lora_path, _, _ = run_node("FlowGRPOTrain", **parts, run_name="full_disk/run",
                                                 **dict(TRAIN, save_every=1))
        names = sorted(p.name for p in (loras / "full_disk").iterdir())
    assert any("could not write checkpoint run_00001.safetensors" in r.getMessage() and "training goes on"
               in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records][-5:]
    assert names == ["run_00002.flowgrpo-state", "run_00002.safetensors", "run_00003.flowgrpo-state",
                     "run_00003.safetensors"], names
    assert state.iteration == 3 and lora_path.endswith("run_00003.safetensors")
