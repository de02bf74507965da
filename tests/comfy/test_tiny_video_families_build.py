"""The tiny video families of :mod:`tiny_video_families` build on the running ComfyUI and run through the pack's
policy: one velocity per sample of the latent's shape, finite, moved by the conditioning; ComfyUI's LoRA loader maps
the Linear layers inside their transformer blocks. Every flow-matching video family of the runtime is either built or
listed in ``NOT_BUILT`` with its reason."""

from __future__ import annotations

import importlib
import re

import pytest
import torch

import model_families
import tiny_video_families

pytestmark = pytest.mark.comfy

BATCH = 2


def _module(pkg: str, *names: str):
    """The first of the pack's modules ``names`` that exists (``encode_conditioning`` may move between them)."""
    for name in names:
        try:
            return importlib.import_module(f"{pkg}.nodes.{name}")
        except ModuleNotFoundError:
            continue
    raise ModuleNotFoundError(names)


def _available():
    present = model_families.supported_model_classes()
    return [f for f in tiny_video_families.FAMILIES if f.name in present]


def test_every_video_flow_family_is_built_or_explained(comfy_runtime):
    flow = model_families.flow_families()
    video = {n for n in flow if re.match(tiny_video_families.VIDEO_NAME, n)}
    built = {f.name for f in tiny_video_families.FAMILIES}
    missing = sorted(video - built - set(tiny_video_families.NOT_BUILT))
    assert not missing, f"video flow families with neither a tiny config nor a NOT_BUILT reason: {missing}"
    assert {"WAN21_T2V", "WAN22_T2V"} <= built & video
    assert not built & set(tiny_video_families.NOT_BUILT)
    assert all(len(reason.split()) >= 5 for reason in tiny_video_families.NOT_BUILT.values())


@pytest.mark.parametrize("name", [f.name for f in tiny_video_families.FAMILIES])
def test_tiny_video_family_runs_through_the_policy(name, comfy_runtime, flowgrpo_pack):
    import comfy.lora

    family = {f.name: f for f in tiny_video_families.FAMILIES}[name]
    if family.name not in model_families.supported_model_classes():  # Kandinsky5: added after 0.3.75
        assert name == "Kandinsky5", f"{name} is missing from this ComfyUI"
        with pytest.raises(model_families.Unbuildable):
            model_families.build(family)
        return
    pkg = flowgrpo_pack.package
    policy_mod = importlib.import_module(f"{pkg}.nodes.comfy_policy")
    encode = _module(pkg, "conditioning", "comfy_policy").encode_conditioning
    assert model_families.is_flow_family(model_families.supported_model_classes()[name])

    patcher = model_families.build(family, seed=0)
    shape = family.latent(BATCH)
    assert len(shape) == 5 and shape[2] >= 2 and family.video
    assert shape[1] == patcher.model.latent_format.latent_channels
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    sigma = torch.full((BATCH,), 0.6)
    policy = policy_mod.ComfyFlowPolicy(patcher)
    with torch.no_grad():
        velocities = [policy.velocity(x, sigma, encode(patcher, family.conditioning(seed), None, BATCH, shape))
                      for seed in (0, 1)]
    for v in velocities:
        assert v.shape == x.shape and bool(torch.isfinite(v).all())
    assert not torch.equal(velocities[0], velocities[1]), "the conditioning does not reach the model"

    diffusion_model = patcher.model.diffusion_model
    mapped = set(comfy.lora.model_lora_keys_unet(patcher.model, {}).values())
    block_linears = [f"diffusion_model.{child}.{i}.{path}.weight"
                     for child, blocks in diffusion_model.named_children() if isinstance(blocks, torch.nn.ModuleList)
                     for i, block in enumerate(blocks)
                     for path, module in block.named_modules() if isinstance(module, torch.nn.Linear)]
    assert block_linears, f"{name}: no Linear layer inside a transformer block"
    unmapped = [k for k in block_linears if k not in mapped]
    assert not unmapped, f"{name}: ComfyUI's LoRA loader maps no key to {unmapped[:3]}"
