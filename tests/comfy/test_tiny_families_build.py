"""The tiny image families of :mod:`tiny_image_families` build on the running ComfyUI and run through the pack's
policy: a velocity of the latent's shape, finite, that the conditioning moves; ComfyUI's LoRA loader maps keys to
Linear layers inside their transformer blocks. A family whose class this ComfyUI lacks must be refused as
``Unbuildable``."""

from __future__ import annotations

import importlib

import pytest
import torch

import model_families
import tiny_image_families

pytestmark = pytest.mark.comfy

BATCH = 2
SIGMA = 0.7
FAMILIES = {f.name: f for f in tiny_image_families.FAMILIES}


def _pack_module(pkg: str, *names: str):
    """The first of the pack's ``nodes.<name>`` modules that exists (``encode_conditioning`` may move)."""
    for name in names:
        try:
            return importlib.import_module(f"{pkg}.nodes.{name}")
        except ModuleNotFoundError:
            continue
    raise ModuleNotFoundError(f"none of {names} in {pkg}.nodes")


def _block_linear_weights(diffusion_model: torch.nn.Module) -> set[str]:
    """``diffusion_model.<path>.weight`` of every Linear inside a block of a ``ModuleList`` (transformer blocks)."""
    out = set()
    for list_path, blocks in diffusion_model.named_modules():
        if isinstance(blocks, torch.nn.ModuleList):
            for path, module in blocks.named_modules():
                if isinstance(module, torch.nn.Linear) and path:
                    out.add(f"diffusion_model.{list_path}.{path}.weight")
    return out


def test_families_and_reasons_are_consistent(comfy_runtime):
    """Each class has one entry; every NOT_BUILT reason is a sentence; the built names this runtime has are flow
    families (ComfyUI samples them as flows)."""
    assert len(FAMILIES) == len(tiny_image_families.FAMILIES)
    assert not set(FAMILIES) & set(tiny_image_families.NOT_BUILT)
    assert all(len(reason.split()) >= 5 for reason in tiny_image_families.NOT_BUILT.values())
    present = model_families.supported_model_classes()
    flow = model_families.flow_families()
    assert [n for n in FAMILIES if n in present and n not in flow] == []


@pytest.mark.parametrize("name", list(FAMILIES))
def test_tiny_image_family_runs_through_the_policy(name, comfy_runtime, flowgrpo_pack):
    import comfy.lora

    family = FAMILIES[name]
    if name not in model_families.supported_model_classes():  # e.g. the 0.33-only families on 0.3.75
        with pytest.raises(model_families.Unbuildable):
            model_families.build(family)
        return
    pkg = flowgrpo_pack.package
    policy_mod = _pack_module(pkg, "comfy_policy")
    encode_conditioning = _pack_module(pkg, "conditioning", "comfy_policy").encode_conditioning

    patcher = model_families.build(family, seed=0)
    shape = family.latent(BATCH)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    sigma = torch.full((BATCH,), SIGMA)
    policy = policy_mod.ComfyFlowPolicy(patcher)
    with torch.no_grad():
        velocities = [policy.velocity(x, sigma, encode_conditioning(patcher, family.conditioning(seed), None, BATCH,
                                                                    shape))
                      for seed in (0, 1)]
    for v in velocities:
        assert v.shape == x.shape
        assert bool(torch.isfinite(v).all())
    assert not torch.equal(velocities[0], velocities[1]), f"{name}: the conditioning does not reach the model"

    mapped = set()
    for target in comfy.lora.model_lora_keys_unet(patcher.model, {}).values():
        mapped.add(target[0] if isinstance(target, tuple) else target)
    in_blocks = mapped & _block_linear_weights(patcher.model.diffusion_model)
    assert in_blocks, f"{name}: ComfyUI's LoRA loader maps no key to a Linear inside a transformer block"
