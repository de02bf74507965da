"""The OCR reward with the REAL PP-OCR models bundled in the rapidocr wheel, on text rendered with PIL; prompt
parsing and the edit distance against values worked out by hand; no network during build and scoring."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from rewardkit import block_network
import torch
from PIL import Image, ImageDraw, ImageFont

from flowgrpo_core.rewards import ocr
from flowgrpo_core.rewards.base import RewardResult

_DEJAVU = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")



@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    block_network(monkeypatch)


@pytest.fixture(scope="module")
def backend():
    with pytest.MonkeyPatch.context() as mp:
        block_network(mp)
        spec = next(s for s in ocr.SPECS if s.name == "ocr")
        yield spec.build(None, torch.device("cpu"), torch.float32)


def render(text: str, size=(512, 128)) -> torch.Tensor:
    """``text`` in black on white as an IMAGE ``[1, H, W, 3]`` in [0, 1]."""
    font = (ImageFont.truetype(str(_DEJAVU), 40) if _DEJAVU.is_file() else ImageFont.load_default(size=40))
    image = Image.new("RGB", size, "white")
    ImageDraw.Draw(image).text((20, 40), text, fill="black", font=font)
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)[None]


def test_spec():
    (spec,) = ocr.SPECS
    assert (spec.name, spec.weights_kind, spec.needs_prompt) == ("ocr", None, True)


@pytest.mark.parametrize("prompt, expected", [
    ('A sign that says "Hello World 2049"', "Hello World 2049"),
    ('say "a" and "b"', "a"),
    ("curly \u201cNeon Cafe\u201d sign", "Neon Cafe"),
    ('mixed \u201cOpen" sign', "Open"),
    ('empty "" quotes', ""),
    ("no quotes at all", None),
    ('one " quote only', None),
])
def test_quoted_text(prompt, expected):
    assert ocr.quoted_text(prompt) == expected


@pytest.mark.parametrize("a, b, distance", [
    ("", "", 0), ("abc", "", 3), ("", "ab", 2), ("kitten", "sitting", 3), ("flaw", "lawn", 2),
    ("helloword2049", "helloworld2049", 1), ("abc", "abc", 0), ("abcd", "dcba", 4),
])
def test_levenshtein_hand_values(a, b, distance):
    assert ocr.levenshtein(a, b) == distance
    assert ocr.levenshtein(b, a) == distance


def test_reward_formula_hand_values():
    assert ocr.ocr_reward("The Hello World sign", "hello world") == 1.0  # contained -> d = 0
    assert ocr.ocr_reward("helo", "hello") == pytest.approx(1 - 1 / 5)  # one insertion
    assert ocr.ocr_reward("", "abc") == 0.0  # d = 3 = |t|
    assert ocr.ocr_reward("xyzxyzxyz", "abc") == 0.0  # d = 9 clipped to |t| = 3
    with pytest.raises(ValueError):
        ocr.ocr_reward("abc", "  ")


def test_exact_blank_and_near_miss_with_the_bundled_model(backend):
    prompts = ['A sign that says "Hello World 2049"'] * 3
    images = torch.cat([render("Hello World 2049"), torch.ones(1, 128, 512, 3), render("Hello Word 2049")])
    result = backend.score(images, prompts)
    assert isinstance(result, RewardResult) and result.scores.dtype == torch.float32
    exact, blank, near = result.scores.tolist()
    texts = result.details["ocr_text"]
    assert exact >= 0.99 and texts[0].replace(" ", "").lower() == "helloworld2049"
    assert blank == 0.0 and texts[1] == ""
    assert 0.0 < near < 1.0
    # by hand: "helloword2049" vs "helloworld2049" is one insertion, |target| = 14
    assert texts[2].replace(" ", "").lower() == "helloword2049"
    assert near == pytest.approx(1 - 1 / 14)
    assert result.details["ocr_target"] == ["Hello World 2049"] * 3
    assert result.details["ocr_error"] == [None, None, None]


def test_batch_equals_single_images(backend):
    images = torch.cat([render("OPEN 24"), render("Bakery")])
    prompts = ['a door with "open 24 hours"', 'a shop sign "Bakery"']
    batch = backend.score(images, prompts)
    singles = [backend.score(images[i:i + 1], prompts[i:i + 1]) for i in range(2)]
    assert batch.scores.tolist() == [s.scores.item() for s in singles]
    assert batch.details["ocr_text"] == [s.details["ocr_text"][0] for s in singles]
    # by hand: the image holds "open24", the target "open24hours" (11 letters) needs 5 insertions
    assert batch.details["ocr_text"][0].replace(" ", "").lower() == "open24"
    assert batch.scores[0].item() == pytest.approx(1 - 5 / 11)
    assert batch.scores[1].item() >= 0.99


def test_prompts_without_quoted_text_score_zero_without_reading(backend):
    result = backend.score(torch.cat([render("Hello")] * 2), ["a sign that says Hello", 'a sign "  "'])
    assert result.scores.tolist() == [0.0, 0.0]
    assert "no quoted text" in result.details["ocr_error"][0]
    assert "empty" in result.details["ocr_error"][1]
    assert result.details["ocr_target"] == [None, "  "]


def test_engine_failure_scores_zero_with_a_detail():
    def broken_engine(image):
        raise RuntimeError(f"cannot read an image of shape {image.shape}")

    result = ocr.OcrReward(broken_engine).score(torch.ones(1, 8, 8, 3), ['"x"'])
    assert result.scores.tolist() == [0.0]
    assert result.details["ocr_error"][0] == "OCR engine failed: RuntimeError: cannot read an image of shape (8, 8, 3)"


def test_engine_gets_bgr_uint8_and_only_positive_confidences_count():
    seen = []

    class Output:
        txts, scores = ("AB", "zz", "C"), (0.9, 0.0, 0.7)

    def engine(image):
        seen.append(image)
        return Output()

    image = torch.zeros(1, 2, 2, 3)
    image[..., 0] = 1.0  # pure red in RGB
    image[..., 1] = 0.5
    result = ocr.OcrReward(engine).score(image, ['"abc"'])
    assert seen[0].dtype == np.uint8 and seen[0].shape == (2, 2, 3)
    assert seen[0][0, 0].tolist() == [0, 128, 255]  # B, G, R
    assert result.details["ocr_text"] == ["AB C"] and result.scores.item() == 1.0
