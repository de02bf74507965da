"""The rollout node and the GRPO update against ComfyUI's stock sampler, same model, conditioning and steps, one run.

On a small SD3 (MMDiT) built from ComfyUI's own classes, with true CFG 4.5 and a batch of 8:

* stock: ``SamplerCustomAdvanced`` with ``CFGGuider`` and ``euler`` (the cost of plain sampling);
* rollout: ``FlowGRPOSDERollout`` (flow_sde 0.7, every step but the last recording log-probs);
* update: ``FlowGRPOUpdate`` on that rollout (replay with gradients on every trained step + one AdamW step).

Prints the medians and the ratios rollout/stock and update/stock.

Run: ``.venv/bin/python benchmarks/bench_rollout.py [--depth 4] [--size 32] [--batch 8] [--steps 10] [--repeats 5]``
"""

from __future__ import annotations

import statistics
import time

from comfy_bench import comfy_in_process, parse_sizes


def main() -> None:
    args = parse_sizes(batch=8)
    node, run = comfy_in_process()
    import torch
    import tiny_models

    with torch.inference_mode():
        model = tiny_models.build_sd3(depth=args.depth)
    positive = [[c.repeat(args.batch, 1, 1), {"pooled_output": e["pooled_output"].repeat(args.batch, 1)}]
                for c, e in tiny_models.conditioning("sd3", seed=1)]
    negative = [[c.repeat(args.batch, 1, 1), {"pooled_output": e["pooled_output"].repeat(args.batch, 1)}]
                for c, e in tiny_models.conditioning("sd3", seed=2)]
    latent = {"samples": torch.zeros(args.batch, 16, args.size, args.size)}
    (guider,) = run("CFGGuider", model=model, positive=positive, negative=negative, cfg=4.5)
    (sigmas,) = run("BasicScheduler", model=model, scheduler="simple", steps=args.steps, denoise=1.0)
    (noise,) = run("RandomNoise", noise_seed=0)
    (euler,) = run("KSamplerSelect", sampler_name="euler")

    import importlib
    pkg = node["FlowGRPOSDERollout"].__module__.rsplit(".nodes.", 1)[0]
    state = importlib.import_module(f"{pkg}.nodes.state")
    trainer, train_model = run("FlowGRPOLoRAInit", model=model, rank=16, alpha=16.0, targets="attention",
                               learning_rate=1e-4, seed=0, run_name="bench", resume="none")
    groups = state.PromptBatch(texts=("p",) * args.batch, group_ids=torch.arange(args.batch) // 2,
                               prompt_indices=(0,) * args.batch, iteration=0, group_size=2)
    rollout_kw = dict(model=train_model, positive=positive, negative=negative, groups=groups,
                      width=args.size * 8, height=args.size * 8, steps=args.steps, scheduler="simple", shift=0.0,
                      sde_kind="flow_sde", noise_level=0.7, cfg=4.5, norm_rescale=False, step_mode="fraction",
                      train_fraction=0.99, window_size=2, window_start=0, window_shift_every=25, micro_batch_size=0,
                      seed=0, iteration=0)
    rewards = state.Rewards(values=torch.linspace(0, 1, args.batch))

    def stock() -> float:
        start = time.perf_counter()
        run("SamplerCustomAdvanced", noise=noise, guider=guider, sampler=euler, sigmas=sigmas, latent_image=latent)
        return time.perf_counter() - start

    def rollout():
        start = time.perf_counter()
        out = run("FlowGRPOSDERollout", **rollout_kw)[1]
        return time.perf_counter() - start, out

    def update(r) -> float:
        start = time.perf_counter()
        run("FlowGRPOUpdate", trainer=trainer, rollout=r, rewards=rewards, clip_range=1e-4, kl_beta=0.0,
            adv_clip_max=5.0, max_grad_norm=1.0, std_mode="global", optimizer_steps=1, gradient_checkpointing=False)
        return time.perf_counter() - start

    stock(), update(rollout()[1])  # warm-up
    rows = []
    for _ in range(args.repeats):
        t_stock = stock()
        t_roll, r = rollout()
        rows.append((t_stock, t_roll, update(r)))
    med = [statistics.median(c) for c in zip(*rows)]
    roll_ratio = statistics.median(r / s for s, r, _ in rows)
    upd_ratio = statistics.median(u / s for s, _, u in rows)
    print(f"SD3 depth {args.depth}, latent {args.batch}x16x{args.size}x{args.size}, {args.steps} steps, CFG 4.5, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"stock euler {med[0] * 1e3:8.1f} ms   FlowGRPOSDERollout {med[1] * 1e3:8.1f} ms ({roll_ratio:.2f}x)   "
          f"FlowGRPOUpdate {med[2] * 1e3:8.1f} ms ({upd_ratio:.2f}x)   (medians of {args.repeats})")


if __name__ == "__main__":
    main()
