"""GenEval-style reward: the rules against hand-written detections and hand-computed partial credits; a pluggable
detector written here; the OWL-ViT path on a tiny random OwlViT saved in the real format and loaded by the
production loader, checked against the test's own preprocessing, post-processing and colour cosines."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from rewardkit import block_network
from rewardkit.detector_tiny import OWLVIT_DIR, build_tiny_owlvit

from flowgrpo_core.rewards import geneval, registry
from flowgrpo_core.rewards.geneval import Detection, GenEvalReward, GenEvalRules, evaluate, relative_position
from flowgrpo_core.rewards.geneval_detectors import OwlViTGenEvalReward
from flowgrpo_core.rewards.weights import MissingWeightsError, WeightsFormatError

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)  # not CLIP's: the loader must read them from the processor config



@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    block_network(monkeypatch)


def det(label, score, box, color=None):
    return Detection(label, score, tuple(float(v) for v in box), color)


# ---------------------------------------------------------------- rules on hand-written detections

def test_count_credit_threshold_and_clipping():
    dogs = [det("dog", s, (0, 0, 10, 10)) for s in (0.9, 0.8, 0.5, 0.2)]  # 0.2 is below 0.3
    score, strict, results = evaluate(dogs, {"tag": "counting_not", "include": [{"class": "dog", "count": 2}]})
    assert results[0]["found"] == 3 and score == pytest.approx(1 - 1 / 2) and not strict
    score, _, _ = evaluate(dogs, {"include": [{"class": "dog", "count": 1}]})
    assert score == 0.0  # 1 - |1 - 3| / 1 = -1, clipped
    # the counting tag keeps only score > 0.9: none of these; a 0.95 dog alone makes it exact
    score, strict, results = evaluate(dogs + [det("dog", 0.95, (0, 0, 5, 5))],
                                      {"tag": "counting", "include": [{"class": "dog", "count": 1}]})
    assert results[0]["found"] == 1 and score == 1.0 and strict
    many = [det("cat", 0.5 + i / 100, (i, 0, i + 1, 1)) for i in range(20)]
    _, _, results = evaluate(many, {"include": [{"class": "cat", "count": 4}]})
    assert results[0]["found"] == 16  # at most 16 per class


def test_colour_credit():
    cars = [det("car", 0.9, (0, 0, 5, 5), "red"), det("car", 0.8, (10, 0, 15, 5), "blue")]
    meta = {"include": [{"class": "car", "count": 2, "color": "red"}]}
    score, strict, results = evaluate(cars, meta)
    assert [r["credit"] for r in results] == [1.0, 0.5]  # count exact; 1 - |2 - 1| / 2 red
    assert score == pytest.approx(0.75) and not strict
    score, strict, _ = evaluate([cars[0], det("car", 0.7, (20, 0, 25, 5), "red")], meta)
    assert score == 1.0 and strict
    score, _, results = evaluate(cars[:1], meta)  # count off: colour scores 0 whatever the colours
    assert [r["credit"] for r in results] == [0.5, 0.0] and score == pytest.approx(0.25)


def test_relative_position_hand_values():
    dog = (60, 10, 80, 30)  # centre (70, 20), 20 x 20
    # cat centre (20, 20): offset (-50, 0), margin 0.1 * 40 = 4 -> (-46, 0) / 50 = -0.92
    assert relative_position((10, 10, 30, 30), dog) == {"left of"}
    assert relative_position(dog, (10, 10, 30, 30)) == {"right of"}
    # centre (65, 20): offset -5 -> shrunk -1 -> -0.2: no relation (without the margin it would be left of)
    assert relative_position((55, 10, 75, 30), dog) == set()
    assert relative_position((55, 10, 75, 30), dog, margin=0.0) == {"left of"}
    # centre (40, -10): offset (-30, -30) -> (-26, -26) / 42.43 = -0.61 on both axes
    assert relative_position((30, -20, 50, 0), dog) == {"left of", "above"}
    assert relative_position((60, 50, 80, 70), dog) == {"below"}
    assert relative_position(dog, dog) == set()


def test_position_credit():
    meta = {"include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1, "position": ["left of", 0]}]}
    dog = det("dog", 0.9, (60, 10, 80, 30))
    score, strict, results = evaluate([dog, det("cat", 0.9, (10, 10, 30, 30))], meta)
    assert [r["credit"] for r in results] == [1.0, 1.0, 1.0] and score == 1.0 and strict
    score, strict, results = evaluate([dog, det("cat", 0.9, (55, 10, 75, 30))], meta)
    assert [r["credit"] for r in results] == [1.0, 1.0, 0.0] and score == pytest.approx(2 / 3) and not strict
    # the target group (one dog) is not met when there are two dogs: position 0 even though the cat is left
    two = [dog, det("dog", 0.8, (90, 10, 99, 30)), det("cat", 0.9, (10, 10, 30, 30))]
    score, _, results = evaluate(two, meta)
    assert [r["credit"] for r in results] == [0.0, 1.0, 0.0] and score == pytest.approx(1 / 3)


def test_exclude_and_mean_of_all_credits():
    meta = {"tag": "color_attr",
            "include": [{"class": "dog", "count": 2, "color": "brown"},
                        {"class": "cat", "count": 1, "position": ["right of", 0]}],
            "exclude": [{"class": "bird", "count": 1}]}
    dets = [det("dog", 0.9, (0, 0, 10, 10), "brown"), det("dog", 0.8, (0, 20, 10, 30), "black"),
            det("cat", 0.7, (50, 0, 60, 10)), det("bird", 0.6, (0, 0, 2, 2))]
    score, strict, results = evaluate(dets, meta)
    # dog count 1, dog colour 1 - 1/2, cat count 1, position 0 (dogs not met), bird excluded but present 0
    assert [r["rule"] for r in results] == ["count", "color", "count", "position", "exclude"]
    assert [r["credit"] for r in results] == [1.0, 0.5, 1.0, 0.0, 0.0]
    assert score == pytest.approx(2.5 / 5) and not strict
    score, strict, _ = evaluate(dets[:1] + [det("dog", 0.8, (0, 20, 10, 30), "brown"), dets[2]], meta)
    assert score == 1.0 and strict  # the cat (centre x 55) is right of both dogs (centre x 5)


@pytest.mark.parametrize("meta, message", [
    (None, "is missing"),
    ({"tag": "single_object"}, "no 'include'"),
    ({"include": [{"class": "dog", "count": 0}]}, "integer >= 1"),
    ({"include": [{"class": "dog", "count": True}]}, "integer >= 1"),
    ({"include": [{"count": 1}]}, "without a 'class'"),
    ({"include": [{"class": "dog", "count": 1, "position": ["left of", 0]}]}, "earlier include"),
    ({"include": [{"class": "a", "count": 1}, {"class": "b", "count": 1, "position": ["near", 0]}]}, "position"),
    ({"include": [{"class": "a", "count": 1}], "exclude": [{"class": "b"}]}, "exclude"),
])
def test_metadata_errors(meta, message):
    with pytest.raises(ValueError, match=message):
        geneval.check_metadata(meta, 3)


class SquareDetector:
    """A user detector: every solid colour of a palette is one object (its bounding box), score 1."""

    palette = {"red": ("apple", (1.0, 0.0, 0.0)), "blue": ("car", (0.0, 0.0, 1.0)), "green": ("car", (0.0, 1.0, 0.0))}

    def detect(self, images, classes):
        out = []
        for image, wanted in zip(images, classes):
            found = []
            for color, (label, rgb) in self.palette.items():
                ys, xs = torch.nonzero((image[..., :3] == torch.tensor(rgb)).all(dim=-1), as_tuple=True)
                if label in wanted and len(xs):
                    found.append(det(label, 1.0, (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1), color))
            out.append(found)
        return out


def test_pluggable_detector_through_the_backend():
    images = torch.full((2, 32, 32, 3), 0.5)
    images[0, 4:10, 20:28] = torch.tensor([1.0, 0.0, 0.0])  # red apple right
    images[0, 4:10, 2:8] = torch.tensor([0.0, 0.0, 1.0])  # blue car left
    images[1, 20:30, 2:8] = torch.tensor([0.0, 1.0, 0.0])  # green car only
    meta = {"tag": "position", "include": [{"class": "apple", "count": 1},
                                           {"class": "car", "count": 1, "color": "blue",
                                            "position": ["left of", 0]}]}
    backend = GenEvalReward(SquareDetector())
    result = backend.score(images, ["a", "b"], [meta, meta])
    # image 0: all four credits 1; image 1: apple 0, car count 1, colour 0 (green), position 0 (no apple)
    assert result.scores.tolist() == [1.0, 0.25]
    assert result.details["strict"] == [1.0, 0.0]
    assert result.details["detections"][1] == [{"label": "car", "score": 1.0, "box": [2.0, 20.0, 8.0, 30.0],
                                               "color": "green"}]
    with pytest.raises(ValueError, match="needs GenEval metadata"):
        backend.score(images, ["a", "b"])
    with pytest.raises(TypeError):
        GenEvalReward(object())


# ---------------------------------------------------------------- OWL-ViT on a tiny random model

@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    build_tiny_owlvit(root, image_mean=MEAN, image_std=STD)
    return root


@pytest.fixture(scope="module")
def backend(models_dir):
    with pytest.MonkeyPatch.context() as mp:
        block_network(mp)
        mp.setitem(registry.BACKENDS, "geneval", geneval.SPECS[0])
        return registry.build_backend("geneval", None, [models_dir / "reward_models"])


def hand_pixels(images, size):
    x = images.permute(0, 3, 1, 2)
    x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def hand_nms(boxes, scores, iou):
    keep = []
    for i in sorted(range(len(scores)), key=lambda k: -scores[k]):
        def overlap(a, b):
            w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
            h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
            area = lambda r: (r[2] - r[0]) * (r[3] - r[1])
            return w * h / (area(a) + area(b) - w * h)
        if all(overlap(boxes[i], boxes[k]) <= iou for k in keep):
            keep.append(i)
    return keep


def test_spec_and_loading(backend, models_dir):
    (spec,) = geneval.SPECS
    assert (spec.name, spec.weights_kind, spec.default_weights, spec.needs_prompt) == (
        "geneval", "dir", OWLVIT_DIR, True)
    det_ = backend.detector
    assert type(det_.model).__name__ == "OwlViTForObjectDetection" and backend.model is det_.model
    assert (det_.mean, det_.std) == (MEAN, STD) and det_.image_size == 32 and det_.text_length == 16


def test_detections_match_hand_post_processing(backend):
    torch.manual_seed(1)
    images = torch.rand(2, 40, 48, 3)
    classes = [["dog", "cat"], ["bird"]]
    detector = backend.detector
    got = detector.detect(images, classes, [set(), set()])
    model, tok = detector.model, detector.tokenizer
    suppressed = 0
    for i, names in enumerate(classes):
        enc = tok([f"a photo of a {c}" for c in names], padding="max_length", max_length=16, return_tensors="pt")
        with torch.no_grad():
            out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                        pixel_values=hand_pixels(images[i:i + 1], 32))
        logits = out.logits[0]
        assert logits.shape == (16, len(names))  # (32 / 8)^2 boxes
        expected = []
        for q, name in enumerate(names):
            rows = [p for p in range(16) if logits[p].argmax().item() == q
                    and torch.sigmoid(logits[p, q]).item() > detector.score_threshold]
            boxes = []
            for p in rows:
                cx, cy, w, h = out.pred_boxes[0, p].tolist()
                boxes.append([min(max(v, 0.0), m) for v, m in
                              zip(((cx - w / 2) * 48, (cy - h / 2) * 40, (cx + w / 2) * 48, (cy + h / 2) * 40),
                                  (48, 40, 48, 40))])
            scores = [torch.sigmoid(logits[p, q]).item() for p in rows]
            expected += [(name, scores[k], boxes[k]) for k in hand_nms(boxes, scores, detector.nms_iou)[:16]]
        suppressed += sum(1 for p in range(16) if torch.sigmoid(logits[p].max()).item() > detector.score_threshold
                          and logits[p].argmax().item() < len(names)) - len(expected)
        assert [d.label for d in got[i]] == [e[0] for e in expected]
        assert [d.score for d in got[i]] == pytest.approx([e[1] for e in expected], abs=1e-5)
        for d, e in zip(got[i], expected):
            assert list(d.box) == pytest.approx(e[2], abs=1e-3) and d.color is None
    assert any(got) and suppressed > 0, "the tiny detector should find boxes, and NMS drop some"


def test_colour_choice_is_the_argmax_of_hand_cosines(backend):
    torch.manual_seed(2)
    image = torch.rand(40, 48, 3)
    box = (3.2, 5.7, 20.1, 27.9)  # pixels x 3..21, y 5..28: a 23 x 18 crop
    detector, model, tok = backend.detector, backend.detector.model, backend.detector.tokenizer
    crop = image[5:28, 3:21].permute(2, 0, 1)[None]
    # shortest side (18) to 32, the long side truncated as CLIP's processor does: int(23 * 32 / 18) = 40
    crop = F.interpolate(crop, size=(40, 32), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    top = (crop.shape[-2] - 32) // 2
    crop = crop[..., top:top + 32, :]
    crop = (crop - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        img = model.owlvit.get_image_features(pixel_values=crop).pooler_output[0]
        img = img / img.norm()
        colors = []
        for c in geneval.GENEVAL_COLORS:
            texts = [f"a photo of a {c} dog", f"a photo of a {c}-colored dog", f"a photo of a {c} object"]
            enc = tok(texts, padding="max_length", max_length=16, return_tensors="pt")
            t = model.owlvit.get_text_features(**enc).pooler_output
            t = (t / t.norm(dim=-1, keepdim=True)).mean(dim=0)
            colors.append(t / t.norm())
    cosines = torch.stack(colors) @ img
    got = detector.crop_embeddings(image, [box]) @ detector.color_classifier("dog").T
    assert got[0].tolist() == pytest.approx(cosines.tolist(), abs=1e-5)
    assert detector.classify_colors(image, "dog", [box]) == [geneval.GENEVAL_COLORS[cosines.argmax().item()]]


def test_detection_to_rules_pipeline(backend):
    torch.manual_seed(3)
    images = torch.rand(3, 40, 48, 3)
    metas = [{"tag": "single_object", "include": [{"class": "dog", "count": 1}]},
             {"tag": "colors", "include": [{"class": "cat", "count": 1, "color": "red"}],
              "exclude": [{"class": "bird", "count": 1}]},
             {"tag": "counting", "include": [{"class": "dog", "count": 2}]}]
    prompts = ["a dog", "a red cat", "two dogs"]
    # thresholds between the detector's own scores so that image 0 finds exactly 1 dog and image 2 finds 3
    raw = backend.detector.detect(images, [["dog"], ["cat", "bird"], ["dog"]], [set(), set(), set()])
    s0 = sorted((d.score for d in raw[0]), reverse=True)
    s2 = sorted((d.score for d in raw[2]), reverse=True)
    rules = GenEvalRules(threshold=(s0[0] + s0[1]) / 2, counting_threshold=(s2[2] + s2[3]) / 2)
    reward = OwlViTGenEvalReward(backend.detector, rules, batch_size=2)
    result = reward.score(images, prompts, metas)
    assert result.scores.shape == (3,) and result.scores.dtype == torch.float32
    for key in ("strict", "tag", "requirements", "detections"):
        assert len(result.details[key]) == 3
    assert result.scores[0].item() == 1.0 and result.details["strict"][0] == 1.0
    assert result.scores[2].item() == pytest.approx(1 - 1 / 2) and result.details["strict"][2] == 0.0
    # image 1 by hand from its detections: cat count, red colour, bird exclusion
    dets = result.details["detections"][1]
    assert all((d["color"] in geneval.GENEVAL_COLORS) == (d["label"] == "cat") for d in dets)
    cats = [d for d in dets if d["label"] == "cat" and d["score"] > rules.threshold]
    birds = [d for d in dets if d["label"] == "bird" and d["score"] > rules.threshold]
    colour = float(cats[0]["color"] == "red") if len(cats) == 1 else 0.0
    credits = [max(0.0, 1 - abs(1 - len(cats))), colour, float(len(birds) < 1)]
    assert result.scores[1].item() == pytest.approx(sum(credits) / 3)
    singles = [reward.score(images[i:i + 1], prompts[i:i + 1], metas[i:i + 1]) for i in range(3)]
    assert result.scores.tolist() == pytest.approx([s.scores.item() for s in singles], abs=1e-6)
    default = backend.score(images, prompts, metas)  # the registry-built backend (GenEval's thresholds)
    assert default.scores.shape == (3,) and all(0.0 <= v <= 1.0 for v in default.scores.tolist())
    with pytest.raises(ValueError, match="needs GenEval metadata"):
        reward.score(images, prompts)


def test_missing_and_wrong_weights(models_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(registry.BACKENDS, "geneval", geneval.SPECS[0])
    with pytest.raises(MissingWeightsError) as err:
        registry.build_backend("geneval", None, [tmp_path])
    assert str(tmp_path) in str(err.value) and OWLVIT_DIR in str(err.value)
    assert "huggingface.co/google/owlvit-base-patch32" in str(err.value)
    build = geneval.SPECS[0].build
    folder = tmp_path / OWLVIT_DIR
    shutil.copytree(models_dir / "reward_models" / OWLVIT_DIR, folder)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(MissingWeightsError, match="vocab.json") as err:
        build(folder, torch.device("cpu"), torch.float32)
    assert str(folder) in str(err.value)
    shutil.rmtree(folder)
    shutil.copytree(models_dir / "reward_models" / OWLVIT_DIR, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "clip"}))
    with pytest.raises(WeightsFormatError, match="not OWL-ViT"):
        build(folder, torch.device("cpu"), torch.float32)
    (folder / "config.json").write_text(json.dumps(config))
    from safetensors.torch import load_file, save_file

    weights = load_file(str(folder / "model.safetensors"))
    save_file({k: v for k, v in weights.items() if not k.startswith("box_head.")}, str(folder / "model.safetensors"))
    with pytest.raises(WeightsFormatError, match="do not fit"):
        build(folder, torch.device("cpu"), torch.float32)
    (folder / "model.safetensors").unlink()
    with pytest.raises(MissingWeightsError, match="model.safetensors"):
        build(folder, torch.device("cpu"), torch.float32)
