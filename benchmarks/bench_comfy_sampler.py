"""The pack's SDE sampler against ComfyUI's stock euler sampler, same model, steps and graph, in one run.

Both go through stock ``SamplerCustomAdvanced`` (BasicGuider, BasicScheduler simple, RandomNoise) on a small SD3
(MMDiT) built from ComfyUI's own classes; only the SAMPLER differs: ``FlowGRPOSDESampler`` (flow_sde, 0.7) vs
``KSamplerSelect euler``. The ratio is the cost of the SDE step math and log-prob-ready bookkeeping per rollout.

Run: ``.venv/bin/python benchmarks/bench_comfy_sampler.py [--depth 4] [--size 32] [--steps 10] [--repeats 5]``
"""

from __future__ import annotations

import statistics
import time

from comfy_bench import comfy_in_process, parse_sizes


def main() -> None:
    args = parse_sizes(batch=4)
    node, run = comfy_in_process()
    import torch
    import tiny_models

    model = tiny_models.build_sd3(depth=args.depth)
    cond = tiny_models.conditioning("sd3")
    latent = {"samples": torch.zeros(args.batch, 16, args.size, args.size)}
    (guider,) = run("BasicGuider", model=model, conditioning=cond)
    (sigmas,) = run("BasicScheduler", model=model, scheduler="simple", steps=args.steps, denoise=1.0)
    (noise,) = run("RandomNoise", noise_seed=0)
    (ours,) = run("FlowGRPOSDESampler", sde_kind="flow_sde", noise_level=0.7, seed=0)
    (euler,) = run("KSamplerSelect", sampler_name="euler")

    def timed(sampler) -> float:
        start = time.perf_counter()
        run("SamplerCustomAdvanced", noise=noise, guider=guider, sampler=sampler, sigmas=sigmas, latent_image=latent)
        return time.perf_counter() - start

    timed(ours), timed(euler)  # warm-up
    t_ours, t_euler, ratios = [], [], []
    for _ in range(args.repeats):
        a, b = timed(ours), timed(euler)
        t_ours.append(a)
        t_euler.append(b)
        ratios.append(a / b)
    print(f"SD3 depth {args.depth}, latent {args.batch}x16x{args.size}x{args.size}, {args.steps} steps, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"FlowGRPOSDESampler(flow_sde) {statistics.median(t_ours) * 1e3:8.1f} ms   stock euler "
          f"{statistics.median(t_euler) * 1e3:8.1f} ms   ratio {statistics.median(ratios):5.2f}x "
          f"(median of {args.repeats})")


if __name__ == "__main__":
    main()
