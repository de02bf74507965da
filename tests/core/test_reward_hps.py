"""HPSv2/HPSv2.1 and the open_clip CLIP score on tiny random open_clip models saved in the real file formats into a
temporary ``models/reward_models/``, scored through the production specs; preprocessing and cosines checked against
the test's own computation, and HPS against the reference hpsv2 code (``hpsv2x``, installed without dependencies);
no network during build and scoring."""

from __future__ import annotations

import json

import numpy as np
import open_clip
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from rewardkit import block_network
from rewardkit.open_clip_tiny import (TINY_ARCH, TINY_CONFIG, build_tiny_hps, build_tiny_open_clip_dir,
                                      register_tiny_arch)
from safetensors.torch import load_file
from torchvision.transforms import InterpolationMode

from flowgrpo_core.rewards import hps, open_clip_models, registry
from flowgrpo_core.rewards.preprocess import resize_longest_and_pad
from flowgrpo_core.rewards.weights import MissingWeightsError, WeightsFormatError

MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)
PROMPTS = ["a photo of a red cat", "an oil painting of a lighthouse at night", "A sign that says \"HELLO\"",
           "two dogs", "a bowl of soup, studio lighting"]



@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    block_network(monkeypatch)


@pytest.fixture(scope="module")
def tiny_arch(tmp_path_factory):
    return register_tiny_arch(tmp_path_factory.mktemp("open_clip_configs"))


@pytest.fixture
def specs(monkeypatch, tiny_arch):
    """Our specs in the registry, and the HPS specs building the tiny architecture."""
    for spec in hps.SPECS + open_clip_models.SPECS:
        monkeypatch.setitem(registry.BACKENDS, spec.name, spec)
    monkeypatch.setattr(hps, "HPS_ARCH", tiny_arch)


def images_8bit(batch: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """Random IMAGE ``[B, H, W, 3]`` on the 8-bit grid (so a PIL round trip is exact)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, height, width, 3), generator=g).float() / 255


def own_longest_pad(image: torch.Tensor, size: int) -> torch.Tensor:
    """The test's HPS preprocessing of one ``[H, W, 3]`` image: torchvision's bicubic resize of the longest side,
    centred zero pad (odd pixel right/bottom), CLIP normalisation."""
    x = image.permute(2, 0, 1)
    h, w = x.shape[1:]
    nh, nw = round(h * size / max(h, w)), round(w * size / max(h, w))
    x = TF.resize(x, [nh, nw], InterpolationMode.BICUBIC, antialias=True)
    out = torch.zeros(3, size, size)
    top, left = (size - nh) // 2, (size - nw) // 2
    out[:, top:top + nh, left:left + nw] = x
    return (out - MEAN) / STD


def own_cosines(model, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    with torch.no_grad():
        f_img = model.encode_image(pixels)
        f_txt = model.encode_text(open_clip.tokenize(prompts))
    return (f_img * f_txt).sum(-1) / (f_img.norm(dim=-1) * f_txt.norm(dim=-1))


def test_specs():
    assert {(s.name, s.default_weights, s.weights_kind, s.needs_prompt) for s in hps.SPECS} == {
        ("hpsv2", "HPS_v2_compressed.pt", "file", True), ("hpsv2.1", "HPS_v2.1_compressed.pt", "file", True)}
    assert all(s.source == "https://huggingface.co/xswu/HPSv2" for s in hps.SPECS)
    (clip,) = open_clip_models.SPECS
    assert (clip.name, clip.weights_kind, clip.needs_prompt) == ("clip_score_open_clip", "dir", True)


def test_longest_side_pad_by_hand():
    """A constant colour survives resizing, so every output pixel is known: (c - mean)/std inside, -mean/std in the
    pad; 30x80 -> 24x64 with 40 pad rows: 20 top, 20 bottom; 41x80 -> 33x64 (32.8 rounded): 31 rows, 15 top,
    16 bottom; 64x40 stays 64x40 and is padded 12 left, 12 right."""
    colour = torch.tensor([0.2, 0.6, 0.9])
    for (h, w), (top, rows) in {(30, 80): (20, 24), (41, 80): (15, 33), (64, 40): (0, 64)}.items():
        out = resize_longest_and_pad(colour.expand(1, h, w, 3).clone(), 64)[0]
        expected = (-MEAN / STD).expand(3, 64, 64).clone()
        if (h, w) == (64, 40):  # longest side already 64: padded on the width (hpsv2 would leave it 64x40)
            expected[:, :, 12:52] = ((colour.view(3, 1, 1) - MEAN) / STD)
        else:
            expected[:, top:top + rows, :] = ((colour.view(3, 1, 1) - MEAN) / STD)
        assert out.shape == (3, 64, 64)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_longest_side_pad_matches_own_resize():
    for h, w in [(50, 80), (97, 31), (200, 201), (64, 64), (16, 16)]:
        image = images_8bit(1, h, w, seed=h)
        torch.testing.assert_close(resize_longest_and_pad(image, 64)[0], own_longest_pad(image[0], 64),
                                   atol=1e-6, rtol=0)


@pytest.mark.parametrize("name, weights, seed", [("hpsv2", "HPS_v2_compressed.pt", 0),
                                                 ("hpsv2.1", "HPS_v2.1_compressed.pt", 1)])
def test_hps_is_the_cosine_of_the_tiny_towers(tmp_path, specs, tiny_arch, name, weights, seed):
    path = build_tiny_hps(tmp_path / "models", weights, seed=seed)
    backend = registry.build_backend(name, None, [tmp_path / "models" / "reward_models"])
    images = images_8bit(3, 48, 80, seed=seed)
    result = backend.score(images, PROMPTS[:3])

    reference = open_clip.create_model(tiny_arch, pretrained=str(path)).eval()  # open_clip's own loader
    pixels = torch.stack([own_longest_pad(im, 64) for im in images])
    expected = own_cosines(reference, pixels, PROMPTS[:3])
    assert backend.name == name and backend.needs_prompt
    assert result.scores.dtype == torch.float32 and result.scores.shape == (3,)
    torch.testing.assert_close(result.scores, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(result.details["cosine"], expected, atol=1e-5, rtol=0)
    other = backend.score(images, PROMPTS[2:5])  # the prompt matters
    assert (other.scores - result.scores).abs().max() > 1e-3


def test_hps_batches_equal_single_images(tmp_path, tiny_arch):
    path = build_tiny_hps(tmp_path / "models")
    backend = hps.load_hps(path, "cpu", torch.float32, arch=tiny_arch, batch_size=2)
    images = images_8bit(5, 40, 56, seed=3)
    batch = backend.score(images, PROMPTS).scores
    singles = torch.cat([backend.score(images[i:i + 1], PROMPTS[i:i + 1]).scores for i in range(5)])
    flipped = backend.score(images.flip(0), PROMPTS[::-1]).scores
    torch.testing.assert_close(batch, singles, atol=1e-6, rtol=0)
    torch.testing.assert_close(flipped, batch.flip(0), atol=1e-6, rtol=0)
    assert batch.std() > 1e-4  # different images and prompts give different scores


def test_hps_in_bfloat16(tmp_path, tiny_arch):
    path = build_tiny_hps(tmp_path / "models")
    images = images_8bit(2, 64, 64)
    fp32 = hps.load_hps(path, "cpu", torch.float32, arch=tiny_arch).score(images, PROMPTS[:2]).scores
    bf16 = hps.load_hps(path, "cpu", torch.bfloat16, arch=tiny_arch)
    assert {p.dtype for p in bf16.model.parameters()} == {torch.bfloat16}
    scores = bf16.score(images, PROMPTS[:2]).scores
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores, fp32, atol=0.03, rtol=0)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # hpsv2's torch.cuda.amp.autocast, timm.models.layers
def test_hps_equals_reference_hpsv2(tmp_path, monkeypatch, specs, tiny_arch):
    """Same tiny weights, images and prompt: the pack's score equals hpsv2.img_score.score's (the real hpsv2 code,
    with its model registry pre-filled with the tiny architecture so nothing downloads)."""
    import hpsv2.src.open_clip as hps_open_clip
    from hpsv2 import img_score

    path = build_tiny_hps(tmp_path / "models", "HPS_v2.1_compressed.pt")
    backend = registry.build_backend("hpsv2.1", None, [tmp_path / "models" / "reward_models"])
    register_tiny_arch(tmp_path / "hpsv2_configs", hps_open_clip)
    model, _, preprocess_val = hps_open_clip.create_model_and_transforms(
        tiny_arch, None, precision="amp", device="cpu", light_augmentation=True, output_dict=True)
    monkeypatch.setattr(img_score, "model_dict", {"model": model, "preprocess_val": preprocess_val})
    monkeypatch.setattr(img_score, "root_path", str(tmp_path / "hpsv2_root"))

    for (h, w), prompt in zip([(64, 64), (50, 80), (97, 31), (130, 129)], PROMPTS):
        images = images_8bit(2, h, w, seed=h + w)
        pil = [Image.fromarray((im * 255).round().to(torch.uint8).numpy()) for im in images]
        reference = torch.tensor(np.array(img_score.score(pil, prompt, cp=str(path)), dtype=np.float32))
        ours = backend.score(images, [prompt, prompt]).scores
        torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)
        assert reference.abs().min() > 1e-3  # a real comparison, not two zeros


def test_hps_missing_weights_names_folder_and_file(tmp_path, specs):
    folder = tmp_path / "models" / "reward_models"
    folder.mkdir(parents=True)
    with pytest.raises(MissingWeightsError) as err:
        registry.build_backend("hpsv2.1", None, [folder])
    message = str(err.value)
    assert "HPS_v2.1_compressed.pt" in message and str(folder) in message and "xswu/HPSv2" in message


def test_hps_wrong_file_is_a_clear_error(tmp_path, tiny_arch):
    path = build_tiny_hps(tmp_path / "models")
    state = torch.load(path, weights_only=True)["state_dict"]
    del state["text_projection"]
    state["visual.proj"] = torch.zeros(3, 3)
    torch.save({"state_dict": state}, path)
    with pytest.raises(WeightsFormatError) as err:
        hps.load_hps(path, arch=tiny_arch)
    message = str(err.value)
    assert str(path) in message and "text_projection" in message and "visual.proj" in message

    clip_dir = build_tiny_open_clip_dir(tmp_path / "models")
    with pytest.raises(WeightsFormatError) as err:  # a file of another format
        hps.load_hps(clip_dir / "open_clip_config.json", arch=tiny_arch)
    assert "open_clip_config.json" in str(err.value)


def own_clip_preprocess(image: torch.Tensor, cfg: dict) -> torch.Tensor:
    """The test's open_clip preprocessing of one image for ``resize_mode`` shortest / longest / squash."""
    size, mean, std = cfg["size"], torch.tensor(cfg["mean"]).view(3, 1, 1), torch.tensor(cfg["std"]).view(3, 1, 1)
    x = image.permute(2, 0, 1)
    h, w = x.shape[1:]
    if cfg["resize_mode"] == "longest":
        return own_longest_pad(image, size) * STD / std + (MEAN - mean) / std  # same pixels, other mean/std
    if cfg["resize_mode"] == "squash":
        x = TF.resize(x, [size, size], InterpolationMode.BICUBIC, antialias=True).clamp(0, 1)
    else:
        nh, nw = max(size, int(h * size / min(h, w))), max(size, int(w * size / min(h, w)))  # torchvision truncates
        x = TF.resize(x, [nh, nw], InterpolationMode.BICUBIC, antialias=True).clamp(0, 1)
        top, left = (nh - size) // 2, (nw - size) // 2
        x = x[:, top:top + size, left:left + size]
    return (x - mean) / std


@pytest.mark.parametrize("resize_mode", ["shortest", "longest", "squash"])
def test_open_clip_clip_score_is_the_cosine(tmp_path, specs, resize_mode):
    cfg = {"size": 64, "mean": [0.5, 0.45, 0.4], "std": [0.25, 0.3, 0.2], "interpolation": "bicubic",
           "resize_mode": resize_mode}
    folder = build_tiny_open_clip_dir(tmp_path / "models", seed=4, preprocess_cfg=cfg)
    backend = registry.build_backend("clip_score_open_clip", None, [tmp_path / "models" / "reward_models"])
    images = images_8bit(3, 48, 80, seed=5)
    result = backend.score(images, PROMPTS[:3])

    reference = open_clip.model.CLIP(**json.loads((folder / "open_clip_config.json").read_text())["model_cfg"])
    reference.load_state_dict(load_file(str(folder / "open_clip_model.safetensors")))
    pixels = torch.stack([own_clip_preprocess(im, cfg) for im in images])
    expected = own_cosines(reference.eval(), pixels, PROMPTS[:3])
    torch.testing.assert_close(result.scores, expected, atol=1e-5, rtol=0)
    batch_of_one = backend.score(images[1:2], PROMPTS[1:2]).scores
    torch.testing.assert_close(batch_of_one, result.scores[1:2], atol=1e-6, rtol=0)


def test_open_clip_folder_errors(tmp_path, specs):
    folders = [tmp_path / "models" / "reward_models"]
    with pytest.raises(MissingWeightsError) as err:  # no folder at all
        registry.build_backend("clip_score_open_clip", None, folders)
    assert "CLIP-ViT-H-14-laion2B-s32B-b79K" in str(err.value) and str(folders[0]) in str(err.value)

    folder = build_tiny_open_clip_dir(tmp_path / "models", name="mine")
    (folder / "open_clip_model.safetensors").unlink()
    with pytest.raises(MissingWeightsError) as err:  # config without weights
        registry.build_backend("clip_score_open_clip", "mine", folders)
    assert "open_clip_model.safetensors" in str(err.value) and str(folder) in str(err.value)

    config = {"model_cfg": {**TINY_CONFIG, "text_cfg": {"hf_model_name": "roberta-base"}}}
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    torch.save({"x": torch.zeros(1)}, folder / "open_clip_pytorch_model.bin")
    with pytest.raises(WeightsFormatError, match="Hugging Face text tower"):
        registry.build_backend("clip_score_open_clip", "mine", folders)


def test_needs_prompt_pairing(tmp_path, tiny_arch):
    """Each image is scored against its own prompt: swapping two prompts swaps exactly those cosines' pairing."""
    backend = hps.load_hps(build_tiny_hps(tmp_path / "models"), arch=tiny_arch)
    image = images_8bit(1, 64, 64, seed=9).expand(2, 64, 64, 3)
    scores = backend.score(image, PROMPTS[:2]).scores
    swapped = backend.score(image, PROMPTS[1::-1]).scores
    torch.testing.assert_close(swapped, scores.flip(0), atol=1e-6, rtol=0)
    assert abs(scores[0] - scores[1]) > 1e-4
    with pytest.raises(ValueError, match="prompts"):
        backend.score(image, PROMPTS[:1])
