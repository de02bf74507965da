"""OCR text reward (Flow-GRPO's ``ocr`` reward) on RapidOCR's PP-OCR ONNX models, which ship inside the
``rapidocr`` wheel (nothing is downloaded; the engine runs on the CPU through ``onnxruntime``).

For an image sampled for ``prompt``:

1. ``target`` = the text between the first pair of double quotes of the prompt (straight ``"`` or curly ``“ ”``,
   in any mix): ``A sign that says "Hello World"`` -> ``Hello World``;
2. ``rec`` = the concatenation of the recognised strings with confidence > 0 (the engine itself drops lines below
   ``text_score`` = 0.5, PaddleOCR 2.x's ``drop_score`` that Flow-GRPO ran with);
3. both with all whitespace removed and lower-cased;
4. ``d = 0`` if ``target`` is a substring of ``rec``, else ``Levenshtein(rec, target)``; ``d = min(d, |target|)``;
5. **score = 1 - d / |target|**, in ``[0, 1]`` (1: the text is there; 0: nothing of it).

Guards (Flow-GRPO would crash or score 0 through an exception): a prompt without a quoted text, or with an empty
one, scores 0 and says so in ``details["ocr_error"]``; an engine failure scores 0 with the error there too.

``details``: ``ocr_text`` (recognised strings joined by spaces), ``ocr_target`` (the quoted text or ``None``),
``ocr_error`` (``None`` or why the score is 0 without reading the image).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from .base import RewardBackend, RewardResult
from .registry import RewardSpec, require

__all__ = ["OcrReward", "quoted_text", "levenshtein", "ocr_reward", "bundled_engine", "BUNDLED_MODELS", "SPECS"]

_QUOTES = ('"', "\u201c", "\u201d")

#: The det/rec model files the rapidocr 3.x wheel ships in ``rapidocr/models`` (preferred in this order).
BUNDLED_MODELS = {"det": ("PP-OCRv6_det_small.onnx", "ch_PP-OCRv4_det_infer.onnx"),
                  "rec": ("PP-OCRv6_rec_small.onnx", "ch_PP-OCRv4_rec_infer.onnx")}


def quoted_text(prompt: str) -> Optional[str]:
    """The text between the first two quote characters (``"``, ``“`` or ``”``) of ``prompt``; ``None`` when the
    prompt has fewer than two."""
    positions = [i for i, ch in enumerate(prompt) if ch in _QUOTES][:2]
    if len(positions) < 2:
        return None
    return prompt[positions[0] + 1:positions[1]]


def levenshtein(a: str, b: str) -> int:
    """The edit distance (insertions, deletions, substitutions, each cost 1) between ``a`` and ``b``."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        current = [i]
        for j, cb in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def _squash(text: str) -> str:
    return "".join(text.split()).lower()


def ocr_reward(recognised: str, target: str) -> float:
    """Steps 3-5 of the recipe: ``1 - min(d, |t|) / |t|`` on the whitespace-free lower-cased strings, ``d = 0``
    when the target occurs in the recognised text. ``target`` must not be empty after squashing."""
    rec, tgt = _squash(recognised), _squash(target)
    if not tgt:
        raise ValueError("the target text is empty")
    d = 0 if tgt in rec else levenshtein(rec, tgt)
    return 1.0 - min(d, len(tgt)) / len(tgt)


def _bundled_model(folder: Path, kind: str) -> Path:
    for name in BUNDLED_MODELS[kind]:
        if (folder / name).is_file():
            return folder / name
    found = sorted(folder.glob(f"*{kind}*.onnx"))  # only the known files carry their character list (no download)
    raise FileNotFoundError(
        f"reward 'ocr': the bundled {kind} model {BUNDLED_MODELS[kind]} is not in {folder} (found "
        f"{[p.name for p in found]}); the rapidocr "
        "wheel ships its models there. Reinstall it: python -m pip install --force-reinstall rapidocr")


def bundled_engine(text_score: float = 0.5) -> Any:
    """A ``RapidOCR`` engine on the det/rec ONNX files inside the installed wheel, given by explicit path so
    that rapidocr's download-if-missing path is never taken; no angle classifier (Flow-GRPO's
    ``use_angle_cls=False``). Sessions load lazily on the first image."""
    rapidocr = require("rapidocr", "rapidocr onnxruntime", "ocr")
    require("onnxruntime", "onnxruntime", "ocr")
    folder = Path(rapidocr.__file__).resolve().parent / "models"
    params = {"Global.use_cls": False, "Global.text_score": float(text_score), "Global.log_level": "error",
              "Det.model_path": str(_bundled_model(folder, "det")),
              "Rec.model_path": str(_bundled_model(folder, "rec"))}
    return rapidocr.RapidOCR(params=params)


class OcrReward(RewardBackend):
    """The OCR reward (module docstring) with ``engine``: any callable ``engine(bgr_uint8[H, W, 3])`` returning an
    object with ``txts`` and ``scores`` (None or sequences), as ``RapidOCR`` does."""

    name = "ocr"
    needs_prompt = True

    def __init__(self, engine: Any):
        self.engine = engine

    def recognise(self, image: torch.Tensor) -> str:
        """The recognised strings (confidence > 0) of one image ``[H, W, C]`` in ``[0, 1]``, joined by spaces."""
        rgb = (image[..., :3].float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
        output = self.engine(rgb[..., ::-1].copy())  # RapidOCR reads arrays as BGR (OpenCV order)
        texts, scores = getattr(output, "txts", None) or (), getattr(output, "scores", None) or ()
        return " ".join(t for t, s in zip(texts, scores) if s > 0)

    def _score(self, images: torch.Tensor, prompts: list[str],
               metadata: Optional[Sequence[dict]]) -> RewardResult:
        scores, texts, targets, errors = [], [], [], []
        for image, prompt in zip(images, prompts):
            target, text, error, score = quoted_text(prompt), "", None, 0.0
            if target is None or not _squash(target):
                error = (f"no quoted text in the prompt {prompt[:80]!r}" if target is None
                         else "the quoted text of the prompt is empty")
            else:
                try:
                    text = self.recognise(image)
                    score = ocr_reward(text, target)
                except Exception as e:  # an engine failure scores 0 (Flow-GRPO's behaviour) and is reported
                    error = f"OCR engine failed: {type(e).__name__}: {e}"
            scores.append(score)
            texts.append(text)
            targets.append(target)
            errors.append(error)
        return RewardResult(scores=torch.tensor(scores, dtype=torch.float32),
                            details={"ocr_text": texts, "ocr_target": targets, "ocr_error": errors})


def _build(weights: Optional[Path], device: torch.device, dtype: torch.dtype) -> OcrReward:
    return OcrReward(bundled_engine())


SPECS = [RewardSpec(
    name="ocr", build=_build, needs_prompt=True, weights_kind=None,
    description="OCR reward: 1 - edit distance / length between the text quoted in the prompt and the text "
                "RapidOCR reads in the image (0..1; Flow-GRPO's ocr reward). Models ship with the rapidocr wheel.",
    source="pip install rapidocr onnxruntime (PP-OCR ONNX models inside the wheel)")]
