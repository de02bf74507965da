"""The rollout and GRPO Update nodes in a real ComfyUI on tiny SD3, FLUX and Qwen-Image models.

Must-show items 1 and 2 of the nodes issue: the update's first recomputed log-probs equal the rollout's (CFG on for SD3
and Qwen-Image, the guidance embedding for FLUX), and the input MODEL is unchanged by training.
"""

from __future__ import annotations

import importlib
import json
from types import SimpleNamespace

import pytest
import torch

import tiny_models

pytestmark = pytest.mark.comfy

#: per family: rollout settings of the kind the papers use (CFG for SD3 / Qwen-Image, guidance for FLUX)
SETTINGS = {
    "sd3": dict(cfg=4.5, norm_rescale=False, sde_kind="flow_sde", noise_level=0.7),
    "flux": dict(cfg=1.0, norm_rescale=False, sde_kind="cps", noise_level=0.8),
    "qwen_image": dict(cfg=4.0, norm_rescale=True, sde_kind="flow_sde", noise_level=1.2),
}
PROMPTS, GROUP = 2, 2
BATCH = PROMPTS * GROUP


@pytest.fixture(scope="module")
def mods(flowgrpo_pack):
    pkg = flowgrpo_pack.package
    return SimpleNamespace(state=importlib.import_module(f"{pkg}.nodes.state"),
                           rollout=importlib.import_module(f"{pkg}.nodes.rollout_nodes"))


def load_model(kind, run_node, tiny_sd3_file):
    """The MODEL as a user gets it (SD3 through the stock UNETLoader; FLUX / Qwen-Image built under inference mode)."""
    if kind == "sd3":
        return run_node("UNETLoader", unet_name=tiny_sd3_file, weight_dtype="default")[0]
    with torch.inference_mode():
        return tiny_models.BUILDERS[kind](seed=1)


def batched_conditioning(kind, seeds, group, guidance=3.5):
    """One CONDITIONING entry with ``len(seeds) * group`` rows: prompt k's conditioning repeated ``group`` times."""
    entries = [tiny_models.conditioning(kind, seed=s, guidance=guidance)[0] for s in seeds]
    cond = torch.cat([e[0].repeat(group, 1, 1) for e in entries])
    extra = dict(entries[0][1])
    if "pooled_output" in extra:
        extra["pooled_output"] = torch.cat([e[1]["pooled_output"].repeat(group, 1) for e in entries])
    return [[cond, extra]]


def prompt_batch(mods, prompts=PROMPTS, group=GROUP, iteration=0):
    ids = torch.arange(prompts).repeat_interleave(group)
    return mods.state.PromptBatch(texts=tuple(f"prompt {int(i)}" for i in ids), group_ids=ids,
                                  prompt_indices=tuple(int(i) for i in ids), iteration=iteration, group_size=group)


def stock_sample(run_node, model, cond, kind, steps=4, seed=42):
    """Stock euler through SamplerCustomAdvanced + BasicGuider."""
    (sampler,) = run_node("KSamplerSelect", sampler_name="euler")
    (guider,) = run_node("BasicGuider", model=model, conditioning=cond)
    (sigmas,) = run_node("BasicScheduler", model=model, scheduler="simple", steps=steps, denoise=1.0)
    (noise,) = run_node("RandomNoise", noise_seed=seed)
    latent = {"samples": torch.zeros(tiny_models.latent_shape(kind, 2, 8, 8))}
    return run_node("SamplerCustomAdvanced", noise=noise, guider=guider, sampler=sampler, sigmas=sigmas,
                    latent_image=latent)[0]["samples"]


ROLLOUT_DEFAULTS = dict(width=64, height=64, steps=4, scheduler="simple", shift=0.0, step_mode="fraction",
                        train_fraction=0.99, window_size=2, window_start=0, window_shift_every=25,
                        micro_batch_size=2, seed=7, iteration=0)
UPDATE_DEFAULTS = dict(clip_range=1e-4, kl_beta=0.01, adv_clip_max=5.0, max_grad_norm=1.0, std_mode="global",
                       optimizer_steps=1, gradient_checkpointing=False)


def rollout_inputs(kind, **overrides):
    s = SETTINGS[kind]
    return dict(ROLLOUT_DEFAULTS, sde_kind=s["sde_kind"], noise_level=s["noise_level"], cfg=s["cfg"],
                norm_rescale=s["norm_rescale"], **overrides)


def init_trainer(run_node, model, run_name, **kw):
    args = dict(rank=4, alpha=4.0, targets="attention_mlp", learning_rate=1e-3, seed=0, run_name=run_name,
                resume="none")
    args.update(kw)
    return run_node("FlowGRPOLoRAInit", model=model, **args)


def randomise_lora_(state, std=0.2):
    """Move the LoRA off its zero init so rollouts really run through the adapters."""
    with torch.inference_mode(False), torch.no_grad():
        for k, p in state.lora_params.items():
            if k.endswith("lora_up.weight"):
                p.normal_(0.0, std, generator=torch.Generator().manual_seed(len(k)))


@pytest.mark.parametrize("kind", list(SETTINGS))
def test_rollout_update_log_prob_parity_and_untouched_model(kind, mods, run_node, tiny_sd3_file):
    model = load_model(kind, run_node, tiny_sd3_file)
    single = tiny_models.conditioning(kind, seed=3)
    before = stock_sample(run_node, model, single, kind)

    trainer, train_model = init_trainer(run_node, model, f"parity_{kind}")
    randomise_lora_(trainer)
    positive = batched_conditioning(kind, seeds=(3, 5), group=GROUP)
    negative = batched_conditioning(kind, seeds=(4, 4), group=GROUP) if SETTINGS[kind]["cfg"] != 1.0 else None
    latent, rollout = run_node("FlowGRPOSDERollout", model=train_model, positive=positive, negative=negative,
                               groups=prompt_batch(mods), **rollout_inputs(kind))
    traj = rollout.trajectory
    assert latent["samples"].shape[0] == BATCH and torch.isfinite(latent["samples"]).all()
    assert traj.latents.shape[:2] == (5, BATCH) and traj.log_probs.shape == (4, BATCH)
    assert traj.spec.train_steps == [0, 1, 2] and dict(traj.spec.extras)["cfg"] == SETTINGS[kind]["cfg"]
    assert bool((traj.log_probs[:3] != 0).all()) and bool((traj.log_probs[3] == 0).all())
    if kind == "flux":
        assert traj.cond["positive"]["guidance"].tolist() == [3.5] * BATCH

    params = [p for k, p in trainer.lora_params.items() if p.requires_grad]
    snapshot = [p.detach().clone() for p in params]
    rewards = mods.state.Rewards(values=torch.tensor([1.0, 0.0, 0.3, 0.9]))
    new_state, metrics_json, reward_mean = run_node("FlowGRPOUpdate", trainer=trainer, rollout=rollout,
                                                    rewards=rewards, **UPDATE_DEFAULTS)
    metrics = json.loads(metrics_json)
    assert metrics["first_log_ratio_abs_max"] <= 1e-5, metrics
    assert abs(reward_mean - 0.55) < 1e-6 and metrics["iteration"] == 1
    assert new_state.iteration == trainer.iteration + 1 and new_state is not trainer
    assert len(new_state.history) == 1 and new_state.history[0]["reward_mean"] == pytest.approx(0.55)
    assert any(not torch.equal(a, p.detach()) for a, p in zip(snapshot, params)), "the update must move the LoRA"

    after = stock_sample(run_node, model, single, kind)
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_same_seed_same_rollout_and_iteration_moves_it(mods, run_node, tiny_sd3_file):
    model = load_model("sd3", run_node, tiny_sd3_file)
    positive = batched_conditioning("sd3", seeds=(3, 5), group=GROUP)
    negative = batched_conditioning("sd3", seeds=(4, 4), group=GROUP)
    runs = [run_node("FlowGRPOSDERollout", model=model, positive=positive, negative=negative,
                     **rollout_inputs("sd3", iteration=it))[1] for it in (0, 0, 1)]
    torch.testing.assert_close(runs[0].trajectory.latents, runs[1].trajectory.latents, rtol=0, atol=0)
    assert (runs[0].trajectory.latents[-1] - runs[2].trajectory.latents[-1]).abs().max() > 1e-3


def test_rollout_bad_inputs_name_the_node(mods, run_node, tiny_sd3_file):
    NodeInputError = mods.state.NodeInputError
    sd3 = load_model("sd3", run_node, tiny_sd3_file)
    positive = batched_conditioning("sd3", seeds=(3, 5), group=GROUP)
    negative = batched_conditioning("sd3", seeds=(4, 4), group=GROUP)
    with pytest.raises(NodeInputError, match=r"FlowGRPO SDE Sampler \(rollout\): .*eps.*Fix: connect a flow"):
        run_node("FlowGRPOSDERollout", model=tiny_models.build_sd15_eps(), positive=positive, negative=negative,
                 **rollout_inputs("sd3"))
    bad_latent = {"samples": torch.zeros(3, 16, 8, 8)}
    with pytest.raises(NodeInputError, match="mismatched latent sizes: the LATENT has batch 3"):
        run_node("FlowGRPOSDERollout", model=sd3, positive=positive, negative=negative, latent=bad_latent,
                 **rollout_inputs("sd3"))
    with pytest.raises(NodeInputError, match="groups describe 6 samples"):
        run_node("FlowGRPOSDERollout", model=sd3, positive=positive, negative=negative,
                 groups=prompt_batch(mods, prompts=3), **rollout_inputs("sd3"))
    with pytest.raises(NodeInputError, match="needs a negative conditioning"):
        run_node("FlowGRPOSDERollout", model=sd3, positive=positive, **rollout_inputs("sd3"))


def test_update_rejects_nan_rewards_and_foreign_rollouts(mods, run_node, tiny_sd3_file):
    NodeInputError = mods.state.NodeInputError
    model = load_model("sd3", run_node, tiny_sd3_file)
    trainer, train_model = init_trainer(run_node, model, "bad_update")
    positive = batched_conditioning("sd3", seeds=(3, 5), group=GROUP)
    negative = batched_conditioning("sd3", seeds=(4, 4), group=GROUP)
    _, rollout = run_node("FlowGRPOSDERollout", model=train_model, positive=positive, negative=negative,
                          groups=prompt_batch(mods), **rollout_inputs("sd3"))
    params = {k: p.detach().clone() for k, p in trainer.lora_params.items()}
    nan = mods.state.Rewards(values=torch.tensor([1.0, float("nan"), 0.0, 1.0]))
    with pytest.raises(NodeInputError, match=r"FlowGRPO GRPO Update: the rewards of samples \[1\] are NaN"):
        run_node("FlowGRPOUpdate", trainer=trainer, rollout=rollout, rewards=nan, **UPDATE_DEFAULTS)
    assert all(torch.equal(params[k], p.detach()) for k, p in trainer.lora_params.items()), "nothing may change"

    _, foreign = run_node("FlowGRPOSDERollout", model=model, positive=positive, negative=negative,
                          groups=prompt_batch(mods), **rollout_inputs("sd3"))
    ok = mods.state.Rewards(values=torch.tensor([1.0, 0.0, 0.0, 1.0]))
    with pytest.raises(NodeInputError, match="does not carry this trainer's LoRA"):
        run_node("FlowGRPOUpdate", trainer=trainer, rollout=foreign, rewards=ok, **UPDATE_DEFAULTS)
    short = mods.state.Rewards(values=torch.tensor([1.0, 0.0]))
    with pytest.raises(NodeInputError, match="2 rewards for a rollout of 4 samples"):
        run_node("FlowGRPOUpdate", trainer=trainer, rollout=rollout, rewards=short, **UPDATE_DEFAULTS)


@pytest.mark.parametrize("mode", ["weighted_sum", "advantage_sum"])
def test_two_weighted_rewards_train_with_hand_computed_advantages(mode, mods, run_node, tiny_sd3_file,
                                                                  flowgrpo_pack):
    update_nodes = importlib.import_module(f"{flowgrpo_pack.package}.nodes.update_nodes")
    model = load_model("sd3", run_node, tiny_sd3_file)
    trainer, train_model = init_trainer(run_node, model, f"two_rewards_{mode}")
    positive = batched_conditioning("sd3", seeds=(3, 5), group=GROUP)
    negative = batched_conditioning("sd3", seeds=(4, 4), group=GROUP)
    _, rollout = run_node("FlowGRPOSDERollout", model=train_model, positive=positive, negative=negative,
                          groups=prompt_batch(mods), **rollout_inputs("sd3"))
    a_scores, b_scores = torch.tensor([1.0, 3.0, 2.0, 2.0]), torch.tensor([10.0, 0.0, 5.0, 7.0])
    a = mods.state.Rewards(values=a_scores, components=(("a", a_scores),))
    b = mods.state.Rewards(values=b_scores, components=(("b", b_scores),))
    (combined,) = run_node("FlowGRPOCombineRewards", rewards_1=a, weight_1=1.0, rewards_2=b, weight_2=0.5,
                           weight_3=1.0, weight_4=1.0, mode=mode)
    torch.testing.assert_close(combined.values, torch.tensor([6.0, 3.0, 4.5, 5.5]))
    settings = update_nodes.update_settings(**{k: v for k, v in UPDATE_DEFAULTS.items()})
    got = update_nodes.advantages(combined, rollout.groups.group_ids, settings).advantages
    eps = 1e-4  # global std (the update's default): std of the whole batch, ddof 0
    if mode == "weighted_sum":
        total = [6.0, 3.0, 4.5, 5.5]
        std = torch.tensor(total).std(unbiased=False).item()
        expected = torch.tensor([(6.0 - 4.5), (3.0 - 4.5), (4.5 - 5.0), (5.5 - 5.0)]) / (std + eps)
    else:
        std_a = torch.tensor([1.0, 3.0, 2.0, 2.0]).std(unbiased=False).item()
        std_b = torch.tensor([10.0, 0.0, 5.0, 7.0]).std(unbiased=False).item()
        adv_a = torch.tensor([-1.0, 1.0, 0.0, 0.0]) / (std_a + eps)
        adv_b = torch.tensor([5.0, -5.0, -1.0, 1.0]) / (std_b + eps)
        expected = adv_a + 0.5 * adv_b
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)

    _, metrics_json, reward_mean = run_node("FlowGRPOUpdate", trainer=trainer, rollout=rollout, rewards=combined,
                                            **UPDATE_DEFAULTS)
    metrics = json.loads(metrics_json)
    assert metrics["first_log_ratio_abs_max"] <= 1e-5 and metrics["grad_norm"] > 0
    assert metrics["reward_a"] == pytest.approx(2.0) and metrics["reward_b"] == pytest.approx(5.5)
    assert reward_mean == pytest.approx(4.75)


def test_combine_rewards_needs_two(mods, run_node):
    a = mods.state.Rewards(values=torch.tensor([1.0, 0.0]), components=(("a", torch.tensor([1.0, 0.0])),))
    with pytest.raises(mods.state.NodeInputError, match="FlowGRPO Combine Rewards: 1 reward connected"):
        run_node("FlowGRPOCombineRewards", rewards_1=a, weight_1=1.0, weight_2=1.0, weight_3=1.0, weight_4=1.0,
                 mode="weighted_sum")


class _ForwardProbe:
    """A forward pre-hook on FLUX's first double block: records ComfyUI's training flag at each forward (None where
    the runtime has none) and, armed, makes the ``fail_at``-th forward with gradients fail as ``failure`` says."""

    def __init__(self, failure: str, fail_at: int = 2):
        self.failure, self.fail_at, self.grad_forwards, self.flags = failure, fail_at, 0, []

    def __call__(self, module, args):
        import comfy.model_management as mm

        self.flags.append(getattr(mm, "in_training", None))
        if torch.is_grad_enabled():
            self.grad_forwards += 1
            if self.grad_forwards == self.fail_at:
                if self.failure == "interrupt":  # a user's Cancel: seen at the next forward's interrupt check
                    mm.interrupt_current_processing(True)
                else:
                    raise RuntimeError("a failure inside the model (probe)")


def _kernel_counter(monkeypatch):
    """Counts calls of ComfyUI's fused inference kernels for RoPE (comfy-kitchen, 2026 runtimes): ``None`` where the
    runtime has none (then the flag is what the test can check)."""
    import comfy.quant_ops

    ck = getattr(comfy.quant_ops, "ck", None)
    if ck is None or not hasattr(ck, "apply_rope1"):
        return None
    calls = {"n": 0}
    for name in ("apply_rope", "apply_rope1"):
        kernel = getattr(ck, name)

        def counted(*a, _kernel=kernel, **kw):
            calls["n"] += 1
            return _kernel(*a, **kw)
        monkeypatch.setattr(ck, name, counted)
    return calls


@pytest.mark.parametrize("failure", ["error", "interrupt"])
def test_an_update_that_fails_midway_restores_comfyuis_training_flag(failure, mods, run_node, tiny_sd3_file,
                                                                      monkeypatch):
    """The update builds its graph in ComfyUI's training mode (2026 runtimes: kernels with autograd formulas) and,
    failing midway (an error in the model, or the user's interrupt), leaves the flag as it found it: the next stock
    sampling runs the inference kernels again and gives the same samples as before the update."""
    import comfy.model_management as mm

    kind = "flux"
    model = load_model(kind, run_node, tiny_sd3_file)
    single = tiny_models.conditioning(kind, seed=3)
    kernels = _kernel_counter(monkeypatch)
    before = stock_sample(run_node, model, single, kind)
    kernel_calls_per_sampling = kernels and kernels["n"]
    trainer, train_model = init_trainer(run_node, model, f"fails_midway_{failure}")
    randomise_lora_(trainer)
    _, rollout = run_node("FlowGRPOSDERollout", model=train_model, positive=batched_conditioning(kind, (3, 5), GROUP),
                          groups=prompt_batch(mods), **rollout_inputs(kind))
    params = {k: p.detach().clone() for k, p in trainer.lora_params.items()}
    flag_before = getattr(mm, "in_training", None)
    probe = _ForwardProbe(failure)
    handle = model.model.diffusion_model.double_blocks[0].register_forward_pre_hook(probe)
    try:
        with pytest.raises((Exception, mm.InterruptProcessingException)) as raised:
            run_node("FlowGRPOUpdate", trainer=trainer, rollout=rollout,
                     rewards=mods.state.Rewards(values=torch.tensor([1.0, 0.0, 0.3, 0.9])), **UPDATE_DEFAULTS)
        training_flags = list(probe.flags)
        probe.flags.clear()
        kernel_calls_before_after = kernels and kernels["n"]
        after = stock_sample(run_node, model, single, kind)
    finally:
        handle.remove()
        mm.interrupt_current_processing(False)
    expected = {"error": "a failure inside the model", "interrupt": "Interrupt"}[failure]
    assert expected in f"{type(raised.value).__name__}: {raised.value}"
    assert probe.grad_forwards >= 2, "the failure must come after the update's first forward"
    assert getattr(mm, "in_training", None) == flag_before
    assert all(torch.equal(params[k], p.detach()) for k, p in trainer.lora_params.items()), "no partial update"
    if flag_before is not None:  # a runtime with the flag: training forwards ran with it, stock sampling without
        assert flag_before is False and training_flags and all(training_flags)
        assert probe.flags and not any(probe.flags)
    if kernels is not None:  # and the stock sampler ran ComfyUI's fused inference kernels again, as before
        assert kernel_calls_per_sampling > 0
        assert kernels["n"] - kernel_calls_before_after == kernel_calls_per_sampling
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_an_interrupt_during_a_multi_step_update_waits_for_its_end(mods, run_node, tiny_sd3_file):
    """With several optimizer steps the update is not cut between them, although 2026 runtimes check for interrupts
    at every op: the request stays pending and is raised at the first check after the update."""
    import comfy.model_management as mm

    kind = "flux"
    model = load_model(kind, run_node, tiny_sd3_file)
    trainer, train_model = init_trainer(run_node, model, "interrupt_multistep")
    randomise_lora_(trainer)
    _, rollout = run_node("FlowGRPOSDERollout", model=train_model, positive=batched_conditioning(kind, (3, 5), GROUP),
                          groups=prompt_batch(mods), **rollout_inputs(kind))
    params = {k: p.detach().clone() for k, p in trainer.lora_params.items()}
    probe = _ForwardProbe("interrupt")
    handle = model.model.diffusion_model.double_blocks[0].register_forward_pre_hook(probe)
    try:
        new_state, metrics_json, _ = run_node(
            "FlowGRPOUpdate", trainer=trainer, rollout=rollout,
            rewards=mods.state.Rewards(values=torch.tensor([1.0, 0.0, 0.3, 0.9])),
            **dict(UPDATE_DEFAULTS, optimizer_steps=2))
        pending = mm.processing_interrupted()
        with pytest.raises(mm.InterruptProcessingException):
            mm.throw_exception_if_processing_interrupted()
    finally:
        handle.remove()
        mm.interrupt_current_processing(False)
    assert probe.grad_forwards > probe.fail_at, "the interrupt came before the update's last forward"
    assert pending and new_state.iteration == trainer.iteration + 1
    assert json.loads(metrics_json)["iteration"] == 1
    assert any(not torch.equal(params[k], p.detach()) for k, p in trainer.lora_params.items())
