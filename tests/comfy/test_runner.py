"""``python -m flowgrpo`` against a real ComfyUI server: stock graphs on the demo's model files, streamed progress,
errors that name the node, interrupts, ``--set``, convert/validate, and a private server started by the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import safetensors.torch
import torch
from PIL import Image

from flowgrpo.client import ComfyClient, ComfyError
from flowgrpo.demo_models import CONTENT_VERSION, DEMO_FILES, build_demo_models, file_version, save_file
from flowgrpo.graph import Graph
from flowgrpo.workflow import api_to_ui, load_workflow, ui_to_api

pytestmark = [pytest.mark.comfy, pytest.mark.server]

REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = "sd3_tiny_text_to_image"
EXAMPLE_UI = REPO_ROOT / "example_workflows" / f"{EXAMPLE}.json"
EXAMPLE_API = REPO_ROOT / "example_workflows" / "api" / f"{EXAMPLE}.json"


def cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flowgrpo", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, PYTHONUNBUFFERED="1"))


def saved_images(stdout: str, output_dir: Path) -> list[Path]:
    """The files the run reported as ``saved <path relative to the output folder> (output)`` (a remote server)."""
    paths = []
    for line in stdout.splitlines():
        if line.startswith("  saved "):
            rel, kind = line[len("  saved "):].rsplit(" (", 1)
            assert kind == "output)", line
            paths.append(output_dir / rel)
    return paths


def write_json(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj, indent=1))
    return path


@pytest.fixture(scope="module")
def server(comfy_server, demo_model_files):
    """The session server, with the demo's model files in its models folder."""
    return comfy_server


@pytest.fixture(scope="module")
def object_info(server):
    with ComfyClient(server.url) as client:
        return client.object_info()


def test_stock_api_workflow_runs_on_the_demo_models(server, demo_model_files):
    api = load_workflow(EXAMPLE_API)
    loaders = {n["class_type"]: n["inputs"] for n in api.values()}
    assert loaders["UNETLoader"]["unet_name"] == demo_model_files["diffusion_model"]
    assert loaders["CLIPLoader"]["clip_name"] == demo_model_files["text_encoder"]
    assert loaders["VAELoader"]["vae_name"] == demo_model_files["vae"]
    out = cli("run", str(EXAMPLE_API), "--server", server.url, "--set", "KSampler.steps=3",
              "--set", "Save Image.filename_prefix=runner/api")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert any(line.startswith("queued prompt ") for line in lines)
    ksampler = next(i for i, n in api.items() if n["class_type"] == "KSampler")
    assert f"running node {ksampler} KSampler" in lines
    progress = [line for line in lines if line.startswith("  progress ")]
    assert progress and progress[-1].startswith("  progress 3/3")  # --set steps=3 (the file says 8)
    assert not any(line.lstrip().startswith(("{", "[")) for line in lines)  # no raw JSON
    (image_path,) = saved_images(out.stdout, server.output_dir)
    assert image_path.is_file() and "runner" in image_path.parts and image_path.name.startswith("api")
    with Image.open(image_path) as img:
        assert img.size == (128, 128) and img.mode == "RGB"
        colours = img.getcolors(maxcolors=128 * 128)
    assert len(colours) > 100  # the random TAESD decodes to a varied image, not a flat colour


def test_ui_workflow_converts_and_runs(server):
    out = cli("run", str(EXAMPLE_UI), "--server", server.url, "--set", "KSampler.steps=2",
              "--set", "Positive Prompt.text=a blue car", "--set", "Save Image.filename_prefix=runner/ui")
    assert out.returncode == 0, out.stderr
    (image_path,) = saved_images(out.stdout, server.output_dir)
    with Image.open(image_path) as img:
        embedded = json.loads(img.info["workflow"])  # the UI workflow travels as extra_pnginfo
        prompt = json.loads(img.info["prompt"])
    assert len(embedded["nodes"]) == len(load_workflow(EXAMPLE_UI)["nodes"])
    texts = {n["inputs"]["text"] for n in prompt.values() if n["class_type"] == "CLIPTextEncode"}
    assert "a blue car" in texts


def test_bypassed_and_muted_nodes_of_a_ui_workflow(server, object_info, tmp_path):
    """A bypassed LatentUpscaleBy is skipped (the image keeps its size), a muted SaveImage writes nothing."""
    api = load_workflow(EXAMPLE_API)
    g_ids = {n["class_type"]: i for i, n in api.items()}
    up, muted = str(len(api) + 1), str(len(api) + 2)
    api[up] = {"class_type": "LatentUpscaleBy", "inputs": {"upscale_method": "nearest-exact", "scale_by": 1.5,
                                                          "samples": [g_ids["EmptySD3LatentImage"], 0]}}
    api[g_ids["KSampler"]]["inputs"].update(latent_image=[up, 0], steps=2)
    api[g_ids["SaveImage"]]["inputs"]["filename_prefix"] = "runner/bypass"
    api[muted] = {"class_type": "SaveImage", "inputs": {"images": [g_ids["VAEDecode"], 0],
                                                        "filename_prefix": "runner/muted"}}
    ui = api_to_ui(api, object_info, note="bypass and mute")
    modes = {int(up): 4, int(muted): 2}
    for node in ui["nodes"]:
        node["mode"] = modes.get(node["id"], 0)
    out = cli("run", str(write_json(tmp_path / "modes.json", ui)), "--server", server.url)
    assert out.returncode == 0, out.stderr
    (image_path,) = saved_images(out.stdout, server.output_dir)
    with Image.open(image_path) as img:
        assert img.size == (128, 128)
    assert not list((server.output_dir / "runner").glob("muted*"))
    # the premise: without the bypass the sampler would get the upscaled (24x24, i.e. 192 px) latent
    for node in ui["nodes"]:
        node["mode"] = 0
    assert ui_to_api(ui, object_info)[g_ids["KSampler"]]["inputs"]["latent_image"] == [up, 0]


def test_client_streams_the_prompts_events_and_serves_its_files(server):
    api = load_workflow(EXAMPLE_API)
    ids = {n["class_type"]: i for i, n in api.items()}
    api[ids["KSampler"]]["inputs"].update(steps=2, seed=7)
    api[ids["SaveImage"]]["inputs"]["filename_prefix"] = "runner/client"
    events = []
    with ComfyClient(server.url) as client:
        entry = client.run(api, on_event=lambda kind, data: events.append((kind, data)))
        kinds = [kind for kind, _ in events]
        for kind in ("execution_start", "executing", "progress", "executed", "execution_success"):
            assert kind in kinds
        assert "status" in kinds  # a broadcast without prompt_id (how the pack's custom events arrive) is passed on
        assert all(d.get("prompt_id") in (None, entry["prompt"][1]) for _, d in events)
        (image,) = entry["outputs"][ids["SaveImage"]]["images"]
        data = client.view(image["filename"], image["subfolder"], image["type"])
    assert data == (server.output_dir / image["subfolder"] / image["filename"]).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"


def test_client_reports_what_the_server_refused(server):
    api = load_workflow(EXAMPLE_API)
    ids = {n["class_type"]: i for i, n in api.items()}
    broken = json.loads(json.dumps(api))
    del broken[ids["KSampler"]]["inputs"]["steps"]
    with ComfyClient(server.url) as client:
        with pytest.raises(ComfyError) as e:
            client.queue_prompt(broken)
        assert e.value.kind == "rejected" and e.value.node_id == ids["KSampler"]
        assert f"node {ids['KSampler']} (KSampler): Required input is missing: steps" in str(e.value)
        # a second, valid output: the server runs that one and reports the other
        api[ids["KSampler"]]["inputs"]["steps"] = 2
        api["99"] = {"class_type": "SaveImage", "inputs": {"filename_prefix": "runner/skipped"}}
        entry = client.run(api)
        assert "node 99 (SaveImage): Required input is missing: images" in client.skipped_outputs
        assert entry["status"]["status_str"] == "success"


def test_malformed_json_fails_with_line_and_column(server, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"1": {"class_type": "KSampler",\n "inputs": {}}')
    out = cli("run", str(bad), "--server", server.url)
    assert out.returncode == 2
    assert "bad.json: not valid JSON" in out.stderr and "line 2, column" in out.stderr
    assert out.stdout == ""


def test_unknown_node_types_fail_naming_the_node(server, tmp_path, object_info):
    api = load_workflow(EXAMPLE_API)
    api["42"] = {"class_type": "NoSuchFlowNode", "inputs": {}}
    out = cli("run", str(write_json(tmp_path / "api.json", api)), "--server", server.url)
    assert out.returncode == 2
    assert "NoSuchFlowNode (node 42)" in out.stderr and "Install the pack" in out.stderr
    ui = api_to_ui(load_workflow(EXAMPLE_API), object_info)
    ui["nodes"][0]["type"] = "AnotherMissingNode"
    out = cli("validate", str(write_json(tmp_path / "ui.json", ui)), "--server", server.url)
    assert out.returncode == 2
    assert f"AnotherMissingNode (node {ui['nodes'][0]['id']})" in out.stderr


def test_invalid_values_and_overrides_fail_before_queueing(server):
    out = cli("run", str(EXAMPLE_API), "--server", server.url, "--set", "KSampler.steps=0")
    assert out.returncode == 2
    assert "(KSampler): input 'steps': 0 is below the minimum 1" in out.stderr and "queued" not in out.stdout
    out = cli("run", str(EXAMPLE_API), "--server", server.url, "--set", "KSampler.stepz=3")
    assert out.returncode == 2 and "has no input 'stepz'" in out.stderr


def test_a_node_failing_at_execution_is_named(server, demo_model_files, tmp_path):
    """FlowGRPOSDESampler on an eps-prediction model: SamplerCustomAdvanced raises while running."""
    g = Graph()
    unet = g.add("UNETLoader", unet_name=demo_model_files["diffusion_model"], weight_dtype="default")
    eps = g.add("ModelSamplingDiscrete", model=unet, sampling="eps", zsnr=False)
    clip = g.add("CLIPLoader", clip_name=demo_model_files["text_encoder"], type="sd3", device="default")
    cond = g.add("CLIPTextEncode", text="x", clip=clip)
    run = g.add("SamplerCustomAdvanced", noise=g.add("RandomNoise", noise_seed=1),
                guider=g.add("BasicGuider", model=eps, conditioning=cond),
                sampler=g.add("FlowGRPOSDESampler", sde_kind="flow_sde", noise_level=0.7, seed=1),
                sigmas=g.add("BasicScheduler", model=eps, scheduler="simple", steps=2, denoise=1.0),
                latent_image=g.add("EmptySD3LatentImage", width=64, height=64, batch_size=1))
    g.add("SaveLatent", samples=run, filename_prefix="runner/err")
    out = cli("run", str(write_json(tmp_path / "fail.json", g.api())), "--server", server.url)
    assert out.returncode == 1
    assert f"node {run.node_id} (SamplerCustomAdvanced) failed" in out.stderr
    assert "ValueError: FlowGRPO needs a flow-matching model" in out.stderr, out.stderr


def test_a_node_input_error_reads_as_a_sentence(server, demo_model_files, tmp_path):
    """The pack's input errors reach the user as ``NodeInputError: <node>: <problem>. Fix: <fix>``, without the
    pack's module path in front (ComfyUI prints an error's type with its module)."""
    g = Graph()
    unet = g.add("UNETLoader", unet_name=demo_model_files["diffusion_model"], weight_dtype="default")
    trainer = g.add("FlowGRPOLoRAInit", model=unet, rank=4, alpha=4.0, targets="attention", learning_rate=1e-4,
                    seed=0, run_name="../outside", resume="none", ema_decay=0.0, ema_every=1)
    g.add("FlowGRPOSaveLoRA", trainer=trainer, filename_prefix="", export="comfyui")
    out = cli("run", str(write_json(tmp_path / "bad_name.json", g.api())), "--server", server.url)
    assert out.returncode == 1
    assert "failed: NodeInputError: FlowGRPO LoRA Init: run_name '../outside' is not a file name inside the loras " \
           "folder. Fix: use a plain name" in out.stderr, out.stderr
    assert ".nodes." not in out.stderr and "custom_nodes" not in out.stderr, out.stderr


def _start_long_run(server, prefix: str) -> subprocess.Popen:
    """The example with 10000 KSampler steps (long by work, not by sleeping); returns once sampling is under way."""
    proc = subprocess.Popen([sys.executable, "-m", "flowgrpo", "run", str(EXAMPLE_API), "--server", server.url,
                             "--set", "KSampler.steps=10000", "--set", f"Save Image.filename_prefix={prefix}"],
                            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("  progress "):
            return proc
    proc.wait(timeout=30)
    pytest.fail(f"the run ended before sampling started: {''.join(seen)} {proc.stderr.read()}")


def test_interrupt_from_another_client_ends_the_run(server):
    proc = _start_long_run(server, "runner/interrupted")
    try:
        ComfyClient(server.url).interrupt()
        rest, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert "interrupted" in err and "KSampler" in err
    assert not list((server.output_dir / "runner").glob("interrupted*"))


def test_ctrl_c_interrupts_the_prompt_on_the_server(server):
    proc = _start_long_run(server, "runner/ctrl_c")
    try:
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, (rest, err)
    assert "Ctrl-C: interrupting the prompt" in err and "was interrupted at node" in err
    with ComfyClient(server.url) as client:  # the server is idle again
        assert client.get_json("/queue") == {"queue_running": [], "queue_pending": []}


def test_convert_and_validate_against_the_server(server, tmp_path):
    target = tmp_path / "out" / "api.json"
    out = cli("convert", str(EXAMPLE_UI), "-o", str(target), "--server", server.url)
    assert out.returncode == 0, out.stderr
    assert json.loads(target.read_text()) == load_workflow(EXAMPLE_API)
    out = cli("validate", str(EXAMPLE_UI), "--server", server.url)
    assert out.returncode == 0 and out.stdout.strip() == f"valid: {len(load_workflow(EXAMPLE_API))} nodes"


def test_demo_model_files_are_rewritten_only_when_stale(comfy_home, demo_model_files):
    models = comfy_home / "models"
    files = {kind: models / folder / name for kind, (folder, name) in DEMO_FILES.items()}
    assert {kind: p.name for kind, p in files.items()} == demo_model_files
    stamps = {kind: p.stat().st_mtime_ns for kind, p in files.items()}
    assert build_demo_models(models) == demo_model_files
    assert {kind: p.stat().st_mtime_ns for kind, p in files.items()} == stamps  # current version: left alone
    vae = files["vae"]
    original = safetensors.torch.load_file(str(vae))
    assert {k.split(".")[0] for k in original} == {"taesd_encoder", "taesd_decoder", "vae_scale", "vae_shift"}
    save_file({"stale": torch.zeros(1)}, vae)  # no version: rewritten, with the same seeded weights
    assert file_version(vae) is None
    build_demo_models(models)
    assert file_version(vae) == CONTENT_VERSION
    rebuilt = safetensors.torch.load_file(str(vae))
    assert rebuilt.keys() == original.keys() and all(torch.equal(rebuilt[k], original[k]) for k in original)


def test_demo_without_its_workflow_fails_clearly(tmp_path):
    out = cli("demo", "--workflow", str(tmp_path / "flowgrpo_tiny_demo.json"))
    assert out.returncode == 2
    assert "flowgrpo_tiny_demo.json does not exist" in out.stderr


def test_without_server_the_cli_starts_and_stops_its_own(tmp_path):
    """A private server on a fresh home, with extra ComfyUI flags: a graph without model files validates; the server
    is gone afterwards."""
    g = Graph()
    g.add("SaveLatent", samples=g.add("EmptySD3LatentImage", width=64, height=64, batch_size=1),
          filename_prefix="private")
    home = tmp_path / "home"
    out = cli("validate", str(write_json(tmp_path / "latent.json", g.api())), "--home", str(home),
              "--comfy-arg=--cache-none", "--comfy-arg=--verbose", "--comfy-arg=DEBUG")
    assert out.returncode == 0, out.stderr
    assert "valid: 2 nodes" in out.stdout and (home / "custom_nodes" / "flowgrpo").is_symlink()
    log = (home / "server.log").read_text(errors="replace")
    assert "Trying to load custom node" in log  # a debug line: the extra flags reached the server
    url = next(line.split(" at ", 1)[1].split()[0] for line in out.stdout.splitlines() if "ComfyUI is up at" in line)
    with pytest.raises(OSError):
        urllib.request.urlopen(url + "/system_stats", timeout=5)
