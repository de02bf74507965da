"""Video RL through the pack's nodes on tiny Wan 2.1 / 2.2 text-to-video models (5-D latents ``[B, C, T, H, W]``).

(a) The composable nodes: LoRA Init -> SDE Rollout (a stock video LATENT, or width / height / frames) -> stock
    VAEDecode (B * T frames) -> Simple Reward with the groups (one reward per sample: the mean over its frames) ->
    GRPO Update: the first recomputed log-probs equal the rollout's, the LoRA moves, the input MODEL is untouched.
(b) GRPO Train (all-in-one) for 2 iterations; its LoRA file loads in stock LoraLoaderModelOnly with no unloaded key
    and changes the model's output. The preview grid shows each sample as a frame strip.

VAEs: a tiny real Wan 2.1 VAE and, for Wan 2.2, a random TAEHV (:mod:`tiny_video_vaes` says why), by VAELoader.
"""

from __future__ import annotations

import importlib
import json
import logging
from types import SimpleNamespace

import pytest
import torch

import model_families
import tiny_video_families
import tiny_video_vaes
from test_grpo_nodes import UPDATE_DEFAULTS as UPDATE

pytestmark = pytest.mark.comfy

WAN = [n for n in ("WAN21_T2V", "WAN22_T2V")]
PROMPTS, GROUP = 2, 2
BATCH = PROMPTS * GROUP
WIDTH = HEIGHT = 64
FRAMES = 9  # 3 latent frames (Wan: 4x temporal)
NOT_LOADED = ("lora key not loaded", "NOT LOADED")
ROLLOUT = dict(width=WIDTH, height=HEIGHT, steps=4, scheduler="simple", shift=0.0, sde_kind="flow_sde",
               noise_level=0.7, cfg=1.0, norm_rescale=False, step_mode="fraction", train_fraction=0.99,
               window_size=2, window_start=0, window_shift_every=25, micro_batch_size=2, seed=7, iteration=0)


@pytest.fixture(scope="module")
def mods(flowgrpo_pack):
    pkg = flowgrpo_pack.package
    return SimpleNamespace(state=importlib.import_module(f"{pkg}.nodes.state"),
                           rollout=importlib.import_module(f"{pkg}.nodes.rollout_nodes"),
                           previews=importlib.import_module(f"{pkg}.nodes.previews"),
                           simple=importlib.import_module(f"{pkg}.flowgrpo_core.rewards.simple"))


def _family(name):
    if name not in model_families.supported_model_classes():
        pytest.fail(f"this ComfyUI has no {name}")
    return {f.name: f for f in tiny_video_families.FAMILIES}[name]


def _model(name):
    """The tiny MODEL as a user gets it: built under inference mode (its parameters are inference tensors)."""
    with torch.inference_mode():
        return model_families.build(_family(name), seed=1)


def _vae(name, comfy_runtime, run_node):
    file = f"flowgrpo_test_{name.lower()}_vae.safetensors"
    path = comfy_runtime.home / "models" / "vae" / file
    if not path.exists():
        tiny_video_vaes.write_vae_file(name, path, seed=0)
    return run_node("VAELoader", vae_name=file)[0]


def _conditioning(name, seeds=(3, 5), group=GROUP):
    entries = [_family(name).conditioning(s)[0] for s in seeds]
    return [[torch.cat([e[0].repeat(group, 1, 1) for e in entries]), dict(entries[0][1])]]


def _groups(mods):
    ids = torch.arange(PROMPTS).repeat_interleave(GROUP)
    return mods.state.PromptBatch(texts=tuple(f"prompt {int(i)}" for i in ids), group_ids=ids,
                                  prompt_indices=tuple(int(i) for i in ids), iteration=0, group_size=GROUP)


def _stock_sample(run_node, model, name):
    """Stock sampling (euler, 3 steps) of one tiny clip through SamplerCustomAdvanced."""
    (sampler,) = run_node("KSamplerSelect", sampler_name="euler")
    (guider,) = run_node("BasicGuider", model=model, conditioning=_family(name).conditioning(3))
    (sigmas,) = run_node("BasicScheduler", model=model, scheduler="simple", steps=3, denoise=1.0)
    (noise,) = run_node("RandomNoise", noise_seed=11)
    latent = {"samples": torch.zeros(_family(name).latent(1))}
    out, _ = run_node("SamplerCustomAdvanced", noise=noise, guider=guider, sampler=sampler, sigmas=sigmas,
                      latent_image=latent)
    return out["samples"]


def _stock_latent(name, run_node, vae):
    """The empty video LATENT of the family's stock node (batch 1)."""
    if name == "WAN22_T2V":
        return run_node("Wan22ImageToVideoLatent", vae=vae, width=WIDTH, height=HEIGHT, length=FRAMES,
                        batch_size=1)[0]
    return run_node("EmptyHunyuanLatentVideo", width=WIDTH, height=HEIGHT, length=FRAMES, batch_size=1)[0]


@pytest.mark.parametrize("name", WAN)
def test_composable_nodes_train_a_wan_lora_with_a_per_frame_reward(name, mods, run_node, comfy_runtime):
    model = _model(name)
    vae = _vae(name, comfy_runtime, run_node)
    before = _stock_sample(run_node, model, name)
    stock = _stock_latent(name, run_node, vae)
    assert mods.rollout.empty_latent(model, 1, WIDTH, HEIGHT, FRAMES).shape == stock["samples"].shape

    trainer, train_model = run_node("FlowGRPOLoRAInit", model=model, rank=4, alpha=4.0, targets="attention_mlp",
                                    learning_rate=1e-3, seed=0, run_name=f"video_{name.lower()}", resume="none")
    groups = _groups(mods)
    # Wan 2.1 from the stock video LATENT, Wan 2.2 from width / height / frames
    inputs = dict(latent=stock) if name == "WAN21_T2V" else dict(frames=FRAMES)
    latent, rollout = run_node("FlowGRPOSDERollout", model=train_model, positive=_conditioning(name),
                               groups=groups, **inputs, **ROLLOUT)
    samples = latent["samples"]
    assert samples.shape == (BATCH, *stock["samples"].shape[1:]) and samples.dim() == 5
    assert rollout.trajectory.latents.shape[:2] == (5, BATCH) and rollout.trajectory.log_probs.shape == (4, BATCH)

    (images,) = run_node("VAEDecode", vae=vae, samples=latent)  # stock: the B * T frames one after another
    assert images.dim() == 4 and images.shape[0] == BATCH * FRAMES
    (rewards,) = run_node("FlowGRPOSimpleReward", images=images, reward="redness", scale=1.0, groups=groups)
    per_frame = mods.simple.simple_reward("redness", images).reshape(BATCH, FRAMES)
    assert rewards.batch_size == BATCH
    torch.testing.assert_close(rewards.values, per_frame.mean(dim=1))
    assert float(rewards.values.std()) > 0

    params = [p for p in trainer.lora_params.values() if p.requires_grad]
    snapshot = [p.detach().clone() for p in params]
    new_state, metrics_json, _ = run_node("FlowGRPOUpdate", trainer=trainer, rollout=rollout, rewards=rewards,
                                          **UPDATE)
    metrics = json.loads(metrics_json)
    assert metrics["first_log_ratio_abs_max"] <= 1e-5, metrics
    assert new_state.iteration == 1
    assert any(not torch.equal(a, p.detach()) for a, p in zip(snapshot, params)), "the update must move the LoRA"
    after = _stock_sample(run_node, model, name)
    torch.testing.assert_close(after, before, rtol=0, atol=0)

    clips = images.reshape(BATCH, FRAMES, *images.shape[1:])
    grid = mods.previews.group_grid(clips, groups.group_ids.tolist(), rewards.values.tolist(), groups.texts,
                                    cell=32)
    strip = 32 * mods.previews.STRIP_FRAMES
    assert grid.width == 150 + GROUP * (strip + 4) - 4 and grid.height == PROMPTS * (32 + 14)


TRAIN = dict(prompts="a red square\na blue circle\na green triangle", prompt_file="", negative_prompt="",
             prompts_per_iteration=PROMPTS, group_size=GROUP, flux_guidance=3.5, width=WIDTH, height=HEIGHT,
             frames=FRAMES, steps=3, scheduler="simple", shift=0.0, sde_kind="flow_sde", noise_level=0.7, cfg=1.0,
             norm_rescale=False, step_mode="fraction", train_fraction=0.99, window_size=2, window_start=0,
             window_shift_every=25, micro_batch_size=0, reward="redness", reward_scale=1.0, clip_range=0.2,
             kl_beta=0.0, adv_clip_max=5.0, max_grad_norm=1.0, std_mode="global", optimizer_steps=1,
             gradient_checkpointing=False, rank=4, alpha=4.0, targets="attention", learning_rate=1e-2,
             iterations=2, save_every=0, resume="none", seed=5)


@pytest.mark.parametrize("name", WAN)
def test_grpo_train_runs_on_wan_and_its_lora_loads_in_stock_nodes(name, run_node, comfy_runtime, tiny_clip_file,
                                                                   caplog):
    import comfy.model_management

    model = _model(name)
    clip = run_node("CLIPLoader", clip_name=tiny_clip_file, type="sd3", device="default")[0]
    vae = _vae(name, comfy_runtime, run_node)
    trained, state, lora_path, curve, samples = run_node("FlowGRPOTrain", model=model, clip=clip, vae=vae,
                                                         run_name=f"video_train_{name.lower()}", **TRAIN)
    assert state.iteration == 2 and len(state.history) == 2
    assert all(m["first_log_ratio_abs_max"] <= 1e-5 for m in state.history)
    assert lora_path.endswith("_00002.safetensors")
    assert samples.shape[2] >= GROUP * 8 * 128, "the preview shows each sample as a frame strip"

    from pathlib import Path
    with caplog.at_level(logging.INFO):
        (loaded,) = run_node("LoraLoaderModelOnly", model=model, lora_name=Path(lora_path).name, strength_model=1.0)
    unloaded = [r.getMessage() for r in caplog.records if any(m in r.getMessage() for m in NOT_LOADED)]
    assert not unloaded, unloaded[:3]

    family = _family(name)
    x = torch.randn(family.latent(1), generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.7])
    cond = {"c_crossattn": family.conditioning(3)[0][0]}

    def denoise(m):
        with torch.inference_mode():
            comfy.model_management.load_models_gpu([m])
            return m.model.apply_model(x, sigma, **cond)

    base, with_lora, from_node = denoise(model), denoise(loaded), denoise(trained)
    assert (with_lora - base).abs().max() > 0, "the stock-loaded LoRA must change the output"
    torch.testing.assert_close(with_lora, from_node, rtol=0, atol=1e-5)
