"""Training presets: named sets of FlowGRPO GRPO Train settings per model, loaded from JSON and validated.

Conventions:

* :data:`FIELDS` is the schema: every field is an input of the ``FlowGRPO GRPO Train`` node with the same name,
  kind (int, float, bool, a string with fixed ``choices``, or free text) and a range inside the node widget's;
* a preset sets any subset of the fields; the node keeps its own widget value for the fields a preset leaves out;
* a preset file is one JSON object::

      {"title": "...", "family": "flux", "description": "...", "source": "...",
       "values": {"steps": 10, "sde_kind": "flow_sde", ...}}

  ``family`` and ``values`` are required; ``family`` is the ComfyUI model config class in snake case, as
  ``nodes.lora_targets.model_family`` names it (``sd3``, ``flux``, ``flux2``, ``qwen_image``, ``z_image``,
  ``wan22_t2v``, ...); the preset's name is the file's stem (or what the caller passes);
* overrides are text, one ``field = value`` per line or several separated by commas; ``#`` starts a comment;
  values are parsed by the field's type (``1e-4``, ``true``/``false``/``yes``/``no``/``1``/``0``, strings bare or
  quoted with ``"..."`` (JSON escapes) or ``'...'``); nothing is evaluated;
* after the per-field checks, the values are checked together (:func:`check_consistency`): the noise level against
  the SDE kind and the step plan against the step count (with :mod:`.sde` and :mod:`.windows`, the code the rollout
  runs), the optimizer steps against the micro-batches of one iteration, and an evaluation period against the
  evaluation steps. A check needs all of its fields; with one missing it is left to the node, which sees the full set.

Every error is a :class:`PresetError` with ``problem`` and ``fix`` (a node phrases it as
``"<node>: <problem>. Fix: <fix>"``); file errors start with ``path:line:column``.
"""

from __future__ import annotations

import difflib
import functools
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping, Optional

from .grpo import STD_MODES
from .rewards.simple import SIMPLE_REWARDS
from .sde import SDE_KINDS, check_noise_level
from .windows import STEP_MODES, StepSelection, select_steps

__all__ = ["FAMILY_PATTERN", "LORA_TARGETS", "FIELDS", "Field", "PresetError", "Preset", "PRESET_DIR", "validate_values",
           "check_consistency", "load_preset_file", "builtin_presets", "parse_overrides", "resolve"]

#: a model family name: a ComfyUI model config class in snake case (``nodes.lora_targets.model_family``)
FAMILY_PATTERN = re.compile(r"[a-z][a-z0-9_]*")
#: LoRA target groups (``nodes.lora_targets.LORA_TARGETS``; the core does not import the nodes)
LORA_TARGETS = ("attention", "attention_mlp")
#: the built-in preset files
PRESET_DIR = Path(__file__).resolve().parent / "preset_files"

_FILE_KEYS = ("title", "family", "description", "source", "values")
_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")
_INT_RE = re.compile(r"[+-]?\d+")


class PresetError(ValueError):
    """A bad preset file, field value or override; ``problem`` says what is wrong, ``fix`` how to fix it."""

    def __init__(self, problem: str, fix: str) -> None:
        super().__init__(f"{problem}. Fix: {fix}")
        self.problem = problem
        self.fix = fix

    def prefixed(self, where: str) -> "PresetError":
        return PresetError(f"{where}: {self.problem}", self.fix)


def _check_family(family: str, where: str) -> None:
    if not FAMILY_PATTERN.fullmatch(family):
        raise PresetError(f"{where}: family {family!r} is not a model family name (lower case letters, digits and "
                          "_, e.g. flux, qwen_image, wan22_t2v)",
                          "set family to the ComfyUI model class the preset is for, in snake case (FlowGRPO LoRA "
                          "Init logs the name of a connected MODEL's family)")


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else f"{x:g}"


@dataclass(frozen=True)
class Field:
    """One preset field: ``kind`` is ``int``, ``float``, ``bool`` or ``str``; ``low``/``high`` bound numbers
    (inclusive), ``choices`` restricts a string."""

    kind: type
    doc: str
    low: Optional[float] = None
    high: Optional[float] = None
    choices: Optional[tuple[str, ...]] = None

    def allowed(self) -> str:
        """What the field takes, in words (for error messages and the docs)."""
        if self.kind is bool:
            return "true or false"
        if self.choices is not None:
            return "one of " + ", ".join(self.choices)
        if self.kind is str:
            return "a string"
        what = "an integer" if self.kind is int else "a number"
        return f"{what} in [{_number(self.low)}, {_number(self.high)}]"

    def check(self, name: str, value: Any) -> Any:
        """``value`` as this field's type (an int is accepted for a float); PresetError when the type or range is
        wrong."""
        bad_type = PresetError(f"{name} = {value!r} has the wrong type: {name} takes {self.allowed()}",
                               f"give {name} {self.allowed()}")
        if self.kind is bool:
            if not isinstance(value, bool):
                raise bad_type
            return value
        if self.kind is str:
            if not isinstance(value, str):
                raise bad_type
            if self.choices is not None and value not in self.choices:
                hint = difflib.get_close_matches(value, self.choices, n=1)
                raise PresetError(f"{name} = {value!r} is not {self.allowed()}"
                                  + (f" (did you mean {hint[0]!r}?)" if hint else ""),
                                  f"set {name} to {self.allowed()}")
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad_type
        if self.kind is int and not isinstance(value, int):
            raise bad_type
        value = self.kind(value)
        if not (math.isfinite(value) and self.low <= value <= self.high):
            raise PresetError(f"{name} = {_number(value)} is out of range: {name} takes {self.allowed()}",
                              f"set {name} within [{_number(self.low)}, {_number(self.high)}]")
        return value

    def parse(self, name: str, text: str) -> Any:
        """The value of the override text ``text`` (already stripped of blanks), checked."""
        if self.kind is str:
            return self.check(name, _unquote(text))
        bad = PresetError(f"{name} = {text or '(empty)'} is not {self.allowed()}", f"give {name} {self.allowed()}")
        if self.kind is bool:
            word = text.lower()
            if word not in _TRUE + _FALSE:
                raise bad
            return self.check(name, word in _TRUE)
        try:
            number = float(text)
        except ValueError:
            raise bad from None
        if self.kind is int:
            if _INT_RE.fullmatch(text):
                return self.check(name, int(text))
            if not (math.isfinite(number) and number.is_integer()):  # 1e4 is fine, 2.5 is not
                raise bad
            return self.check(name, int(number))
        return self.check(name, number)


def _int(low: int, high: int, doc: str) -> Field:
    return Field(int, doc, low=low, high=high)


def _float(low: float, high: float, doc: str) -> Field:
    return Field(float, doc, low=low, high=high)


def _choice(choices, doc: str) -> Field:
    return Field(str, doc, choices=tuple(choices))


#: field name -> :class:`Field`; names, kinds and ranges follow the FlowGRPO GRPO Train widgets
FIELDS: Mapping[str, Field] = MappingProxyType({
    # sampling
    "steps": _int(2, 1000, "sampling steps of each training rollout"),
    "eval_steps": _int(0, 1000, "ODE steps of the evaluation samples (0: no evaluation)"),
    "shift": _float(0.0, 100.0, "Flow-GRPO sigma-grid shift (0: the model's own schedule)"),
    "sde_kind": _choice((k for k in SDE_KINDS if k != "ode"), "reverse SDE of the stochastic steps"),
    "noise_level": _float(0.0, 5.0, "SDE noise: flow_sde a, dance_sde eta, cps / euler_ancestral eta in [0, 1]"),
    "cfg": _float(1.0, 30.0, "true classifier-free guidance scale (1: off)"),
    "norm_rescale": Field(bool, "Qwen-Image CFG norm rescale"),
    "flux_guidance": _float(0.0, 100.0, "FLUX guidance embedding"),
    "negative_prompt": Field(str, "negative prompt of true CFG"),
    "step_mode": _choice(STEP_MODES, "which steps are stochastic and trained"),
    "train_fraction": _float(0.01, 1.0, "fraction / random_subset: share of the steps trained"),
    "window_size": _int(1, 1000, "window modes: SDE (and trained) steps per window"),
    "window_start": _int(0, 1000, "first step of the window (fixed), of the sweep (sliding) or of the range (random)"),
    "window_end": _int(0, 1000, "random_window: the window lies in [window_start, window_end) (0: N - 1)"),
    "window_shift_every": _int(1, 100000, "sliding_window: iterations per window position"),
    "micro_batch_size": _int(0, 4096, "samples per model forward (0: the whole batch)"),
    "same_noise_per_group": Field(bool, "one initial noise per prompt group (DanceGRPO, MixGRPO)"),
    # batch and images
    "prompts_per_iteration": _int(1, 1024, "distinct prompts (groups) per iteration"),
    "group_size": _int(2, 1024, "images per prompt (the GRPO group)"),
    "width": _int(16, 8192, "image width in pixels"),
    "height": _int(16, 8192, "image height in pixels"),
    "reward": _choice(SIMPLE_REWARDS, "weight-free reward (ignored when a reward model is connected)"),
    # update
    "clip_range": _float(1e-7, 1.0, "PPO ratio clip epsilon"),
    "kl_beta": _float(0.0, 10.0, "weight of the KL to the base model"),
    "adv_clip_max": _float(0.0, 100.0, "advantage clip (0: off)"),
    "max_grad_norm": _float(0.0, 1000.0, "gradient-norm clip (0: off)"),
    "std_mode": _choice(STD_MODES, "advantage std: the whole batch (global) or each group"),
    "optimizer_steps": _int(1, 64, "optimizer steps per update (needs as many micro-batches)"),
    "gradient_checkpointing": Field(bool, "recompute block activations in the backward pass"),
    "ema_decay": _float(0.0, 0.9999, "EMA decay of the LoRA weights (0: off)"),
    "ema_every": _int(1, 10000, "GRPO updates between EMA updates"),
    # LoRA
    "rank": _int(1, 1024, "LoRA rank"),
    "alpha": _float(0.001, 4096.0, "LoRA alpha (scale alpha / rank)"),
    "targets": _choice(LORA_TARGETS, "layers with a LoRA"),
    "learning_rate": _float(1e-8, 1.0, "AdamW learning rate"),
    # run
    "iterations": _int(1, 10**7, "total GRPO updates of the run"),
    "save_every": _int(0, 10**7, "iterations between checkpoints (0: at the end)"),
    "eval_every": _int(0, 10**7, "iterations between evaluations (0: at the end)"),
    "sample_every": _int(0, 10**7, "iterations between saved rollout grids (0: never)"),
})


def _closest_field_hint(name: str) -> str:
    match = difflib.get_close_matches(name, list(FIELDS), n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _unknown_field(name: str) -> PresetError:
    return PresetError(f"unknown field {name!r}{_closest_field_hint(name)}",
                       "use one of the fields " + ", ".join(FIELDS))


def _check_field(name: str, value: Any) -> Any:
    if name not in FIELDS:
        raise _unknown_field(name)
    return FIELDS[name].check(name, value)


def _batch_size(values: Mapping[str, Any]) -> int:
    return values["prompts_per_iteration"] * values["group_size"]


def check_consistency(values: Mapping[str, Any]) -> None:
    """Cross-field checks of (type-checked) ``values``; a check runs only when all of its fields are present."""
    if "sde_kind" in values and "noise_level" in values:
        try:
            check_noise_level(values["sde_kind"], values["noise_level"])
        except ValueError as e:
            raise PresetError(f"noise_level {_number(values['noise_level'])} does not suit sde_kind "
                              f"{values['sde_kind']}: {e}", "lower noise_level or change sde_kind") from None
    _check_step_plan(values)
    if values.get("eval_every") and values.get("eval_steps", 1) == 0:
        raise PresetError(f"eval_every is {values['eval_every']} but eval_steps is 0 (no evaluation)",
                          "set eval_steps (e.g. 40 for SD3.5) or eval_every to 0")
    if all(k in values for k in ("optimizer_steps", "micro_batch_size", "prompts_per_iteration", "group_size")):
        batch, size = _batch_size(values), values["micro_batch_size"] or _batch_size(values)
        micro_batches = -(-batch // size)
        if micro_batches < values["optimizer_steps"]:
            raise PresetError(f"optimizer_steps {values['optimizer_steps']} needs at least as many micro-batches, but "
                              f"{batch} samples per iteration (prompts_per_iteration x group_size) in micro-batches "
                              f"of {size} make {micro_batches}",
                              "lower optimizer_steps or micro_batch_size, or raise the batch")


_PLAN_FIELDS = {
    "fraction": ("train_fraction",),
    "random_subset": ("train_fraction",),
    "fixed_window": ("window_size", "window_start"),
    "random_window": ("window_size", "window_start", "window_end"),
    "sliding_window": ("window_size", "window_start", "window_shift_every"),
}


def _check_step_plan(values: Mapping[str, Any]) -> None:
    """The step plan of iteration 0 with :func:`windows.select_steps`; the random_window range is
    ``[window_start, window_end or steps - 1)`` like the train node's."""
    mode = values.get("step_mode")
    if "steps" not in values or mode is None or not all(k in values for k in _PLAN_FIELDS[mode]):
        return
    steps = values["steps"]
    window_range = None
    if mode == "random_window" and (values["window_start"] or values["window_end"]):
        window_range = (values["window_start"], values["window_end"] or steps - 1)
    try:
        selection = StepSelection(mode=mode, fraction=values.get("train_fraction", 0.99),
                                  window_size=values.get("window_size", 2), window_start=values.get("window_start", 0),
                                  window_range=window_range, iters_per_shift=values.get("window_shift_every", 25))
        select_steps(selection, steps, seed=0, iteration=0)
    except ValueError as e:
        fields = ", ".join(("steps", "step_mode") + _PLAN_FIELDS[mode])
        raise PresetError(f"step_mode {mode} with {steps} steps: {e}", f"adjust {fields}") from None


def validate_values(values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` checked field by field (:data:`FIELDS`) and together (:func:`check_consistency`); returns a new
    dict with floats as ``float``. PresetError on the first problem."""
    checked = {name: _check_field(name, value) for name, value in values.items()}
    check_consistency(checked)
    return checked


@dataclass(frozen=True)
class Preset:
    """A named, validated set of training values for one model family (``values`` is read-only)."""

    name: str
    title: str
    family: str
    description: str
    source: str
    values: Mapping[str, Any]

    def __post_init__(self) -> None:
        _check_family(self.family, "family")
        object.__setattr__(self, "values", MappingProxyType(validate_values(self.values)))


def _position(text: str, key: str, occurrence: int = 0) -> tuple[int, int]:
    """1-based (line, column) of the JSON key ``key`` in ``text`` (its ``occurrence``-th appearance, 0 = the first;
    (1, 1) when not found)."""
    matches = list(re.finditer(re.escape(json.dumps(key)) + r"\s*:", text))
    if len(matches) <= occurrence:
        return 1, 1
    match = matches[occurrence]
    line = text.count("\n", 0, match.start()) + 1
    return line, match.start() - (text.rfind("\n", 0, match.start()) + 1) + 1


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    seen: dict = {}
    for key, value in pairs:
        if key in seen:
            raise _Duplicate(key)
        seen[key] = value
    return seen


class _Duplicate(Exception):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _require_str(data: dict, key: str, default: Optional[str], where) -> str:
    value = data.get(key, default)
    if value is None:
        raise PresetError(f"{where(key)}: the file has no {key!r}", f"add \"{key}\": ... to the top-level object")
    if not isinstance(value, str):
        raise PresetError(f"{where(key)}: {key} must be a string, got {value!r}", f"write {key} as a JSON string")
    return value


def load_preset_file(path: str | Path, name: Optional[str] = None) -> Preset:
    """The :class:`Preset` in the JSON file ``path`` (named ``name``, default the file's stem).

    PresetError, starting with ``path:line:column``, for invalid JSON, a duplicate or unknown key (with the closest
    field name), a missing ``family`` or ``values``, or a value of the wrong type or out of range.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise PresetError(f"{path}: cannot read the preset file ({e})", "check the path and that it is UTF-8 text") \
            from None
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as e:
        raise PresetError(f"{path}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}",
                          "fix the JSON syntax at that position (double quotes, no trailing commas)") from None
    except _Duplicate as e:
        line, col = _position(text, e.key, occurrence=1)
        raise PresetError(f"{path}:{line}:{col}: the key {e.key!r} appears twice", "keep one of them") from None

    def where(key: str) -> str:
        return "{}:{}:{}".format(path, *_position(text, key))

    if not isinstance(data, dict):
        raise PresetError(f"{path}:1:1: a preset file holds one JSON object, got {type(data).__name__}",
                          "write {\"family\": ..., \"values\": {...}}")
    for key in data:
        if key not in _FILE_KEYS:
            hint = difflib.get_close_matches(key, _FILE_KEYS, n=1)
            raise PresetError(f"{where(key)}: unknown top-level key {key!r}"
                              + (f" (did you mean {hint[0]!r}?)" if hint else ""),
                              "the top-level keys are " + ", ".join(_FILE_KEYS) + "; fields go inside \"values\"")
    values = data.get("values")
    if not isinstance(values, dict):
        raise PresetError(f"{where('values') if 'values' in data else path}: \"values\" must be an object of "
                          "field: value pairs", "add \"values\": {\"steps\": 10, ...}")
    family = _require_str(data, "family", None, where)
    _check_family(family, where("family"))
    checked = {}
    for key, value in values.items():
        try:
            checked[key] = _check_field(key, value)
        except PresetError as e:
            raise e.prefixed(where(key)) from None
    name = path.stem if name is None else name
    texts = {key: _require_str(data, key, default, where)
             for key, default in (("title", name), ("description", ""), ("source", ""))}
    try:
        return Preset(name=name, family=family, values=checked, **texts)
    except PresetError as e:  # the fields together
        raise e.prefixed(str(path)) from None


@functools.lru_cache(maxsize=1)
def _builtins() -> Mapping[str, Preset]:
    presets = {p.stem: load_preset_file(p) for p in sorted(PRESET_DIR.glob("*.json"))}
    return MappingProxyType(presets)


def builtin_presets() -> dict[str, Preset]:
    """The presets shipped in ``flowgrpo_core/preset_files/``, by name (the file stem), sorted by name."""
    return dict(_builtins())


# ------------------------------------------------------------------------------------------------ overrides
def _unquote(text: str) -> str:
    """A string override: ``"..."`` with JSON escapes, ``'...'`` literally, else the bare text."""
    if len(text) >= 2 and text[0] == text[-1] == '"':
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise PresetError(f"the string {text} is not a valid double-quoted string ({e.msg})",
                              "escape inner double quotes as \\\" or use single quotes") from None
        return value
    if len(text) >= 2 and text[0] == text[-1] == "'":
        return text[1:-1]
    return text


def _split_line(line: str) -> list[str]:
    """The comma-separated entries of one override line, without its ``#`` comment; quotes protect both."""
    entries, current, quote, escaped = [], [], None, False
    for ch in line:
        if quote is not None:
            current.append(ch)
            if escaped:
                escaped = False
            elif ch == "\\" and quote == '"':
                escaped = True
            elif ch == quote:
                quote = None
        elif ch in "\"'":
            quote = ch
            current.append(ch)
        elif ch == "#":
            break
        elif ch == ",":
            entries.append("".join(current))
            current = []
        else:
            current.append(ch)
    if quote is not None:
        raise PresetError(f"unclosed {quote} quote", f"close the string with {quote}")
    entries.append("".join(current))
    return [e.strip() for e in entries if e.strip()]


def parse_overrides(text: str) -> dict[str, Any]:
    """``{field: value}`` from override text (module docstring); each value checked on its own (not together).

    PresetError naming the line for a missing ``=``, an unknown field (with the closest match), a field set twice,
    or a value of the wrong type or out of range.
    """
    result: dict[str, Any] = {}
    where_set: dict[str, int] = {}
    for number, line in enumerate((text or "").splitlines(), start=1):
        try:
            entries = _split_line(line)
            for entry in entries:
                name, sep, raw = entry.partition("=")
                name, raw = name.strip(), raw.strip()
                if not sep or not name:
                    raise PresetError(f"{entry!r} is not of the form field = value",
                                      "write one field = value per line or separate them with commas")
                if name in where_set:
                    raise PresetError(f"{name} is set twice (lines {where_set[name]} and {number})",
                                      "keep one of them")
                if name not in FIELDS:
                    raise _unknown_field(name)
                result[name] = FIELDS[name].parse(name, raw)
                where_set[name] = number
        except PresetError as e:
            raise e.prefixed(f"overrides line {number}") from None
    return result


def resolve(preset: Preset, overrides_text: str = "") -> dict[str, Any]:
    """``preset``'s values updated by the overrides in ``overrides_text``, checked together."""
    values = dict(preset.values)
    overrides = parse_overrides(overrides_text)
    values.update(overrides)
    try:
        return validate_values(values)
    except PresetError as e:
        raise e.prefixed(f"preset {preset.name} with the overrides {', '.join(overrides) or '(none)'}") from None
