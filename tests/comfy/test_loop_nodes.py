"""FlowGRPO Loop Start / Loop End: loops run only in ComfyUI's executor, so the loop tests go through a real server
(under the classic cache, ``--cache-none`` and ``--cache-lru 10``, like ComfyUI's own execution tests), with stock
nodes in the body: ``LoadLatent`` start and step latents, ``LatentAdd`` as the body, ``SaveLatent`` / ``SaveImage``
branches to observe every pass.
"""

from __future__ import annotations

import importlib
import re
import uuid
from types import SimpleNamespace

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

from client import ComfyClient, ComfyError

pytestmark = [pytest.mark.comfy, pytest.mark.server]

#: server flags per cache mode; "classic" (the default) is the session's shared server
CACHE_FLAGS = {"classic": None, "none": ["--cache-none"], "lru": ["--cache-lru", "10"]}
SHAPE = (1, 4, 2, 2)  # a tiny LATENT


# ------------------------------------------------------------------------------------------ servers and files
@pytest.fixture(scope="session")
def cache_mode_servers(comfy_server_factory):
    """A server per non-default cache mode (``--cache-none``, ``--cache-lru 10``), on the shared test home."""
    return {name: comfy_server_factory(flags, name=f"cache-{name}") for name, flags in CACHE_FLAGS.items()
            if flags is not None}


@pytest.fixture(scope="module", params=list(CACHE_FLAGS))
def loop_server(request):
    """The shared server for the classic cache, else this module's server for that cache mode."""
    if CACHE_FLAGS[request.param] is None:
        return request.getfixturevalue("comfy_server")
    return request.getfixturevalue("cache_mode_servers")[request.param]


@pytest.fixture()
def loop_client(loop_server):
    with ComfyClient(loop_server.url) as client:
        yield client


@pytest.fixture(scope="module")
def latents(comfy_home):
    """Nonzero start and step latents as ``.latent`` files in the input folder (for the stock ``LoadLatent``)."""
    generator = torch.Generator().manual_seed(0)
    values = {"start": torch.randn(SHAPE, generator=generator), "step": torch.randn(SHAPE, generator=generator)}
    names = {}
    for key, tensor in values.items():
        names[key] = f"flowgrpo_loop_{key}.latent"
        safetensors.torch.save_file({"latent_tensor": tensor, "latent_format_version_0": torch.tensor([])},
                                    str(comfy_home / "input" / names[key]))
    return SimpleNamespace(names=names, **values)


# ------------------------------------------------------------------------------------------ prompts and outputs
def loop_prompt(latents, iterations, tag, loop_source=("3", 0)):
    """LoadLatent(start) -> Loop Start -> LatentAdd(+ LoadLatent(step)) -> Loop End -> SaveLatent ("6"), with body
    branches SaveLatent of each pass's sum ("7") and SaveImage of EmptyImage(color = iteration) ("9")."""
    return {
        "1": {"class_type": "LoadLatent", "inputs": {"latent": latents.names["start"]}},
        "2": {"class_type": "LoadLatent", "inputs": {"latent": latents.names["step"]}},
        "3": {"class_type": "FlowGRPOLoopStart", "inputs": {"value": ["1", 0], "iterations": iterations}},
        "4": {"class_type": "LatentAdd", "inputs": {"samples1": ["3", 1], "samples2": ["2", 0]}},
        "5": {"class_type": "FlowGRPOLoopEnd", "inputs": {"loop": list(loop_source), "value": ["4", 0]}},
        "6": {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": f"{tag}_final"}},
        "7": {"class_type": "SaveLatent", "inputs": {"samples": ["4", 0], "filename_prefix": f"{tag}_pass"}},
        "8": {"class_type": "EmptyImage", "inputs": {"width": 2, "height": 2, "batch_size": 1, "color": ["3", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": f"{tag}_iteration"}},
    }


def pass_ids(node, passes, end="5"):
    """Ids of ``node``'s copy in each pass: the original, then under ``<Loop End id>.0.0.`` of the previous pass."""
    ids, end_id = [node], end
    for _ in range(1, passes):
        ids.append(f"{end_id}.0.0.{node}")
        end_id = f"{end_id}.0.0.{end}"
    return ids


def saved_file(server, entry, node_id, kind):
    (saved,) = entry["outputs"][node_id][kind]
    return server.output_dir / saved["subfolder"] / saved["filename"]


def saved_latent(server, entry, node_id):
    return safetensors.torch.load_file(str(saved_file(server, entry, node_id, "latents")))["latent_tensor"]


def outputs_of(entry, display_node):
    """Ids of every executed copy of ``display_node`` that reported ui output."""
    return sorted(i for i in entry["outputs"] if entry["meta"][i]["display_node"] == display_node)


# ------------------------------------------------------------------------------------------ tests
def test_object_info_describes_the_loop_nodes(comfy_client):
    info = comfy_client.get_json("/object_info")
    start, end = info["FlowGRPOLoopStart"], info["FlowGRPOLoopEnd"]
    assert start["category"] == end["category"] == "FlowGRPO/loop"
    assert start["output"] == ["FLOWGRPO_LOOP", "*", "INT"]
    assert start["output_name"] == ["loop", "value", "iteration"]
    assert end["output"] == ["*"] and end["input"]["required"]["loop"][0] == "FLOWGRPO_LOOP"
    assert start["input"]["required"]["iterations"][1]["default"] == 10
    assert start["input"]["required"]["iterations"][1]["min"] == 1
    for node in (start, end):
        for group in ("required", "optional"):
            for name, spec in node["input"].get(group, {}).items():
                assert spec[1].get("tooltip"), f"{node['name']}.{name} has no tooltip"


@pytest.mark.parametrize("iterations", [1, 3])
def test_loop_carries_the_value_and_reruns_the_body(loop_server, loop_client, latents, iterations):
    tag = f"loop_{uuid.uuid4().hex[:8]}"
    entry = loop_client.run(loop_prompt(latents, iterations, tag), timeout=120)

    final = saved_latent(loop_server, entry, "6")
    torch.testing.assert_close(final, latents.start + iterations * latents.step)

    # the body branch ran once per pass, under the deterministic copy ids, on the value carried so far
    body_ids = pass_ids("7", iterations)
    assert outputs_of(entry, "7") == sorted(body_ids)
    for done, node_id in enumerate(body_ids, start=1):
        torch.testing.assert_close(saved_latent(loop_server, entry, node_id), latents.start + done * latents.step)
    assert len(list(loop_server.output_dir.glob(f"{tag}_pass_*.latent"))) == iterations

    # the iteration output (a LATENT has no .iteration: the pass index) coloured each pass's image
    image_ids = pass_ids("9", iterations)
    assert outputs_of(entry, "9") == sorted(image_ids)
    blue = [int(np.asarray(Image.open(saved_file(loop_server, entry, i, "images")))[0, 0, 2]) for i in image_ids]
    assert blue == list(range(iterations))


def test_nested_loops_multiply_the_passes(comfy_server, comfy_client, latents):
    """An inner 3-pass loop inside an outer 2-pass loop: 6 additions, the inner body copied per outer pass."""
    tag = f"nested_{uuid.uuid4().hex[:8]}"
    prompt = loop_prompt(latents, 3, tag)
    prompt["10"] = {"class_type": "FlowGRPOLoopStart", "inputs": {"value": ["1", 0], "iterations": 2}}
    prompt["3"]["inputs"]["value"] = ["10", 1]
    prompt["11"] = {"class_type": "FlowGRPOLoopEnd", "inputs": {"loop": ["10", 0], "value": ["5", 0]}}
    prompt["6"]["inputs"]["samples"] = ["11", 0]
    entry = comfy_client.run(prompt, timeout=120)
    torch.testing.assert_close(saved_latent(comfy_server, entry, "6"), latents.start + 6 * latents.step)
    assert len(outputs_of(entry, "7")) == 6
    blue = sorted(int(np.asarray(Image.open(saved_file(comfy_server, entry, i, "images")))[0, 0, 2])
                  for i in outputs_of(entry, "9"))
    assert blue == [0, 0, 1, 1, 2, 2]


def test_loop_end_fed_by_another_output_is_a_clear_error(comfy_client, latents):
    prompt = loop_prompt(latents, 2, f"bad_{uuid.uuid4().hex[:8]}", loop_source=("3", 1))
    with pytest.raises(ComfyError, match=r"FlowGRPO Loop End: the loop input must come from the 'loop' output of a "
                                         r"FlowGRPO Loop Start, got output 1 of FlowGRPOLoopStart\. Fix: connect"):
        comfy_client.run(prompt, timeout=120)
    del prompt["5"]["inputs"]["loop"]  # not connected at all: ComfyUI's validation drops Loop End and what needs it
    comfy_client.run(prompt, timeout=120)
    assert re.search(r"node 5 \(FlowGRPOLoopEnd\): Required input is missing: loop", comfy_client.skipped_outputs or "")


# ------------------------------------------------------------------------------------------ in-process pieces
@pytest.fixture(scope="module")
def mods(flowgrpo_pack):
    pkg = flowgrpo_pack.package
    return SimpleNamespace(loop=importlib.import_module(f"{pkg}.nodes.loop_nodes"),
                           state=importlib.import_module(f"{pkg}.nodes.state"))


def test_iteration_output_is_the_trainer_iteration(mods, run_node):
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    settings = mods.state.LoraSettings(rank=2, alpha=2.0, targets="all", seed=0, learning_rate=0.1, family="sd3")
    trainer = mods.state.TrainerState(base_model=None, patcher=None, lora_params={}, optimizer=optimizer,
                                      settings=settings, iteration=17)
    loop, value, iteration = run_node("FlowGRPOLoopStart", value=trainer, iterations=4, loop_index=2)
    assert value is trainer and iteration == 17
    assert (loop.index, loop.iterations, loop.is_last) == (2, 4, False)
    latent = {"samples": torch.zeros(SHAPE)}
    assert run_node("FlowGRPOLoopStart", value=latent, iterations=4, loop_index=3)[2] == 3
    assert run_node("FlowGRPOLoopStart", value=SimpleNamespace(iteration=True), iterations=2)[2] == 0
    with pytest.raises(mods.state.NodeInputError, match="FlowGRPO Loop Start: loop_index 4 is outside 0..3"):
        run_node("FlowGRPOLoopStart", value=latent, iterations=4, loop_index=4)


def test_loop_body_is_what_depends_on_the_start_and_not_on_the_end(mods, comfy_nodes):
    from comfy_execution.graph import DynamicPrompt
    from comfy_execution.graph_utils import GraphBuilder

    prompt = {
        "1": {"class_type": "EmptyLatentImage", "inputs": {"width": 8, "height": 8, "batch_size": 1}},
        "2": {"class_type": "FlowGRPOLoopStart", "inputs": {"value": ["1", 0], "iterations": 3}},
        "3": {"class_type": "LatentAdd", "inputs": {"samples1": ["2", 1], "samples2": ["1", 0]}},  # body
        "4": {"class_type": "SaveLatent", "inputs": {"samples": ["3", 0], "filename_prefix": "x"}},  # side branch
        "5": {"class_type": "FlowGRPOLoopEnd", "inputs": {"loop": ["2", 0], "value": ["3", 0]}},
        "6": {"class_type": "LatentAdd", "inputs": {"samples1": ["5", 0], "samples2": ["3", 0]}},  # after the loop
    }
    dynprompt = DynamicPrompt(prompt)
    # a node made by some body node's own expansion is not part of the body (its maker's copy expands again)
    dynprompt.add_ephemeral_node("3.0.0.1", {"class_type": "LatentAdd",
                                             "inputs": {"samples1": ["2", 1], "samples2": ["1", 0]}}, "3", "3")
    assert mods.loop.loop_body(dynprompt, "2", "5") == ["2", "3", "4", "5"]

    marker = object()
    GraphBuilder.set_default_prefix("5", 0, 0)  # what the executor sets before running node "5"
    graph, output = mods.loop.next_pass_graph(dynprompt, "2", "5", marker, 1)
    assert sorted(graph) == ["5.0.0.2", "5.0.0.3", "5.0.0.4", "5.0.0.5"] and output == ["5.0.0.5", 0]
    assert graph["5.0.0.2"]["inputs"] == {"value": marker, "iterations": 3, "loop_index": 1}
    assert graph["5.0.0.3"]["inputs"] == {"samples1": ["5.0.0.2", 1], "samples2": ["1", 0]}
    assert graph["5.0.0.5"]["inputs"] == {"loop": ["5.0.0.2", 0], "value": ["5.0.0.3", 0]}
    assert {node["override_display_id"] for node in graph.values()} == {"2", "3", "4", "5"}
