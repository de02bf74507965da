"""PickScore, CLIP score and the LAION aesthetic predictor on tiny random transformers CLIP models written in the real
formats into a temporary ``models/reward_models/``, scored through the production loaders (registry.build_backend)
and checked against the towers run by hand here with this file's own preprocessing and tokenisation."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from open_clip.tokenizer import SimpleTokenizer
from transformers import CLIPImageProcessor, CLIPModel

from flowgrpo_core.rewards import registry
from flowgrpo_core.rewards.aesthetic import SPECS as AESTHETIC_SPECS
from flowgrpo_core.rewards.hf_clip import SPECS as CLIP_SPECS
from flowgrpo_core.rewards.hf_clip import generated_clip_tokenizer, openai_bpe_path, read_image_config
from flowgrpo_core.rewards.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from flowgrpo_core.rewards.weights import MissingWeightsError, WeightsFormatError
from rewardkit import block_network
from rewardkit.hf_clip_tiny import (PICKSCORE_MEAN, PICKSCORE_STD, TINY_IMAGE_SIZE, build_tiny_aesthetic,
                                    build_tiny_clip, build_tiny_pickscore, tiny_aesthetic_head_state)

PROMPTS = ["a photo of a cat", "A red Car, parked on the street!", "two dogs playing in the snow",
           "an oil painting of a lighthouse at night", "text 'HELLO' on a sign"]


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    """PickScore_v1 (tokenizer + preprocessor files), clip-vit-large-patch14 (neither: generated tokenizer,
    default preprocessing) and the aesthetic head next to it."""
    root = tmp_path_factory.mktemp("models")
    build_tiny_pickscore(root)
    build_tiny_aesthetic(root)
    return root


@pytest.fixture(autouse=True)
def specs(monkeypatch):
    for spec in CLIP_SPECS + AESTHETIC_SPECS:
        monkeypatch.setitem(registry.BACKENDS, spec.name, spec)


@pytest.fixture
def no_network(monkeypatch):
    block_network(monkeypatch)


def images(batch: int, height: int = 48, width: int = 64, seed: int = 0) -> torch.Tensor:
    """Smooth random [B, H, W, 3] images in [0, 1] on the 8-bit grid (so HF's uint8 path sees the same pixels)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(batch, 3, 6, 8, generator=g)
    x = F.interpolate(low, size=(height, width), mode="bilinear", align_corners=True)
    return ((x * 255).round() / 255).permute(0, 2, 3, 1).contiguous()


def own_preprocess(imgs, resize, crop, mean, std):
    """Shortest side -> resize (bicubic, antialias), centre crop, normalise; written here independently."""
    x = imgs.permute(0, 3, 1, 2)
    h, w = x.shape[-2:]
    nh, nw = (resize, int(w * resize / h)) if h <= w else (int(h * resize / w), resize)  # as HF: truncated
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    top, left = (nh - crop) // 2, (nw - crop) // 2
    x = x[:, :, top:top + crop, left:left + crop]
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def own_tokens(prompts):
    """open_clip's reference tokenizer (77 tokens, EOT last when truncated, 0-padded)."""
    return SimpleTokenizer()(prompts, context_length=77)


def hand_cosine(folder, pixels, prompts):
    model = CLIPModel.from_pretrained(str(folder), local_files_only=True).eval()
    with torch.no_grad():
        e_img = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        e_txt = model.text_projection(model.text_model(input_ids=own_tokens(prompts)).pooler_output)
        cos = (F.normalize(e_img, dim=-1) * F.normalize(e_txt, dim=-1)).sum(-1)
        scale = float(model.logit_scale.exp())
    return cos, scale


def test_generated_tokenizer_matches_open_clip_and_saved_files(models_dir):
    generated = generated_clip_tokenizer(openai_bpe_path())
    assert len(generated) == 49408
    assert generated("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]
    long_prompt = " ".join(["a very long prompt about many colourful things"] * 20)
    prompts = PROMPTS + [long_prompt]
    ids = generated(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    reference = own_tokens(prompts)
    for row, ref, mask in zip(ids["input_ids"], reference, ids["attention_mask"]):
        n = int(mask.sum())
        assert row[:n].tolist() == ref[:n].tolist() and int(ref[n - 1]) == 49407
    from transformers import CLIPTokenizer

    saved = CLIPTokenizer.from_pretrained(str(models_dir / "reward_models" / "PickScore_v1"), local_files_only=True)
    assert saved.get_vocab() == generated.get_vocab()
    assert saved(prompts)["input_ids"][:-1] == generated(prompts)["input_ids"][:-1]


def test_image_config_from_file_and_defaults(models_dir):
    pick = read_image_config(models_dir / "reward_models" / "PickScore_v1", 999)
    assert (pick.resize, pick.crop) == (40, TINY_IMAGE_SIZE)
    assert pick.mean == pytest.approx(PICKSCORE_MEAN) and pick.std == pytest.approx(PICKSCORE_STD)
    plain = read_image_config(models_dir / "reward_models" / "clip-vit-large-patch14", 24)
    assert (plain.resize, plain.crop, plain.mean, plain.std) == (24, 24, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)

    imgs = images(3, 48, 64, seed=3)
    ours = pick(imgs)
    assert ours.shape == (3, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE) and ours.dtype == torch.float32
    assert torch.allclose(ours, own_preprocess(imgs, 40, 32, PICKSCORE_MEAN, PICKSCORE_STD), atol=1e-5)
    same = type(pick)(32, 32, PICKSCORE_MEAN, PICKSCORE_STD)(imgs)
    assert torch.allclose(same, own_preprocess(imgs, 32, 32, PICKSCORE_MEAN, PICKSCORE_STD), atol=1e-5)
    hf = CLIPImageProcessor.from_pretrained(str(models_dir / "reward_models" / "PickScore_v1"))
    hf_pixels = hf(images=[(i * 255).round().to(torch.uint8).permute(2, 0, 1) for i in imgs],
                   return_tensors="pt")["pixel_values"]
    assert hf_pixels.shape == ours.shape and (hf_pixels - ours).abs().max() < 0.05
    # 48x64 to shortest side 32: the long side is 42.67, which HF truncates to 42 (rounding would shift the crop)
    hf32 = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                              image_mean=list(PICKSCORE_MEAN), image_std=list(PICKSCORE_STD))
    hf_pixels = hf32(images=[(i * 255).round().to(torch.uint8).permute(2, 0, 1) for i in imgs],
                     return_tensors="pt")["pixel_values"]
    assert (hf_pixels - same).abs().max() < 0.05


def test_bad_preprocessor_config_is_refused(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"size": {"height": 32, "width": 48}}))
    with pytest.raises(WeightsFormatError, match="shortest_edge"):
        read_image_config(tmp_path, 32)


def test_pickscore_formula(models_dir, no_network):
    backend = registry.build_backend("pickscore", None, [models_dir / "reward_models"])
    assert backend.needs_prompt and backend.name == "pickscore"
    imgs = images(4, 48, 64, seed=1)
    result = backend.score(imgs, PROMPTS[:4])
    pixels = own_preprocess(imgs, 40, 32, PICKSCORE_MEAN, PICKSCORE_STD)
    cos, scale = hand_cosine(models_dir / "reward_models" / "PickScore_v1", pixels, PROMPTS[:4])
    assert scale == pytest.approx(torch.e ** 4.0, rel=1e-5)
    assert result.scores.dtype == torch.float32 and result.scores.shape == (4,)
    assert torch.allclose(result.details["cosine"], cos, atol=1e-5)
    assert torch.allclose(result.scores, scale * cos / 26, atol=1e-5)


def test_clip_score_formula_with_generated_tokenizer(models_dir, no_network):
    folder = models_dir / "reward_models" / "clip-vit-large-patch14"
    assert not (folder / "tokenizer.json").exists() and not (folder / "preprocessor_config.json").exists()
    backend = registry.build_backend("clip_score", "", [models_dir / "reward_models"])
    imgs = images(3, 64, 40, seed=2)
    result = backend.score(imgs, PROMPTS[2:5])
    pixels = own_preprocess(imgs, 32, 32, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    cos, scale = hand_cosine(folder, pixels, PROMPTS[2:5])
    assert scale == pytest.approx(torch.e ** 3.0, rel=1e-5)
    assert torch.allclose(result.details["cosine"], cos, atol=1e-5)
    assert torch.allclose(result.scores, scale * cos / 30, atol=1e-5)


def head_as_affine(state):
    """The dropout-only head in eval mode is one affine map y = A e + c (composed in float64)."""
    A, c = None, None
    for index in (0, 2, 4, 6, 7):
        W, b = state[f"layers.{index}.weight"].double(), state[f"layers.{index}.bias"].double()
        A, c = (W, b) if A is None else (W @ A, W @ c + b)
    return A, c


def test_aesthetic_formula(models_dir, no_network):
    backend = registry.build_backend("aesthetic", None, [models_dir / "reward_models"])
    assert not backend.needs_prompt and backend.name == "aesthetic"
    assert sum(p.numel() for p in backend.model.parameters()) > 768 * 1024
    assert not any(name.startswith("text_") for name, _ in backend.model.named_parameters())
    imgs = images(3, 40, 40, seed=4)
    scores = backend.score(imgs, [""] * 3).scores
    model = CLIPModel.from_pretrained(str(models_dir / "reward_models" / "clip-vit-large-patch14")).eval()
    with torch.no_grad():
        pixels = own_preprocess(imgs, 32, 32, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
        e = F.normalize(model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output), dim=-1)
    A, c = head_as_affine(tiny_aesthetic_head_state(768, seed=0))
    expected = (e.double() @ A.T + c).squeeze(-1)
    assert torch.allclose(scores.double(), expected, atol=1e-5)


def test_aesthetic_safetensors_head_matches_pth(models_dir, tmp_path):
    head = build_tiny_aesthetic(tmp_path, "head.safetensors")  # same seeds as models_dir's
    imgs = images(2, 36, 44, seed=5)
    a = registry.build_backend("aesthetic", str(head), []).score(imgs, ["", ""]).scores
    b = registry.build_backend("aesthetic", None, [models_dir / "reward_models"]).score(imgs, ["", ""]).scores
    assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("name", ["pickscore", "clip_score", "aesthetic"])
def test_batch_equals_single_images(models_dir, name):
    backend = registry.build_backend(name, None, [models_dir / "reward_models"])
    backend.batch_size = 2
    imgs = images(5, 44, 52, seed=6)
    batch = backend.score(imgs, PROMPTS)
    singles = torch.cat([backend.score(imgs[i:i + 1], PROMPTS[i:i + 1]).scores for i in range(5)])
    assert torch.allclose(batch.scores, singles, atol=1e-5)
    assert not torch.allclose(batch.scores, batch.scores.flip(0))


def test_bfloat16_towers(models_dir):
    fp32 = registry.build_backend("pickscore", None, [models_dir / "reward_models"]).score(images(2), PROMPTS[:2])
    bf16 = registry.build_backend("pickscore", None, [models_dir / "reward_models"], dtype=torch.bfloat16)
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    result = bf16.score(images(2), PROMPTS[:2])
    assert result.scores.dtype == torch.float32
    assert torch.allclose(result.details["cosine"], fp32.details["cosine"], atol=0.05)


def test_missing_weights_name_folder_and_file(models_dir, tmp_path):
    empty = tmp_path / "reward_models"
    empty.mkdir()
    with pytest.raises(MissingWeightsError, match="PickScore_v1") as info:
        registry.build_backend("pickscore", None, [empty])
    assert str(empty) in str(info.value) and "huggingface.co/yuvalkirstain/PickScore_v1" in str(info.value)
    head = build_tiny_aesthetic(tmp_path, backbone=False)
    with pytest.raises(MissingWeightsError, match="clip-vit-large-patch14") as info:
        registry.build_backend("aesthetic", None, [empty])
    assert str(head.parent) in str(info.value) and "openai/clip-vit-large-patch14" in str(info.value)


def test_wrong_head_shape_is_a_clear_error(tmp_path):
    head = build_tiny_aesthetic(tmp_path, "small.pth", in_features=512)
    with pytest.raises(WeightsFormatError, match=r"shape mismatches.*layers\.0\.weight.*\(1024, 512\)"):
        registry.build_backend("aesthetic", str(head), [])


def test_broken_model_folders_are_clear_errors(tmp_path):
    folder = build_tiny_clip(tmp_path, "broken", projection_dim=16, tokenizer=False)
    (folder / "model.safetensors").write_bytes(b"not a safetensors file" * 4)
    with pytest.raises(WeightsFormatError, match="cannot load the CLIP model"):
        registry.build_backend("clip_score", "broken", [tmp_path / "reward_models"])
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(config, model_type="bert")))
    with pytest.raises(WeightsFormatError, match="not a CLIP model"):
        registry.build_backend("clip_score", "broken", [tmp_path / "reward_models"])
    (folder / "config.json").unlink()
    with pytest.raises(MissingWeightsError, match="config.json"):
        registry.build_backend("clip_score", "broken", [tmp_path / "reward_models"])
