"""FlowGRPO Training Preset in a real ComfyUI: the combo lists the built-ins and the user's preset files, overrides
resolve or fail with a node error, apply_preset replaces a node's widgets, and every preset field is an input of
FlowGRPO GRPO Train with the same kind and a range inside the widget's."""

from __future__ import annotations

import importlib
import json
import uuid
from types import SimpleNamespace

import pytest

pytestmark = pytest.mark.comfy

NODE_ID = "FlowGRPOPreset"
TRAIN_ID = "FlowGRPOTrain"


@pytest.fixture(scope="module")
def mods(flowgrpo_pack):
    package = flowgrpo_pack.package
    return SimpleNamespace(nodes=importlib.import_module(f"{package}.nodes.preset_nodes"),
                           core=importlib.import_module(f"{package}.flowgrpo_core.presets"),
                           state=importlib.import_module(f"{package}.nodes.state"))


@pytest.fixture()
def user_folder(comfy_runtime):
    """models/flowgrpo_presets of the test home; files written there are removed afterwards."""
    folder = comfy_runtime.home / "models" / "flowgrpo_presets"
    folder.mkdir(parents=True, exist_ok=True)
    before = set(folder.rglob("*"))
    yield folder
    for path in sorted(set(folder.rglob("*")) - before, reverse=True):
        path.rmdir() if path.is_dir() else path.unlink()


def _inputs(cls) -> dict:
    info = cls.INPUT_TYPES()
    return {**info.get("required", {}), **info.get("optional", {})}


def _options(comfy_nodes) -> list[str]:
    kind, spec = _inputs(comfy_nodes[NODE_ID])["preset"][:2]
    assert kind == "COMBO"
    return spec["options"]


def _user_preset(family: str = "flux", **values) -> str:
    return json.dumps({"title": "mine", "family": family, "description": "a test preset", "values": values}, indent=2)


# ------------------------------------------------------------------------------------------------ the node
def test_node_lists_the_builtins_and_resolves_overrides(comfy_nodes, run_node, mods):
    builtins = mods.core.builtin_presets()
    options = _options(comfy_nodes)
    assert options[:len(builtins)] == list(builtins)
    assert _inputs(comfy_nodes[NODE_ID])["preset"][1]["default"] in builtins
    assert comfy_nodes[NODE_ID].GET_SCHEMA().outputs[0].io_type == mods.nodes.PRESET

    resolved, text = run_node(NODE_ID, preset="flux_dev_fast",
                              overrides="group_size = 8, prompts_per_iteration = 2  # one GPU\nlearning_rate = 1e-4")
    assert isinstance(resolved, mods.nodes.ResolvedPreset)
    assert (resolved.name, resolved.family) == ("flux_dev_fast", "flux")
    expected = dict(builtins["flux_dev_fast"].values, group_size=8, prompts_per_iteration=2, learning_rate=1e-4)
    assert dict(resolved.values) == expected
    with pytest.raises(TypeError):
        resolved.values["steps"] = 3
    document = json.loads(text)
    assert document["values"] == expected and document["family"] == "flux"
    assert "Overridden: group_size, learning_rate, prompts_per_iteration." in document["description"]


def test_node_output_is_a_loadable_preset_file(run_node, mods, tmp_path):
    resolved, text = run_node(NODE_ID, preset="qwen_image_flowgrpo", overrides="ema_decay = 0.95, ema_every = 4")
    path = tmp_path / "saved.json"
    path.write_text(text)
    loaded = mods.core.load_preset_file(path)
    assert loaded.family == "qwen_image" and dict(loaded.values) == dict(resolved.values)


@pytest.mark.parametrize("overrides, words", [
    ("lerning_rate = 1e-3", ["unknown field 'lerning_rate'", "did you mean 'learning_rate'"]),
    ("steps = 5000", ["steps = 5000 is out of range", "[2, 1000]", "set steps within"]),
    ("group_size = 8\nsde_kind = cps, noise_level = 1.5", ["noise_level 1.5 does not suit sde_kind cps"]),
])
def test_bad_overrides_are_node_errors_naming_the_field_and_the_fix(run_node, mods, overrides, words):
    with pytest.raises(mods.state.NodeInputError) as info:
        run_node(NODE_ID, preset="sd35_medium_flowgrpo", overrides=overrides)
    message = str(info.value)
    assert message.startswith("FlowGRPO Training Preset: ") and ". Fix: " in message
    assert all(w in message for w in words), message


def test_user_preset_files_are_listed_under_user_and_load(comfy_nodes, run_node, mods, user_folder):
    stem = f"mine_{uuid.uuid4().hex[:6]}"
    (user_folder / f"{stem}.json").write_text(_user_preset(steps=12, rank=4, targets="attention"))
    (user_folder / "team").mkdir()
    (user_folder / "team" / f"{stem}.json").write_text(_user_preset("sd3", cfg=3.0))
    # a file named like a built-in does not shadow it
    (user_folder / "tiny_demo.json").write_text(_user_preset("qwen_image", steps=30))
    options = _options(comfy_nodes)
    for name in (f"user/{stem}", f"user/team/{stem}", "user/tiny_demo"):
        assert name in options, options

    resolved, _ = run_node(NODE_ID, preset=f"user/{stem}", overrides="rank = 16")
    assert (resolved.name, resolved.family) == (f"user/{stem}", "flux")
    assert dict(resolved.values) == {"steps": 12, "rank": 16, "targets": "attention"}
    assert dict(run_node(NODE_ID, preset=f"user/team/{stem}", overrides="")[0].values) == {"cfg": 3.0}
    assert dict(run_node(NODE_ID, preset="user/tiny_demo", overrides="")[0].values) == {"steps": 30}
    builtin = run_node(NODE_ID, preset="tiny_demo", overrides="")[0]
    assert builtin.family == "sd3" and dict(builtin.values) == dict(mods.core.builtin_presets()["tiny_demo"].values)


def test_a_changed_user_file_changes_the_fingerprint(comfy_nodes, user_folder):
    node = comfy_nodes[NODE_ID]
    path = user_folder / f"fp_{uuid.uuid4().hex[:6]}.json"
    path.write_text(_user_preset(steps=12))
    name = f"user/{path.stem}"
    first = node.fingerprint_inputs(preset=name, overrides="")
    assert node.fingerprint_inputs(preset=name, overrides="") == first
    path.write_text(_user_preset(steps=14))
    assert node.fingerprint_inputs(preset=name, overrides="") != first


def test_an_invalid_user_file_is_a_node_error_with_its_position(run_node, mods, user_folder):
    text = '{\n  "family": "sd3",\n  "values": {\n    "stepss": 10\n  }\n}\n'
    path = user_folder / f"bad_{uuid.uuid4().hex[:6]}.json"
    path.write_text(text)
    with pytest.raises(mods.state.NodeInputError) as info:
        run_node(NODE_ID, preset=f"user/{path.stem}", overrides="")
    assert f"{path}:4:5: unknown field 'stepss' (did you mean 'steps'?)" in str(info.value)
    with pytest.raises(mods.state.NodeInputError, match="there is no preset 'user/gone'"):
        run_node(NODE_ID, preset="user/gone", overrides="")


# ------------------------------------------------------------------------------------------------ apply_preset
def test_apply_preset_replaces_the_nodes_fields_and_ignores_the_rest(mods):
    preset = mods.nodes.ResolvedPreset("p", "sd3", {"steps": 7, "cfg": 2.0, "ema_decay": 0.9})
    inputs = {"steps": 10, "cfg": 4.5, "seed": 3, "model": object()}
    out = mods.nodes.apply_preset(preset, inputs, node="FlowGRPO Test", family="sd3")
    assert out == dict(inputs, steps=7, cfg=2.0) and "ema_decay" not in out
    assert inputs["steps"] == 10  # a copy
    assert mods.nodes.apply_preset(None, inputs, node="FlowGRPO Test", family="flux") == inputs
    assert mods.nodes.apply_preset(preset, inputs, node="FlowGRPO Test")["steps"] == 7  # no family: no check
    # an optional input a saved workflow left out is still set when the node names its inputs
    named = mods.nodes.apply_preset(preset, inputs, node="FlowGRPO Test", names=[*inputs, "ema_decay"])
    assert named == dict(inputs, steps=7, cfg=2.0, ema_decay=0.9)


def test_apply_preset_refuses_a_preset_for_another_family(mods):
    preset = mods.nodes.ResolvedPreset("flux_dev_fast", "flux", {"steps": 6})
    with pytest.raises(mods.state.NodeInputError) as info:
        mods.nodes.apply_preset(preset, {"steps": 10}, node="FlowGRPO Test", family="qwen_image")
    message = str(info.value)
    assert message.startswith("FlowGRPO Test: preset 'flux_dev_fast' is for FLUX models but this MODEL is Qwen-Image")
    assert "qwen_image_flowgrpo" in message


def test_preset_input_is_an_optional_typed_input_with_a_tooltip(mods):
    spec = mods.nodes.preset_input()
    assert spec.id == "preset" and spec.optional and spec.tooltip
    assert spec.get_io_type() == mods.nodes.PRESET


# ------------------------------------------------------------------------------------------------ schema
_KINDS = {int: "INT", float: "FLOAT", bool: "BOOLEAN", str: "STRING"}


def _mismatch(name, field, spec) -> str | None:
    """Why the preset field ``name`` does not fit the train node's input ``spec`` (None when it fits)."""
    kind, options = spec[0], spec[1] if len(spec) > 1 else {}
    if field.choices is not None:
        widget = kind if isinstance(kind, list) else options.get("options") if kind == "COMBO" else None
        if widget is None:
            return f"{name}: the node input is {kind}, the preset field a choice"
        extra = set(field.choices) - set(widget)
        return f"{name}: choices {sorted(extra)} are not node options {widget}" if extra else None
    if kind != _KINDS[field.kind]:
        return f"{name}: the node input is {kind}, the preset field {_KINDS[field.kind]}"
    if field.kind in (int, float):
        low, high = options.get("min"), options.get("max")
        if low is None or high is None or field.low < low or field.high > high:
            return f"{name}: preset range [{field.low}, {field.high}] is not inside the widget's [{low}, {high}]"
    return None


def test_every_preset_field_is_a_train_input_of_the_same_kind_and_range(comfy_nodes, mods):
    inputs = _inputs(comfy_nodes[TRAIN_ID])
    missing = [name for name in mods.core.FIELDS if name not in inputs]
    assert not missing, f"preset fields that FlowGRPO GRPO Train does not have: {missing}"
    problems = [p for name, field in mods.core.FIELDS.items() if (p := _mismatch(name, field, inputs[name]))]
    assert not problems, problems
