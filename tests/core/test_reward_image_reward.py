"""ImageReward v1.0 on transformers BLIP classes: a tiny random model in the upstream ``ImageReward.pt`` format is
scored through the production loader and compared with BLIP's forward written out here on the upstream keys
(timm ViT, ``med.py`` BERT with cross-attention), the head as one affine map and upstream's normalisation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from flowgrpo_core.rewards import image_reward as ir
from flowgrpo_core.rewards import registry
from flowgrpo_core.rewards.weights import MissingWeightsError, WeightsFormatError
from rewardkit import block_network
from rewardkit.image_reward_tiny import (TinyImageRewardConfig, build_tiny_image_reward, tiny_upstream_state_dict,
                                         tiny_vocab)

SPEC = ir.SPECS[0]
CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
PROMPTS = ["a photo of a cat", "A red car on the street at night.", "a zebra", "two dogs running on a beach"]




def _build(models_dir):
    """The backend through the registry, as the loader node builds it (the spec is registered if the registry
    does not list it yet)."""
    if SPEC.name not in registry.BACKENDS:
        registry.register(SPEC)
    return registry.build_backend(SPEC.name, None, [models_dir / "reward_models"], "cpu", torch.float32)


def _images(seed=0, n=4, height=96, width=160):
    gen = torch.Generator().manual_seed(seed)
    smooth = F.interpolate(torch.rand(n, 3, 6, 10, generator=gen), size=(height, width), mode="bilinear")
    return smooth.permute(0, 2, 3, 1).contiguous()  # [B, H, W, C] in [0, 1]


# ----------------------------------------------------------------------------------------------------------------
# The reference, by hand, on the upstream keys
# ----------------------------------------------------------------------------------------------------------------

def preprocess_by_hand(images):
    """Upstream's transform on tensors: the 96 x 160 images become 224 x 373 (bicubic), crop columns 74..297."""
    x = images.permute(0, 3, 1, 2)
    assert x.shape[-2:] == (96, 160)
    x = F.interpolate(x, size=(224, 373), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    return (x[..., :, 74:74 + 224] - CLIP_MEAN) / CLIP_STD


def _split(x, heads):
    b, n, width = x.shape
    return x.view(b, n, heads, width // heads).transpose(1, 2)


def _attention(q, k, v, heads, additive_mask=None):
    q, k, v = _split(q, heads), _split(k, heads), _split(v, heads)
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if additive_mask is not None:
        scores = scores + additive_mask
    out = scores.softmax(-1) @ v
    return out.transpose(1, 2).reshape(q.shape[0], -1, q.shape[1] * q.shape[-1])


def _lin(sd, name, x):
    return F.linear(x, sd[name + ".weight"], sd[name + ".bias"])


def _ln(sd, name, x, eps):
    return F.layer_norm(x, x.shape[-1:], sd[name + ".weight"], sd[name + ".bias"], eps)


def vit_by_hand(sd, pixels, heads, layers):
    p = "blip.visual_encoder."
    weight = sd[p + "patch_embed.proj.weight"]
    x = F.conv2d(pixels, weight, sd[p + "patch_embed.proj.bias"], stride=weight.shape[-1]).flatten(2).transpose(1, 2)
    x = torch.cat([sd[p + "cls_token"].expand(x.shape[0], -1, -1), x], dim=1) + sd[p + "pos_embed"]
    for i in range(layers):
        b = f"{p}blocks.{i}."
        q, k, v = _lin(sd, b + "attn.qkv", _ln(sd, b + "norm1", x, 1e-6)).chunk(3, dim=-1)
        x = x + _lin(sd, b + "attn.proj", _attention(q, k, v, heads))
        x = x + _lin(sd, b + "mlp.fc2", F.gelu(_lin(sd, b + "mlp.fc1", _ln(sd, b + "norm2", x, 1e-6))))
    return _ln(sd, p + "norm", x, 1e-6)


def text_cls_by_hand(sd, input_ids, attention_mask, image_embeds, heads, layers):
    t = "blip.text_encoder."
    x = sd[t + "embeddings.word_embeddings.weight"][input_ids]
    x = _ln(sd, t + "embeddings.LayerNorm", x + sd[t + "embeddings.position_embeddings.weight"][:x.shape[1]], 1e-12)
    pad = (1.0 - attention_mask[:, None, None, :].float()) * -10000.0  # med.py's extended mask
    for i in range(layers):
        b = f"{t}encoder.layer.{i}."
        for part, kv, mask in (("attention", x, pad), ("crossattention", image_embeds, None)):
            s = f"{b}{part}.self."
            a = _attention(_lin(sd, s + "query", x), _lin(sd, s + "key", kv), _lin(sd, s + "value", kv), heads, mask)
            x = _ln(sd, f"{b}{part}.output.LayerNorm", _lin(sd, f"{b}{part}.output.dense", a) + x, 1e-12)
        ffn = _lin(sd, b + "output.dense", F.gelu(_lin(sd, b + "intermediate.dense", x)))
        x = _ln(sd, b + "output.LayerNorm", ffn + x, 1e-12)
    return x[:, 0]


def head_as_affine_map(sd):
    """The MLP without activations in eval mode: r = h @ W.T + b."""
    weight, bias = torch.eye(sd["mlp.layers.0.weight"].shape[1]), torch.zeros(sd["mlp.layers.0.weight"].shape[1])
    for i in (0, 2, 4, 6, 7):
        w, b = sd[f"mlp.layers.{i}.weight"], sd[f"mlp.layers.{i}.bias"]
        weight, bias = w @ weight, w @ bias + b
    return weight, bias


def tokens_by_hand(prompt, vocab):
    """[CLS] + lower-cased whole words / punctuation of the tiny vocab + [SEP], padded with [PAD] to 35."""
    words = prompt.lower().replace(".", " .").split()
    ids = [vocab.index("[CLS]")] + [vocab.index(w) for w in words] + [vocab.index("[SEP]")]
    return ids + [vocab.index("[PAD]")] * (35 - len(ids)), [1] * len(ids) + [0] * (35 - len(ids))


# ----------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    models = tmp_path_factory.mktemp("models")
    path = build_tiny_image_reward(models)
    return models, torch.load(path, weights_only=True)


@pytest.mark.parametrize("config", [TinyImageRewardConfig(), TinyImageRewardConfig(med_config=True, seed=1)],
                         ids=["64-wide-heads", "med_config-heads"])
def test_scores_match_blip_by_hand(tmp_path, monkeypatch, config):
    path = build_tiny_image_reward(tmp_path, config)
    sd = torch.load(path, weights_only=True)
    images = _images()
    block_network(monkeypatch)
    backend = _build(tmp_path)
    result = backend.score(images, PROMPTS)
    monkeypatch.undo()

    assert backend.name == "image_reward" and backend.needs_prompt and SPEC.needs_prompt
    assert result.scores.shape == (4,) and result.scores.dtype == torch.float32
    heads = (config.vision_heads, config.text_heads) if config.med_config else (2, 2)  # 128 / 64
    tokens = backend.tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    image_embeds = vit_by_hand(sd, preprocess_by_hand(images), heads[0], config.vision_layers)
    cls = text_cls_by_hand(sd, tokens["input_ids"], tokens["attention_mask"], image_embeds, heads[1],
                           config.text_layers)
    weight, bias = head_as_affine_map(sd)
    raw = cls @ weight.T[:, 0] + bias[0]
    expected = (raw - 0.16717362830052426) / 1.0333394966054072
    torch.testing.assert_close(result.details["raw"], raw, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(result.scores, expected, atol=2e-5, rtol=1e-5)
    assert raw.std() > 0.05  # the images and prompts really move the score


def test_tokenizer_is_blips(tiny):
    models, _ = tiny
    backend = _build(models)
    vocab = tiny_vocab()
    tok = backend.tokenizer
    assert len(tok) == len(vocab) + 2
    assert tok.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [len(vocab), len(vocab) + 1]
    assert tok.bos_token == "[DEC]"
    for prompt in ("a photo of a cat", "A Red CAR on the street at night."):
        ids, mask = backend.tokenize([prompt])
        assert (ids[0].tolist(), mask[0].tolist()) == tokens_by_hand(prompt, vocab)  # position 0 stays [CLS]
    ids, mask = backend.tokenize([" ".join(["cat"] * 50)])
    assert ids.shape == (1, 35) and mask.all() and ids[0, -1] == vocab.index("[SEP]")


def test_batch_equals_single_images_and_prompt_matters(tiny):
    models, _ = tiny
    backend = _build(models)
    images = _images(seed=3)
    whole = backend.score(images, PROMPTS).scores
    backend.batch_size = 3  # chunks of 3 + 1
    chunked = backend.score(images, PROMPTS).scores
    singles = torch.cat([backend.score(images[i:i + 1], PROMPTS[i:i + 1]).scores for i in range(4)])
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(singles, whole, atol=1e-5, rtol=1e-5)
    same_image = images[:1].expand(4, -1, -1, -1)
    by_prompt = backend.score(same_image, PROMPTS).scores
    assert len({round(v, 4) for v in by_prompt.tolist()}) == 4


def test_missing_files_are_named(tmp_path):
    with pytest.raises(MissingWeightsError, match=r"ImageReward/ImageReward\.pt") as err:
        _build(tmp_path)
    assert str(tmp_path / "reward_models") in str(err.value) and "THUDM/ImageReward" in str(err.value)
    build_tiny_image_reward(tmp_path, vocab=[])
    with pytest.raises(MissingWeightsError, match="vocab.txt") as err:
        _build(tmp_path)
    assert str(tmp_path / "reward_models" / "ImageReward") in str(err.value)
    assert "bert-base-uncased" in str(err.value)


def test_missing_or_unknown_keys_fail_clearly(tmp_path, tiny):
    _, sd = tiny
    broken = dict(sd)
    del broken["blip.text_encoder.encoder.layer.1.crossattention.self.key.weight"]
    build_tiny_image_reward(tmp_path, state_dict=broken)
    with pytest.raises(WeightsFormatError, match=r"1 missing keys.*encoder\.layer\.1\.crossattention\.self\.key"):
        _build(tmp_path)
    extra = dict(sd, **{"blip.text_encoder.pooler.dense.weight": torch.zeros(128, 128)})
    build_tiny_image_reward(tmp_path, state_dict=extra)
    with pytest.raises(WeightsFormatError, match=r"1 unexpected keys.*pooler"):
        _build(tmp_path)
    head_only = {k: v for k, v in sd.items() if k.startswith("mlp.")}  # e.g. an aesthetic-style head file
    build_tiny_image_reward(tmp_path, state_dict=head_only)
    with pytest.raises(WeightsFormatError, match=r"has no 'blip\.visual_encoder\.cls_token'; is this ImageReward\.pt"):
        _build(tmp_path)


def test_companions_must_fit_the_weights(tmp_path, tiny):
    _, sd = tiny
    build_tiny_image_reward(tmp_path, TinyImageRewardConfig(med_config=True), state_dict=sd)
    med_path = tmp_path / "reward_models" / "ImageReward" / "med_config.json"
    med = json.loads(med_path.read_text())
    med_path.write_text(json.dumps(dict(med, num_hidden_layers=12)))
    with pytest.raises(WeightsFormatError, match="num_hidden_layers = 12 but the weights have 2"):
        _build(tmp_path)
    med_path.write_text(json.dumps(dict(med, num_attention_heads=3)))
    with pytest.raises(WeightsFormatError, match="num_attention_heads = 3 does not divide"):
        _build(tmp_path)
    med_path.unlink()
    build_tiny_image_reward(tmp_path, vocab=tiny_vocab()[:-3], state_dict=sd)
    with pytest.raises(WeightsFormatError, match="vocab.txt gives .* but the text encoder .* has"):
        _build(tmp_path)


def test_real_sizes_remap_onto_transformers_blip():
    """At the real sizes (on the meta device): the inferred configs are upstream's ViT-L/16-224 and med_config, and
    the remapped upstream keys are exactly the transformers model's keys, with the same shapes."""
    real = TinyImageRewardConfig(vision_width=1024, vision_layers=24, vision_mlp=4096, text_width=768,
                                 text_layers=12, text_intermediate=3072, max_positions=512)
    with torch.device("meta"):
        sd = tiny_upstream_state_dict(real, 30524)
    vision, text = ir.blip_configs(sd, {}, Path("ImageReward.pt"))
    assert (vision["hidden_size"], vision["num_hidden_layers"], vision["num_attention_heads"]) == (1024, 24, 16)
    assert (vision["image_size"], vision["patch_size"], vision["intermediate_size"]) == (224, 16, 4096)
    assert (text["hidden_size"], text["num_hidden_layers"], text["num_attention_heads"]) == (768, 12, 12)
    assert (text["vocab_size"], text["encoder_hidden_size"], text["max_position_embeddings"]) == (30524, 1024, 512)
    with torch.device("meta"):
        model = ir.blip_model(vision, text)
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    kept = {k: tuple(v.shape) for k, v in ir.remap_upstream_keys(sd).items()
            if not k.startswith(ir.DROPPED_UPSTREAM_KEYS)}
    assert own == kept
    assert len(sd) - len(kept) == 5  # vision_proj / text_proj weight + bias, position_ids
