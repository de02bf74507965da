"""The pack in a real ComfyUI server: registration over HTTP and API-format prompts run end to end."""

from __future__ import annotations

import re

import pytest
import safetensors.torch

from client import ComfyError

pytestmark = [pytest.mark.comfy, pytest.mark.server]


def _prompt(unet_name, clip_name, sampler_seed=3, sde_kind="flow_sde", sampling_patch=None, prefix="flowgrpo_e2e"):
    """UNETLoader -> ModelSamplingSD3 -> BasicGuider(CLIPTextEncode) + BasicScheduler + RandomNoise +
    FlowGRPOSDESampler -> SamplerCustomAdvanced -> SaveLatent."""
    model = ["2", 0]
    prompt = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": unet_name, "weight_dtype": "default"}},
        "2": {"class_type": "ModelSamplingSD3", "inputs": {"model": ["1", 0], "shift": 3.0}},
        "3": {"class_type": "CLIPLoader", "inputs": {"clip_name": clip_name, "type": "sd3", "device": "default"}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red apple on a table", "clip": ["3", 0]}},
        "6": {"class_type": "BasicScheduler", "inputs": {"model": model, "scheduler": "simple", "steps": 4,
                                                         "denoise": 1.0}},
        "7": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 2}},
        "8": {"class_type": "RandomNoise", "inputs": {"noise_seed": 7}},
        "9": {"class_type": "FlowGRPOSDESampler", "inputs": {"sde_kind": sde_kind, "noise_level": 0.7,
                                                             "seed": sampler_seed}},
        "10": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["8", 0], "guider": ["5", 0],
                                                                 "sampler": ["9", 0], "sigmas": ["6", 0],
                                                                 "latent_image": ["7", 0]}},
        "11": {"class_type": "SaveLatent", "inputs": {"samples": ["10", 0], "filename_prefix": prefix}},
    }
    if sampling_patch is not None:
        prompt["12"] = {"class_type": "ModelSamplingDiscrete",
                        "inputs": {"model": ["2", 0], "sampling": sampling_patch, "zsnr": False}}
        model = ["12", 0]
    prompt["5"] = {"class_type": "BasicGuider", "inputs": {"model": model, "conditioning": ["4", 0]}}
    return prompt


def _saved_latent(server, entry, node_id="11"):
    (saved,) = entry["outputs"][node_id]["latents"]
    path = server.output_dir / saved["subfolder"] / saved["filename"]
    assert path.is_file(), f"SaveLatent reported {saved} but {path} does not exist"
    return safetensors.torch.load_file(str(path))["latent_tensor"]


def test_object_info_describes_the_sampler(comfy_client):
    info = comfy_client.get_json("/object_info/FlowGRPOSDESampler")["FlowGRPOSDESampler"]
    assert info["category"] == "FlowGRPO/sampling"
    assert info["output"] == ["SAMPLER"]
    required = info["input"]["required"]
    assert list(required) == ["sde_kind", "noise_level", "seed"]
    for name, spec in required.items():
        assert spec[1].get("tooltip"), f"input {name} has no tooltip"
    kind_spec = required["sde_kind"]
    options = kind_spec[0] if isinstance(kind_spec[0], list) else kind_spec[1]["options"]
    assert options == ["flow_sde", "dance_sde", "cps", "euler_ancestral", "ode"]
    assert required["noise_level"][0] == "FLOAT" and required["seed"][0] == "INT"


def test_server_loads_the_pack_exactly_once(comfy_server, comfy_client):
    log = comfy_server.log_path.read_text(errors="replace")
    imports = [line for line in log.splitlines() if re.search(r"seconds.*custom_nodes[/\\]flowgrpo\s*$", line)]
    assert len(imports) == 1, f"expected one import of the pack, log says: {imports}"
    assert "IMPORT FAILED" not in imports[0]
    assert "FlowGRPOSDESampler" in comfy_client.get_json("/object_info")


def test_prompt_with_the_sampler_runs_end_to_end(comfy_server, comfy_client, tiny_sd3_file, tiny_clip_file):
    entry = comfy_client.run(_prompt(tiny_sd3_file, tiny_clip_file, sampler_seed=3), timeout=120)
    assert entry["status"]["completed"] is True
    first = _saved_latent(comfy_server, entry)
    assert first.shape == (2, 16, 8, 8) and first.isfinite().all()
    assert first.abs().max() > 0
    # another sampler seed re-runs the sampler (not served from cache) and changes the sample
    entry = comfy_client.run(_prompt(tiny_sd3_file, tiny_clip_file, sampler_seed=4), timeout=120)
    second = _saved_latent(comfy_server, entry)
    assert (first - second).abs().max() > 1e-3


def test_non_flow_model_error_reaches_the_client(comfy_client, tiny_sd3_file, tiny_clip_file):
    prompt = _prompt(tiny_sd3_file, tiny_clip_file, sampling_patch="eps", prefix="flowgrpo_err")
    with pytest.raises(ComfyError, match=r"SamplerCustomAdvanced.*needs a flow-matching model .*predicts eps"):
        comfy_client.run(prompt, timeout=120)
