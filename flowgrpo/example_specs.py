"""The example workflows as compact Python specs.

``scripts/make_workflows.py`` turns each spec into ``example_workflows/<name>.json`` (the UI workflow the template
browser lists) and ``example_workflows/api/<name>.json`` (its API twin, for ``python -m flowgrpo run`` and tests;
in a sub-folder because ComfyUI lists only ``example_workflows/*.json`` as templates). To add an example, write a
function that builds a :class:`~flowgrpo.graph.Graph`, register it with :func:`example`, and run the script.
Model names are those of :data:`flowgrpo.demo_models.DEMO_FILES` (``python -m flowgrpo demo`` builds the files).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from flowgrpo_core.presets import builtin_presets

from .demo_models import DEMO_FILES
from .graph import Graph

__all__ = ["Example", "EXAMPLES", "example", "render", "paths", "DEMO_MODEL", "DEMO_TEXT_ENCODER", "DEMO_VAE",
           "EXTERNAL_MODELS", "EXTERNAL_INPUTS", "write_placeholders"]

DEMO_MODEL = DEMO_FILES["diffusion_model"][1]
DEMO_TEXT_ENCODER = DEMO_FILES["text_encoder"][1]
DEMO_VAE = DEMO_FILES["vae"][1]


@dataclass(frozen=True)
class Example:
    name: str
    description: str  # Markdown, shown in a note next to the graph
    build: Callable[[], Graph]


EXAMPLES: dict[str, Example] = {}


def example(name: str, description: str):
    """Register the decorated ``() -> Graph`` function as the example ``name``."""
    def register(build: Callable[[], Graph]) -> Callable[[], Graph]:
        if name in EXAMPLES:
            raise ValueError(f"example {name!r} is defined twice")
        EXAMPLES[name] = Example(name, description, build)
        return build
    return register


@example("sd3_tiny_text_to_image", """## Text to image with the tiny demo models (stock nodes)

A plain SD3 text-to-image graph on the pack's tiny random demo models: it checks that ComfyUI, the loaders and the
headless runner work, in seconds on a CPU. The images are noise-like: the models are random.

Build the models with `python -m flowgrpo demo` (or put your own SD3 model, text encoder and VAE in the loaders).

Headless: `python -m flowgrpo run example_workflows/sd3_tiny_text_to_image.json`""")
def sd3_tiny_text_to_image() -> Graph:
    g = Graph()
    unet = g.add("UNETLoader", unet_name=DEMO_MODEL, weight_dtype="default")
    model = g.add("ModelSamplingSD3", model=unet, shift=3.0)
    clip = g.add("CLIPLoader", clip_name=DEMO_TEXT_ENCODER, type="sd3", device="default")
    positive = g.add("CLIPTextEncode", "Positive Prompt", text="a red apple on a wooden table", clip=clip)
    negative = g.add("CLIPTextEncode", "Negative Prompt", text="", clip=clip)
    latent = g.add("EmptySD3LatentImage", width=128, height=128, batch_size=1)
    sampled = g.add("KSampler", model=model, seed=0, steps=8, cfg=4.5, sampler_name="euler", scheduler="simple",
                    positive=positive, negative=negative, latent_image=latent, denoise=1.0)
    vae = g.add("VAELoader", vae_name=DEMO_VAE)
    image = g.add("VAEDecode", samples=sampled, vae=vae)
    g.add("SaveImage", images=image, filename_prefix="flowgrpo/sd3_tiny")
    return g


#: the tiny demo's training settings: the ``tiny_demo`` preset (tuned so the reward rises within 20 iterations on 2
#: CPU cores) plus the inputs a preset does not carry; the train node's widgets show the same values the preset sets
TINY_DEMO_TRAIN = dict(
    builtin_presets()["tiny_demo"].values,
    prompts="a red square\na blue circle\na green triangle\na yellow star\na white cloud\na black cat",
    scheduler="simple", run_name="flowgrpo_tiny_demo", resume="none", seed=0)


@example("flowgrpo_tiny_demo", """## FlowGRPO tiny demo: GRPO on CPU in minutes

The README's main job. **FlowGRPO Training Preset** (`tiny_demo`) feeds **FlowGRPO GRPO Train**, which fine-tunes a LoRA on the pack's tiny SD3-architecture model (random
weights, through the stock UNETLoader), with a random CLIP-L (stock CLIPLoader) and a random 16-channel TAESD VAE
(stock VAELoader). Each iteration draws 2 prompts x 4 images, samples them with the Flow-GRPO SDE (8 steps, noise
0.7, CFG 4.5), decodes them, scores their **redness** and takes one GRPO step. The mean reward rises within 20
iterations; the LoRA lands in `models/loras/flowgrpo_tiny_demo_00020.safetensors` and the reward curve in
`output/flowgrpo/`, the per-iteration metrics in `output/flowgrpo/flowgrpo_tiny_demo/metrics.jsonl`. Settings
from a connected preset replace the train node's widgets of the same name; change them in the preset's `overrides`
(e.g. `group_size = 8`).

Headless: `bash scripts/demo.sh` (or `python -m flowgrpo demo`), which builds the tiny models first.""")
def flowgrpo_tiny_demo() -> Graph:
    g = Graph()
    model = g.add("UNETLoader", unet_name=DEMO_MODEL, weight_dtype="default")
    clip = g.add("CLIPLoader", clip_name=DEMO_TEXT_ENCODER, type="sd3", device="default")
    vae = g.add("VAELoader", vae_name=DEMO_VAE)
    preset = g.add("FlowGRPOPreset", "Training preset", preset="tiny_demo", overrides="")
    train = g.add("FlowGRPOTrain", "GRPO Train", model=model, clip=clip, vae=vae, preset=preset.out(0),
                  **TINY_DEMO_TRAIN)
    g.add("PreviewImage", "Reward curve", images=train.out(3))
    g.add("PreviewImage", "Last iteration's groups", images=train.out(4))
    return g


@example("flowgrpo_sd35_grpo_loop", """## SD3.5 Flow-GRPO with composable nodes and a loop

The Flow-GRPO reference settings for SD3.5 Medium, built from the composable nodes so any reward chain can sit in
the loop body: **LoRA Init** -> **Loop Start** -> **Prompt Source** (its iteration from the loop) -> **SDE Sampler
(rollout)** (Flow-SDE, noise 0.7, 10 steps, CFG 4.5, shift 3, all steps but the last trained) -> VAEDecode ->
**Simple Reward** (JPEG compressibility; swap in any reward) -> **GRPO Update** (clip 1e-4, KL 0.04) -> **Loop End**
-> **Save LoRA**. Replace the checkpoint and text-encoder names with your files. The paper uses 24 images per
prompt and many prompts per step; lower `group_size` and `prompts_per_iteration` to fit your GPU.""")
def flowgrpo_sd35_grpo_loop() -> Graph:
    g = Graph()
    ckpt = g.add("CheckpointLoaderSimple", ckpt_name="sd3.5_medium.safetensors")
    clip = g.add("TripleCLIPLoader", "Text encoders (CLIP-G, CLIP-L, T5-XXL)", clip_name1="clip_g.safetensors",
                 clip_name2="clip_l.safetensors", clip_name3="t5xxl_fp16.safetensors")
    init = g.add("FlowGRPOLoRAInit", "LoRA Init", model=ckpt, rank=32, alpha=64.0, targets="attention",
                 learning_rate=3e-4, seed=42, run_name="sd35_flowgrpo", resume="latest")
    start = g.add("FlowGRPOLoopStart", "Loop Start", value=init.out(0), iterations=1000)
    prompts = g.add("FlowGRPOPromptSource", "Prompts", clip=clip.out(0), prompt_file="flowgrpo_prompts.txt",
                    prompts_per_iteration=4, group_size=8, iteration=start.out(2), seed=42)
    rollout = g.add("FlowGRPOSDERollout", "SDE Sampler (rollout)", model=init.out(1), positive=prompts.out(0),
                    negative=prompts.out(1), groups=prompts.out(2), width=512, height=512, steps=10, shift=3.0,
                    sde_kind="flow_sde", noise_level=0.7, cfg=4.5, step_mode="fraction", train_fraction=0.99,
                    micro_batch_size=8, seed=42, iteration=start.out(2))
    images = g.add("VAEDecode", samples=rollout.out(0), vae=ckpt.out(2))
    reward = g.add("FlowGRPOSimpleReward", "Reward", images=images, reward="jpeg_compressibility")
    update = g.add("FlowGRPOUpdate", "GRPO Update", trainer=start.out(1), rollout=rollout.out(1), rewards=reward,
                   clip_range=1e-4, kl_beta=0.04, std_mode="global", gradient_checkpointing=True)
    end = g.add("FlowGRPOLoopEnd", "Loop End", loop=start.out(0), value=update.out(0))
    g.add("FlowGRPOSaveLoRA", "Save LoRA", trainer=end.out(0), filename_prefix="sd35_flowgrpo", export="comfyui")
    return g


@example("flowgrpo_flux_dev_grpo", """## FLUX.1-dev GRPO (all-in-one)

**GRPO Train** on FLUX.1-dev: the guidance embedding at 3.5 (no true CFG: cfg 1), a LoRA on attention and MLP
layers, CPS sampling (eta 0.8) with a random 2-step window per iteration (Flow-GRPO-Fast) and the CPS clip range
1e-5. Swap `sde_kind` to flow_sde with noise 0.9 for Flow-GRPO's FLUX setting. Replace the model, text-encoder and
VAE names with your files.""")
def flowgrpo_flux_dev_grpo() -> Graph:
    g = Graph()
    model = g.add("UNETLoader", unet_name="flux1-dev.safetensors", weight_dtype="default")
    clip = g.add("DualCLIPLoader", "Text encoders (CLIP-L, T5-XXL)", clip_name1="clip_l.safetensors",
                 clip_name2="t5xxl_fp16.safetensors", type="flux")
    vae = g.add("VAELoader", vae_name="ae.safetensors")
    train = g.add("FlowGRPOTrain", "GRPO Train", model=model, clip=clip, vae=vae,
                  prompts="a photo of a cat\na watercolor of a lighthouse\na city street at night",
                  prompts_per_iteration=2, group_size=8, flux_guidance=3.5, width=512, height=512, steps=16,
                  sde_kind="cps", noise_level=0.8, cfg=1.0, step_mode="random_window", window_size=2,
                  reward="jpeg_compressibility", clip_range=1e-5, kl_beta=0.0, gradient_checkpointing=True,
                  rank=32, alpha=64.0, targets="attention_mlp", learning_rate=1e-4, iterations=300,
                  save_every=25, run_name="flux_dev_flowgrpo", resume="latest", seed=1)
    g.add("PreviewImage", "Reward curve", images=train.out(3))
    return g


@example("flowgrpo_qwen_image_grpo", """## Qwen-Image GRPO (all-in-one)

**GRPO Train** on Qwen-Image with true CFG 4 and Qwen-Image's CFG norm rescale, Flow-SDE noise 1.2 on a fixed
2-step window (the other steps are deterministic), LoRA on the attention projections. Replace the model,
text-encoder and VAE names with your files.""")
def flowgrpo_qwen_image_grpo() -> Graph:
    g = Graph()
    model = g.add("UNETLoader", unet_name="qwen_image_fp8_e4m3fn.safetensors", weight_dtype="default")
    clip = g.add("CLIPLoader", clip_name="qwen_2.5_vl_7b_fp8_scaled.safetensors", type="qwen_image",
                 device="default")
    vae = g.add("VAELoader", vae_name="qwen_image_vae.safetensors")
    train = g.add("FlowGRPOTrain", "GRPO Train", model=model, clip=clip, vae=vae,
                  prompts="a poster that says HELLO\na bowl of ramen, studio photo\na robot reading a book",
                  negative_prompt=" ", prompts_per_iteration=1, group_size=8, width=512, height=512, steps=20,
                  sde_kind="flow_sde", noise_level=1.2, cfg=4.0, norm_rescale=True, step_mode="fixed_window",
                  window_size=2, window_start=0, reward="jpeg_compressibility", clip_range=1e-4, kl_beta=0.0,
                  gradient_checkpointing=True, rank=32, alpha=64.0, targets="attention", learning_rate=1e-4,
                  iterations=300, save_every=25, run_name="qwen_image_flowgrpo", resume="latest", seed=1)
    g.add("PreviewImage", "Reward curve", images=train.out(3))
    return g


def _preset_values(name: str, overrides: str) -> dict:
    """The built-in preset ``name`` resolved with ``overrides`` (the values its train node's widgets show)."""
    from flowgrpo_core.presets import resolve

    return resolve(builtin_presets()[name], overrides)


def _preset_train(preset: str, overrides: str, unet: str, weight_dtype: str, text_encoder: str, clip_type: str,
                  vae_name: str, **train) -> Graph:
    """Stock loaders, a PickScore reward model and the preset ``preset`` (with ``overrides``) feeding GRPO Train,
    whose widgets show the resolved preset's values; ``train`` holds the train node's other inputs."""
    g = Graph()
    model = g.add("UNETLoader", unet_name=unet, weight_dtype=weight_dtype)
    clip = g.add("CLIPLoader", clip_name=text_encoder, type=clip_type, device="default")
    vae = g.add("VAELoader", vae_name=vae_name)
    reward = g.add("FlowGRPOLoadRewardModel", "Reward model (PickScore)", backend="pickscore", weights="(default)",
                   device="auto", dtype="auto")
    settings = g.add("FlowGRPOPreset", "Training preset", preset=preset, overrides=overrides)
    values = _preset_values(preset, overrides)
    out = g.add("FlowGRPOTrain", "GRPO Train", model=model, clip=clip, vae=vae, preset=settings.out(0),
                reward_model=reward, **values, **train)
    g.add("PreviewImage", "Reward curve", images=out.out(3))
    g.add("PreviewImage", "Last iteration's groups", images=out.out(4))
    return g


_ONE_GPU = "prompts_per_iteration = 2, group_size = 8  # one GPU (the preset: 48 x 16 on 8 GPUs)"


@example("flowgrpo_flux2_grpo", """## FLUX.2 [dev] GRPO (preset `flux2_flowgrpo`)

**FlowGRPO Training Preset** `flux2_flowgrpo` (Flow-Factory's FLUX.2 GRPO settings: 8 steps, one Flow-SDE step
drawn from steps 1-3, guidance 4, LoRA r64 on attention and MLP) feeds **GRPO Train**; its `overrides` shrink the
batch to one GPU and turn on gradient checkpointing. The reward is PickScore (**Load Reward Model**: put its weights
in `models/reward_models`, see docs/reward-models.md). The model is Black Forest Labs' bf16 `flux2-dev.safetensors`
loaded with weight dtype fp8_e4m3fn (the pack refuses scaled / mixed-precision files such as
`flux2_dev_fp8mixed`); the text encoder and VAE are ComfyUI's FLUX.2 files. Replace the names with your files.""")
def flowgrpo_flux2_grpo() -> Graph:
    return _preset_train(
        "flux2_flowgrpo", _ONE_GPU + "\ngradient_checkpointing = true", "flux2-dev.safetensors", "fp8_e4m3fn",
        "mistral_3_small_flux2_fp8.safetensors", "flux2", "flux2-vae.safetensors",
        prompts="a red fox in fresh snow, morning light\na neon sign that says OPEN above a diner\n"
                "a glass teapot on a wooden table, studio photo", run_name="flux2_flowgrpo", resume="latest", seed=1,
        iterations=300)


@example("flowgrpo_z_image_grpo", """## Z-Image GRPO (preset `z_image_flowgrpo`)

**FlowGRPO Training Preset** `z_image_flowgrpo` (Flow-Factory's Z-Image GRPO settings: 10 steps, one Flow-SDE step
drawn from steps 1-3, true CFG 5 with an empty negative, LoRA r64 on attention and feed-forward) feeds **GRPO
Train**; its `overrides` shrink the batch to one GPU. The reward is PickScore (**Load Reward Model**, weights in
`models/reward_models`). The model is the Z-Image base model (`z_image_bf16`; Turbo is distilled for CFG-free
sampling and does not suit these settings) with ComfyUI's Qwen3-4B text encoder (CLIPLoader type lumina2) and the
FLUX VAE. Replace the names with your files.""")
def flowgrpo_z_image_grpo() -> Graph:
    return _preset_train(
        "z_image_flowgrpo", _ONE_GPU, "z_image_bf16.safetensors", "default", "qwen_3_4b.safetensors", "lumina2",
        "ae.safetensors",
        prompts="a lighthouse on a cliff at dusk, watercolor\na bowl of ramen, overhead studio photo\n"
                "a poster that says SPRING SALE in bold letters", run_name="z_image_flowgrpo", resume="latest",
        seed=1, iterations=300)


@example("flowgrpo_wan22_t2v_grpo", """## Wan 2.2 TI2V-5B text-to-video GRPO (preset `wan22_t2v_flowgrpo`)

**FlowGRPO Training Preset** `wan22_t2v_flowgrpo` (Flow-Factory's Wan 2.2 text-to-video GRPO settings: 10 steps, one
Flow-SDE step drawn from steps 1-3, CFG 4, 480 x 480, LoRA r64 on attention and FFN) feeds **GRPO Train**, which
samples 5-frame clips (its `frames` widget: frames are not a preset field). Each clip gets one reward, the mean
PickScore of its frames (**Load Reward Model**, weights in `models/reward_models`); the previews show each clip as a
strip of frames. The `overrides` shrink the batch to one GPU and turn on gradient checkpointing. The model is
ComfyUI's Wan 2.2 TI2V-5B with the UMT5 text encoder (CLIPLoader type wan) and the Wan 2.2 VAE; the two-expert
T2V-A14B is another ComfyUI class (wan21_t2v). Replace the names with your files.""")
def flowgrpo_wan22_t2v_grpo() -> Graph:
    return _preset_train(
        "wan22_t2v_flowgrpo", "prompts_per_iteration = 1, group_size = 8  # one GPU (the preset: 48 x 16 on 8 GPUs)"
        "\ngradient_checkpointing = true", "wan2.2_ti2v_5B_fp16.safetensors", "default",
        "umt5_xxl_fp8_e4m3fn_scaled.safetensors", "wan", "wan2.2_vae.safetensors", frames=5,
        prompts="a paper boat drifting down a rain gutter\na cat stretching on a sunny windowsill\n"
                "waves rolling onto a rocky beach at sunset", run_name="wan22_t2v_flowgrpo", resume="latest",
        seed=1, iterations=300)


#: the Qwen-Image-Edit example's settings: the ``qwen_image_edit_flowgrpo`` preset for one GPU
QWEN_EDIT = _preset_values("qwen_image_edit_flowgrpo", "prompts_per_iteration = 1, group_size = 8")


@example("flowgrpo_qwen_image_edit_grpo", """## Qwen-Image-Edit GRPO with composable nodes and a loop

Image editing needs an input image per prompt, which **Prompt Source** takes (`images` + the model's `vae`; each
drawn prompt's image becomes a reference latent in both conditionings). GRPO Train has no image input, so this graph
uses the composable nodes: **LoRA Init** -> **Loop Start** -> **Prompt Source** (the edit instructions, one Load
Image for all of them) -> **SDE Sampler (rollout)** -> VAEDecode -> **Score Images** (PickScore, weights in
`models/reward_models`; combine it with the `input_similarity` backend to keep edits close to the input) -> **GRPO
Update** -> **Loop End** -> **Save LoRA**. The widgets hold the `qwen_image_edit_flowgrpo` preset (Flow-Factory's
Qwen-Image-Edit GRPO settings: 10 steps, one Flow-SDE step drawn from steps 1-3, CFG 4 with norm rescale, 384 px,
LoRA r64 on attention and MLP) with 1 prompt x 8 images per iteration for one GPU. The model is ComfyUI's
Qwen-Image-Edit-2509 with the Qwen2.5-VL text encoder and the Qwen-Image VAE; `example.png` is the image ComfyUI
ships in `input/`. Replace the names with your files.""")
def flowgrpo_qwen_image_edit_grpo() -> Graph:
    v = QWEN_EDIT
    g = Graph()
    model = g.add("UNETLoader", unet_name="qwen_image_edit_2509_fp8_e4m3fn.safetensors", weight_dtype="default")
    clip = g.add("CLIPLoader", clip_name="qwen_2.5_vl_7b_fp8_scaled.safetensors", type="qwen_image",
                 device="default")
    vae = g.add("VAELoader", vae_name="qwen_image_vae.safetensors")
    image = g.add("LoadImage", "Input image", image="example.png")
    init = g.add("FlowGRPOLoRAInit", "LoRA Init", model=model, rank=v["rank"], alpha=v["alpha"],
                 targets=v["targets"], learning_rate=v["learning_rate"], ema_decay=v["ema_decay"],
                 ema_every=v["ema_every"], seed=1, run_name="qwen_image_edit_flowgrpo", resume="latest")
    start = g.add("FlowGRPOLoopStart", "Loop Start", value=init.out(0), iterations=300)
    prompts = g.add("FlowGRPOPromptSource", "Prompts and input image", clip=clip,
                    prompts="make it a snowy winter scene\nturn it into a pencil sketch\nadd a red umbrella",
                    prompt_file="", negative_prompt=v["negative_prompt"],
                    prompts_per_iteration=v["prompts_per_iteration"], group_size=v["group_size"],
                    iteration=start.out(2), seed=1, images=image.out(0), vae=vae)
    rollout = g.add("FlowGRPOSDERollout", "SDE Sampler (rollout)", model=init.out(1), positive=prompts.out(0),
                    negative=prompts.out(1), groups=prompts.out(2), width=v["width"], height=v["height"],
                    steps=v["steps"], shift=v["shift"], sde_kind=v["sde_kind"], noise_level=v["noise_level"],
                    cfg=v["cfg"], norm_rescale=v["norm_rescale"], step_mode=v["step_mode"],
                    window_size=v["window_size"], window_start=v["window_start"], window_end=v["window_end"],
                    micro_batch_size=v["micro_batch_size"], seed=1, iteration=start.out(2))
    images = g.add("VAEDecode", samples=rollout.out(0), vae=vae)
    scorer = g.add("FlowGRPOLoadRewardModel", "Reward model (PickScore)", backend="pickscore", weights="(default)",
                   device="auto", dtype="auto")
    reward = g.add("FlowGRPOScoreImages", "Reward", reward_model=scorer, images=images, groups=prompts.out(2))
    update = g.add("FlowGRPOUpdate", "GRPO Update", trainer=start.out(1), rollout=rollout.out(1),
                   rewards=reward.out(0), **{k: v[k] for k in ("clip_range", "kl_beta", "adv_clip_max",
                                                                "max_grad_norm", "std_mode", "optimizer_steps",
                                                                "gradient_checkpointing")})
    end = g.add("FlowGRPOLoopEnd", "Loop End", loop=start.out(0), value=update.out(0))
    g.add("FlowGRPOSaveLoRA", "Save LoRA", trainer=end.out(0), filename_prefix="qwen_image_edit_flowgrpo",
          export="comfyui")
    return g


#: model files the real-model examples name, per ComfyUI model folder (users bring their own; to validate the
#: examples, :func:`write_placeholders` lists empty stand-ins under a throw-away server home)
EXTERNAL_MODELS = {
    "checkpoints": ["sd3.5_medium.safetensors"],
    "diffusion_models": ["flux1-dev.safetensors", "qwen_image_fp8_e4m3fn.safetensors", "flux2-dev.safetensors",
                         "z_image_bf16.safetensors", "qwen_image_edit_2509_fp8_e4m3fn.safetensors",
                         "wan2.2_ti2v_5B_fp16.safetensors"],
    "text_encoders": ["clip_g.safetensors", "clip_l.safetensors", "t5xxl_fp16.safetensors",
                      "qwen_2.5_vl_7b_fp8_scaled.safetensors", "mistral_3_small_flux2_fp8.safetensors",
                      "qwen_3_4b.safetensors", "umt5_xxl_fp8_e4m3fn_scaled.safetensors"],
    "vae": ["ae.safetensors", "qwen_image_vae.safetensors", "flux2-vae.safetensors", "wan2.2_vae.safetensors"],
}
#: input images the examples load (ComfyUI ships ``input/example.png``; :func:`write_placeholders` writes a small
#: grey PNG of that name into a throw-away home's ``input/``)
EXTERNAL_INPUTS = ["example.png"]


def write_placeholders(models_dir) -> list:
    """Create empty files named like :data:`EXTERNAL_MODELS` under ``models_dir`` (a test or build home, never a
    user's), so ComfyUI lists the names and the examples validate, and a small PNG per :data:`EXTERNAL_INPUTS` in the
    home's ``input/`` (the folder beside ``models_dir``); returns the paths created."""
    from pathlib import Path

    made = []
    for folder, names in EXTERNAL_MODELS.items():
        for name in names:
            path = Path(models_dir) / folder / name
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                path.touch()
                made.append(path)
    for name in EXTERNAL_INPUTS:
        path = Path(models_dir).parent / "input" / name
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(_grey_png(64))
            made.append(path)
    return made


def _grey_png(size: int) -> bytes:
    """A ``size`` x ``size`` mid-grey 8-bit greyscale PNG."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + b"\x80" * size for _ in range(size))
    header = struct.pack(">IIBBBBB", size, size, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


# ------------------------------------------------------------------------------------------------ rendering
def render(ex: Example, object_info: dict) -> tuple[dict, dict]:
    """``(ui, api)``: the UI workflow (with the description as a note) and its complete API twin."""
    from .workflow import api_to_ui, complete_api

    api = complete_api(ex.build().api(), object_info)
    return api_to_ui(api, object_info, note=ex.description), api


def paths(name: str, root) -> tuple:
    """``(ui_path, api_path)`` of the example ``name`` under the repository ``root``."""
    from pathlib import Path

    folder = Path(root) / "example_workflows"
    return folder / f"{name}.json", folder / "api" / f"{name}.json"
