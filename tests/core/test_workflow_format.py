"""Workflow files without ComfyUI: loading, UI -> API conversion, validation, overrides, API -> UI, run output.

The reference is ``fixtures/frontend_workflow.json``: a workflow built and saved by the real ComfyUI frontend
(1.32.9 on ComfyUI 0.3.75), the API prompt that frontend exported for it, and the ``/object_info`` of its classes.
"""

from __future__ import annotations

import copy
import io
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

from flowgrpo import ui_export  # noqa: E402
from flowgrpo.report import Reporter, format_metrics  # noqa: E402
from flowgrpo.workflow import (  # noqa: E402
    UnknownNodeTypes, WorkflowError, api_to_ui, apply_overrides, complete_api, find_node, is_api_format,
    is_ui_format, load_workflow, ui_to_api, validate_api,
)

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "frontend_workflow.json").read_text())
INFO, UI, API = FIXTURE["object_info"], FIXTURE["ui"], FIXTURE["api"]


def ui_copy() -> dict:
    return copy.deepcopy(UI)


def ui_node(ui: dict, node_id: int) -> dict:
    return next(n for n in ui["nodes"] if n["id"] == node_id)


def ids_of(ui: dict, node_type: str) -> list:
    return [n["id"] for n in ui["nodes"] if n["type"] == node_type]


# ------------------------------------------------------------------------------------------------ UI -> API
def test_conversion_matches_the_frontends_own_export():
    assert ui_to_api(UI, INFO) == API


def test_ui_only_nodes_and_muted_nodes_are_left_out():
    api = ui_to_api(UI, INFO)
    classes = {n["class_type"] for n in api.values()}
    assert not classes & {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
    muted = [n["id"] for n in UI["nodes"] if n.get("mode") == 2]
    bypassed = [n["id"] for n in UI["nodes"] if n.get("mode") == 4]
    assert muted and bypassed
    assert not {str(i) for i in muted + bypassed} & set(api)


def test_muting_a_node_drops_it_and_the_inputs_it_fed():
    ui = ui_copy()
    (ksampler,) = ids_of(ui, "KSampler")
    ui_node(ui, ksampler)["mode"] = 2
    api = ui_to_api(ui, INFO)
    assert str(ksampler) not in api
    decode = next(i for i, n in api.items() if n["class_type"] == "VAEDecode")
    assert "samples" not in api[decode]["inputs"] and api[decode]["inputs"]["vae"] == API[decode]["inputs"]["vae"]


def test_a_bypassed_node_passes_its_input_through_and_unbypassing_restores_it():
    ui = ui_copy()
    (sampling,) = ids_of(ui, "ModelSamplingSD3")
    (unet,) = ids_of(ui, "UNETLoader")
    (ksampler,) = ids_of(ui, "KSampler")
    assert API[str(ksampler)]["inputs"]["model"] == [str(unet), 0]
    ui_node(ui, sampling)["mode"] = 0
    api = ui_to_api(ui, INFO)
    assert api[str(ksampler)]["inputs"]["model"] == [str(sampling), 0]
    assert api[str(sampling)]["inputs"] == {"shift": ui_node(ui, sampling)["widgets_values"][0],
                                            "model": [str(unet), 0]}


def test_a_bypassed_node_with_two_fitting_inputs_prefers_the_one_at_the_output_slot():
    ui = ui_copy()
    (combine,) = ids_of(ui, "ConditioningCombine")
    (ksampler,) = ids_of(ui, "KSampler")
    node = ui_node(ui, combine)
    sources = {}
    for slot in node["inputs"]:
        link = next(lk for lk in ui["links"] if lk[0] == slot["link"])
        sources[slot["name"]] = [str(link[1]), link[2]]
    assert API[str(ksampler)]["inputs"]["positive"] == sources["conditioning_1"]
    # fed from a second output slot of the same type: the input at index 1 is passed through
    node["outputs"].append({"name": "CONDITIONING", "type": "CONDITIONING", "links": []})
    link = next(lk for lk in ui["links"] if lk[1] == combine and lk[3] == ksampler)
    link[2] = 1
    assert ui_to_api(ui, INFO)[str(ksampler)]["inputs"]["positive"] == sources["conditioning_2"]
    link[2] = 0
    node["inputs"][0]["link"] = None  # unlinked: the other input of the same type is passed through
    assert ui_to_api(ui, INFO)[str(ksampler)]["inputs"]["positive"] == sources["conditioning_2"]


def test_a_chain_of_reroutes_is_followed():
    ui = ui_copy()
    (reroute,) = ids_of(ui, "Reroute")
    (clip,) = ids_of(ui, "CLIPLoader")
    out_links = [lk for lk in ui["links"] if lk[1] == reroute]
    new_id, new_link = 999, 998
    ui["nodes"].append({"id": new_id, "type": "Reroute", "mode": 0, "inputs": [{"name": "", "type": "*",
                        "link": new_link}], "outputs": [{"name": "", "type": "CLIP", "links": [out_links[0][0]]}],
                        "properties": {}})
    ui["links"].append([new_link, reroute, 0, new_id, 0, "*"])
    out_links[0][1] = new_id
    api = ui_to_api(ui, INFO)
    consumer = str(out_links[0][3])
    assert api[consumer]["inputs"]["clip"] == [str(clip), 0]


def test_a_primitive_node_value_goes_into_the_input_it_feeds():
    ui = ui_copy()
    (primitive,) = ids_of(ui, "PrimitiveNode")
    (ksampler,) = ids_of(ui, "KSampler")
    ui_node(ui, primitive)["widgets_values"][0] = 11
    api = ui_to_api(ui, INFO)
    assert api[str(ksampler)]["inputs"]["steps"] == 11
    assert ui_node(ui, ksampler)["widgets_values"][2] != 11  # the widget's own value is not used


def test_widget_values_saved_without_a_control_value_still_line_up():
    ui = ui_copy()
    (ksampler,) = ids_of(ui, "KSampler")
    values = ui_node(ui, ksampler)["widgets_values"]
    assert values[1] in ("fixed", "randomize", "increment", "decrement")
    del values[1]  # what older frontends saved
    assert ui_to_api(ui, INFO) == API


def test_missing_widget_values_fall_back_to_the_schema_default():
    ui = ui_copy()
    (ksampler,) = ids_of(ui, "KSampler")
    ui_node(ui, ksampler)["widgets_values"] = ui_node(ui, ksampler)["widgets_values"][:5]  # denoise missing
    api = ui_to_api(ui, INFO)
    assert api[str(ksampler)]["inputs"]["denoise"] == INFO["KSampler"]["input"]["required"]["denoise"][1]["default"]


def test_titles_become_meta_titles_and_default_to_the_display_name():
    api = ui_to_api(UI, INFO)
    titled = [n for n in UI["nodes"] if n.get("title") and n["type"] in INFO]
    assert titled
    for n in titled:
        assert api[str(n["id"])]["_meta"]["title"] == n["title"]
    (unet,) = ids_of(UI, "UNETLoader")
    assert api[str(unet)]["_meta"]["title"] == INFO["UNETLoader"]["display_name"]


def test_unknown_node_types_are_listed_with_their_node_ids():
    ui = ui_copy()
    (decode,) = ids_of(ui, "VAEDecode")
    ui_node(ui, decode)["type"] = "SomePackNode"
    with pytest.raises(UnknownNodeTypes, match=rf"SomePackNode \(node {decode}\).*Install the pack") as e:
        ui_to_api(ui, INFO)
    assert e.value.missing == ["SomePackNode"]
    ui_node(ui, decode)["mode"] = 2  # a muted unknown node does not matter
    assert str(decode) not in ui_to_api(ui, INFO)


def test_subgraphs_are_refused_with_a_way_out():
    ui = ui_copy()
    ui["definitions"] = {"subgraphs": [{"id": "00000000-0000-0000-0000-000000000000", "nodes": []}]}
    with pytest.raises(WorkflowError, match="Unpack Subgraph"):
        ui_to_api(ui, INFO)


def test_list_values_are_wrapped_so_they_are_not_read_as_links():
    info = {"Lists": {"input": {"required": {"values": ["STRING", {}], "mode": [["a", "b"]]}},
                      "output": [], "output_node": True, "display_name": "Lists"}}
    ui = {"nodes": [{"id": 1, "type": "Lists", "mode": 0, "inputs": [], "outputs": [],
                     "widgets_values": [[1, 2], "b"]}], "links": [], "version": 0.4}
    api = ui_to_api(ui, info)
    assert api["1"]["inputs"] == {"values": {"__value__": [1, 2]}, "mode": "b"}
    assert validate_api(api, info) == []
    assert api_to_ui(api, info)["nodes"][0]["widgets_values"] == [[1, 2], "b"]


def test_an_explicit_control_after_generate_false_means_no_control_value():
    info = {"Seeded": {"input": {"required": {"seed": ["INT", {"control_after_generate": False}],
                                              "noise_seed": ["INT", {}], "steps": ["INT", {}]}},
                       "output": [], "output_node": True}}
    ui = {"nodes": [{"id": 1, "type": "Seeded", "mode": 0, "widgets_values": [5, 6, "fixed", 7]}], "links": []}
    assert ui_to_api(ui, info)["1"]["inputs"] == {"seed": 5, "noise_seed": 6, "steps": 7}


# ------------------------------------------------------------------------------------------------ loading
def test_load_workflow_reports_bad_files_clearly(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "1": {"class_type": "X",\n  "inputs": {}\n')
    with pytest.raises(WorkflowError, match=r"bad\.json: not valid JSON: .* line 4, column 1"):
        load_workflow(bad)
    empty = tmp_path / "empty.json"
    empty.write_text("  \n")
    with pytest.raises(WorkflowError, match="empty.json: the file is empty"):
        load_workflow(empty)
    other = tmp_path / "other.json"
    other.write_text('{"name": "not a workflow"}')
    with pytest.raises(WorkflowError, match="not a ComfyUI workflow"):
        load_workflow(other)
    with pytest.raises(WorkflowError, match="no such file"):
        load_workflow(tmp_path / "missing.json")


def test_load_workflow_reads_both_formats_and_unwraps_a_prompt_payload(tmp_path):
    (tmp_path / "ui.json").write_text(json.dumps(UI))
    (tmp_path / "api.json").write_text(json.dumps(API))
    (tmp_path / "payload.json").write_text(json.dumps({"prompt": API, "client_id": "x"}))
    assert is_ui_format(load_workflow(tmp_path / "ui.json")) and not is_api_format(UI)
    assert load_workflow(tmp_path / "api.json") == API and is_api_format(API) and not is_ui_format(API)
    assert load_workflow(tmp_path / "payload.json") == API


# ------------------------------------------------------------------------------------------------ validation
def _fixed_api_and_info():
    """The fixture with model names the schema lists and the SaveImage fed by the muted node connected."""
    api, info = copy.deepcopy(API), copy.deepcopy(INFO)
    info["UNETLoader"]["input"]["required"]["unet_name"] = [["m.safetensors"]]
    info["CLIPLoader"]["input"]["required"]["clip_name"] = [["c.safetensors"]]
    by_class = {n["class_type"]: i for i, n in api.items()}
    api[by_class["UNETLoader"]]["inputs"]["unet_name"] = "m.safetensors"
    api[by_class["CLIPLoader"]]["inputs"]["clip_name"] = "c.safetensors"
    inverted = next(i for i, n in api.items() if n["_meta"]["title"] == "Inverted")
    api[inverted]["inputs"]["images"] = [by_class["VAEDecode"], 0]
    return api, info, by_class


def test_validation_finds_the_fixtures_real_problems():
    problems = validate_api(API, INFO)
    inverted = next(i for i, n in API.items() if n["_meta"]["title"] == "Inverted")
    by_class = {n["class_type"]: i for i, n in API.items()}
    assert len(problems) == 3, problems
    assert any(f"node {inverted} (SaveImage, 'Inverted'): required input 'images' is missing" in p for p in problems)
    assert any(f"node {by_class['UNETLoader']} " in p and "unet_name" in p and "not available" in p for p in problems)
    api, info, _ = _fixed_api_and_info()
    assert validate_api(api, info) == []


@pytest.mark.parametrize("change, expected", [
    (lambda a, c: a[c["KSampler"]]["inputs"].update(model=[c["EmptySD3LatentImage"], 0]),
     r"input 'model' \(MODEL\) is linked to output 0 of node \d+ \(EmptySD3LatentImage\), a LATENT"),
    (lambda a, c: a[c["KSampler"]]["inputs"].update(model=["404", 0]), r"linked to node 404, which is not in"),
    (lambda a, c: a[c["KSampler"]]["inputs"].update(model=[c["UNETLoader"], 3]), r"which has 1 outputs"),
    (lambda a, c: a[c["KSampler"]]["inputs"].update(steps=0), r"'steps': 0 is below the minimum 1"),
    (lambda a, c: a[c["KSampler"]]["inputs"].update(steps=2.5), r"'steps': expected an integer"),
    (lambda a, c: a[c["KSampler"]]["inputs"].update(cfg="high"), r"'cfg': expected a number"),
    (lambda a, c: a[c["KSampler"]]["inputs"].update(sampler_name="nope"), r"'nope' is not one of the choices"),
    (lambda a, c: a[c["FlowGRPOSDESampler"]]["inputs"].update(sde_kind="nope"), r"'nope' is not one of"),
    (lambda a, c: a[c["GrowMask"]]["inputs"].update(tapered_corners="yes"), r"expected true or false"),
    (lambda a, c: a[c["KSampler"]]["inputs"].pop("seed"), r"KSampler\): required input 'seed' is missing"),
    (lambda a, c: a[c["KSampler"]]["inputs"].update(seed=[1, 2, 3]), r"a list must be a link"),
    (lambda a, c: a[c["KSampler"]].update(class_type="KSamplerPlus"), r"KSamplerPlus \(node \d+\)"),
])
def test_validation_catches_each_kind_of_problem(change, expected):
    api, info, by_class = _fixed_api_and_info()
    change(api, by_class)
    problems = validate_api(api, info)
    assert len(problems) == 1 and __import__("re").search(expected, problems[0]), problems


def test_validation_wants_an_output_node_and_accepts_wildcards():
    api, info, by_class = _fixed_api_and_info()
    only_loaders = {i: n for i, n in api.items() if n["class_type"] in ("UNETLoader", "CLIPLoader")}
    assert validate_api(only_loaders, info) == ["the workflow has no output node (e.g. SaveImage, PreviewImage, "
                                                "or a FlowGRPO training node), so ComfyUI would run nothing"]
    info["MaskPreview"]["input"]["required"]["mask"] = ["*", {}]
    api[by_class["MaskPreview"]]["inputs"]["mask"] = [by_class["VAEDecode"], 0]
    assert validate_api(api, info) == []


# ------------------------------------------------------------------------------------------------ overrides
def test_overrides_by_id_title_and_class_with_json_values():
    by_class = {n["class_type"]: i for i, n in API.items() if n["class_type"] != "CLIPTextEncode"}
    out = apply_overrides(API, [f"{by_class['KSampler']}.steps=5", "Negative.text=a cat", "KSampler.cfg=2.5",
                                "RandomNoise.noise_seed=\"12\"", "GrowMask.tapered_corners=false"], INFO)
    ks = out[by_class["KSampler"]]["inputs"]
    assert ks["steps"] == 5 and ks["cfg"] == 2.5
    assert out[find_node(API, "Negative")]["inputs"]["text"] == "a cat"
    assert out[by_class["RandomNoise"]]["inputs"]["noise_seed"] == "12"
    assert out[by_class["GrowMask"]]["inputs"]["tapered_corners"] is False
    assert API[by_class["KSampler"]]["inputs"]["steps"] != 5  # the input prompt is not modified


def test_overrides_reject_ambiguous_unknown_and_malformed_targets():
    with pytest.raises(WorkflowError, match="names several nodes"):
        apply_overrides(API, ["SaveImage.filename_prefix=x"], INFO)
    with pytest.raises(WorkflowError, match=r"has no input 'stepz'; its inputs are: model, seed, steps"):
        apply_overrides(API, ["KSampler.stepz=3"], INFO)
    with pytest.raises(WorkflowError, match="no node with id, title or class 'Nope'"):
        apply_overrides(API, ["Nope.steps=3"], INFO)
    with pytest.raises(WorkflowError, match="expected NODE.INPUT=VALUE"):
        apply_overrides(API, ["KSampler steps 3"], INFO)


# ------------------------------------------------------------------------------------------------ API -> UI
def test_api_to_ui_converts_back_to_the_same_prompt():
    ui = api_to_ui(API, INFO, note="about")
    assert is_ui_format(ui) and ui["version"] == 0.4
    assert ui_to_api(ui, INFO) == API
    notes = [n for n in ui["nodes"] if n["type"] == "MarkdownNote"]
    assert len(notes) == 1 and notes[0]["widgets_values"] == ["about"]
    link_ids = [lk[0] for lk in ui["links"]]
    assert len(set(link_ids)) == len(link_ids) == ui["last_link_id"]


def assert_links_flow_forward(ui: dict) -> None:
    """Each link goes right within a band or down to a later band; nothing ends right of BAND_WIDTH."""
    box = {n["id"]: (n["pos"], n["size"]) for n in ui["nodes"] if n["type"] != "MarkdownNote"}
    assert ui["links"] and max(p[0] + s[0] for p, s in box.values()) <= ui_export.BAND_WIDTH
    for _link_id, src, _slot, dst, _dst_slot, _type in ui["links"]:
        (sx, sy), (_, sh) = box[src]
        (dx, dy), _ = box[dst]
        assert (sx < dx and dy < sy + sh) or dy > sy + sh, (src, dst)


def test_api_to_ui_lays_out_left_to_right_and_keeps_given_positions():
    assert_links_flow_forward(api_to_ui(API, INFO))
    chain = {"1": API[next(i for i, n in API.items() if n["class_type"] == "UNETLoader")]}
    for i in range(2, 12):  # a chain of 11 columns is wider than one band
        chain[str(i)] = {"class_type": "ModelSamplingSD3", "inputs": {"model": [str(i - 1), 0], "shift": 3.0},
                         "_meta": {"title": f"shift {i}"}}
    wide = api_to_ui(chain, INFO)
    assert_links_flow_forward(wide)
    assert len({n["pos"][1] for n in wide["nodes"]}) > 1
    ks = next(i for i, n in API.items() if n["class_type"] == "KSampler")
    placed = api_to_ui(API, INFO, layout={ks: [-500, 42]})
    assert next(n["pos"] for n in placed["nodes"] if n["id"] == int(ks)) == [-500, 42]


def test_api_to_ui_fills_defaults_and_needs_integer_ids():
    by_class = {n["class_type"]: i for i, n in API.items()}
    partial = copy.deepcopy(API)
    del partial[by_class["KSampler"]]["inputs"]["denoise"]
    del partial[by_class["KSampler"]]["_meta"]
    full = complete_api(partial, INFO)
    assert full[by_class["KSampler"]]["inputs"]["denoise"] == 1.0
    assert full[by_class["KSampler"]]["_meta"]["title"] == "KSampler"
    assert ui_to_api(api_to_ui(partial, INFO), INFO) == full != partial
    with pytest.raises(ValueError, match="integer node ids"):
        api_to_ui({"a": API[by_class["VAELoader"]]}, INFO)


# ------------------------------------------------------------------------------------------------ run output
def test_metrics_line_format():
    line = format_metrics({"node": "12", "iteration": 3, "iterations": 20, "reward_mean": 0.41234,
                           "reward_std": 0.05101, "approx_kl": 0.00012, "clipfrac": 0.0, "ratio_max": 1.0,
                           "grad_norm": 0.0123, "note": "x"})
    assert line == "iter   3/20  reward 0.4123 ± 0.0510  approx_kl 1.20e-04  clipfrac 0.000  grad_norm 0.0123"
    assert format_metrics({"iteration": 12, "iterations": 150, "reward_mean": 1.0}).startswith("iter  12/150  reward")


def test_reporter_prints_progress_events_and_the_result_summary(tmp_path):
    out, now = io.StringIO(), [0.0]
    rep = Reporter(out, {"7": "KSampler"}, tmp_path, clock=lambda: now[0])
    rep("execution_start", {"prompt_id": "p"})
    rep("execution_cached", {"nodes": ["1", "2"], "prompt_id": "p"})
    rep("executing", {"node": "7", "prompt_id": "p"})
    rep("executing", {"node": "7.0.1", "display_node": "7", "prompt_id": "p"})  # expanded by node 7: no new line
    for value in range(1, 11):
        now[0] += 0.3
        rep("progress", {"value": value, "max": 10, "node": "7", "prompt_id": "p"})
    rep("flowgrpo.metrics", {"iteration": 1, "iterations": 2, "reward_mean": 0.5, "reward_std": 0.25})
    rep("flowgrpo.checkpoint", {"iteration": 1, "lora_path": "/l.safetensors", "state_path": "/s.pt"})
    rep("flowgrpo.result", {"lora_path": "/l.safetensors", "reward_curve_path": "/curve.png"})
    rep("executed", {"node": "9", "output": {"images": [{"filename": "a.png", "subfolder": "x", "type": "output"}]}})
    rep("executed", {"node": "8", "output": {"latents": [{"filename": "b.latent", "subfolder": "", "type": "temp"}],
                                             "text": ["not a file"]}})
    rep("execution_success", {"prompt_id": "p"})
    lines = out.getvalue().splitlines()
    progress = [ln for ln in lines if ln.startswith("  progress ")]
    assert progress[0].startswith("  progress 1/10") and progress[-1].startswith("  progress 10/10")
    assert 2 < len(progress) < 10  # throttled to about one a second
    assert "cached: 2 nodes (1, 2)" in lines and lines.count("running node 7 KSampler") == 1
    assert "iter   1/2  reward 0.5000 ± 0.2500" in lines
    assert "checkpoint at iteration 1: /l.safetensors (state /s.pt)" in lines
    assert f"  saved {tmp_path / 'x' / 'a.png'}" in lines and "  saved b.latent (temp)" in lines
    assert lines[-1] == "finished in 3.0 s"
    assert rep.summary() == ["LoRA: /l.safetensors", "Reward curve: /curve.png"]
