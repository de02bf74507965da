"""``nodes/comfy_policy.py`` in a real ComfyUI: LoRA through weight wrappers, rollout/replay, one GRPO update.

Models are loaded the way ComfyUI does it (SD3 through ``UNETLoader``, FLUX and Qwen-Image built under
``torch.inference_mode()``), so every base parameter is an inference tensor, including FLUX's RMSNorm scales.
"""

from __future__ import annotations

import importlib
from types import SimpleNamespace

import pytest
import torch

import tiny_models

pytestmark = pytest.mark.comfy

FLOW_KINDS = ("sd3", "flux", "qwen_image")
BATCH = 4

#: per kind: CFG scale, norm rescale, SDE kind and noise level of the rollout (the settings of grpo-math.md §7)
SETTINGS = {
    "sd3": dict(cfg=4.5, norm_rescale=False, sde="flow_sde", noise=0.7),
    "flux": dict(cfg=1.0, norm_rescale=False, sde="cps", noise=0.5),
    "qwen_image": dict(cfg=4.0, norm_rescale=True, sde="flow_sde", noise=1.2),
}


@pytest.fixture(scope="module")
def mods(flowgrpo_pack):
    """The pack's modules as ComfyUI loaded them (relative imports: same package as the policy)."""
    pkg = flowgrpo_pack.package
    return SimpleNamespace(policy=importlib.import_module(f"{pkg}.nodes.comfy_policy"),
                           adapters=importlib.import_module(f"{pkg}.nodes.lora_adapters"),
                           conditioning=importlib.import_module(f"{pkg}.nodes.conditioning"),
                           targets=importlib.import_module(f"{pkg}.nodes.lora_targets"),
                           compat=importlib.import_module(f"{pkg}.nodes.compat"),
                           rollout=importlib.import_module(f"{pkg}.flowgrpo_core.rollout"),
                           trainer=importlib.import_module(f"{pkg}.flowgrpo_core.trainer"))


def _load(kind, run_node, tiny_sd3_file):
    """The MODEL as a user gets it: loaded under inference mode, so its parameters are inference tensors."""
    if kind == "sd3":
        model = run_node("UNETLoader", unet_name=tiny_sd3_file, weight_dtype="default")[0]
    else:
        with torch.inference_mode():
            model = tiny_models.BUILDERS[kind](seed=1)
    assert any(p.is_inference() for p in model.model.parameters())
    return model


def _conds(kind):
    positive = tiny_models.conditioning(kind, seed=3)
    negative = tiny_models.conditioning(kind, seed=4) if SETTINGS[kind]["cfg"] != 1.0 else None
    return positive, negative


def _sample(run_node, model, cond, steps=4, noise_seed=42, kind="sd3"):
    """Stock sampling: BasicGuider + KSamplerSelect euler through SamplerCustomAdvanced."""
    (sampler,) = run_node("KSamplerSelect", sampler_name="euler")
    (guider,) = run_node("BasicGuider", model=model, conditioning=cond)
    (sigmas,) = run_node("BasicScheduler", model=model, scheduler="simple", steps=steps, denoise=1.0)
    (noise,) = run_node("RandomNoise", noise_seed=noise_seed)
    latent = {"samples": torch.zeros(tiny_models.latent_shape(kind, 2, 8, 8))}
    out, _ = run_node("SamplerCustomAdvanced", noise=noise, guider=guider, sampler=sampler, sigmas=sigmas,
                      latent_image=latent)
    return out["samples"]


def _base_velocity(model, x, sigma, cond, cfg, norm_rescale, policy_mod):
    """The velocity of the untouched MODEL (called before any LoRA exists), CFG written out independently."""
    def branch(kw):
        with torch.inference_mode():
            return (x - model.model.apply_model(x, sigma, **kw)) / sigma.reshape(-1, *[1] * (x.dim() - 1))
    v_c = branch(cond["positive"])
    if cfg == 1.0:
        return v_c
    v_u = branch(cond["negative"])
    v = v_u + cfg * (v_c - v_u)
    return policy_mod.cfg_norm_rescale(v, v_c) if norm_rescale else v


def _packed_norm_rescale(guided, cond):
    """Diffusers' Qwen-Image rescale on packed tokens [B, N, 64] (norm over the last dim), unpacked again."""
    b, c, t, h, w = guided.shape

    def pack(v):  # ComfyUI's QwenImageTransformer2DModel.process_img packing (T = 1)
        v = v[:, :, 0].reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
        return v.reshape(b, (h // 2) * (w // 2), c * 4)

    g, k = pack(guided), pack(cond)
    out = g * (k.norm(dim=-1, keepdim=True) / g.norm(dim=-1, keepdim=True))
    out = out.reshape(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)
    return out[:, :, None]


# ------------------------------------------------------------------------------------------ unit checks
def test_norm_rescale_matches_diffusers_token_layout(mods):
    g = torch.Generator().manual_seed(0)
    guided = torch.randn(2, 16, 1, 6, 8, generator=g)
    cond = torch.randn(2, 16, 1, 6, 8, generator=g)
    got = mods.policy.cfg_norm_rescale(guided, cond)
    torch.testing.assert_close(got, _packed_norm_rescale(guided, cond), rtol=1e-6, atol=1e-6)
    # a per-channel or per-pixel norm would differ
    per_pixel = guided * (cond.norm(dim=1, keepdim=True) / guided.norm(dim=1, keepdim=True))
    assert (got - per_pixel).abs().max() > 1e-2


@pytest.mark.parametrize("kind", FLOW_KINDS)
def test_attach_lora_targets_dtype_and_fresh_policy_equals_base(kind, mods, run_node, tiny_sd3_file):
    P = mods.policy
    model = _load(kind, run_node, tiny_sd3_file)
    wrappers_before = dict(model.weight_wrapper_patches)
    attn, lora = mods.adapters.attach_trainable_lora(model, rank=4, alpha=4.0, targets="attention")
    both, lora_both = mods.adapters.attach_trainable_lora(model, rank=4, alpha=4.0, targets="attention_mlp")
    assert model.weight_wrapper_patches == wrappers_before, "the input MODEL must get no wrapper"
    assert attn is not model and attn.model is model.model

    ups = {k: v for k, v in lora.items() if k.endswith(".lora_up.weight")}
    assert ups and len(ups) < len([k for k in lora_both if k.endswith(".lora_up.weight")])
    assert all(k.startswith("diffusion_model.") for k in lora)
    assert all(v.dtype == torch.float32 for v in lora.values())
    assert all(float(v.detach().abs().max()) == 0.0 for v in ups.values()), "B (up) starts at zero"
    assert all(float(lora[k.replace("lora_up", "lora_down")].detach().abs().max()) > 0 for k in ups)
    names = " ".join(ups)
    expected = {"sd3": ("attn.qkv", "attn.proj"), "flux": ("img_attn.qkv", "single_blocks.0.linear1"),
                "qwen_image": ("attn.to_q", "attn.add_k_proj", "attn.to_out.0")}[kind]
    assert all(e in names for e in expected), names
    for bad in ("mlp", "_mod.", "modulation", "embed", "norm_out", "final_layer"):
        assert bad not in names.replace("diffusion_model.", ""), (bad, names)

    policy = P.ComfyFlowPolicy(attn, **{k: SETTINGS[kind][k] for k in ("cfg", "norm_rescale")})
    params = policy.trainable_parameters()
    assert len(params) == 2 * len(ups) and all(p.requires_grad for p in params)
    assert not any(p.requires_grad for p in attn.model.parameters()), "the base must be frozen"
    pos, neg = _conds(kind)
    cond = mods.conditioning.encode_conditioning(attn, pos, neg, 2, tiny_models.latent_shape(kind, 2))
    x = tiny_models.random_latent(kind, batch=2, seed=5)
    sigma = torch.tensor([0.9, 0.4])
    with torch.no_grad():
        v = policy.velocity(x, sigma, cond)
        with policy.reference():
            v_ref = policy.velocity(x, sigma, cond)
    torch.testing.assert_close(v, v_ref, rtol=0, atol=1e-6)


def test_unknown_targets_and_models_without_targets_raise(mods, run_node, tiny_sd3_file, monkeypatch):
    model = _load("sd3", run_node, tiny_sd3_file)
    with pytest.raises(ValueError, match="targets must be one of"):
        mods.adapters.attach_trainable_lora(model, targets="everything")
    monkeypatch.setitem(mods.targets._GROUPS, "attention_mlp", ("no_such_role",))
    with pytest.raises(ValueError, match="this sd3 model has no no_such_role Linear layer inside a transformer block"):
        mods.adapters.attach_trainable_lora(model, targets="attention_mlp")


# ------------------------------------------------------------------------------------------ rollout and update
@pytest.mark.parametrize("kind", FLOW_KINDS)
def test_rollout_replay_and_grpo_update(kind, mods, run_node, tiny_sd3_file):
    P, R, T = mods.policy, mods.rollout, mods.trainer
    s = SETTINGS[kind]
    model = _load(kind, run_node, tiny_sd3_file)
    pos, neg = _conds(kind)
    stock_before = _sample(run_node, model, pos, kind=kind)

    patcher, lora = mods.adapters.attach_trainable_lora(model, rank=4, alpha=4.0, targets="attention_mlp", seed=0)
    policy = P.ComfyFlowPolicy(patcher, cfg=s["cfg"], norm_rescale=s["norm_rescale"])
    cond = mods.conditioning.encode_conditioning(patcher, pos, neg, BATCH, tiny_models.latent_shape(kind, BATCH))
    if kind == "flux":
        assert cond["positive"]["guidance"].tolist() == [3.5] * BATCH and "negative" not in cond
    else:
        assert cond["negative"]["c_crossattn"].shape[0] == BATCH

    x_probe = tiny_models.random_latent(kind, batch=2, seed=9)
    sigma_probe = torch.tensor([0.8, 0.3])
    probe_cond = {k: {kk: vv[:2] for kk, vv in b.items()} for k, b in cond.items()}
    v_base = _base_velocity(model, x_probe, sigma_probe, probe_cond, s["cfg"], s["norm_rescale"], P)

    # a nonzero LoRA, so that the rollout really runs through the adapters
    with torch.no_grad():
        for k, p in lora.items():
            if k.endswith("lora_up.weight"):
                p.normal_(0.0, 0.2, generator=torch.Generator().manual_seed(len(k)))
    with torch.no_grad():
        v_lora = policy.velocity(x_probe, sigma_probe, probe_cond)
    assert v_lora.grad_fn is None, "no graph may be built under torch.no_grad()"
    assert (v_lora - v_base).abs().max() > 1e-3, "the LoRA must change the velocity"

    spec = R.RolloutSpec(kind=s["sde"], noise_level=s["noise"], sigmas=[1.0, 0.75, 0.5, 0.25, 0.0],
                         sde_mask=[True, True, True, False], train_mask=[True, True, True, False],
                         micro_batch_size=2, extras=policy.extras())
    x_start = tiny_models.random_latent(kind, batch=BATCH, seed=11)
    trajectory = R.sample_trajectory(policy, x_start, cond, spec, generator=torch.Generator().manual_seed(3))
    assert trajectory.latents.isfinite().all() and trajectory.log_probs.isfinite().all()
    assert (trajectory.final[0] - trajectory.final[1]).abs().max() > 1e-3

    recomputed = R.recompute_log_probs(policy, trajectory)
    log_ratio = (recomputed - trajectory.log_probs[spec.train_steps]).abs().max()
    assert float(log_ratio) <= 1e-5, f"replay log ratio {float(log_ratio)}"

    # one update; record the gradients the optimizer sees
    params = policy.trainable_parameters()
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.Adam(params, lr=1e-3)
    seen = {}
    step = optimizer.step

    def checked_step(*a, **kw):
        seen["grads"] = [None if p.grad is None else p.grad.detach().clone() for p in params]
        return step(*a, **kw)

    optimizer.step = checked_step
    trainer = T.GRPOTrainer(policy, optimizer, T.GRPOConfig(clip_range=1e-4, kl_beta=0.01))
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])
    with pytest.raises(RuntimeError, match="policy.training"):
        trainer.update(trajectory, advantages)
    with policy.training():
        metrics = trainer.update(trajectory, advantages)
    assert metrics["first_log_ratio_abs_max"] <= 1e-5, metrics
    grads = seen["grads"]
    names = [k for k, p in lora.items() if p.requires_grad]
    assert all(g.isfinite().all() for g in grads if g is not None)
    # the text stream of Qwen-Image's last block feeds nothing (its output is dropped): no grad, or exactly zero for
    # the text queries (they only produce the dropped text outputs); every other LoRA tensor gets a nonzero grad
    dead = {k for k in names if k.startswith("diffusion_model.transformer_blocks.0.")
            and any(m in k for m in (".txt_mlp.", ".to_add_out.", ".add_q_proj."))} if kind == "qwen_image" else set()
    zero = {k for k, g in zip(names, grads) if g is None or float(g.abs().max()) == 0.0}
    assert zero == dead, zero ^ dead
    grads = [g for g in grads if g is not None]
    assert sum(float(g.abs().sum()) for g in grads) > 0
    changed = {k for k, b, p in zip(names, before, params) if not torch.equal(b, p.detach())}
    assert changed == set(names) - dead, set(names) - dead - changed

    with torch.no_grad():
        v_trained = policy.velocity(x_probe, sigma_probe, probe_cond)
    assert (v_trained - v_lora).abs().max() > 1e-6, "the update must change the policy's velocity"

    # the input MODEL is untouched: stock sampling (which loads the original patcher) is bit-identical
    stock_after = _sample(run_node, model, pos, kind=kind)
    torch.testing.assert_close(stock_after, stock_before, rtol=0, atol=0)
    # ... and the policy re-installs its adapters afterwards
    with torch.no_grad():
        torch.testing.assert_close(policy.velocity(x_probe, sigma_probe, probe_cond), v_trained, rtol=0, atol=1e-6)
        # reference() is the base model even after training
        with policy.reference():
            v_ref = policy.velocity(x_probe, sigma_probe, probe_cond)
    torch.testing.assert_close(v_ref, v_base, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", FLOW_KINDS)
def test_gradient_checkpointing_gives_the_same_gradients(kind, mods, run_node, tiny_sd3_file):
    P = mods.policy
    s = SETTINGS[kind]
    model = _load(kind, run_node, tiny_sd3_file)
    patcher, lora = mods.adapters.attach_trainable_lora(model, rank=4, alpha=4.0, targets="attention_mlp", seed=0)
    with torch.no_grad():
        for k, p in lora.items():
            if k.endswith("lora_up.weight"):
                p.normal_(0.0, 0.2, generator=torch.Generator().manual_seed(len(k)))
    pos, neg = _conds(kind)
    cond = mods.conditioning.encode_conditioning(patcher, pos, neg, 2, tiny_models.latent_shape(kind, 2))
    x = tiny_models.random_latent(kind, batch=2, seed=5)
    sigma = torch.tensor([0.9, 0.4])
    blocks = [b for _, b in mods.targets.transformer_blocks(patcher.model.diffusion_model)]
    assert blocks and not any("forward" in b.__dict__ for b in blocks)

    grads = {}
    for checkpointing in (False, True):
        policy = P.ComfyFlowPolicy(patcher, cfg=s["cfg"], norm_rescale=s["norm_rescale"], checkpointing=checkpointing)
        params = policy.trainable_parameters()
        for p in params:
            p.grad = None
        with policy.training():
            if checkpointing:
                assert all("forward" in b.__dict__ for b in blocks), "every block is wrapped inside the context"
            policy.velocity(x, sigma, cond).square().mean().backward()
        grads[checkpointing] = [p.grad.detach().clone() for p in params if p.grad is not None]
    assert not any("forward" in b.__dict__ for b in blocks), "the shared blocks are restored afterwards"
    with P.gradient_checkpointing(patcher) as outer:
        with P.gradient_checkpointing(patcher) as inner:
            assert (outer, inner) == (len(blocks), 0), "an inner context wraps nothing twice"
        assert all("forward" in b.__dict__ for b in blocks), "leaving the inner context keeps the outer wrappers"
    assert not any("forward" in b.__dict__ for b in blocks)
    assert len(grads[True]) == len(grads[False]) > 0
    for a, b in zip(grads[False], grads[True]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind", FLOW_KINDS)
def test_mutation_context_only_for_models_that_update_saved_tensors_in_place(kind, mods, run_node, tiny_sd3_file):
    """``allow_mutation_on_saved_tensors`` watches every operation; the policy uses it only where plain autograd
    fails: ComfyUI's FLUX blocks (``img += ...``). SD3 and Qwen-Image train with plain autograd."""
    P = mods.policy
    patcher, lora = mods.adapters.attach_trainable_lora(_load(kind, run_node, tiny_sd3_file), rank=4, alpha=4.0,
                                            targets="attention_mlp", seed=0)
    with torch.no_grad():
        for k, p in lora.items():
            if k.endswith("lora_up.weight"):
                p.normal_(0.0, 0.2, generator=torch.Generator().manual_seed(len(k)))
    assert P.mutates_saved_tensors(patcher.model) == (kind == "flux")
    pos, _ = _conds(kind)
    cond = mods.conditioning.encode_conditioning(patcher, pos, None, 2, tiny_models.latent_shape(kind, 2))
    x = tiny_models.random_latent(kind, batch=2, seed=5)
    P.ComfyFlowPolicy(patcher).ensure_loaded()
    params = [p for p in lora.values() if p.requires_grad]
    # plain autograd, no mutation context (in ComfyUI's training mode, as every graph-building forward runs)
    with torch.inference_mode(False), torch.enable_grad(), mods.compat.training_mode():
        loss = patcher.model.apply_model(x, torch.tensor([0.9, 0.4]), **cond["positive"]).square().mean()
        if kind == "flux":
            with pytest.raises(RuntimeError, match="inplace"):
                loss.backward()
        else:
            loss.backward()
            assert any(p.grad is not None and float(p.grad.abs().max()) > 0 for p in params)
