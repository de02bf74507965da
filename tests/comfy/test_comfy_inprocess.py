"""The pack inside a real ComfyUI 0.3.75, in-process: registration, stock loaders, the velocity bridge, the sampler."""

from __future__ import annotations

from pathlib import Path

import pytest
import safetensors.torch
import torch

import tiny_models

pytestmark = pytest.mark.comfy

REPO_ROOT = Path(__file__).resolve().parents[2]

FLOW_KINDS = ("sd3", "flux", "qwen_image")


# ------------------------------------------------------------------------------------------ registration, loading
def _node_info(cls) -> dict:
    """The /object_info entry ComfyUI builds for a node class (V3 or V1)."""
    if hasattr(cls, "GET_NODE_INFO_V1"):
        return cls.GET_NODE_INFO_V1()
    return {"input": cls.INPUT_TYPES(), "output": list(cls.RETURN_TYPES), "category": getattr(cls, "CATEGORY", "")}


def _io_types(info: dict) -> set:
    types = {t for t in info["output"] if isinstance(t, str)}
    for section in ("required", "optional"):
        for spec in info["input"].get(section, {}).values():
            if isinstance(spec[0], str):
                types.add(spec[0])
    return types


def test_pack_registers_its_nodes_from_this_checkout(comfy_nodes, flowgrpo_pack):
    cls = comfy_nodes["FlowGRPOSDESampler"]
    schema = cls.GET_SCHEMA()
    assert schema.category == "FlowGRPO/sampling"
    assert [i.id for i in schema.inputs] == ["sde_kind", "noise_level", "seed"]
    assert [o.io_type for o in schema.outputs] == ["SAMPLER"]
    # the code ComfyUI loaded is this checkout's (through the home's custom_nodes link)
    assert Path(flowgrpo_pack.sampler_nodes.__file__).resolve() == REPO_ROOT / "nodes" / "sampler_nodes.py"


def test_pack_nodes_follow_the_conventions(comfy_nodes, flowgrpo_pack):
    """Every node of the pack: id FlowGRPO*, category FlowGRPO/*, a tooltip on each input, custom types FLOWGRPO_*."""
    ours = {n: c for n, c in comfy_nodes.items() if c.__module__.startswith(flowgrpo_pack.package + ".")}
    assert set(flowgrpo_pack.package_module.NODE_CLASSES) == set(ours.values())
    stock_types = set()
    for name, cls in comfy_nodes.items():
        if name not in ours:
            stock_types |= _io_types(_node_info(cls))
    for name, cls in ours.items():
        info = _node_info(cls)
        assert name.startswith("FlowGRPO"), name
        assert info["category"].startswith("FlowGRPO/"), (name, info["category"])
        for section in ("required", "optional"):
            for input_name, spec in info["input"].get(section, {}).items():
                assert len(spec) > 1 and spec[1].get("tooltip"), f"{name}.{input_name} has no tooltip"
        custom = _io_types(info) - stock_types
        assert all(t.startswith("FLOWGRPO_") for t in custom), f"{name} uses unprefixed custom types {custom}"


def test_tiny_sd3_file_loads_through_stock_unet_loader(run_node, tiny_sd3_file, comfy_runtime, flowgrpo_pack):
    import comfy.model_base

    (model,) = run_node("UNETLoader", unet_name=tiny_sd3_file, weight_dtype="default")
    assert isinstance(model.model, comfy.model_base.SD3)
    dm = model.model.diffusion_model
    assert (dm.hidden_size, len(dm.joint_blocks)) == (128, 2)
    on_disk = safetensors.torch.load_file(
        str(comfy_runtime.home / "models" / "diffusion_models" / tiny_sd3_file))
    loaded = dm.state_dict()
    assert set(on_disk) == set(loaded)
    for key in ("x_embedder.proj.weight", "pos_embed", "final_layer.linear.weight"):
        torch.testing.assert_close(loaded[key].float(), on_disk[key].float(), rtol=0, atol=0)
    sampling = flowgrpo_pack.model_adapter.require_flow_model(model)
    assert float(sampling.shift) == pytest.approx(3.0)


# ------------------------------------------------------------------------------------------ the velocity bridge
def _flow_model(kind, run_node, tiny_sd3_file):
    if kind == "sd3":  # the file through the stock loader, as users get it
        return run_node("UNETLoader", unet_name=tiny_sd3_file, weight_dtype="default")[0]
    return tiny_models.BUILDERS[kind](seed=1)


def _raw_network_output(base_model, x, sigma, c_crossattn, **extra):
    """The diffusion model called directly, with ComfyUI's own input and timestep conversion."""
    sampling = base_model.model_sampling
    timestep = sampling.timestep(sigma).float()
    return base_model.diffusion_model(sampling.calculate_input(sigma, x), timestep, context=c_crossattn,
                                      transformer_options={}, **extra)


@pytest.mark.parametrize("kind", FLOW_KINDS)
def test_velocity_from_denoised_equals_raw_network_output(kind, run_node, tiny_sd3_file, flowgrpo_pack):
    adapter = flowgrpo_pack.model_adapter
    patcher = _flow_model(kind, run_node, tiny_sd3_file)
    base = patcher.model
    assert adapter.is_flow_model(patcher)
    x = tiny_models.random_latent(kind, batch=3, seed=2)
    sigma = torch.tensor([1.0, 0.62, 0.11])
    kwargs = tiny_models.apply_model_kwargs(kind, batch=3, seed=3)
    with torch.inference_mode():
        velocity, denoised = adapter.predict_velocity(base.apply_model, x, sigma, **kwargs)
        raw = _raw_network_output(base, x, sigma, **kwargs).float()
    assert velocity.dtype == torch.float32 and velocity.shape == x.shape
    assert raw.std() > 1e-2, "the tiny network output is too small for this comparison to mean anything"
    torch.testing.assert_close(velocity, raw, rtol=0, atol=1e-5)
    # denoised really is x - sigma * v (not the network output itself)
    assert (denoised - x).abs().max() > 1e-2


def test_timestep_conversion_differs_per_family(run_node, tiny_sd3_file):
    """SD3 feeds t = 1000 sigma to the network, FLUX and Qwen-Image t = sigma (grpo-math.md §1)."""
    sigma = torch.tensor([0.25])
    sd3 = _flow_model("sd3", run_node, tiny_sd3_file).model.model_sampling
    flux = tiny_models.build_flux().model.model_sampling
    qwen = tiny_models.build_qwen_image().model.model_sampling
    assert float(sd3.timestep(sigma)) == pytest.approx(250.0)
    assert float(flux.timestep(sigma)) == pytest.approx(0.25)
    assert float(qwen.timestep(sigma)) == pytest.approx(0.25)


def test_non_flow_models_are_refused_with_a_clear_error(run_node, tiny_sd3_file, flowgrpo_pack):
    adapter = flowgrpo_pack.model_adapter
    eps_unet = tiny_models.build_sd15_eps()
    assert not adapter.is_flow_model(eps_unet)
    with pytest.raises(ValueError, match=r"needs a flow-matching model .*predicts eps"):
        adapter.require_flow_model(eps_unet)
    # a flow model whose sampling a stock node switched to v-prediction is refused too
    sd3 = _flow_model("sd3", run_node, tiny_sd3_file)
    (as_v,) = run_node("ModelSamplingDiscrete", model=sd3, sampling="v_prediction", zsnr=False)
    with pytest.raises(ValueError, match=r"needs a flow-matching model .*predicts v"):
        adapter.require_flow_model(as_v)
    assert adapter.is_flow_model(sd3), "the patch must not leak into the original model"


def test_sampler_refuses_a_non_flow_model_inside_sampler_custom_advanced(run_node):
    eps_unet = tiny_models.build_sd15_eps()
    (sampler,) = run_node("FlowGRPOSDESampler", sde_kind="flow_sde", noise_level=0.7, seed=0)
    with pytest.raises(ValueError, match="needs a flow-matching model"):
        _sample(run_node, eps_unet, tiny_models.conditioning("sd15"), sampler,
                {"samples": torch.zeros(1, 4, 8, 8)}, steps=2)


# ------------------------------------------------------------------------------------------ the sampler
def _sample(run_node, model, cond, sampler, latent, steps=6, sigmas=None, noise_seed=42):
    (guider,) = run_node("BasicGuider", model=model, conditioning=cond)
    if sigmas is None:
        (sigmas,) = run_node("BasicScheduler", model=model, scheduler="simple", steps=steps, denoise=1.0)
    (noise,) = run_node("RandomNoise", noise_seed=noise_seed)
    out, _ = run_node("SamplerCustomAdvanced", noise=noise, guider=guider, sampler=sampler, sigmas=sigmas,
                      latent_image=latent)
    return out["samples"]


def _latent(kind, batch=2):
    return {"samples": torch.zeros(tiny_models.latent_shape(kind, batch, 8, 8))}


@pytest.fixture(scope="module")
def sd3_model(run_node, tiny_sd3_file):
    return _flow_model("sd3", run_node, tiny_sd3_file)


@pytest.mark.parametrize("kind", FLOW_KINDS)
def test_ode_reproduces_stock_euler(kind, run_node, tiny_sd3_file):
    model = _flow_model(kind, run_node, tiny_sd3_file)
    cond = tiny_models.conditioning(kind)
    (euler,) = run_node("KSamplerSelect", sampler_name="euler")
    reference = _sample(run_node, model, cond, euler, _latent(kind))
    assert reference.isfinite().all()
    for sde_kind, noise_level in (("ode", 0.7), ("flow_sde", 0.0), ("dance_sde", 0.0), ("cps", 0.0)):
        (ours,) = run_node("FlowGRPOSDESampler", sde_kind=sde_kind, noise_level=noise_level, seed=5)
        got = _sample(run_node, model, cond, ours, _latent(kind))
        assert got.shape == reference.shape
        torch.testing.assert_close(got, reference, rtol=0, atol=1e-5, msg=f"{sde_kind} at noise {noise_level}")


@pytest.mark.parametrize("sde_kind,noise_level", [("flow_sde", 0.7), ("dance_sde", 0.3), ("cps", 0.5)])
def test_stochastic_kinds_differ_from_euler_and_are_reproducible(sde_kind, noise_level, run_node, sd3_model):
    cond = tiny_models.conditioning("sd3")
    (euler,) = run_node("KSamplerSelect", sampler_name="euler")
    reference = _sample(run_node, sd3_model, cond, euler, _latent("sd3"))
    runs = {}
    for seed in (11, 11, 12):
        (sampler,) = run_node("FlowGRPOSDESampler", sde_kind=sde_kind, noise_level=noise_level, seed=seed)
        runs.setdefault(seed, []).append(_sample(run_node, sd3_model, cond, sampler, _latent("sd3")))
    first, again = runs[11]
    assert first.isfinite().all()
    assert (first - reference).abs().max() > 1e-2, "the SDE must inject noise"
    torch.testing.assert_close(first, again, rtol=0, atol=0, msg="same seed must give the same sample")
    assert (first - runs[12][0]).abs().max() > 1e-2, "another seed must give another sample"


def test_step_to_sigma_zero_is_deterministic(run_node, sd3_model):
    cond = tiny_models.conditioning("sd3")
    (euler,) = run_node("KSamplerSelect", sampler_name="euler")
    (sde_a,) = run_node("FlowGRPOSDESampler", sde_kind="flow_sde", noise_level=0.9, seed=1)
    (sde_b,) = run_node("FlowGRPOSDESampler", sde_kind="flow_sde", noise_level=0.9, seed=2)
    one_step = torch.tensor([1.0, 0.0])
    ref = _sample(run_node, sd3_model, cond, euler, _latent("sd3"), sigmas=one_step)
    torch.testing.assert_close(_sample(run_node, sd3_model, cond, sde_a, _latent("sd3"), sigmas=one_step), ref,
                               rtol=0, atol=1e-5)
    # a grid that stops above zero keeps its last step stochastic
    partial = torch.tensor([1.0, 0.5])
    a = _sample(run_node, sd3_model, cond, sde_a, _latent("sd3"), sigmas=partial)
    b = _sample(run_node, sd3_model, cond, sde_b, _latent("sd3"), sigmas=partial)
    assert (a - b).abs().max() > 1e-2


def test_sampler_reports_every_step_to_the_callback(run_node, sd3_model):
    import comfy.sample

    (sampler,) = run_node("FlowGRPOSDESampler", sde_kind="flow_sde", noise_level=0.7, seed=0)
    (guider,) = run_node("BasicGuider", model=sd3_model, conditioning=tiny_models.conditioning("sd3"))
    (sigmas,) = run_node("BasicScheduler", model=sd3_model, scheduler="simple", steps=5, denoise=1.0)
    latent = torch.zeros(tiny_models.latent_shape("sd3", 1, 8, 8))
    noise = comfy.sample.prepare_noise(latent, 0)
    calls = []

    def callback(step, x0, x, total_steps):
        calls.append((step, total_steps, tuple(x0.shape), bool(x0.isfinite().all())))

    with torch.inference_mode():
        guider.sample(noise, latent, sampler, sigmas, callback=callback, disable_pbar=True, seed=0)
    assert [c[0] for c in calls] == list(range(5))
    assert all(c[1] == 5 and c[2] == tuple(latent.shape) and c[3] for c in calls)


def test_sampler_node_rejects_bad_options(run_node):
    with pytest.raises(ValueError, match="cps"):
        run_node("FlowGRPOSDESampler", sde_kind="cps", noise_level=1.5, seed=0)
    with pytest.raises(ValueError, match="sde_kind"):
        run_node("FlowGRPOSDESampler", sde_kind="euler", noise_level=0.5, seed=0)
