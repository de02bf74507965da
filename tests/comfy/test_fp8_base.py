"""A LoRA trained over an fp8 base (issue 17, must-show 4).

The tiny SD3 file is loaded by stock ``UNETLoader`` with weight dtype ``fp8_e4m3fn``: ComfyUI keeps the weights in
fp8 and casts them per forward to the compute dtype. The pack's LoRA is fp32 on top of the cast weight, the step math
is fp32, the base stays as loaded, and the replay of the rollout is exact. The saved LoRA loads back onto the fp8
model through ``LoraLoaderModelOnly`` (``test_every_flow_family.check_training`` does every check).
"""

from __future__ import annotations

import logging

import pytest
import torch

import tiny_models
from test_every_flow_family import check_training, mods  # noqa: F401  (the fixture)

pytestmark = pytest.mark.comfy


def test_lora_over_an_fp8_base_replays_exactly_and_loads_back_in_stock_nodes(mods, run_node, caplog, tiny_sd3_file):
    (model,) = run_node("UNETLoader", unet_name=tiny_sd3_file, weight_dtype="fp8_e4m3fn")
    base = dict(model.model.diffusion_model.named_parameters())
    weights = {k: v.detach().clone() for k, v in base.items()}
    fp8 = {k for k, v in weights.items() if v.dtype == torch.float8_e4m3fn}
    assert len(fp8) > 10, "UNETLoader did not load the weights in fp8"

    with caplog.at_level(logging.INFO):
        summary = check_training(model, lambda seed: tiny_models.conditioning("sd3", seed=seed), (1, 16, 8, 8),
                                 "fp8", mods, run_node, caplog, loaded_rel_tol=0.2)
    assert summary.startswith("ratio")

    after = dict(model.model.diffusion_model.named_parameters())
    assert {k for k, v in after.items() if v.dtype == torch.float8_e4m3fn} == fp8, "the base must stay fp8"
    changed = [k for k in weights if not torch.equal(after[k].detach().float(), weights[k].float())]
    assert not changed, f"training changed base weights: {changed[:3]}"


def write_scaled_fp8_copy(folder_paths, source_name: str, name: str) -> str:
    """A copy of a diffusion-model file in ComfyUI's scaled-fp8 format: block Linear weights as fp8 e4m3fn with a
    per-layer ``scale_weight``, and the ``scaled_fp8`` marker key (the format of common FLUX / SD3.5 fp8 files)."""
    import os

    import safetensors.torch

    source = folder_paths.get_full_path("diffusion_models", source_name)
    out = {}
    for key, value in safetensors.torch.load_file(source).items():
        if key.endswith(".weight") and value.dim() == 2 and ("attn" in key or "mlp" in key):
            scale = value.abs().max().float() / 448.0
            out[key] = (value.float() / scale).to(torch.float8_e4m3fn)
            out[key.removesuffix("weight") + "scale_weight"] = scale.reshape(())
        else:
            out[key] = value
    out["scaled_fp8"] = torch.zeros(0, dtype=torch.float8_e4m3fn)
    safetensors.torch.save_file(out, os.path.join(os.path.dirname(source), name))
    return name


def test_a_scaled_fp8_file_is_refused_with_what_to_do(mods, run_node, tiny_sd3_file, comfy_runtime):
    name = write_scaled_fp8_copy(comfy_runtime.folder_paths, tiny_sd3_file, "flowgrpo_tiny_sd3_scaled_fp8.safetensors")
    (model,) = run_node("UNETLoader", unet_name=name, weight_dtype="default")
    with pytest.raises(mods.state.NodeInputError, match=r"scaled / quantized format.*weight_dtype fp8_e4m3fn"):
        run_node("FlowGRPOLoRAInit", model=model, rank=4, alpha=4.0, targets="attention", learning_rate=1e-3,
                 seed=0, run_name="fp8_scaled", resume="none")
