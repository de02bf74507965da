"""The GRPO update against a bare forward + backward through the same LoRA-adapted model, same batch, one run.

A rollout is sampled once with ``FlowGRPOSDERollout`` (flow_sde, every step but the last trained). Then, side by
side in each repeat:

* ours: the ``FlowGRPOUpdate`` node on that rollout, as a graph runs it (input checks, advantages, other models
  offloaded, log-prob replay with gradients at every trained step and micro-batch, clipped surrogate, backward,
  gradient clip, one AdamW step, metrics);
* bare: for the same trained steps and micro-batches, ComfyUI's ``BaseModel.apply_model`` on the same latents, sigma
  and conditioning (both CFG branches batched when the model uses CFG, as the update does) with gradients through
  the same LoRA weight wrappers, then ``backward`` of the mean squared output. No step math, no log-prob, no loss,
  no optimizer: only what any LoRA training step through ComfyUI's model costs.

Prints the medians per trained (sample, step) and the median of the per-repeat ratios ours / bare (target <= 1.15).

Run: ``.venv/bin/python benchmarks/bench_update.py [--model sd3|flux-width|flux-dev|qwen-image] [--depth 4] [--size 32] [--batch 8]
[--steps 10] [--micro-batch 0] [--repeats 5] [--device cuda --dtype bf16]``
"""

from __future__ import annotations

import argparse
import statistics

from comfy_bench import build_model, comfy_in_process, describe, median_ratio, pack_module, parse_sizes, timed


def pack_modules(node_mappings) -> dict:
    """The pack's ``nodes.state``, ``nodes.comfy_policy``, ``nodes.conditioning`` and ``flowgrpo_core.policy`` as
    ComfyUI imported them."""
    return {name: pack_module(node_mappings, name)
            for name in ("nodes.state", "nodes.comfy_policy", "nodes.conditioning", "flowgrpo_core.policy")}


def sample_rollout(run, mods, model, args, train_model, micro_batch: int = 0):
    """One ``FlowGRPOSDERollout`` of ``args.batch`` samples (groups of 2) with every step but the last trained."""
    import torch

    state = mods["nodes.state"]
    groups = state.PromptBatch(texts=("p",) * args.batch, group_ids=torch.arange(args.batch) // 2,
                               prompt_indices=(0,) * args.batch, iteration=0, group_size=2)
    rollout_kw = dict(model=train_model, positive=model.positive, negative=model.negative, groups=groups,
                      width=args.size * 8, height=args.size * 8, steps=args.steps, scheduler="simple", shift=0.0,
                      sde_kind="flow_sde", noise_level=0.7, cfg=model.cfg, norm_rescale=False,
                      step_mode="fraction", train_fraction=0.99, window_size=2, window_start=0,
                      window_shift_every=25, micro_batch_size=micro_batch, seed=0, iteration=0)
    return run("FlowGRPOSDERollout", **rollout_kw)[1]


def bare_forward_backward(mods, rollout, params) -> None:
    """``apply_model`` + ``backward`` at every trained step and micro-batch of ``rollout`` (see the module doc)."""
    import torch

    P, index_cond = mods["nodes.comfy_policy"], mods["flowgrpo_core.policy"].index_cond
    batch_branches = mods["nodes.conditioning"].batch_branches
    traj, spec, patcher = rollout.trajectory, rollout.trajectory.spec, rollout.model
    cfg = dict(spec.extras)["cfg"]
    options = patcher.model_options.get("transformer_options", {})
    # ComfyUI's training flag as the update sets it (2026 runtimes: kernels with autograd formulas)
    with torch.inference_mode(False), torch.enable_grad(), P.training_mode(), P.mutation_guard(patcher.model):
        for j in spec.train_steps:
            for chunk in spec.chunks(traj.batch_size):
                x = traj.latents[j, chunk].clone()
                cond = index_cond(traj.cond, chunk)
                kwargs = cond["positive"] if cfg == 1.0 else batch_branches(cond["positive"], cond["negative"])
                if cfg != 1.0:
                    x = torch.cat([x, x])
                sigma = torch.full((x.shape[0],), spec.sigmas[j], device=x.device)
                out = patcher.model.apply_model(x, sigma, transformer_options=options, **kwargs)
                out.float().square().mean().backward()
    for p in params:
        p.grad = None


def compare(run, mods: dict, model, args, micro_batch: int = 0) -> dict:
    """Ours vs bare on ``model`` at ``args``' sizes (a rank-16 LoRA on attention, one rollout of ``micro_batch``
    samples per forward): a warm-up of each, then ``args.repeats`` interleaved timed pairs. ``{"ours", "bare"}``:
    median seconds per update, ``"trained"``: trained (sample, step) pairs per update, ``"ratio"``: median
    per-repeat ratio, ``"rows"``, ``"fns"`` (the two calls), and ``"trainer"``, ``"train_model"``, ``"rollout"``,
    ``"rewards"`` (for bench_gpu's memory measurement)."""
    import comfy.model_management
    import torch

    trainer, train_model = run("FlowGRPOLoRAInit", model=model.patcher, rank=16, alpha=16.0, targets="attention",
                               learning_rate=1e-4, seed=0, run_name="bench_update", resume="none")
    rollout = sample_rollout(run, mods, model, args, train_model, micro_batch)
    rewards = mods["nodes.state"].Rewards(values=torch.linspace(0, 1, args.batch))
    params = [p for p in trainer.lora_params.values() if p.requires_grad]
    device = train_model.load_device

    def ours() -> None:
        run("FlowGRPOUpdate", trainer=trainer, rollout=rollout, rewards=rewards, clip_range=1e-4, kl_beta=0.0,
            adv_clip_max=5.0, max_grad_norm=1.0, std_mode="global", optimizer_steps=1, gradient_checkpointing=False)

    def bare() -> None:
        comfy.model_management.load_models_gpu([train_model], force_full_load=True)  # once loaded: a list lookup
        bare_forward_backward(mods, rollout, params)

    ours(), bare()  # warm-up
    rows = []
    for _ in range(args.repeats):
        rows.append((timed(ours, device)[0], timed(bare, device)[0]))
    med_ours, med_bare = (statistics.median(c) for c in zip(*rows))
    return dict(ours=med_ours, bare=med_bare, ratio=median_ratio(rows), rows=rows,
                trained=len(rollout.trajectory.spec.train_steps) * args.batch, fns=dict(ours=ours, bare=bare),
                trainer=trainer, train_model=train_model, rollout=rollout, rewards=rewards)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--micro-batch", type=int, default=0, help="samples per forward (0: the whole batch)")
    args = parse_sizes(batch=8, parser=parser)
    node, run = comfy_in_process(args.device)

    mods = pack_modules(node)
    model = build_model(args)
    res = compare(run, mods, model, args, args.micro_batch)
    trained = res["trained"]
    print(describe(args, model))
    print(f"{trained} trained (sample, step) pairs per update, micro-batch {args.micro_batch or args.batch}")
    print(f"FlowGRPOUpdate {res['ours'] * 1e3 / trained:8.2f} ms   bare forward+backward "
          f"{res['bare'] * 1e3 / trained:8.2f} ms   per trained (sample, step)   ratio {res['ratio']:.3f}x   "
          f"(medians of {args.repeats})")

if __name__ == "__main__":
    main()
