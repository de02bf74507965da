"""Image-edit RL (issue 17) in a real ComfyUI: FlowGRPO Prompt Source with input images on a tiny Qwen-Image.

Qwen-Image-Edit is ComfyUI's ``QwenImage`` model class fed ``reference_latents`` (``comfy/supported_models.py``
QwenImage, ``model_base.QwenImage.extra_conds``): the tiny Qwen-Image here (its text width fitted to the test
CLIP-L's 4096-wide SD3 conditioning) is that class. Images are encoded by the stock VAELoader's 16-channel TAESD (the
demo's VAE file). Must-show: changing the input image changes the velocity, the replay ratio holds through rollout +
GRPO Update, and a reward that reads the input image receives it.
"""

from __future__ import annotations

import importlib
import json
import os
from types import SimpleNamespace

import pytest
import torch

import tiny_models
from test_grpo_nodes import UPDATE_DEFAULTS as UPDATE

pytestmark = pytest.mark.comfy

NODE_NAME = "FlowGRPO Prompt Source"
VAE_NAME = "flowgrpo_test_edit_taesd16.safetensors"
TEXT = "turn the sky purple"
P, G = 2, 2
B = P * G
ROLLOUT = dict(width=64, height=64, steps=4, scheduler="simple", shift=0.0, step_mode="fraction", train_fraction=0.99,
               window_size=2, window_start=0, window_shift_every=25, micro_batch_size=2, seed=7, iteration=0,
               sde_kind="flow_sde", noise_level=1.2, cfg=4.0, norm_rescale=True)


@pytest.fixture(scope="module")
def mods(flowgrpo_pack):
    pkg = flowgrpo_pack.package
    return SimpleNamespace(state=importlib.import_module(f"{pkg}.nodes.state"),
                           policy=importlib.import_module(f"{pkg}.nodes.comfy_policy"),
                           conditioning=importlib.import_module(f"{pkg}.nodes.conditioning"))


@pytest.fixture(scope="module")
def clip(run_node, tiny_clip_file):
    return run_node("CLIPLoader", clip_name=tiny_clip_file, type="sd3", device="default")[0]


@pytest.fixture(scope="module")
def vae(run_node, comfy_runtime):
    tiny_models.write_taesd_file(comfy_runtime.home / "models" / "vae" / VAE_NAME, seed=0)
    return run_node("VAELoader", vae_name=VAE_NAME)[0]


@pytest.fixture(scope="module")
def score(comfy_nodes):
    """Score Images (called directly: its ``name`` input clashes with run_node's node-name argument)."""
    from conftest import call_node

    return lambda **inputs: call_node(comfy_nodes["FlowGRPOScoreImages"], **dict(dict(name="", scale=1.0), **inputs))


def edit_model(seed: int = 1):
    """A tiny QwenImage (the Qwen-Image-Edit class) reading the SD3 CLIP's 4096-wide conditioning."""
    import comfy.supported_models

    config = dict(tiny_models.qwen_image_unet_config(), joint_attention_dim=tiny_models.SD3_CONTEXT_DIM)
    with torch.inference_mode():
        return tiny_models.build_model_patcher(comfy.supported_models.QwenImage, config, seed)


def two_images(size: int = 64) -> torch.Tensor:
    """IMAGE [2, size, size, 3]: a warm horizontal gradient and a cool checkerboard."""
    ramp = torch.linspace(0.0, 1.0, size)
    warm = torch.stack([ramp.expand(size, size), ramp.expand(size, size) * 0.5, torch.full((size, size), 0.1)], -1)
    check = ((torch.arange(size)[:, None] // 8 + torch.arange(size)[None] // 8) % 2).float()
    cool = torch.stack([check * 0.2, check * 0.6, 0.3 + 0.7 * check], -1)
    return torch.stack([warm, cool])


def source(run_node, clip, prompts=(TEXT, TEXT), **kw):
    args = dict(prompt_file="", negative_prompt="blurry", prompts_per_iteration=P, group_size=G, iteration=0, seed=0,
                flux_guidance=3.5)
    args.update(kw)
    return run_node("FlowGRPOPromptSource", clip=clip, prompts="\n".join(prompts), **args)


def prompt_of_row(groups, images):
    """Which of ``images`` each sample of ``groups`` was given (by its metadata's input image)."""
    found = []
    for text in groups.texts:
        image = text.metadata["input_image"]
        found.append(next(i for i in range(images.shape[0]) if torch.equal(image, images[i])))
    return found


# ----------------------------------------------------------------------------------------------- conditioning
def test_input_image_reaches_the_model_as_comfyui_edit_nodes_pass_it(run_node, clip, vae, mods):
    images = two_images()
    positive, negative, groups, texts = source(run_node, clip, images=images, vae=vae)
    assert texts == f"{TEXT}\n{TEXT}"  # one text, two (text, image) pairs: two groups
    rows = prompt_of_row(groups, images)
    assert rows[0] == rows[1] and rows[2] == rows[3] and rows[0] != rows[2]

    (cond, extra), = positive
    (ref,) = extra["reference_latents"]
    encoded = [run_node("VAEEncode", pixels=images[i:i + 1], vae=vae)[0]["samples"] for i in range(2)]
    assert ref.shape == (B, *encoded[0].shape[1:])
    for row, i in enumerate(rows):
        torch.testing.assert_close(ref[row], encoded[i][0], rtol=0, atol=0)
    # the rows differ only in their reference latent: one text, the same encoding on every row
    assert all(torch.equal(cond[0], cond[r]) for r in range(B))
    assert all(torch.equal(extra["pooled_output"][0], extra["pooled_output"][r]) for r in range(B))
    torch.testing.assert_close(negative[0][1]["reference_latents"][0], ref, rtol=0, atol=0)

    model = edit_model()
    policy = mods.policy.ComfyFlowPolicy(model)
    x = tiny_models.random_latent("qwen_image", seed=3).repeat(B, 1, 1, 1, 1)
    sigma = torch.full((B,), 0.7)
    kwargs = mods.conditioning.encode_conditioning(model, positive, None, B, x.shape)
    with torch.no_grad():
        v = policy.velocity(x, sigma, kwargs)
        plain = policy.velocity(x, sigma, mods.conditioning.encode_conditioning(
            model, [[cond, {k: w for k, w in extra.items() if k != "reference_latents"}]], None, B, x.shape))
    torch.testing.assert_close(v[0], v[1], rtol=0, atol=0)
    assert (v[0] - v[2]).abs().max() > 1e-4, "changing the input image must change the velocity"
    assert (v[0] - plain[0]).abs().max() > 1e-4, "the reference latent must reach the model"

    # the same velocity as ComfyUI's own edit chain: CLIPTextEncode -> ReferenceLatent(VAEEncode(image))
    (stock,) = run_node("CLIPTextEncode", clip=clip, text=TEXT)
    (stock,) = run_node("ReferenceLatent", conditioning=stock, latent={"samples": encoded[rows[2]]})
    with torch.no_grad():
        v_stock = policy.velocity(x[:1], sigma[:1], mods.conditioning.encode_conditioning(model, stock, None, 1,
                                                                                          x.shape))
    torch.testing.assert_close(v_stock[0], v[2], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------- training
def test_rollout_update_parity_and_the_reward_reads_the_input_image(run_node, score, clip, vae, mods):
    images = two_images()
    positive, negative, groups, _ = source(run_node, clip, images=images, vae=vae)
    model = edit_model()
    trainer, train_model = run_node("FlowGRPOLoRAInit", model=model, rank=4, alpha=4.0, targets="attention_mlp",
                                    learning_rate=1e-3, seed=0, run_name="image_edit", resume="none")
    with torch.inference_mode(False), torch.no_grad():  # off the zero init, so the rollout runs through the LoRA
        for key, p in trainer.lora_params.items():
            if key.endswith("lora_up.weight"):
                p.normal_(0.0, 0.2, generator=torch.Generator().manual_seed(len(key)))
    latent, rollout = run_node("FlowGRPOSDERollout", model=train_model, positive=positive, negative=negative,
                               groups=groups, **ROLLOUT)
    assert torch.isfinite(latent["samples"]).all()
    assert isinstance(rollout.trajectory.cond["positive"]["ref_latents"], list)

    # the TAESD stands in for Qwen-Image's video VAE: decode the one frame as an image latent
    (decoded,) = run_node("VAEDecode", samples={"samples": latent["samples"][:, :, 0]}, vae=vae)
    (similarity,) = run_node("FlowGRPOLoadRewardModel", backend="input_similarity", weights="(default)",
                             device="cpu", dtype="float32")
    rewards, _, _ = score(reward_model=similarity, images=decoded, groups=groups)
    rows = prompt_of_row(groups, images)
    expected = [1.0 - (decoded[r, ..., :3].clamp(0, 1) - images[i]).abs().mean().item() for r, i in enumerate(rows)]
    assert rewards.values.tolist() == pytest.approx(expected, abs=1e-5)

    params = [p for p in trainer.lora_params.values() if p.requires_grad]
    snapshot = [p.detach().clone() for p in params]
    _, metrics_json, _ = run_node("FlowGRPOUpdate", trainer=trainer, rollout=rollout, rewards=rewards, **UPDATE)
    metrics = json.loads(metrics_json)
    assert metrics["first_log_ratio_abs_max"] <= 1e-5, metrics
    assert any(not torch.equal(a, p.detach()) for a, p in zip(snapshot, params)), "the update must move the LoRA"


def test_similarity_reward_scores_each_sample_against_its_own_input(run_node, score, clip, vae):
    images = two_images()
    _, _, groups, _ = source(run_node, clip, images=images, vae=vae)
    rows = prompt_of_row(groups, images)
    outputs = torch.stack([images[i] for i in rows])
    outputs[1] = images[1 - rows[1]]  # sample 1 shows the other group's input
    (similarity,) = run_node("FlowGRPOLoadRewardModel", backend="input_similarity", weights="(default)",
                             device="cpu", dtype="float32")
    rewards, _, _ = score(reward_model=similarity, images=outputs, groups=groups)
    scores = rewards.values.tolist()
    assert scores[0] == pytest.approx(1.0) and scores[2] == pytest.approx(1.0) and scores[3] == pytest.approx(1.0)
    assert scores[1] < 0.9
    with pytest.raises(Exception, match="input_similarity.*no metadata|without metadata"):
        score(reward_model=similarity, images=outputs)


# ----------------------------------------------------------------------------------------------- files and errors
def test_jsonl_image_paths(run_node, clip, vae, comfy_runtime):
    from PIL import Image

    input_dir = comfy_runtime.folder_paths.get_input_directory()
    os.makedirs(os.path.join(input_dir, "edit"), exist_ok=True)
    images = two_images()
    for i, name in enumerate(("a.png", "b.png")):
        Image.fromarray((images[i] * 255).round().byte().numpy()).save(os.path.join(input_dir, "edit", name))
    records = [{"prompt": TEXT, "image": "edit/a.png", "tag": "x"}, {"prompt": "add a moon", "image": "edit/b.png"}]
    with open(os.path.join(input_dir, "edit", "train.jsonl"), "w") as f:
        f.write("\n".join(json.dumps(r) for r in records))
    positive, _, groups, _ = source(run_node, clip, prompt_file="edit/train.jsonl", vae=vae)
    assert len(positive[0][1]["reference_latents"]) == 1
    for text in groups.texts:
        meta = text.metadata
        index = [r["prompt"] for r in records].index(str(text))
        assert meta["image"] == records[index]["image"] and meta["input_image_path"].endswith(records[index]["image"])
        (stock, _) = run_node("LoadImage", image=records[index]["image"])  # read as stock Load Image reads it
        torch.testing.assert_close(meta["input_image"], stock[0], rtol=0, atol=0)

    def fails(*words, **kw):
        with pytest.raises(Exception) as info:
            source(run_node, clip, **kw)
        message = str(info.value)
        assert message.startswith(NODE_NAME + ":") and "Fix:" in message, message
        for word in words:
            assert word in message, message

    def write(lines):
        with open(os.path.join(input_dir, "edit", "bad.jsonl"), "w") as f:
            f.write("\n".join(json.dumps(r) for r in lines))

    write([records[0], {"prompt": "x", "image": "edit/missing.png"}])
    fails("'edit/missing.png'", "was not found", prompt_file="edit/bad.jsonl", vae=vae)
    write([records[0], {"prompt": "x", "image": "../outside.png"}])
    fails("outside ComfyUI's input folder", prompt_file="edit/bad.jsonl", vae=vae)
    write([records[0], {"prompt": "x"}])
    fails("no \"image\" field", prompt_file="edit/bad.jsonl", vae=vae)
    fails("vae input is empty", prompt_file="edit/train.jsonl")
    fails("both the images input", prompt_file="edit/train.jsonl", vae=vae, images=images)
    Image.new("RGB", (48, 64)).save(os.path.join(input_dir, "edit", "small.png"))
    write([records[0], {"prompt": "x", "image": "edit/small.png"}])
    fails("different sizes", "48x64", prompt_file="edit/bad.jsonl", vae=vae)


def test_bad_edit_inputs_are_explained(run_node, clip, vae, mods, tiny_sd3_file):
    three = torch.cat([two_images(), two_images()[:1]])
    with pytest.raises(mods.state.NodeInputError, match="holds 3 images for 2 prompts.*Fix: give one image per"):
        source(run_node, clip, images=three, vae=vae)
    with pytest.raises(mods.state.NodeInputError, match="vae input is empty.*Fix: connect the VAE"):
        source(run_node, clip, images=two_images())
    # one image for every prompt: the prompts must differ to fill two groups
    with pytest.raises(mods.state.NodeInputError, match="prompt list has 1 prompts"):
        source(run_node, clip, images=two_images()[:1], vae=vae)
    positive, negative, groups, _ = source(run_node, clip, prompts=(TEXT, "add a moon"), images=two_images()[:1],
                                           vae=vae)
    assert all(torch.equal(t.metadata["input_image"], two_images()[0]) for t in groups.texts)

    sd3 = run_node("UNETLoader", unet_name=tiny_sd3_file, weight_dtype="default")[0]
    with pytest.raises(ValueError, match="does not read them.*Fix: train an edit model"):
        run_node("FlowGRPOSDERollout", model=sd3, positive=positive, negative=negative, groups=groups,
                 **dict(ROLLOUT, cfg=1.0, norm_rescale=False))
