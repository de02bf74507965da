"""Efficiency modes, seen from the diffusion network itself (issue 5): which steps are sampled stochastically and
which are trained, CFG layout, micro-batches, gradient checkpointing and the adapter-disabled KL reference.

Real ComfyUI, the tiny real SD3 (UNETLoader), real nodes (FlowGRPOLoRAInit, FlowGRPOSDERollout, FlowGRPOUpdate). The
network is instrumented, not the pack: :class:`forward_probe.ForwardProbe` hooks every forward of ComfyUI's MMDiT and
records its timestep (mapped back to the rollout's sigma grid), grad mode, batch, inputs, output and whether the LoRA
adapters were active.

Layout (``nodes.comfy_policy.ComfyFlowPolicy.velocity``): true CFG runs one forward of ``2b`` rows per velocity of a
micro-batch of ``b`` (positive rows first, then negative), as ComfyUI's samplers batch them; only conditionings of
different shapes (a negative of another token length) fall back to two forwards of ``b``.

Merged weights (``nodes.lora_adapters.merged_lora_weights``): during a rollout the adapted Linear layers hold their
merged weight and run without weight functions (ComfyUI's ``cast_bias_weight`` is not called for them, counted by
recording its calls); the layers get their own Parameter and weight functions back afterwards, the results are bitwise
those of the per-rollout cache and of ComfyUI's per-forward merge, and the update replays the rollout exactly.
"""

from __future__ import annotations

import contextlib
import importlib
import json
from collections import Counter
from types import SimpleNamespace

import pytest
import torch

from forward_probe import ForwardProbe
from test_grpo_nodes import UPDATE_DEFAULTS, batched_conditioning, init_trainer, load_model, prompt_batch, \
    randomise_lora_, rollout_inputs

pytestmark = pytest.mark.comfy

STEPS, BATCH = 5, 4
#: an ODE step reproduces x_{i+1} = x_i + (sigma_{i+1} - sigma_i) v(x_i) to float rounding; an SDE step adds noise
ODE_ATOL, SDE_MIN_GAP = 1e-5, 1e-3

#: step_mode settings per mode, all for STEPS = 5 (steps 0..3 may be stochastic, step 4 is always ODE)
MODES = {
    "fraction": dict(step_mode="fraction", train_fraction=0.5),  # Flow-GRPO: SDE 0-3, trained 0-1
    "fixed_window": dict(step_mode="fixed_window", window_start=1, window_size=2),
    "random_window": dict(step_mode="random_window", window_size=2),  # Flow-GRPO-Fast
    "sliding_window": dict(step_mode="sliding_window", window_start=0, window_size=2, window_shift_every=1),  # MixGRPO
    "random_subset": dict(step_mode="random_subset", train_fraction=0.5),  # DanceGRPO
}
#: iterations checked per mode (seed 7): the sliding window at two positions (iteration // window_shift_every = 0 and
#: 2: steps [0, 2) then [2, 4)); the random window lands on [2, 4) at iteration 1; the random subset is {1, 3} at
#: iteration 4 (not the first steps, unlike at iteration 1, where it would equal the fraction plan)
ITERATIONS = {"sliding_window": (0, 2), "random_subset": (4,)}


@pytest.fixture(scope="module")
def mods(flowgrpo_pack):
    pkg = flowgrpo_pack.package
    return SimpleNamespace(**{name: importlib.import_module(f"{pkg}.{path}") for name, path in (
        ("state", "nodes.state"), ("policy", "nodes.comfy_policy"), ("adapters", "nodes.lora_adapters"),
        ("conditioning", "nodes.conditioning"), ("windows", "flowgrpo_core.windows"),
        ("core_policy", "flowgrpo_core.policy"), ("rollout", "flowgrpo_core.rollout"))})


@pytest.fixture(scope="module")
def base_model(run_node, tiny_sd3_file):
    return load_model("sd3", run_node, tiny_sd3_file)


class MergeAwareProbe(ForwardProbe):
    """A :class:`ForwardProbe` that also counts an adapter as active while its Linear layer runs on the merged weight
    (``merged_lora_weights`` puts it in the layer and takes the adapter out of the layer's ``weight_function``)."""

    def lora_state(self):
        if not self.adapted:
            return False
        active = [bool(a.enabled) and (any(f is a for f in m.weight_function)
                                       or (a.swapped is not None and m.weight is a.swapped.merged))
                  for m, a in self.adapted]
        return True if all(active) else (False if not any(active) else None)


def make_trainer(mods, run_node, base_model, name, **lora):
    """A trainer with a non-zero LoRA (so enabled and disabled adapters give different outputs) and its probe."""
    trainer, train_model = init_trainer(run_node, base_model, name, **lora)
    randomise_lora_(trainer)
    return trainer, train_model, MergeAwareProbe(train_model, adapters=mods.adapters.lora_adapters(train_model))


def rollout(mods, run_node, train_model, cfg=4.5, **overrides):
    """Run the rollout node on B = 4 (two prompts x 2), by default training the 2-step window [1, 3) (few forwards);
    returns its Rollout."""
    settings = dict(rollout_inputs("sd3", steps=STEPS), cfg=cfg)
    settings.update(overrides if "step_mode" in overrides else dict(MODES["fixed_window"], **overrides))
    negative = batched_conditioning("sd3", seeds=(4, 4), group=2) if cfg != 1.0 else None
    positive = batched_conditioning("sd3", seeds=(3, 5), group=2)
    return run_node("FlowGRPOSDERollout", model=train_model, positive=positive, negative=negative,
                    groups=prompt_batch(mods, iteration=settings["iteration"]), **settings)[1]


def update(mods, run_node, trainer, ro, **overrides):
    rewards = mods.state.Rewards(values=torch.tensor([1.0, 0.0, 0.3, 0.9]))
    return run_node("FlowGRPOUpdate", trainer=trainer, rollout=ro, rewards=rewards,
                    **dict(UPDATE_DEFAULTS, **overrides))


def cfg_rows(ro) -> int:
    """Rows per sample in a forward: 2 with true CFG (positive and negative batched), 1 without."""
    return 1 if dict(ro.trajectory.spec.extras)["cfg"] == 1.0 else 2


def ode_residuals(mods, ro) -> list[float]:
    """Per step ``max |x_{i+1} - (x_i + (sigma_{i+1} - sigma_i) v(x_i))|`` with ``v`` recomputed by the pack's
    ComfyFlowPolicy with the rollout's model, conditioning, extras and micro-batch layout."""
    traj, spec = ro.trajectory, ro.trajectory.spec
    extras = dict(spec.extras)
    policy = mods.policy.ComfyFlowPolicy(ro.model, cfg=extras["cfg"], norm_rescale=extras["norm_rescale"])
    out = []
    with torch.inference_mode():
        for i in range(spec.num_steps):
            x = traj.latents[i]
            v = torch.empty(x.shape, dtype=torch.float32)
            for chunk in spec.chunks(traj.batch_size):
                v[chunk] = policy.velocity(x[chunk], mods.rollout.sigma_batch(spec.sigmas[i], x[chunk]),
                                           mods.core_policy.index_cond(traj.cond, chunk)).cpu()
            euler = x.float() + (spec.sigmas[i + 1] - spec.sigmas[i]) * v
            out.append(float((traj.latents[i + 1].float() - euler).abs().max()))
    return out


def assert_forwards(probe, calls, sigmas, *, grad, lora, counts, batch):
    """Every call has this grad mode, LoRA state and batch; ``Counter(step) == counts``."""
    assert calls, "the probe recorded no forward"
    assert {c.module_id for c in calls} == {id(probe.diffusion_model)}, "a forward ran on another network object"
    assert {c.grad for c in calls} == {grad} and {c.lora for c in calls} == {lora}
    assert {c.batch for c in calls} == {batch}
    assert Counter(probe.steps(calls, sigmas)) == counts


# ----------------------------------------------------------------------------------------- 1. step selection
@pytest.mark.parametrize("mode", list(MODES))
def test_stochastic_and_trained_steps_follow_the_step_plan(mode, mods, run_node, base_model):
    trainer, train_model, probe = make_trainer(mods, run_node, base_model, f"modes_{mode}")
    plans = []
    for iteration in ITERATIONS.get(mode, (1,)):
        with probe:
            with probe.phase(f"rollout{iteration}"):
                ro = rollout(mods, run_node, train_model, cfg=1.0, iteration=iteration, **MODES[mode])
            spec, traj = ro.trajectory.spec, ro.trajectory
            residuals = ode_residuals(mods, ro)  # before the update moves the LoRA (outside a phase: not recorded)
            with probe.phase(f"update{iteration}"):
                trainer, _, _ = update(mods, run_node, trainer, ro, kl_beta=0.0)

        # the plan is select_steps' for (seed, iteration)
        inputs = dict(rollout_inputs("sd3"), **MODES[mode])
        selection = mods.windows.StepSelection(
            mode=mode, fraction=inputs["train_fraction"], window_size=inputs["window_size"],
            window_start=inputs["window_start"], iters_per_shift=inputs["window_shift_every"])
        plan = mods.windows.select_steps(selection, STEPS, inputs["seed"], iteration)
        assert spec.sde_mask == tuple(plan.sde_mask.tolist()) and spec.train_mask == tuple(plan.train_mask.tolist())
        plans.append(plan.describe())

        # stochastic steps, read off the trajectory: an ODE step is the Euler step of the recomputed velocity
        sde = [r > SDE_MIN_GAP for r in residuals]
        assert all(r <= ODE_ATOL or r > SDE_MIN_GAP for r in residuals), residuals
        assert tuple(sde) == spec.sde_mask, (residuals, spec.sde_mask)
        assert any(sde) and not sde[-1]
        sde_rows = torch.tensor(spec.sde_mask)
        assert bool(torch.isfinite(traj.log_probs[sde_rows]).all()) and bool((traj.log_probs[sde_rows] != 0).all())
        assert bool((traj.log_probs[~sde_rows] == 0).all())

        # the rollout runs every step once per micro-batch, without grad, with the LoRA
        per_step, rows = len(spec.chunks(BATCH)), spec.micro_batch_size * cfg_rows(ro)
        assert_forwards(probe, probe.of(f"rollout{iteration}"), spec.sigmas, grad=False, lora=True,
                        counts={i: per_step for i in range(STEPS)}, batch=rows)
        # the update (no KL) runs with grad exactly at the trained steps, once per micro-batch
        assert_forwards(probe, probe.of(f"update{iteration}"), spec.sigmas, grad=True, lora=True,
                        counts={j: per_step for j in spec.train_steps}, batch=rows)
    if mode == "sliding_window":
        assert plans[0] != plans[1], f"the window did not move: {plans}"


# ----------------------------------------------------------------------------------------- 2. CFG-free
@pytest.mark.parametrize("cfg", [1.0, 4.5])
def test_cfg_free_runs_one_branch_and_cfg_one_forward_of_both_branches(cfg, mods, run_node, base_model):
    trainer, train_model, probe = make_trainer(mods, run_node, base_model, f"cfg_{cfg}")
    with probe:
        with probe.phase("rollout"):
            ro = rollout(mods, run_node, train_model, cfg=cfg, micro_batch_size=0)
        with probe.phase("update"):
            update(mods, run_node, trainer, ro, kl_beta=0.0)
    spec, cond = ro.trajectory.spec, ro.trajectory.cond
    rows = cfg_rows(ro)
    assert ("negative" in cond) == (cfg != 1.0)
    context = cond["positive"]["c_crossattn"]
    if rows == 2:
        assert not torch.equal(context, cond["negative"]["c_crossattn"]), "positive and negative must differ here"
        context = torch.cat([context, cond["negative"]["c_crossattn"]])  # positive rows, then negative
    for phase, steps, grad in (("rollout", range(STEPS), False), ("update", spec.train_steps, True)):
        calls = probe.of(phase)
        assert_forwards(probe, calls, spec.sigmas, grad=grad, lora=True, counts={i: 1 for i in steps},
                        batch=BATCH * rows)
        for call in calls:
            torch.testing.assert_close(call.context, context.to(call.context.dtype), rtol=0, atol=0)
            torch.testing.assert_close(call.x[:BATCH], call.x[-BATCH:], rtol=0, atol=0)  # the same latents twice


def test_cfg_branches_of_other_shapes_run_as_two_forwards_with_the_same_guided_velocity(mods, run_node, base_model):
    """A negative of another token length cannot be batched exactly: positive then negative forward of b each. The
    batched and the two-forward layouts give the same guided velocity (up to float rounding)."""
    _, train_model, probe = make_trainer(mods, run_node, base_model, "cfg_shapes")
    positive = batched_conditioning("sd3", seeds=(3, 5), group=2)
    x = torch.randn(BATCH, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    sigma = torch.full((BATCH,), 0.7)
    velocities = {}
    for tokens in (8, 16):  # the positive has 8 tokens
        negative = [[t[:, :1].repeat(1, tokens, 1) * 0.5, e] for t, e in batched_conditioning("sd3", (4, 4), 2)]
        cond = mods.conditioning.encode_conditioning(train_model, positive, negative, BATCH, x.shape)
        assert (mods.conditioning.batch_branches(cond["positive"], cond["negative"]) is None) == (tokens != 8)
        policy = mods.policy.ComfyFlowPolicy(train_model, cfg=4.5)
        with probe, probe.phase(f"tokens{tokens}"), torch.inference_mode():
            velocities[tokens] = policy.velocity(x, sigma, cond)
        calls = probe.of(f"tokens{tokens}")
        if tokens == 8:
            assert [c.batch for c in calls] == [2 * BATCH]
        else:
            assert [c.batch for c in calls] == [BATCH, BATCH]
            assert [c.context.shape[1] for c in calls] == [8, 16]  # positive, then negative
        # the guided velocity from separate CFG-free evaluations of each branch
        plain = mods.policy.ComfyFlowPolicy(train_model, cfg=1.0)
        with torch.inference_mode():
            v_c = plain.velocity(x, sigma, {"positive": cond["positive"]})
            v_u = plain.velocity(x, sigma, {"positive": cond["negative"]})
        torch.testing.assert_close(velocities[tokens], v_u + 4.5 * (v_c - v_u), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------- 3. micro-batches
def test_micro_batches_have_the_same_layout_in_rollout_and_update(mods, run_node, base_model):
    trainer, train_model, probe = make_trainer(mods, run_node, base_model, "micro_batches")
    with probe:
        with probe.phase("rollout"):
            ro = rollout(mods, run_node, train_model, micro_batch_size=2)
        with probe.phase("update"):
            update(mods, run_node, trainer, ro, kl_beta=0.0)
    spec, traj = ro.trajectory.spec, ro.trajectory
    assert spec.chunks(BATCH) == [slice(0, 2), slice(2, 4)]
    rollout_calls, update_calls = probe.of("rollout"), probe.of("update")
    assert {c.batch for c in rollout_calls + update_calls} == {4}  # 2 samples x (positive, negative)
    rollout_steps, update_steps = probe.steps(rollout_calls, spec.sigmas), probe.steps(update_calls, spec.sigmas)
    for j in spec.train_steps:
        seen = [c for c, s in zip(rollout_calls, rollout_steps) if s == j]
        replayed = [c for c, s in zip(update_calls, update_steps) if s == j]
        assert len(seen) == len(replayed) == 2  # 2 micro-batches, positive and negative rows in one forward
        for k, (a, b) in enumerate(zip(seen, replayed)):
            chunk = spec.chunks(BATCH)[k]
            torch.testing.assert_close(a.x, traj.latents[j, chunk].repeat(2, 1, 1, 1).to(a.x.dtype), rtol=0, atol=0)
            torch.testing.assert_close(b.x, a.x, rtol=0, atol=0)
            torch.testing.assert_close(b.context, a.context, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------- 4. checkpointing
def test_gradient_checkpointing_recomputes_blocks_and_gives_the_same_lora(mods, run_node, base_model):
    results = {}
    for checkpointing in (False, True):
        trainer, train_model, probe = make_trainer(mods, run_node, base_model, f"ckpt_{checkpointing}")
        params = {k: p for k, p in trainer.lora_params.items() if p.requires_grad}
        before = {k: p.detach().clone() for k, p in params.items()}
        ro = rollout(mods, run_node, train_model, cfg=1.0, micro_batch_size=0)
        with probe, probe.phase("update"):
            update(mods, run_node, trainer, ro, kl_beta=0.0, gradient_checkpointing=checkpointing)
        assert any(not torch.equal(before[k], p.detach()) for k, p in params.items()), "the update must move the LoRA"
        results[checkpointing] = SimpleNamespace(latents=ro.trajectory.latents, counts=probe.counts,
                                                 lora={k: p.detach().clone() for k, p in params.items()})
    plain, ckpt = results[False], results[True]
    torch.testing.assert_close(ckpt.latents, plain.latents, rtol=0, atol=0)  # same seed, same inputs
    blocks = plain.counts[("update", "block", True)]
    inner = plain.counts[("update", "inner", True)]
    assert blocks > 0 and inner > 0, "the probe counted no block call"
    assert ckpt.counts[("update", "block", True)] == blocks  # the same forwards...
    assert ckpt.counts[("update", "inner", True)] == 2 * inner  # ...and every block runs again in backward
    assert plain.lora.keys() == ckpt.lora.keys()
    for k in plain.lora:
        torch.testing.assert_close(ckpt.lora[k], plain.lora[k], rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------- 5. KL reference
def test_kl_reference_disables_the_adapter_on_the_shared_weights(mods, run_node, base_model):
    import comfy.model_management

    trainer, train_model, probe = make_trainer(mods, run_node, base_model, "kl_reference")
    ro = rollout(mods, run_node, train_model, micro_batch_size=2)
    net = train_model.model.diffusion_model
    assert net is base_model.model.diffusion_model
    watched = probe.watched.weight
    storage = (sum(p.numel() for p in net.parameters()), len(list(net.modules())), watched.data_ptr())
    with probe, probe.phase("update"):
        _, metrics, _ = update(mods, run_node, trainer, ro, kl_beta=0.04)
    assert json.loads(metrics)["kl"] > 0
    assert (sum(p.numel() for p in net.parameters()), len(list(net.modules())), probe.watched.weight.data_ptr()) \
        == storage, "the update duplicated or moved the base weights"

    spec = ro.trajectory.spec
    calls = probe.of("update")
    trained = [c for c in calls if c.grad]
    reference = [c for c in calls if not c.grad]
    per_step, rows = len(spec.chunks(BATCH)), 2 * cfg_rows(ro)
    assert_forwards(probe, trained, spec.sigmas, grad=True, lora=True,
                    counts={j: per_step for j in spec.train_steps}, batch=rows)
    assert_forwards(probe, reference, spec.sigmas, grad=False, lora=False,
                    counts={j: per_step for j in spec.train_steps}, batch=rows)
    assert {c.weight_ptr for c in calls} == {storage[2]}, "a forward ran on other base weights"
    # each reference velocity follows its trained one on the same inputs
    pairs = [(calls[k], calls[k + 1]) for k in range(0, len(calls), 2)]
    assert len(pairs) == len(trained) and all(t.grad and not r.grad for t, r in pairs)
    for t, r in pairs:
        torch.testing.assert_close(r.x, t.x, rtol=0, atol=0)
        torch.testing.assert_close(r.context, t.context, rtol=0, atol=0)

    # the reference output is the base model's: load the plain MODEL (its adapters leave the Linear layers) and rerun
    with torch.inference_mode():
        comfy.model_management.load_models_gpu([base_model], force_full_load=True)
        assert probe.lora_state() is False
        for t, r in pairs:
            base = net(r.x, r.timestep.to(r.x.device), **r.kwargs)
            torch.testing.assert_close(r.output, base, rtol=0, atol=1e-6)
            assert float((t.output - base).abs().max()) > 1e-3, "the LoRA must change the trained forward"


# ----------------------------------------------------------------------------------------- 6. host synchronisation
def test_a_comfy_rollout_does_not_wait_for_the_device_between_forwards(mods, run_node, base_model):
    """Between the network's forwards, the rollout (policy, CFG, step math, storing latents and log-probs) makes no
    call that would stall a GPU (``.item()``, ``bool(t)``, host-to-device copies: tests/support/host_sync.py), and the
    model is loaded once, not asked for at every forward."""
    import comfy.model_management
    from host_sync import HostSyncCounter

    _, train_model, _ = make_trainer(mods, run_node, base_model, "host_sync")
    ro = rollout(mods, run_node, train_model, micro_batch_size=2)  # the node: a reference spec and conditioning
    traj, spec = ro.trajectory, ro.trajectory.spec
    policy = mods.policy.ComfyFlowPolicy(train_model, cfg=4.5)
    loads = []
    original = comfy.model_management.load_models_gpu
    comfy.model_management.load_models_gpu = lambda *a, **k: (loads.append(1), original(*a, **k))[1]
    try:
        with torch.inference_mode(), HostSyncCounter(inside=[train_model.model.diffusion_model]) as counter:
            again = mods.rollout.sample_trajectory(policy, traj.latents[0], traj.cond, spec,
                                                   generator=torch.Generator().manual_seed(0))
    finally:
        comfy.model_management.load_models_gpu = original
    assert counter.total == 0, counter.calls
    assert len(loads) == 1, "the policy must load the model once per rollout, not per forward"
    assert again.latents.shape == traj.latents.shape and bool(torch.isfinite(again.log_probs).all())


@contextlib.contextmanager
def recorded(owner, name):
    """Record the calls of ``owner.name`` (the function still runs); yields a list of ``(first argument, grad
    mode)``."""
    calls, original = [], getattr(owner, name)

    def recording(first, *args, **kwargs):
        calls.append((first, torch.is_grad_enabled()))
        return original(first, *args, **kwargs)

    setattr(owner, name, recording)
    try:
        yield calls
    finally:
        setattr(owner, name, original)


@contextlib.contextmanager
def merged_swap(mods, enabled):
    """Run with ``merged_lora_weights`` swapping the merged weights into the layers (its default) or not."""
    previous, mods.adapters.SWAP_MERGED_WEIGHTS = mods.adapters.SWAP_MERGED_WEIGHTS, enabled
    try:
        yield
    finally:
        mods.adapters.SWAP_MERGED_WEIGHTS = previous


def layer_state(probe):
    """Per adapted layer: its weight Parameter, its weight_function list (objects) and that list's entries."""
    return [(m.weight, m.weight_function, list(m.weight_function)) for m, _ in probe.adapted]


def loaded_layer_state(mods, train_model, probe):
    """:func:`layer_state` once ``train_model`` is the loaded patcher (the network is shared by every trainer of
    the module: its layers hold the weight functions of the patcher loaded last)."""
    mods.policy.ComfyFlowPolicy(train_model).ensure_loaded()
    return layer_state(probe)


def assert_layers_restored(probe, before):
    for (m, a), (weight, functions, entries) in zip(probe.adapted, before):
        assert m.weight is weight and m.weight_function is functions and m.weight_function == entries == [a]
        assert a.merged is None and a.scope is None and a.swapped is None


def swap_case(mods, run_node, base_model, name: str, seed: int, sigma: float, tokens: int):
    """A rank-3 / alpha-5 trainer (a scale that is not a power of two), its layers' state before any rollout, a CFG-free
    policy and one velocity input: ``(train_model, probe, before, policy, x, sigma, cond)``."""
    _, train_model, probe = make_trainer(mods, run_node, base_model, name, rank=3, alpha=5.0)
    before = loaded_layer_state(mods, train_model, probe)
    policy = mods.policy.ComfyFlowPolicy(train_model, cfg=1.0)
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(seed))
    cond = mods.conditioning.encode_conditioning(train_model, batched_conditioning("sd3", (tokens,), 2), None, 2, x.shape)
    return train_model, probe, before, policy, x, torch.full((2,), sigma), cond


def test_a_rollout_merges_each_lora_weight_once_and_the_update_replays_it_exactly(mods, run_node, base_model):
    """ComfyUI's weight adapters merge ``w + scale * up @ down`` at every forward; a rollout merges each adapted
    weight once (merged_lora_weights) and the update, which merges per forward with gradients, gets the same
    log-probs bit for bit."""
    from comfy.weight_adapter.lora import LoraDiff

    trainer, train_model, probe = make_trainer(mods, run_node, base_model, "merged_weights")
    adapters = mods.adapters.lora_adapters(train_model)
    with recorded(type(adapters[0]), "merge") as merges, recorded(LoraDiff, "__call__") as per_forward:
        with probe, probe.phase("rollout"):
            ro = rollout(mods, run_node, train_model, micro_batch_size=2)
        sampled, merged_per_forward = list(merges), list(per_forward)
        merges.clear(), per_forward.clear()
        _, metrics, _ = update(mods, run_node, trainer, ro, kl_beta=0.0)
    forwards = len(probe.of("rollout"))
    assert forwards == STEPS * 2 and len(adapters) > 0
    assert sorted(id(a) for a, _ in sampled) == sorted(id(a) for a in adapters) and not any(g for _, g in sampled), \
        "each adapter merges once per rollout, not once per forward"
    assert merged_per_forward == [], "no forward of the rollout merges through ComfyUI's adapter"
    assert not any(a.merged for a in adapters), "the merged copies are released after the rollout"
    assert merges == [] and len(per_forward) == len(adapters) * len(ro.trajectory.spec.train_steps) * 2
    assert all(g for _, g in per_forward)
    assert json.loads(metrics)["first_log_ratio_abs_max"] == 0.0


def test_the_rollout_merge_is_bitwise_comfyuis_lora_merge(mods, run_node, base_model):
    """The adapters' merge (in place, no autograd) returns what ComfyUI's ``LoraDiff.__call__`` returns, bit for bit,
    for weights in fp32, bf16 and fp16 and a scale alpha / rank that is not a power of two."""
    from comfy.weight_adapter.lora import LoraDiff

    _, _, probe = make_trainer(mods, run_node, base_model, "merge_bitwise", rank=3, alpha=5.0)
    for module, adapter in probe.adapted:
        assert float(adapter.alpha) / adapter.rank == 5.0 / 3
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            w = module.weight.detach().to(dtype)
            with torch.no_grad():
                expected = LoraDiff.__call__(adapter, w)
            got = adapter.merge(w)
            assert got.dtype == dtype and torch.equal(got, expected), (dtype, (got.float() - expected).abs().max())
            assert not torch.equal(got, w), "the LoRA must change the weight"


def test_adapted_layers_run_plain_linear_on_merged_weights_and_get_their_own_back(mods, run_node, base_model):
    """Within merged_lora_weights (after the policy loaded the model) every adapted Linear holds a Parameter with its
    merged weight and has no weight function, so ComfyUI's cast_bias_weight (a copy of the weight and the adapters)
    does not run for it; the velocity is bitwise the one of the per-rollout cache and of ComfyUI's per-forward merge.
    On exit, also by exception, each layer gets its own Parameter object and weight_function list back; training works
    after it and refuses to run inside it."""
    import comfy.ops
    from comfy.weight_adapter.lora import LoraDiff

    train_model, probe, before, policy, x, sigma, cond = swap_case(mods, run_node, base_model, "swap_layers",
                                                                   seed=0, sigma=0.6, tokens=3)
    adapted = {id(m) for m, _ in probe.adapted}

    def velocity(swap):
        with recorded(comfy.ops, "cast_bias_weight") as casts, torch.inference_mode():
            with mods.adapters.merged_lora_weights(train_model, swap=swap) as merging:
                assert merging is True
                v = policy.velocity(x, sigma, cond)
                inside = layer_state(probe)
        return v, inside, [id(s) for s, _ in casts if id(s) in adapted]

    cached, inside_cached, casts_cached = velocity(swap=False)
    assert sorted(casts_cached) == sorted(adapted), "without the swap ComfyUI casts each adapted weight per forward"
    assert [entries for _, _, entries in inside_cached] == [entries for _, _, entries in before]
    assert_layers_restored(probe, before)

    swapped, inside, casts = velocity(swap=True)
    assert casts == [], "an adapted layer went through cast_bias_weight"
    for (module, adapter), (weight, _, _), (merged, functions, entries) in zip(probe.adapted, before, inside):
        assert entries == [] and len(functions) == 0 and merged is not weight
        assert isinstance(merged, torch.nn.Parameter) and not merged.requires_grad and not merged.is_inference()
        with torch.no_grad():
            assert torch.equal(merged, LoraDiff.__call__(adapter, weight))
    torch.testing.assert_close(swapped, cached, rtol=0, atol=0)
    assert_layers_restored(probe, before)
    with torch.inference_mode():  # ComfyUI's own per-forward merge, outside the context
        torch.testing.assert_close(policy.velocity(x, sigma, cond), swapped, rtol=0, atol=0)

    class Interrupted(Exception):
        pass

    with pytest.raises(Interrupted), torch.inference_mode(), mods.adapters.merged_lora_weights(train_model):
        policy.velocity(x, sigma, cond)
        assert all(len(m.weight_function) == 0 for m, _ in probe.adapted)
        with pytest.raises(RuntimeError, match="merged_lora_weights"):
            policy.training().__enter__()
        with pytest.raises(RuntimeError, match="merged_lora_weights"), policy.reference():
            pass
        raise Interrupted
    assert_layers_restored(probe, before)

    params = policy.trainable_parameters()
    with policy.training():
        policy.velocity(x, sigma, cond).square().mean().backward()
    assert all(p.grad is not None for p in params) and any(float(p.grad.abs().max()) > 0 for p in params)


@pytest.mark.parametrize("kind", ["sd3", "flux", "qwen_image"])
def test_every_family_runs_all_adapted_layers_on_merged_weights(kind, mods, run_node, tiny_sd3_file):
    """On SD3, FLUX and Qwen-Image (attention and MLP targets) every adapted layer takes the merged weight inside the
    context, with the velocity of ComfyUI's per-forward merge bit for bit."""
    import tiny_models

    model = load_model(kind, run_node, tiny_sd3_file)
    _, train_model, probe = make_trainer(mods, run_node, model, f"swap_{kind}", rank=3, alpha=5.0)
    policy = mods.policy.ComfyFlowPolicy(train_model, cfg=1.0)
    x = torch.randn(tiny_models.latent_shape(kind, batch=1), generator=torch.Generator().manual_seed(3))
    cond = mods.conditioning.encode_conditioning(train_model, tiny_models.conditioning(kind, seed=3), None, 1, x.shape)
    sigma = torch.full((1,), 0.5)
    with torch.inference_mode():
        per_forward = policy.velocity(x, sigma, cond)
        with mods.adapters.merged_lora_weights(train_model):
            swapped = policy.velocity(x, sigma, cond)
            assert len(probe.adapted) > 0 and all(
                len(m.weight_function) == 0 and a.swapped is not None and m.weight is a.swapped.merged
                for m, a in probe.adapted)
    torch.testing.assert_close(swapped, per_forward, rtol=0, atol=0)
    assert all(m.weight_function == [a] and a.swapped is None for m, a in probe.adapted)


def test_swapped_and_cached_rollouts_are_bitwise_equal_and_the_update_replays_them(mods, run_node, base_model):
    """The rollout node with the merged weights swapped into the layers samples the same latents and log-probs, bit
    for bit, as with the per-rollout cache; no adapted layer goes through cast_bias_weight then; the layers are back
    after each rollout, and the update replays the swapped rollout with a ratio of exactly 1."""
    import comfy.ops

    trainer, train_model, probe = make_trainer(mods, run_node, base_model, "swap_rollout", rank=3, alpha=5.0)
    before = loaded_layer_state(mods, train_model, probe)
    adapted = {id(m) for m, _ in probe.adapted}
    rollouts, casts = {}, {}
    for swap in (False, True):
        with merged_swap(mods, swap), recorded(comfy.ops, "cast_bias_weight") as calls, probe, probe.phase(swap):
            rollouts[swap] = rollout(mods, run_node, train_model, micro_batch_size=2)
        casts[swap] = Counter(id(s) for s, _ in calls if id(s) in adapted)
        assert_layers_restored(probe, before)
    forwards = len(probe.of(True))
    assert forwards == len(probe.of(False)) == STEPS * 2
    assert casts[False] == Counter({i: forwards for i in adapted}) and casts[True] == Counter()
    assert {c.lora for c in probe.calls} == {True}
    cached, swapped = rollouts[False].trajectory, rollouts[True].trajectory
    torch.testing.assert_close(swapped.latents, cached.latents, rtol=0, atol=0)
    torch.testing.assert_close(swapped.log_probs, cached.log_probs, rtol=0, atol=0)

    lora = {k: p.detach().clone() for k, p in trainer.lora_params.items() if p.requires_grad}
    trainer, metrics, _ = update(mods, run_node, trainer, rollouts[True], kl_beta=0.0)
    assert json.loads(metrics)["first_log_ratio_abs_max"] == 0.0
    assert any(not torch.equal(lora[k], trainer.lora_params[k].detach()) for k in lora), "the update must train"


def test_a_reload_inside_the_rollout_applies_the_lora_once(mods, run_node, base_model):
    """ComfyUI unloading and reloading the model inside the context puts the adapter back into a rebuilt
    weight_function list while the layer still holds the merged weight: the adapter then passes it through (no double
    merge), and on exit the layer gets its own weight back."""
    import comfy.model_management

    train_model, probe, before, policy, x, sigma, cond = swap_case(mods, run_node, base_model, "swap_reload",
                                                                   seed=1, sigma=0.4, tokens=5)
    with torch.inference_mode(), mods.adapters.merged_lora_weights(train_model):
        first = policy.velocity(x, sigma, cond)
        merged = [m.weight for m, _ in probe.adapted]
        comfy.model_management.unload_all_models()
        again = policy.velocity(x, sigma, cond)  # the policy loads the model again
        for (m, a), w in zip(probe.adapted, merged):
            assert m.weight is w and m.weight_function == [a], "the reload did not put the adapter back"
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    for (m, a), (weight, _, _) in zip(probe.adapted, before):
        assert m.weight is weight and m.weight_function == [a] and a.swapped is None and a.merged is None
    with torch.inference_mode():
        torch.testing.assert_close(policy.velocity(x, sigma, cond), first, rtol=0, atol=0)


def test_a_partially_loaded_model_keeps_comfyuis_casts_and_the_merged_cache(mods, run_node, base_model):
    """With the model partially unloaded by ComfyUI (lowvram: offloaded layers are cast at every forward), the
    context does not swap weights; each adapter merges once into its cache and the velocity is unchanged."""
    import comfy.model_management

    train_model, probe, before, policy, x, sigma, cond = swap_case(mods, run_node, base_model, "swap_lowvram",
                                                                   seed=2, sigma=0.8, tokens=3)
    try:
        with torch.inference_mode():
            full = policy.velocity(x, sigma, cond)  # loads the model fully
            assert train_model.partially_unload(train_model.offload_device, train_model.model_size() // 2) > 0
            assert train_model.model.model_lowvram
            with mods.adapters.merged_lora_weights(train_model):
                partial = policy.velocity(x, sigma, cond)
                assert all(a.swapped is None and len(a.merged) == 1 and a in m.weight_function
                           for m, a in probe.adapted)
        torch.testing.assert_close(partial, full, rtol=0, atol=0)
        assert [(m.weight, list(m.weight_function)) for m, _ in probe.adapted] == \
            [(w, entries) for w, _, entries in before]
    finally:
        comfy.model_management.unload_all_models()  # the next test loads the shared network fully again


# ----------------------------------------------------------------------------------------- 6. reward offload
# Reward models leave the device before each GRPO update: asserted (loaded to score, unloaded by the update, loaded
# again to score) in tests/comfy/test_reward_loading.py
# (test_torch_reward_is_loaded_to_score_and_offloaded_for_the_update); not repeated here.


# ----------------------------------------------------------------------------------------- elsewhere
# Shared initial noise per group, evaluation with more steps than training (stock ODE sampler on the EMA weights)
# and the VAE offloaded before an update: tests/comfy/test_training_features.py.
