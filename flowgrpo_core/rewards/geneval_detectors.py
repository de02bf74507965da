"""Detectors for the GenEval rules (:mod:`.geneval`): OWL-ViT (open-vocabulary boxes + zero-shot colours).

:class:`OwlViTDetector` runs ``OwlViTForObjectDetection`` from a local folder (``google/owlvit-base-patch32``
layout: ``config.json``, ``model.safetensors`` or ``pytorch_model.bin``, tokenizer files; ``preprocessor_config.json``
or ``processor_config.json`` optional: mean/std are read from it):

* **boxes**: the image resized (bicubic, antialiased, no crop) to the vision tower's square size and normalised with
  the processor's mean/std (OpenAI CLIP's by default); one text query ``"a photo of a {class}"`` per class; each
  predicted box takes the query with the highest logit, score = sigmoid(logit) (HF's ``post_process_object_detection``);
  boxes with ``score > score_threshold`` kept, greedy per-class NMS at IoU ``nms_iou`` (OWL-ViT predicts one box per
  patch, so one object gets several), at most ``max_per_class`` per class, boxes in pixels of the input image;
* **colours** (GenEval's classifier, with OWL-ViT's own CLIP towers): the box crop (pixel bounds ``floor(x0),
  floor(y0), ceil(x1), ceil(y1)``) resized so its shortest side is the tower size (bicubic), centre-cropped and
  normalised, embedded with ``get_image_features``; each of the 10 colours is the normalised mean of the normalised
  ``get_text_features`` of the templates ``"a photo of a {c} {class}"``, ``"a photo of a {c}-colored {class}"``,
  ``"a photo of a {c} object"``; colour = argmax of the cosine.

All weights sit in the one ``OwlViTForObjectDetection`` module, so :class:`OwlViTGenEvalReward` is a
:class:`~.base.TorchReward` that runs wherever that module is.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F

from .base import RewardResult, TorchReward
from .hf_clip import pooled
from .geneval import GENEVAL_COLORS, Detection, GenEvalRules, checked_metadata, classes_of, evaluate_batch
from .preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, resize_shortest_and_center_crop, resize_squash
from .registry import require
from .weights import MissingWeightsError, WeightsFormatError, find_weights, read_json

__all__ = ["OWLVIT_SOURCE", "COLOR_TEMPLATES", "OwlViTDetector", "OwlViTGenEvalReward", "load_owlvit",
           "build_owlvit_geneval", "crop_bounds"]

OWLVIT_SOURCE = "https://huggingface.co/google/owlvit-base-patch32"
COLOR_TEMPLATES = ("a photo of a {color} {cls}", "a photo of a {color}-colored {cls}", "a photo of a {color} object")


def crop_bounds(box: Sequence[float], height: int, width: int) -> tuple[int, int, int, int]:
    """Integer pixel bounds ``(x0, y0, x1, y1)`` of ``box`` inside a ``height x width`` image, at least 1 px."""
    x0 = min(max(int(math.floor(box[0])), 0), width - 1)
    y0 = min(max(int(math.floor(box[1])), 0), height - 1)
    return x0, y0, max(min(int(math.ceil(box[2])), width), x0 + 1), max(min(int(math.ceil(box[3])), height), y0 + 1)


def _area(boxes: torch.Tensor) -> torch.Tensor:
    return (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)


def _nms(boxes: torch.Tensor, scores: torch.Tensor, iou: float) -> list[int]:
    """Greedy non-maximum suppression: indices of ``boxes`` ``[n, 4]`` (xyxy) kept, best score first."""
    order = scores.argsort(descending=True).tolist()
    keep = []
    while order:
        best, rest = order[0], order[1:]
        keep.append(best)
        if not rest:
            break
        others = boxes[rest]
        lt = torch.maximum(others[:, :2], boxes[best, :2])
        rb = torch.minimum(others[:, 2:], boxes[best, 2:])
        inter = (rb - lt).clamp(min=0).prod(dim=1)
        overlap = inter / (_area(others) + _area(boxes[best]) - inter).clamp(min=1e-9)
        order = [i for i, o in zip(rest, overlap.tolist()) if o <= iou]
    return keep


class OwlViTDetector:
    """A :class:`~.geneval.Detector` on a loaded ``OwlViTForObjectDetection`` (module docstring). Runs on the
    device of ``model`` at call time."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, *, mean: Sequence[float] = OPENAI_CLIP_MEAN,
                 std: Sequence[float] = OPENAI_CLIP_STD, dtype: torch.dtype = torch.float32,
                 query_template: str = "a photo of a {}", score_threshold: float = 0.1, nms_iou: float = 0.3,
                 max_per_class: int = 16, colors: Sequence[str] = GENEVAL_COLORS,
                 color_templates: Sequence[str] = COLOR_TEMPLATES, crop_batch: int = 32):
        self.model, self.tokenizer, self.dtype = model, tokenizer, dtype
        self.mean, self.std = tuple(mean), tuple(std)
        self.query_template, self.score_threshold, self.nms_iou = query_template, score_threshold, nms_iou
        self.max_per_class, self.colors, self.color_templates = max_per_class, tuple(colors), tuple(color_templates)
        self.crop_batch = crop_batch
        self.image_size = int(model.config.vision_config.image_size)
        self.text_length = int(model.config.text_config.max_position_embeddings)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, H, W, C]`` in [0, 1] -> ``[B, 3, S, S]`` normalised detector input (in :attr:`dtype`)."""
        return resize_squash(images, self.image_size, self.mean, self.std).to(self.dtype)

    def tokens(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``input_ids`` and ``attention_mask`` ``[n, L]`` (padded to the text tower's length) on :attr:`device`."""
        batch = self.tokenizer(list(texts), padding="max_length", truncation=True, max_length=self.text_length,
                               return_tensors="pt")
        return batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)

    def text_embeddings(self, texts: Sequence[str]) -> torch.Tensor:
        """L2-normalised projected text embeddings ``[n, D]`` (float32)."""
        ids, mask = self.tokens(texts)
        return F.normalize(pooled(self.model.owlvit.get_text_features(input_ids=ids, attention_mask=mask)).float(),
                           dim=-1)

    def crop_embeddings(self, image: torch.Tensor, boxes: Sequence[Sequence[float]]) -> torch.Tensor:
        """L2-normalised projected image embeddings ``[n, D]`` of the box crops of ``image`` ``[H, W, C]``."""
        height, width = image.shape[:2]
        crops = []
        for box in boxes:
            x0, y0, x1, y1 = crop_bounds(box, height, width)
            crops.append(resize_shortest_and_center_crop(image[None, y0:y1, x0:x1], self.image_size,
                                                         self.mean, self.std))
        out = []
        for start in range(0, len(crops), self.crop_batch):
            chunk = torch.cat(crops[start:start + self.crop_batch]).to(self.device, self.dtype)
            out.append(pooled(self.model.owlvit.get_image_features(pixel_values=chunk)).float())
        return F.normalize(torch.cat(out), dim=-1)

    def color_classifier(self, class_name: str) -> torch.Tensor:
        """``[n_colors, D]``: per colour the normalised mean of the normalised template embeddings."""
        texts = [t.format(color=c, cls=class_name) for c in self.colors for t in self.color_templates]
        emb = self.text_embeddings(texts).view(len(self.colors), len(self.color_templates), -1)
        return F.normalize(emb.mean(dim=1), dim=-1)

    def classify_colors(self, image: torch.Tensor, class_name: str,
                        boxes: Sequence[Sequence[float]]) -> list[str]:
        """The colour (one of :attr:`colors`) of each box of ``image`` ``[H, W, C]``."""
        if not boxes:
            return []
        logits = self.crop_embeddings(image, boxes) @ self.color_classifier(class_name).T
        return [self.colors[i] for i in logits.argmax(dim=-1).tolist()]

    def detect(self, images: torch.Tensor, classes: list[list[str]],
               color_classes: Optional[list[set[str]]] = None) -> list[list[Detection]]:
        """Detections per image of the named ``classes`` (module docstring); colours for the detections whose class
        is in ``color_classes[i]`` (every class when ``None``)."""
        batch, height, width = images.shape[:3]
        most = max((len(c) for c in classes), default=0)
        if most == 0:
            return [[] for _ in range(batch)]
        # queries [B * most, L]; an image with fewer classes is padded with queries whose first token is 0,
        # which OWL-ViT masks out (and whose columns are dropped below)
        texts = [self.query_template.format(c) for names in classes for c in list(names) + [""] * (most - len(names))]
        ids, mask = self.tokens(texts)
        pad = torch.tensor([j >= len(names) for names in classes for j in range(most)], device=ids.device)
        ids[pad, 0] = 0
        images = images.to(self.device)
        out = self.model(input_ids=ids, pixel_values=self.pixels(images), attention_mask=mask)
        scale = torch.tensor([width, height, width, height], dtype=torch.float32, device=images.device)
        results = []
        for i, names in enumerate(classes):
            if not names:
                results.append([])
                continue
            best = out.logits[i, :, :len(names)].float().max(dim=-1)
            scores, labels = best.values.sigmoid(), best.indices
            cx, cy, w, h = out.pred_boxes[i].float().unbind(-1)
            boxes = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1).mul(scale)
            boxes = torch.minimum(boxes.clamp(min=0), scale)
            found = []
            for q, name in enumerate(names):
                idx = ((labels == q) & (scores > self.score_threshold)).nonzero().flatten()
                keep = idx[_nms(boxes[idx], scores[idx], self.nms_iou)][:self.max_per_class].tolist()
                kept = [tuple(boxes[k].tolist()) for k in keep]
                wants_color = color_classes is None or name in color_classes[i]
                colors = self.classify_colors(images[i], name, kept) if wants_color else [None] * len(kept)
                found += [Detection(name, float(scores[k]), box, c) for k, box, c in zip(keep, kept, colors)]
            results.append(found)
        return results


class OwlViTGenEvalReward(TorchReward):
    """The GenEval rules over :class:`OwlViTDetector` detections, as one torch module (the OWL-ViT model)."""

    name = "geneval"
    needs_prompt = True

    def __init__(self, detector: OwlViTDetector, rules: GenEvalRules = GenEvalRules(), batch_size: int = 8):
        super().__init__(detector.model, detector.dtype, batch_size)
        self.detector, self.rules = detector, rules

    def _score(self, images: torch.Tensor, prompts: list[str],
               metadata: Optional[Sequence[dict]]) -> RewardResult:
        return super()._score(images, prompts, checked_metadata(metadata))

    def _score_batch(self, images: torch.Tensor, prompts: list[str],
                     metadata: Optional[list[dict]]) -> RewardResult:
        colored = [{r["class"] for r in m.get("include", []) if "color" in r} for m in metadata]
        detections = self.detector.detect(images, [classes_of(m) for m in metadata], colored)
        return evaluate_batch(detections, metadata, self.rules)


def _image_stats(folder: Path) -> dict:
    """The image processor settings: ``preprocessor_config.json`` (hub layout) or the ``image_processor`` entry of
    ``processor_config.json`` (transformers 5 ``save_pretrained``); empty when neither exists."""
    if (folder / "preprocessor_config.json").is_file():
        return read_json(folder / "preprocessor_config.json", "geneval")
    if (folder / "processor_config.json").is_file():
        return read_json(folder / "processor_config.json", "geneval").get("image_processor", {})
    return {}


def load_owlvit(folder: Path | str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                **options: Any) -> OwlViTDetector:
    """An :class:`OwlViTDetector` from a local OWL-ViT folder (never downloads). Raises
    :class:`~.weights.MissingWeightsError` for a missing config, weights or tokenizer file and
    :class:`~.weights.WeightsFormatError` when the folder holds another model or weights that do not fit."""
    transformers = require("transformers", "transformers", "geneval")
    folder = Path(folder)
    config = read_json(find_weights("config.json", [folder], reward="geneval", source=OWLVIT_SOURCE), "geneval")
    if not any((folder / n).is_file() for n in ("model.safetensors", "pytorch_model.bin")):
        raise MissingWeightsError("geneval", "model.safetensors", [folder], OWLVIT_SOURCE)
    if not (folder / "tokenizer.json").is_file():
        for name in ("vocab.json", "merges.txt"):
            find_weights(name, [folder], reward="geneval", source=OWLVIT_SOURCE)
    if config.get("model_type") != "owlvit":
        raise WeightsFormatError(f"reward 'geneval': {folder} holds a {config.get('model_type')!r} model, not "
                                 f"OWL-ViT ('owlvit'); download {OWLVIT_SOURCE} into it")
    try:
        model, info = transformers.OwlViTForObjectDetection.from_pretrained(
            str(folder), local_files_only=True, output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise WeightsFormatError(f"reward 'geneval': cannot load OWL-ViT from {folder}: {e}") from None
    bad = sorted(info.get("missing_keys", ())) + sorted(str(k) for k in info.get("mismatched_keys", ()))
    if bad:
        raise WeightsFormatError(f"reward 'geneval': the weights in {folder} do not fit OWL-ViT ({len(bad)} missing "
                                 f"or mismatched, e.g. {bad[:3]}). Is this the full {OWLVIT_SOURCE} folder?")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    stats = _image_stats(folder)
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return OwlViTDetector(model, tokenizer, mean=stats.get("image_mean", OPENAI_CLIP_MEAN),
                          std=stats.get("image_std", OPENAI_CLIP_STD), dtype=dtype, **options)


def build_owlvit_geneval(weights: Optional[Path], device: torch.device, dtype: torch.dtype,
                         rules: GenEvalRules = GenEvalRules()) -> OwlViTGenEvalReward:
    """The ``geneval`` backend: OWL-ViT from the folder ``weights`` and the GenEval rules."""
    if weights is None:
        raise MissingWeightsError("geneval", "owlvit-base-patch32", [], OWLVIT_SOURCE, kind="dir")
    return OwlViTGenEvalReward(load_owlvit(weights, device, dtype), rules)
