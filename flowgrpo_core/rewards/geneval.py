"""GenEval-style compositional reward: rules over object detections (presence, count, colour, position).

The rules follow GenEval and Flow-GRPO's reward server (``reward-server/gen_eval.py``); the detections come from
any :class:`Detector` (the built-in one is OWL-ViT, :mod:`.geneval_detectors`; a reward server can plug in
Mask2Former, YOLO, ...).

Metadata per image (a line of GenEval's ``evaluation_metadata.jsonl``)::

    {"tag": "color_attr", "include": [{"class": "dog", "count": 1, "color": "red"},
                                      {"class": "cat", "count": 2, "position": ["left of", 0]}],
     "exclude": [{"class": "bird", "count": 1}]}

Detections of a class count when ``score > threshold`` (0.3; 0.9 for the ``counting`` tag), best first, at most 16
per class. Every requirement adds partial credits; **score = mean of the credits**, in ``[0, 1]``:

* count (each include): ``max(0, 1 - |req - found| / req)``;
* colour (include with ``color``): 0 unless the count is exact, else ``max(0, 1 - |req - m| / req)`` with ``m`` the
  found objects whose colour is ``color``;
* position (include with ``position: [relation, j]``): 1 when the count (and colour) are exact, requirement ``j``
  (an earlier include) was fully met, and every found object stands in ``relation`` to every object of ``j``;
  else 0. Relations compare box centres after shrinking the offset by ``0.1 * (size_a + size_b)`` per axis:
  ``left of`` / ``right of`` / ``above`` / ``below`` when the shrunk offset points that way (component > 0.5 of the
  unshrunk offset's length; image y grows downwards);
* exclude: 1 when fewer than ``count`` objects of the class are found, else 0.

``strict`` = 1 only when every requirement is met exactly. Differences from ``gen_eval.py``: counts are clipped at
0 (upstream goes negative for too many objects), a failed position check scores 0 (upstream adds a 0 and a 1),
a wrong count scores 0 for colour and position each (upstream one 0 for both), excludes are scored.

``details``: ``strict`` (1.0/0.0), ``tag``, ``requirements`` (per image a list of dicts: ``rule``, ``class``,
``credit``, ``ok`` and the counts), ``detections`` (per image: ``label``, ``score``, ``box``, ``color``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Protocol, Sequence, runtime_checkable

import torch

from .base import RewardBackend, RewardResult
from .registry import RewardSpec

__all__ = ["GENEVAL_COLORS", "RELATIONS", "Detection", "Detector", "GenEvalRules", "relative_position",
           "check_metadata", "checked_metadata", "classes_of", "evaluate", "evaluate_batch", "detect_and_evaluate",
           "GenEvalReward", "SPECS"]

#: GenEval's colour vocabulary (the zero-shot colour classifier chooses among these).
GENEVAL_COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
RELATIONS = ("left of", "right of", "above", "below")


@dataclass(frozen=True)
class Detection:
    """One detected object: ``box`` ``(x0, y0, x1, y1)`` in pixels of the scored image, ``score`` in [0, 1],
    ``color`` one colour name or ``None`` when not classified."""

    label: str
    score: float
    box: tuple[float, float, float, float]
    color: Optional[str] = None


@runtime_checkable
class Detector(Protocol):
    """``detect(images [B, H, W, C] in [0, 1], classes) -> per image a list of Detection``; ``classes[i]`` are the
    class names to look for in image ``i`` (detections of other classes are ignored by the rules). Detections of
    classes that a prompt wants in a colour must carry ``color``."""

    def detect(self, images: torch.Tensor, classes: list[list[str]]) -> list[list[Detection]]: ...


@dataclass(frozen=True)
class GenEvalRules:
    """Thresholds of the rules: ``score > threshold`` (``counting_threshold`` for the ``counting`` tag), at most
    ``max_objects`` per class, position margin ``position_margin * (size_a + size_b)``."""

    threshold: float = 0.3
    counting_threshold: float = 0.9
    max_objects: int = 16
    position_margin: float = 0.1


def relative_position(box_a: Sequence[float], box_b: Sequence[float], margin: float = 0.1) -> set[str]:
    """The relations (subset of :data:`RELATIONS`) of box ``a`` to box ``b`` (module docstring)."""
    offset, shrunk = [], []
    for axis in (0, 1):
        centre_a = (box_a[axis] + box_a[axis + 2]) / 2
        centre_b = (box_b[axis] + box_b[axis + 2]) / 2
        size = abs(box_a[axis + 2] - box_a[axis]) + abs(box_b[axis + 2] - box_b[axis])
        d = centre_a - centre_b
        offset.append(d)
        shrunk.append(math.copysign(max(abs(d) - margin * size, 0.0), d))
    if all(abs(s) < 1e-3 for s in shrunk):
        return set()
    length = math.hypot(*offset)
    dx, dy = shrunk[0] / length, shrunk[1] / length
    found = {"left of": dx < -0.5, "right of": dx > 0.5, "above": dy < -0.5, "below": dy > 0.5}
    return {name for name, hit in found.items() if hit}


def _fail(index: int, what: str) -> ValueError:
    return ValueError(f"reward 'geneval': the metadata of image {index} {what}. Each image needs its GenEval "
                      "metadata: {'tag': ..., 'include': [{'class': 'dog', 'count': 1, 'color'?: 'red', "
                      "'position'?: ['left of', 0]}], 'exclude'?: [{'class': 'cat', 'count': 1}]} (one line of "
                      "GenEval's evaluation_metadata.jsonl)")


def _count(req: Any, index: int, where: str) -> int:
    count = req.get("count") if isinstance(req, dict) else None
    if not isinstance(req, dict) or not isinstance(req.get("class"), str) or not req["class"]:
        raise _fail(index, f"has an {where} entry without a 'class' name: {req!r}")
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise _fail(index, f"has an {where} entry whose 'count' is not an integer >= 1: {req!r}")
    return count


def check_metadata(metadata: Any, index: int = 0) -> dict:
    """``metadata`` checked (ValueError naming the image and the expected format): ``include`` a non-empty list
    (or ``exclude`` non-empty), counts integers >= 1, positions ``[relation, j]`` with ``j`` an earlier include."""
    if not isinstance(metadata, dict):
        raise _fail(index, f"is missing (got {type(metadata).__name__})")
    include, exclude = metadata.get("include", []), metadata.get("exclude", [])
    if not isinstance(include, list) or not isinstance(exclude, list) or not (include or exclude):
        raise _fail(index, "has no 'include' / 'exclude' lists of requirements")
    for i, req in enumerate(include):
        _count(req, index, "include")
        if "position" in req:
            pos = req["position"]
            if (not isinstance(pos, (list, tuple)) or len(pos) != 2 or pos[0] not in RELATIONS
                    or isinstance(pos[1], bool) or not isinstance(pos[1], int) or not 0 <= pos[1] < i):
                raise _fail(index, f"has a position {pos!r} that is not [one of {list(RELATIONS)}, the index of an "
                                   f"earlier include (< {i})]")
    for req in exclude:
        _count(req, index, "exclude")
    return metadata


def classes_of(metadata: dict) -> list[str]:
    """The class names a prompt's metadata mentions (includes first, no repeats)."""
    names = [r["class"] for r in metadata.get("include", [])] + [r["class"] for r in metadata.get("exclude", [])]
    return list(dict.fromkeys(names))


def _credit(required: int, found: int) -> float:
    return max(0.0, 1.0 - abs(required - found) / required)


def evaluate(detections: Sequence[Detection], metadata: dict,
             rules: GenEvalRules = GenEvalRules()) -> tuple[float, bool, list[dict]]:
    """``(score, strict, requirements)`` of one image's ``detections`` against its checked ``metadata``."""
    threshold = rules.counting_threshold if metadata.get("tag") == "counting" else rules.threshold
    by_class: dict[str, list[Detection]] = {}
    for det in sorted(detections, key=lambda d: -d.score):
        if det.score > threshold and len(by_class.setdefault(det.label, [])) < rules.max_objects:
            by_class[det.label].append(det)
    results: list[dict] = []
    groups: list[Optional[list[Detection]]] = []
    for req in metadata.get("include", []):
        name, need = req["class"], req["count"]
        found = by_class.get(name, [])
        ok = len(found) == need
        results.append({"rule": "count", "class": name, "required": need, "found": len(found),
                        "credit": _credit(need, len(found)), "ok": ok})
        if "color" in req:
            matches = sum(d.color == req["color"] for d in found)
            credit = _credit(need, matches) if ok else 0.0
            ok = ok and matches == need
            results.append({"rule": "color", "class": name, "color": req["color"], "required": need,
                            "found": matches, "credit": credit, "ok": ok})
        if "position" in req:
            relation, j = req["position"]
            target = groups[j]
            ok = ok and target is not None and all(
                relation in relative_position(d.box, t.box, rules.position_margin) for d in found for t in target)
            results.append({"rule": "position", "class": name, "relation": relation, "target": j,
                            "credit": float(ok), "ok": ok})
        groups.append(found if ok else None)
    for req in metadata.get("exclude", []):
        found = len(by_class.get(req["class"], []))
        ok = found < req["count"]
        results.append({"rule": "exclude", "class": req["class"], "limit": req["count"], "found": found,
                        "credit": float(ok), "ok": ok})
    score = sum(r["credit"] for r in results) / len(results)
    return score, all(r["ok"] for r in results), results


def evaluate_batch(detections: Sequence[Sequence[Detection]], metadata: Sequence[dict],
                   rules: GenEvalRules = GenEvalRules()) -> RewardResult:
    """:func:`evaluate` per image as a :class:`RewardResult` (scores and the documented details)."""
    scores, strict, requirements = [], [], []
    for dets, meta in zip(detections, metadata, strict=True):
        score, ok, results = evaluate(dets, meta, rules)
        scores.append(score)
        strict.append(float(ok))
        requirements.append(results)
    return RewardResult(scores=torch.tensor(scores, dtype=torch.float32),
                        details={"strict": strict, "tag": [m.get("tag") for m in metadata],
                                 "requirements": requirements,
                                 "detections": [[{**asdict(d), "box": list(d.box)} for d in dets]
                                                for dets in detections]})


def checked_metadata(metadata: Optional[Sequence[Any]]) -> list[dict]:
    """Every image's metadata checked; ValueError when it is missing altogether."""
    if metadata is None:
        raise ValueError("reward 'geneval' needs GenEval metadata for every image (include/exclude requirements), "
                         "got none. Pass the prompts' metadata (e.g. GenEval's evaluation_metadata.jsonl) with the "
                         "prompts.")
    return [check_metadata(m, i) for i, m in enumerate(metadata)]


def detect_and_evaluate(detector: Detector, images: torch.Tensor, metadata: Sequence[dict],
                        rules: GenEvalRules) -> RewardResult:
    """Runs ``detector`` on ``images`` for the classes of each checked ``metadata`` and applies the rules."""
    detections = detector.detect(images, [classes_of(m) for m in metadata])
    if len(detections) != images.shape[0]:
        raise ValueError(f"reward 'geneval': the detector returned {len(detections)} results for "
                         f"{images.shape[0]} images")
    return evaluate_batch(detections, metadata, rules)


class GenEvalReward(RewardBackend):
    """The GenEval rules over any :class:`Detector` (a plain backend: the detector owns its models)."""

    name = "geneval"
    needs_prompt = True

    def __init__(self, detector: Detector, rules: GenEvalRules = GenEvalRules()):
        if not isinstance(detector, Detector):
            raise TypeError(f"detector must have detect(images, classes), got {type(detector).__name__}")
        self.detector, self.rules = detector, rules

    def _score(self, images: torch.Tensor, prompts: list[str],
               metadata: Optional[Sequence[dict]]) -> RewardResult:
        return detect_and_evaluate(self.detector, images, checked_metadata(metadata), self.rules)


def _build(weights: Optional[Path], device: torch.device, dtype: torch.dtype) -> RewardBackend:
    from .geneval_detectors import build_owlvit_geneval

    return build_owlvit_geneval(weights, device, dtype)


SPECS = [RewardSpec(
    name="geneval", build=_build, needs_prompt=True, weights_kind="dir", default_weights="owlvit-base-patch32",
    description="GenEval-style rules (object count, colour, relative position, exclusions) over OWL-ViT "
                "detections; mean partial credit in [0, 1], details carry the strict 0/1. Needs GenEval metadata "
                "per prompt.",
    source="https://huggingface.co/google/owlvit-base-patch32")]
