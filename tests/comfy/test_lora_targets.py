"""LoRA targets chosen by role (``nodes/lora_targets.py``): the roles of real ComfyUI layer paths, and the family name.

The per-family check that the chosen layers train and load in stock nodes is ``test_every_flow_family.py``.
"""

from __future__ import annotations

import importlib

import pytest

import tiny_models

pytestmark = pytest.mark.comfy


@pytest.fixture(scope="module")
def targets(flowgrpo_pack):
    return importlib.import_module(f"{flowgrpo_pack.package}.nodes.lora_targets")


#: layer paths inside one transformer block, as ComfyUI's model classes name them, and their role
ROLE_CASES = [
    # SD3 / MMDiT
    ("x_block.attn.qkv", "attention"), ("context_block.attn.proj", "attention"), ("x_block.attn2.qkv", "attention"),
    ("x_block.mlp.fc1", "mlp"), ("x_block.adaLN_modulation.1", "modulation"),
    # FLUX / Chroma / Flux.2 (double and single blocks)
    ("img_attn.qkv", "attention"), ("txt_attn.proj", "attention"), ("img_mlp.0", "mlp"), ("txt_mlp.2", "mlp"),
    ("img_mod.lin", "modulation"), ("linear1", "attention"), ("linear2", "attention"),
    ("modulation.lin", "modulation"),
    # Qwen-Image
    ("attn.to_q", "attention"), ("attn.add_k_proj", "attention"), ("attn.to_out.0", "attention"),
    ("img_mlp.net.0.proj", "mlp"), ("txt_mod.1", "modulation"),
    # Wan
    ("self_attn.q", "attention"), ("cross_attn.o", "attention"), ("ffn.0", "mlp"), ("ffn.2", "mlp"),
    # Lumina 2 / Z-Image
    ("attention.qkv", "attention"), ("attention.out", "attention"), ("feed_forward.w1", "mlp"),
    ("adaLN_modulation.0", "modulation"),
    # HiDream (MoE feed-forward)
    ("block.attn1.to_q", "attention"), ("block.ff_i.shared_experts.w1", "mlp"), ("block.ff_i.experts.0.w2", "mlp"),
    ("adaLN_modulation.1", "modulation"),
    # HunyuanVideo / LTXV
    ("attn1.to_k", "attention"), ("ff.net.2", "mlp"), ("norm1.linear", "modulation"),
]


@pytest.mark.parametrize("path,role", ROLE_CASES)
def test_layer_role(targets, path, role):
    assert targets.layer_role(path) == role


def test_layers_under_an_unnamed_wrapper_are_no_target(targets):
    assert targets.layer_role("block.proj") == "other"


@pytest.mark.parametrize("kind,family", [("sd3", "sd3"), ("flux", "flux"), ("qwen_image", "qwen_image")])
def test_family_is_comfyuis_model_config_in_snake_case(targets, comfy_runtime, kind, family):
    """The names saved checkpoints and presets carry (the same the pack used before targets became generic)."""
    patcher = tiny_models.BUILDERS[kind]()
    assert targets.model_family(patcher.model) == family
    assert targets._snake("WAN22_T2V") == "wan22_t2v" and targets._snake("ZImage") == "z_image"
    assert targets._snake("Flux2") == "flux2" and targets._snake("HunyuanImage21") == "hunyuan_image21"


def test_targets_are_keys_comfyuis_lora_loader_maps(targets, comfy_runtime):
    import comfy.lora

    patcher = tiny_models.build_flux()
    names = targets.lora_target_names(patcher.model, "attention_mlp")
    mapped = comfy.lora.model_lora_keys_unet(patcher.model, {})
    assert names and all(f"diffusion_model.{n}.weight" in mapped.values() for n in names)
    attention = targets.lora_target_names(patcher.model, "attention")
    assert set(attention) < set(names) and all("mlp" not in n for n in attention)
