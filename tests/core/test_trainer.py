"""Rollout replay, the GRPO update and the pure-core demo, on a tiny MLP policy with a peft LoRA."""

import pytest
import torch

from flowgrpo_core.demo import DIM, DemoConfig, TinyVelocityNet, run_demo, shifted_sigmas
from flowgrpo_core.lora import add_lora, load_lora_state_dict, lora_state_dict
from flowgrpo_core.policy import ModulePolicy, index_cond
from flowgrpo_core.rollout import RolloutSpec, recompute_log_probs, sample_trajectory
from flowgrpo_core.trainer import GRPOConfig, GRPOTrainer
from flowgrpo_core.windows import StepSelection, select_steps

BATCH = 8


def make_policy(seed=0, perturb_lora=False):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = add_lora(TinyVelocityNet(), ["fc1", "fc2", "fc3"], rank=4)
        if perturb_lora:  # a trained-looking adapter: policy != reference
            for name, p in net.named_parameters():
                if "lora_B" in name:
                    p.data.normal_(0, 0.3)
    return ModulePolicy(net)


def make_spec(kind="flow_sde", level=0.7, micro_batch_size=3, steps=6, selection=None):
    plan = select_steps(selection or StepSelection(mode="fraction", fraction=0.99), steps, seed=0, iteration=0)
    return RolloutSpec(kind=kind, noise_level=level, sigmas=shifted_sigmas(steps, 3.0), sde_mask=plan.sde_mask,
                       train_mask=plan.train_mask, micro_batch_size=micro_batch_size)


def rollout(policy, spec, seed=0, batch=BATCH, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    cond = torch.arange(batch) % 4
    return sample_trajectory(policy, torch.randn(batch, DIM, generator=g).to(dtype), cond, spec, generator=g)


@pytest.mark.parametrize("kind,level", [("flow_sde", 0.7), ("dance_sde", 0.3), ("cps", 0.8)])
@pytest.mark.parametrize("perturb", [False, True])
def test_on_policy_replay_gives_ratio_one(kind, level, perturb):
    policy = make_policy(perturb_lora=perturb)
    spec = make_spec(kind, level)
    traj = rollout(policy, spec)
    assert torch.isfinite(traj.log_probs).all()
    assert torch.all(traj.log_probs[-1] == 0)  # deterministic last step records no log-prob
    replay = recompute_log_probs(policy, traj)
    assert (replay - traj.log_probs[spec.train_steps]).abs().max() <= 1e-6

    trainer = GRPOTrainer(policy, torch.optim.SGD(policy.trainable_parameters(), lr=1e-3), GRPOConfig())
    metrics = trainer.update(traj, torch.randn(BATCH, generator=torch.Generator().manual_seed(1)))
    assert metrics["first_log_ratio_abs_max"] <= 1e-6
    assert metrics["clipfrac"] == 0.0


def test_replay_with_another_batch_layout_is_rejected_by_the_spec():
    """The layout is part of the spec: the same trajectory replayed through a different micro-batch size is a
    different spec (never equal), so a caller can detect it."""
    assert make_spec(micro_batch_size=3) != make_spec(micro_batch_size=4)
    assert make_spec(micro_batch_size=3) == make_spec(micro_batch_size=3)


def test_masks_given_as_lists_tuples_or_tensors_give_the_same_spec():
    plan = select_steps(StepSelection(mode="fixed_window", window_size=2, window_start=1), 6, seed=0, iteration=0)
    sigmas = shifted_sigmas(6, 3.0)
    specs = [RolloutSpec("cps", 0.8, sigmas, m_sde, m_train) for m_sde, m_train in [
        (plan.sde_mask, plan.train_mask),
        (plan.sde_mask.tolist(), plan.train_mask.tolist()),
        (tuple(plan.sde_mask.tolist()), tuple(plan.train_mask.tolist())),
    ]]
    specs.append(RolloutSpec("cps", 0.8, torch.tensor(sigmas, dtype=torch.float64), plan.sde_mask, plan.train_mask))
    assert all(s == specs[0] for s in specs)
    assert specs[0].train_steps == [1, 2]
    assert [specs[0].step_kind(i) for i in range(6)] == ["ode", "cps", "cps", "ode", "ode", "ode"]


def test_window_rollout_uses_ode_outside_the_window():
    policy = make_policy()
    spec = make_spec("flow_sde", 0.9, selection=StepSelection(mode="fixed_window", window_size=2, window_start=1))
    traj = rollout(policy, spec)
    assert torch.all(traj.log_probs[0] == 0) and torch.all(traj.log_probs[3:] == 0)
    assert torch.all(traj.log_probs[1:3] != 0)


@pytest.mark.parametrize("bad,match", [
    (dict(train_mask=(True, False, False, False, False, True)), "last step"),
    (dict(train_mask=(False,) * 6), "trains no step"),
    (dict(sigmas=(1.0, 0.8, 0.8, 0.5, 0.3, 0.1, 0.0)), "decrease strictly"),
    (dict(kind="ode"), "stochastic SDE kind"),
])
def test_bad_specs_raise(bad, match):
    args = dict(kind="flow_sde", noise_level=0.7, sigmas=shifted_sigmas(6, 3.0), sde_mask=(True,) * 5 + (False,),
                train_mask=(True,) * 5 + (False,))
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        RolloutSpec(**args)


def test_positive_advantage_raises_that_samples_log_prob():
    policy = make_policy(perturb_lora=True)
    spec = make_spec("flow_sde", 0.7)
    traj = rollout(policy, spec)
    before = recompute_log_probs(policy, traj)
    advantages = torch.zeros(BATCH)
    advantages[2] = 1.0
    trainer = GRPOTrainer(policy, torch.optim.SGD(policy.trainable_parameters(), lr=1e-2), GRPOConfig(clip_range=0.2))
    trainer.update(traj, advantages)
    after = recompute_log_probs(policy, traj)
    assert after[:, 2].sum() > before[:, 2].sum()
    negative = advantages.clone()
    negative[2] = -1.0
    before = after
    trainer.update(traj, negative)
    assert recompute_log_probs(policy, traj)[:, 2].sum() < before[:, 2].sum()


def test_kl_term_carries_gradient_to_the_adapter_only():
    policy = make_policy(perturb_lora=True)
    spec = make_spec("flow_sde", 0.7)
    traj = rollout(policy, spec)
    trainer = GRPOTrainer(policy, torch.optim.SGD(policy.trainable_parameters(), lr=0.0),
                          GRPOConfig(kl_beta=1.0, kl_form="exact", max_grad_norm=None))
    grads = {}
    for name, p in policy.net.named_parameters():
        if p.requires_grad:
            p.register_hook(lambda g, name=name: grads.__setitem__(name, g.abs().sum().item()))
    metrics = trainer.update(traj, torch.zeros(BATCH))  # zero advantages: the KL is the only gradient
    assert metrics["kl"] > 0
    assert grads and all("lora_" in name for name in grads)
    assert any("lora_A" in name for name in grads) and any("lora_B" in name for name in grads)
    assert any(v > 0 for v in grads.values())
    assert all(not p.requires_grad for n, p in policy.net.named_parameters() if "lora_" not in n)

    # with a learning rate, minimising the KL alone pulls the policy towards the reference
    trainer.optimizer = torch.optim.SGD(policy.trainable_parameters(), lr=0.5)
    first = trainer.update(traj, torch.zeros(BATCH))["kl"]
    assert trainer.update(traj, torch.zeros(BATCH))["kl"] < first


def test_fresh_lora_starts_at_the_reference():
    policy = make_policy()
    traj = rollout(policy, make_spec())
    x, cond = traj.latents[0], traj.cond
    sigma = torch.full((BATCH,), 0.7)
    with torch.no_grad():
        v = policy.velocity(x, sigma, cond)
        with policy.reference():
            v_ref = policy.velocity(x, sigma, cond)
    assert torch.equal(v, v_ref)


def test_lora_state_round_trip():
    a, b = make_policy(seed=1, perturb_lora=True), make_policy(seed=1)
    x, sigma, cond = torch.randn(4, DIM), torch.full((4,), 0.5), torch.arange(4)
    with torch.no_grad():
        assert not torch.equal(a.velocity(x, sigma, cond), b.velocity(x, sigma, cond))
        load_lora_state_dict(b.net, lora_state_dict(a.net))
        assert torch.equal(a.velocity(x, sigma, cond), b.velocity(x, sigma, cond))


def test_index_cond_walks_nested_structures():
    cond = {"c": torch.arange(6).view(6, 1), "extra": [torch.arange(6), 3.5, "txt"], "scalar": torch.tensor(2.0)}
    out = index_cond(cond, slice(2, 4))
    assert out["c"].flatten().tolist() == [2, 3] and out["extra"][0].tolist() == [2, 3]
    assert out["extra"][1:] == [3.5, "txt"] and out["scalar"].item() == 2.0


def test_non_finite_advantages_are_rejected_and_nothing_changes():
    policy = make_policy(perturb_lora=True)
    traj = rollout(policy, make_spec())
    before = lora_state_dict(policy.net)
    trainer = GRPOTrainer(policy, torch.optim.SGD(policy.trainable_parameters(), lr=1e-2))
    advantages = torch.zeros(BATCH)
    advantages[0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        trainer.update(traj, advantages)
    after = lora_state_dict(policy.net)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_two_optimizer_steps_per_update_need_enough_micro_batches():
    policy = make_policy()
    traj = rollout(policy, make_spec(micro_batch_size=0))
    trainer = GRPOTrainer(policy, torch.optim.SGD(policy.trainable_parameters(), lr=1e-3), GRPOConfig(optimizer_steps=2))
    with pytest.raises(ValueError, match="micro-batches"):
        trainer.update(traj, torch.zeros(BATCH))


def test_pure_core_demo_raises_the_reward_and_is_deterministic():
    config = DemoConfig(seed=0, iterations=24)
    history = run_demo(config, log=None)
    first, last = sum(history[:6]) / 6, sum(history[-6:]) / 6
    assert last > first + 0.75, history
    again = run_demo(DemoConfig(seed=0, iterations=4), log=None)
    assert again == history[:4]
    other = run_demo(DemoConfig(seed=1, iterations=4), log=None)
    assert other != history[:4]


def test_replay_with_changed_settings_is_detected_and_rejected():
    spec = make_spec("flow_sde", 0.7)
    spec.require_same(make_spec("flow_sde", 0.7))
    with_guidance = RolloutSpec(**{**spec.__dict__, "extras": (("guidance", 3.5),)})
    cases = {
        "noise_level": make_spec("flow_sde", 0.9),
        "micro_batch_size": make_spec("flow_sde", 0.7, micro_batch_size=4),
        "sigmas": RolloutSpec(**{**spec.__dict__, "sigmas": shifted_sigmas(6, 1.0)}),
        "extras": with_guidance,
    }
    for field, other in cases.items():
        assert spec.differences(other) == [field]
        with pytest.raises(ValueError, match=field):
            spec.require_same(other)
    with pytest.raises(ValueError, match=r"guidance.*3\.5|3\.5.*guidance"):
        with_guidance.require_same(RolloutSpec(**{**spec.__dict__, "extras": (("guidance", 4.0),)}))


def test_sampling_and_the_update_do_not_wait_for_the_device_per_step():
    """No ``.item()`` / ``bool(t)`` / host-to-device copy between the forwards of a rollout, and a number of them in
    an update that depends on the optimizer steps, not on the trained steps or micro-batches (HostSyncCounter: these
    calls would stall a GPU)."""
    from host_sync import HostSyncCounter

    policy = make_policy(perturb_lora=True)
    per_update = {}
    for steps in (4, 8):
        spec = make_spec(steps=steps, micro_batch_size=2)  # 4 micro-batches of 2
        with HostSyncCounter(inside=[policy.net]) as sampling:
            traj = rollout(policy, spec)
        assert sampling.total == 0, sampling.calls
        trainer = GRPOTrainer(policy, torch.optim.AdamW(policy.trainable_parameters(), lr=1e-3),
                              GRPOConfig(optimizer_steps=2))
        advantages = torch.randn(BATCH, generator=torch.Generator().manual_seed(1))
        with HostSyncCounter(inside=[policy.net]) as updating:
            trainer.update(traj, advantages)
        assert updating.total > 0  # the counter sees the finiteness checks and the metrics
        per_update[steps] = updating.calls
    assert per_update[4] == per_update[8], per_update
