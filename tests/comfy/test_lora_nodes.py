"""LoRA Init / Save / Apply nodes in a real ComfyUI: files that stock loaders load, resume, errors.

Models are loaded as users get them (SD3 through ``UNETLoader``, FLUX and Qwen-Image built under inference mode).
Checkpoints go to the session's ``models/loras``; every test uses its own run names.
"""

from __future__ import annotations

import importlib
import logging
import shutil
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import tiny_models
from test_comfy_policy import FLOW_KINDS, _load, _sample

pytestmark = pytest.mark.comfy

NOT_LOADED = ("lora key not loaded", "NOT LOADED")


@pytest.fixture(scope="module")
def mods(flowgrpo_pack):
    pkg = flowgrpo_pack.package
    return SimpleNamespace(io=importlib.import_module(f"{pkg}.nodes.lora_io"),
                           policy=importlib.import_module(f"{pkg}.nodes.comfy_policy"),
                           conditioning=importlib.import_module(f"{pkg}.nodes.conditioning"),
                           state=importlib.import_module(f"{pkg}.nodes.state"))


@pytest.fixture()
def loras(comfy_runtime) -> Path:
    return Path(comfy_runtime.folder_paths.get_folder_paths("loras")[0])


def _run_name(tag: str) -> str:
    return f"t_{tag}_{uuid.uuid4().hex[:8]}"


def _files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*")}


def _init(run_node, model, run_name, rank=4, alpha=2.0, targets="attention_mlp", lr=1e-3, resume="none"):
    return run_node("FlowGRPOLoRAInit", model=model, rank=rank, alpha=alpha, targets=targets, learning_rate=lr,
                    seed=0, run_name=run_name, resume=resume)


def _randomize_(trainer):
    """Move the LoRA away from its zero init, in place (both factors)."""
    with torch.no_grad():
        for k, p in trainer.lora_params.items():
            if k.endswith(("lora_up.weight", "lora_down.weight")):
                p.normal_(0.0, 0.2, generator=torch.Generator().manual_seed(len(k)))


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if any(m in r.getMessage() for m in NOT_LOADED)]


def _load_file(run_node, model, name):
    (out,) = run_node("LoraLoaderModelOnly", model=model, lora_name=name, strength_model=1.0)
    return out


# ------------------------------------------------------------------------------------------ files and parity
def test_log_capture_sees_unloaded_keys(run_node, caplog):
    """The capture the parity test relies on does see ComfyUI's message for a key it cannot place."""
    with torch.inference_mode():
        model = tiny_models.build_flux(seed=1)
    with caplog.at_level(logging.INFO):
        run_node("LoraModelLoader", model=model, lora={"diffusion_model.no_such.lora_up.weight": torch.zeros(2, 1),
                                                       "diffusion_model.no_such.lora_down.weight": torch.zeros(1, 2)},
                 strength_model=1.0)
    assert _warnings(caplog)


@pytest.mark.parametrize("kind", FLOW_KINDS)
def test_saved_lora_loads_in_stock_nodes_and_reproduces_the_trainer(kind, mods, run_node, tiny_sd3_file, loras,
                                                                     caplog):
    model = _load(kind, run_node, tiny_sd3_file)
    cond = tiny_models.conditioning(kind, seed=3)
    patches_before = (dict(model.patches), dict(model.weight_wrapper_patches))
    stock_before = _sample(run_node, model, cond, kind=kind)

    run_name = _run_name(kind)
    trainer, trained_model = _init(run_node, model, run_name)
    assert trained_model is trainer.patcher and trainer.iteration == 0
    _randomize_(trainer)
    with caplog.at_level(logging.INFO):
        (lora_path,) = run_node("FlowGRPOSaveLoRA", trainer=trainer, filename_prefix="", export="peft")
        lora_path = Path(lora_path)
        assert lora_path == loras / f"{run_name}_00000.safetensors"
        peft_name = f"{run_name}_00000.peft.safetensors"
        assert {lora_path.name, f"{run_name}_00000.flowgrpo-state", peft_name} <= _files(loras)
        # stock loaders, before the trainer's patcher is ever loaded
        from_file = _sample(run_node, _load_file(run_node, model, lora_path.name), cond, kind=kind)
        from_peft = _sample(run_node, _load_file(run_node, model, peft_name), cond, kind=kind)
        applied, lora_model = run_node("FlowGRPOApplyLoRA", model=model, trainer=trainer, strength=1.0)
        from_apply = _sample(run_node, applied, cond, kind=kind)
        (stock_lora_model,) = run_node("LoraModelLoader", model=model, lora=lora_model, strength_model=1.0)
        from_lora_model = _sample(run_node, stock_lora_model, cond, kind=kind)
        half, _ = run_node("FlowGRPOApplyLoRA", model=model, trainer=trainer, strength=0.5)
        from_half = _sample(run_node, half, cond, kind=kind)
    assert not _warnings(caplog), _warnings(caplog)[:3]

    # the file holds exactly the trainer's LoRA: native keys, fp32, alpha
    import comfy.utils
    saved = comfy.utils.load_torch_file(str(lora_path), safe_load=True)
    assert set(saved) == set(trainer.lora_params)
    assert all(v.dtype == torch.float32 for v in saved.values())
    assert all(torch.equal(saved[k], p.detach()) for k, p in trainer.lora_params.items())
    assert {float(v) for k, v in saved.items() if k.endswith(".alpha")} == {2.0}
    peft = comfy.utils.load_torch_file(str(loras / peft_name), safe_load=True)
    suffixes = (".lora_A.weight", ".lora_B.weight", ".alpha")
    assert all(k.startswith("transformer.") and k.endswith(suffixes) for k in peft)
    assert {float(v) for k, v in peft.items() if k.endswith(".alpha")} == {4.0}, "alpha / rank is folded into B"
    if kind == "flux":  # the fused single-block linear1 is split into q, k, v and the MLP input
        assert {f"transformer.single_transformer_blocks.0.{m}.lora_B.weight"
                for m in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")} <= set(peft)

    from_trainer = _sample(run_node, trained_model, cond, kind=kind)
    assert (from_trainer - stock_before).abs().max() > 1e-3, "the LoRA must change the samples"
    assert (from_half - from_trainer).abs().max() > 1e-4, "strength must matter"
    for name, out in (("LoraLoaderModelOnly", from_file), ("PEFT file", from_peft), ("Apply", from_apply),
                      ("LoraModelLoader", from_lora_model)):
        torch.testing.assert_close(out, from_trainer, rtol=0, atol=1e-4, msg=lambda m, n=name: f"{n}: {m}")

    # the input MODEL is unchanged
    stock_after = _sample(run_node, model, cond, kind=kind)
    torch.testing.assert_close(stock_after, stock_before, rtol=0, atol=0)
    assert (dict(model.patches), dict(model.weight_wrapper_patches)) == patches_before


# ------------------------------------------------------------------------------------------ resume
def _train_step(mods, trainer, i):
    """One AdamW step on a made-up loss through the trainer's LoRA; returns the advanced state."""
    P = mods.policy
    policy = P.ComfyFlowPolicy(trainer.patcher)
    cond = mods.conditioning.encode_conditioning(trainer.patcher, tiny_models.conditioning("flux", seed=3), None, 2,
                                 tiny_models.latent_shape("flux", 2))
    x = tiny_models.random_latent("flux", batch=2, seed=20 + i)
    with policy.training():
        trainer.optimizer.zero_grad()
        loss = (policy.velocity(x, torch.tensor([0.8, 0.4]), cond) - x).square().mean()
        loss.backward()
        trainer.optimizer.step()
    return trainer.advanced({"loss": float(loss.detach()), "reward_mean": 0.25 * i})


def _optimizer_tensors(trainer):
    return [t for s in trainer.optimizer.state_dict()["state"].values() for t in s.values()]


def test_resume_round_trip_through_the_node(mods, run_node, loras):
    with torch.inference_mode():
        model = tiny_models.build_flux(seed=1)
    run_name = _run_name("resume")
    trainer, _ = _init(run_node, model, run_name, targets="attention")
    for i in range(2):
        trainer = _train_step(mods, trainer, i)
    (path,) = run_node("FlowGRPOSaveLoRA", trainer=trainer, filename_prefix="", export="comfyui")
    name = Path(path).name
    assert name == f"{run_name}_00002.safetensors" and name in mods.io.resume_options()
    assert f"{run_name}_00002.peft.safetensors" not in _files(loras)

    resumed, resumed_model = _init(run_node, model, run_name, targets="attention", resume=name)
    assert resumed_model is resumed.patcher and resumed.patcher is not trainer.patcher
    assert resumed.iteration == 2 and resumed.history == trainer.history and len(resumed.history) == 2
    assert resumed.checkpoint == path
    for k, p in trainer.lora_params.items():
        assert resumed.lora_params[k] is not p and torch.equal(resumed.lora_params[k].detach(), p.detach()), k
    saved_opt, new_opt = _optimizer_tensors(trainer), _optimizer_tensors(resumed)
    assert len(saved_opt) == len(new_opt) > 0 and all(torch.equal(a, b) for a, b in zip(saved_opt, new_opt))

    # the next step is bitwise the same as continuing the original run
    trainer = _train_step(mods, trainer, 2)
    resumed = _train_step(mods, resumed, 2)
    for k, p in trainer.lora_params.items():
        assert torch.equal(resumed.lora_params[k].detach(), p.detach()), k

    # "latest" picks the newest checkpoint of the run; the node's learning rate wins over the saved one
    (path3,) = run_node("FlowGRPOSaveLoRA", trainer=resumed, filename_prefix="", export="comfyui")
    latest, _ = _init(run_node, model, run_name, targets="attention", lr=5e-4, resume="latest")
    assert latest.checkpoint == path3 and latest.iteration == 3
    assert all(g["lr"] == 5e-4 for g in latest.optimizer.param_groups)
    assert all(torch.equal(latest.lora_params[k].detach(), p.detach()) for k, p in resumed.lora_params.items())
    # no checkpoint for this name: a fresh run
    fresh, _ = _init(run_node, model, _run_name("none_yet"), targets="attention", resume="latest")
    assert fresh.iteration == 0 and fresh.history == () and fresh.checkpoint is None
    ups = [p for k, p in fresh.lora_params.items() if k.endswith("lora_up.weight")]
    assert all(float(p.detach().abs().max()) == 0.0 for p in ups)


# ------------------------------------------------------------------------------------------ errors
def _raises(mods, node_name, match, fn, *args, **kwargs):
    with pytest.raises(mods.state.NodeInputError, match=match) as info:
        fn(*args, **kwargs)
    assert str(info.value).startswith(f"{node_name}: ") and ". Fix: " in str(info.value), str(info.value)
    return str(info.value)


def test_bad_inputs_give_node_errors_and_write_nothing(mods, run_node, loras):
    with torch.inference_mode():
        flux = tiny_models.build_flux(seed=1)
        qwen = tiny_models.build_qwen_image(seed=1)
        sd15 = tiny_models.build_sd15_eps()
    run_name = _run_name("errors")
    trainer, _ = _init(run_node, flux, run_name, rank=4)
    (path,) = run_node("FlowGRPOSaveLoRA", trainer=trainer, filename_prefix="", export="comfyui")
    name = Path(path).name
    before = _files(loras)
    init, save, apply = "FlowGRPO LoRA Init", "FlowGRPO Save LoRA", "FlowGRPO Apply Trained LoRA"

    _raises(mods, init, "flow-matching", _init, run_node, sd15, run_name)
    _raises(mods, init, "not a FlowGRPO checkpoint", _init, run_node, flux, run_name, resume="nope_00001.safetensors")
    msg = _raises(mods, init, "rank=4", _init, run_node, flux, run_name, rank=8, resume=name)
    assert "set rank to 4" in msg
    msg = _raises(mods, init, "family='flux'", _init, run_node, qwen, run_name, rank=4, resume=name)
    assert "connect the flux model" in msg
    _raises(mods, init, "rank 0", _init, run_node, flux, run_name, rank=0)
    _raises(mods, init, "run_name", _init, run_node, flux, "../outside")
    for prefix in ("../outside", "/tmp/absolute", "a/../../b", "C:/x"):
        _raises(mods, save, "filename_prefix", run_node, "FlowGRPOSaveLoRA", trainer=trainer,
                filename_prefix=prefix, export="comfyui")
    _raises(mods, save, "unknown export", run_node, "FlowGRPOSaveLoRA", trainer=trainer, filename_prefix="",
            export="onnx")
    _raises(mods, apply, "do not exist in this MODEL", run_node, "FlowGRPOApplyLoRA", model=qwen, trainer=trainer,
            strength=1.0)
    assert _files(loras) == before

    # a listed checkpoint whose training state is damaged, and a LoRA file without one
    broken = loras / f"{run_name}_broken_00001.safetensors"
    shutil.copyfile(path, broken)
    broken.with_name(broken.name.replace(".safetensors", ".flowgrpo-state")).write_bytes(b"not safetensors")
    assert broken.name in mods.io.resume_options()
    _raises(mods, init, "not a readable safetensors", _init, run_node, flux, run_name, resume=broken.name)
    lone = loras / f"{run_name}_lone_00001.safetensors"
    shutil.copyfile(path, lone)
    assert lone.name not in mods.io.resume_options()
    _raises(mods, init, "not a FlowGRPO checkpoint", _init, run_node, flux, run_name, resume=lone.name)


def test_save_into_a_subfolder_and_resume_from_it(mods, run_node, loras):
    with torch.inference_mode():
        flux = tiny_models.build_flux(seed=1)
    run_name = _run_name("sub")
    trainer, _ = _init(run_node, flux, run_name)
    (path,) = run_node("FlowGRPOSaveLoRA", trainer=trainer, filename_prefix=f"{run_name}_dir/{run_name}",
                       export="comfyui")
    name = f"{run_name}_dir/{run_name}_00000.safetensors"
    assert Path(path) == loras / name and name in mods.io.resume_options()
    resumed, _ = _init(run_node, flux, run_name, resume=name)
    assert resumed.checkpoint == path


# ------------------------------------------------------------------------------------------ server
def _server_prompt(unet_name, run_name, resume):
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": unet_name, "weight_dtype": "default"}},
        "2": {"class_type": "FlowGRPOLoRAInit",
              "inputs": {"model": ["1", 0], "rank": 4, "alpha": 4.0, "targets": "attention", "learning_rate": 1e-4,
                         "seed": 0, "run_name": run_name, "resume": resume}},
        "3": {"class_type": "FlowGRPOSaveLoRA", "inputs": {"trainer": ["2", 0], "filename_prefix": "",
                                                           "export": "comfyui"}},
    }


def _resume_options(client) -> list[str]:
    spec = client.get_json("/object_info/FlowGRPOLoRAInit")["FlowGRPOLoRAInit"]["input"]["required"]["resume"]
    return spec[0] if isinstance(spec[0], list) else spec[1]["options"]


def _cached_nodes(entry) -> set[str]:
    return {n for kind, data in entry["status"]["messages"] if kind == "execution_cached" for n in data["nodes"]}


@pytest.mark.server
def test_server_runs_init_and_save_on_every_queue_and_lists_new_checkpoints(comfy_client, tiny_sd3_file, loras):
    from client import ComfyError

    run_name = _run_name("server")
    name = f"{run_name}_00000.safetensors"
    assert name not in _resume_options(comfy_client) and "latest" in _resume_options(comfy_client)
    first = comfy_client.run(_server_prompt(tiny_sd3_file, run_name, "none"))
    assert name in first["outputs"]["3"]["text"][0] and (loras / name).is_file()
    second = comfy_client.run(_server_prompt(tiny_sd3_file, run_name, "none"))
    assert "1" in _cached_nodes(second) and not {"2", "3"} & _cached_nodes(second), "Init and Save must re-run"

    # the new checkpoint is offered (and accepted by validation) without a restart
    assert name in _resume_options(comfy_client)
    comfy_client.run(_server_prompt(tiny_sd3_file, run_name, name))
    with pytest.raises(ComfyError, match="resume"):
        comfy_client.run(_server_prompt(tiny_sd3_file, run_name, f"{run_name}_99999.safetensors"))


def test_latest_is_the_newest_checkpoint_of_this_run_only(mods, loras):
    run = _run_name("latest")
    made = []
    for stem in (f"{run}_00001", f"{run}_big_00002", f"{run}x_00003"):  # written in this order: newest last
        for suffix in (".safetensors", ".flowgrpo-state"):
            made.append(loras / f"{stem}{suffix}")
            made[-1].write_bytes(b"")
    try:
        assert mods.io.find_latest_checkpoint(run) == loras / f"{run}_00001.safetensors"
        assert mods.io.find_latest_checkpoint(f"{run}_big") == loras / f"{run}_big_00002.safetensors"
        assert mods.io.find_latest_checkpoint(f"{run}_none") is None
    finally:
        for path in made:
            path.unlink()
