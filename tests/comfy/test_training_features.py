"""Issue-5 features in-process on the tiny SD3 model: the EMA follows its documented update and is what is saved and
applied; shared initial noise per group; evaluation is ComfyUI's stock ODE sampler at its own step count on the EMA
weights; the VAE and other models are offloaded before an update."""

from __future__ import annotations

import importlib
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from test_grpo_nodes import (UPDATE_DEFAULTS, batched_conditioning, init_trainer, load_model, prompt_batch,
                             rollout_inputs)

pytestmark = pytest.mark.comfy


@pytest.fixture(scope="module")
def mods(flowgrpo_pack):
    pkg = flowgrpo_pack.package
    names = ("state", "lora_io", "train_loop", "rollout_nodes", "update_nodes", "reward_nodes")
    return SimpleNamespace(**{n: importlib.import_module(f"{pkg}.nodes.{n}") for n in names})


def _rollout(run_node, train_model, mods, iteration=0, **overrides):
    positive = batched_conditioning("sd3", seeds=(3, 5), group=2)
    negative = batched_conditioning("sd3", seeds=(4, 4), group=2)
    return run_node("FlowGRPOSDERollout", model=train_model, positive=positive, negative=negative,
                    groups=prompt_batch(mods, iteration=iteration),
                    **rollout_inputs("sd3", iteration=iteration, **overrides))


def _trainable(state):
    return {k: v.detach().clone() for k, v in state.lora_params.items() if k.endswith(("up.weight", "down.weight"))}


def test_ema_follows_the_documented_update_and_is_saved_and_applied(mods, run_node, tiny_sd3_file, comfy_runtime):
    model = load_model("sd3", run_node, tiny_sd3_file)
    trainer, train_model = init_trainer(run_node, model, "ema_doc", ema_decay=0.9, ema_every=2, learning_rate=5e-2)
    shadow = _trainable(trainer)  # the average starts at the initial weights
    for n in range(4):
        latent, rollout = _rollout(run_node, train_model, mods, iteration=n)
        rewards = mods.state.Rewards(values=torch.tensor([0.1, 0.9, 0.4, 0.2]) * (n + 1))
        trainer, _, _ = run_node("FlowGRPOUpdate", trainer=trainer, rollout=rollout, rewards=rewards,
                                 **dict(UPDATE_DEFAULTS, clip_range=0.2))
        live = _trainable(trainer)
        if (n + 1) % 2 == 0:
            d = min(0.9, (1 + n) / (10 + n))
            shadow = {k: s + (1 - d) * (live[k] - s) for k, s in shadow.items()}
        assert all(torch.allclose(trainer.ema.shadow[k], shadow[k], atol=1e-7, rtol=0) for k in shadow), n
    assert any(not torch.allclose(shadow[k], live[k]) for k in shadow)  # the average lags the live weights

    (path,) = run_node("FlowGRPOSaveLoRA", trainer=trainer, filename_prefix="ema_doc", export="comfyui")
    saved = load_file(path)
    assert all(torch.equal(saved[k], shadow[k].float()) for k in shadow)
    applied = mods.lora_io.lora_state_dict(trainer)
    assert all(torch.equal(applied[k], saved[k]) for k in saved)


def test_same_noise_per_group_shares_the_start_and_not_the_sde_noise(mods, run_node, tiny_sd3_file):
    model = load_model("sd3", run_node, tiny_sd3_file)
    _, train_model = init_trainer(run_node, model, "same_noise")
    _, shared = _rollout(run_node, train_model, mods, same_noise_per_group=True)
    _, own = _rollout(run_node, train_model, mods, same_noise_per_group=False)
    start, final = shared.trajectory.latents[0], shared.trajectory.latents[-1]
    assert torch.equal(start[0], start[1]) and torch.equal(start[2], start[3])  # groups (0, 1) and (2, 3)
    assert not torch.equal(start[0], start[2])
    assert not torch.allclose(final[0], final[1])  # the SDE noise differs within a group
    assert torch.equal(own.trajectory.latents[0][0], start[0])  # each group takes its first sample's noise
    assert not torch.equal(own.trajectory.latents[0][1], own.trajectory.latents[0][0])
    with pytest.raises(Exception, match="same_noise_per_group needs the prompt groups"):
        run_node("FlowGRPOSDERollout", model=train_model, positive=batched_conditioning("sd3", (3, 5), 2),
                 negative=batched_conditioning("sd3", (4, 4), 2), **rollout_inputs("sd3", same_noise_per_group=True))


def test_update_offloads_the_vae_and_keeps_the_trained_model(mods, run_node, tiny_sd3_file, demo_model_files):
    import comfy.model_management as mm

    model = load_model("sd3", run_node, tiny_sd3_file)
    trainer, train_model = init_trainer(run_node, model, "offload")
    latent, rollout = _rollout(run_node, train_model, mods)
    (vae,) = run_node("VAELoader", vae_name=demo_model_files["vae"])
    run_node("VAEDecode", samples={"samples": torch.zeros(1, 16, 8, 8)}, vae=vae)
    assert any(m is vae.patcher for m in mm.loaded_models())
    _, metrics, _ = run_node("FlowGRPOUpdate", trainer=trainer, rollout=rollout,
                             rewards=mods.state.Rewards(values=torch.tensor([0.1, 0.9, 0.4, 0.2])),
                             **UPDATE_DEFAULTS)
    assert not any(m is vae.patcher for m in mm.loaded_models())
    assert any(m is train_model for m in mm.loaded_models())
    assert '"offloaded": ' in metrics and '"offloaded": 0' not in metrics


def test_evaluation_is_the_stock_ode_sampler_at_eval_steps_on_the_ema_weights(mods, run_node, demo_model_files):
    """``train_loop.evaluate`` samples with more steps than training and the EMA weights: its images equal stock
    SamplerCustom (euler) on the Apply-Trained-LoRA model (which applies the EMA) with the same noise."""
    model = run_node("UNETLoader", unet_name=demo_model_files["diffusion_model"], weight_dtype="default")[0]
    (clip,) = run_node("CLIPLoader", clip_name=demo_model_files["text_encoder"], type="sd3", device="default")
    (vae,) = run_node("VAELoader", vae_name=demo_model_files["vae"])
    state = mods.lora_io.make_trainer_state(model, rank=4, alpha=4.0, targets="attention", learning_rate=1e-3,
                                            seed=0, run_name="eval_ema", ema_decay=0.5, ema_every=1)
    with torch.inference_mode(False), torch.no_grad():  # live weights and the average both away from zero, apart
        for k, p in mods.lora_io.trainable_params(state).items():
            p.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(len(k)))
        state.ema.step(mods.lora_io.trainable_params(state), 0)
        for p in mods.lora_io.trainable_params(state).values():
            p.mul_(-1.0)
    job = mods.train_loop.TrainJob(
        clip=clip, vae=vae, prompts=["a red square"], negative_prompt="", prompts_per_iteration=1, group_size=2,
        flux_guidance=3.5, width=64, height=64, sampling=mods.rollout_nodes.SamplingSettings(steps=4, cfg=3.0),
        update=mods.update_nodes.UpdateSettings(), reward="redness", reward_scale=1.0, reward_model=None,
        iterations=1, save_every=0, seed=11, eval_steps=7)
    live_before = {k: v.clone() for k, v in mods.lora_io.trainable_params(state).items()}
    images = mods.train_loop.eval_images(state, job)
    metrics, _ = mods.train_loop.evaluate(state, job)
    assert all(torch.equal(v, live_before[k]) for k, v in mods.lora_io.trainable_params(state).items())
    assert metrics["eval_steps"] == 7 and metrics["eval_weights"] == "ema"

    # the same with stock nodes: the EMA LoRA applied by Apply Trained LoRA, 7 euler steps, noise seed = run seed
    applied = run_node("FlowGRPOApplyLoRA", model=model, trainer=state, strength=1.0)[0]
    pos = run_node("CLIPTextEncode", clip=clip, text="a red square")[0]
    neg = run_node("CLIPTextEncode", clip=clip, text="")[0]
    (sampler,) = run_node("KSamplerSelect", sampler_name="euler")
    (sigmas,) = run_node("BasicScheduler", model=applied, scheduler="simple", steps=7, denoise=1.0)
    (latent,) = run_node("EmptySD3LatentImage", width=64, height=64, batch_size=1)
    stock = run_node("SamplerCustom", model=applied, add_noise=True, noise_seed=11, cfg=3.0, positive=pos,
                     negative=neg, sampler=sampler, sigmas=sigmas, latent_image=latent)[0]
    (stock_image,) = run_node("VAEDecode", samples=stock, vae=vae)
    assert images.shape == stock_image.shape
    assert torch.allclose(images, stock_image, atol=1e-3), (images - stock_image).abs().max()
    live = mods.lora_io.apply_lora(model, mods.lora_io.live_state_dict(state), 1.0)
    (live_latent,) = run_node("SamplerCustom", model=live, add_noise=True, noise_seed=11, cfg=3.0, positive=pos,
                              negative=neg, sampler=sampler, sigmas=sigmas, latent_image=latent)[:1]
    (live_image,) = run_node("VAEDecode", samples=live_latent, vae=vae)
    assert not torch.allclose(images, live_image, atol=1e-3)
