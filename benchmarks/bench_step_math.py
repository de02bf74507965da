"""The SDE step and its log-prob as a share of one model forward at the benchmark size, one run.

On the benchmark model (``comfy_bench.build_model``), for a batch of ``--batch`` latents at ``--size``:

* forward: one ``BaseModel.apply_model`` of the rollout's layout (both CFG branches batched for a CFG model), no
  grad, as a rollout step runs it;
* sample: ``velocity_from_denoised`` + the CFG combination + ``sde_step(flow_sde)`` drawing the noise, the new
  sample and its log-prob (what a rollout step adds to the forward);
* replay: the same without noise, evaluating the log-prob of a stored sample (what an update step adds).

Prints the medians and the median per-repeat shares sample / forward and replay / forward (target < 2 %).

Run: ``.venv/bin/python benchmarks/bench_step_math.py [--model sd3|flux-width|flux-dev|qwen-image] [--depth 4] [--size 32]
[--batch 8] [--repeats 20] [--device cuda --dtype bf16]``
"""

from __future__ import annotations

import statistics

from comfy_bench import build_model, comfy_in_process, describe, pack_module, parse_sizes, timed


def measure(node: dict, model, args) -> dict:
    """Forward, sampling step and replay step on ``model`` (loaded fully first): a warm-up of each, then
    ``args.repeats`` timed triples. Median seconds ``"forward"``, ``"sample"``, ``"replay"``, the median per-repeat
    shares ``"share_sample"`` / ``"share_replay"``, ``"rows"`` (rows per forward) and ``"fns"`` (the three calls)."""
    import comfy.model_management
    import torch

    C = pack_module(node, "nodes.conditioning")
    sde = pack_module(node, "flowgrpo_core.sde")
    patcher = model.patcher
    comfy.model_management.load_models_gpu([patcher], force_full_load=True)
    device = patcher.load_device
    cond = C.encode_conditioning(patcher, model.positive, model.negative, args.batch, model.latent_shape)
    kwargs = cond["positive"] if model.cfg == 1.0 else C.batch_branches(cond["positive"], cond["negative"])
    rows = 1 if model.cfg == 1.0 else 2
    x = torch.randn(model.latent_shape, generator=torch.Generator().manual_seed(0)).to(device)
    x_in = torch.cat([x] * rows)
    sigma, sigma_next = 0.8, 0.7
    sigma_in = torch.full((x_in.shape[0],), sigma, device=device)
    generator = torch.Generator(device=device).manual_seed(0)

    with torch.inference_mode():
        def forward():
            return patcher.model.apply_model(x_in, sigma_in, transformer_options={}, **kwargs)

        denoised = forward()

        def guided_velocity():
            v = sde.velocity_from_denoised(x_in, denoised, sigma_in)
            if rows == 1:
                return v
            v_c, v_u = v[:args.batch], v[args.batch:]
            return v_u + model.cfg * (v_c - v_u)

        def sample():
            return sde.sde_step("flow_sde", x, guided_velocity(), sigma, sigma_next, 0.7, generator=generator)

        prev = sample().prev_sample

        def replay():
            return sde.sde_step("flow_sde", x, guided_velocity(), sigma, sigma_next, 0.7, prev_sample=prev)

        for fn in (forward, sample, replay):  # warm-up
            timed(fn, device)
        results = []
        for _ in range(args.repeats):
            results.append(tuple(timed(fn, device)[0] for fn in (forward, sample, replay)))
    t_fwd, t_sample, t_replay = (statistics.median(c) for c in zip(*results))
    return dict(forward=t_fwd, sample=t_sample, replay=t_replay, rows=x_in.shape[0],
                share_sample=statistics.median(s / f for f, s, _ in results),
                share_replay=statistics.median(r / f for f, _, r in results),
                fns=dict(forward=forward, sample=sample, replay=replay))


def main() -> None:
    args = parse_sizes(batch=8)
    node, _ = comfy_in_process(args.device)
    model = build_model(args)
    res = measure(node, model, args)
    print(describe(args, model))
    print(f"forward ({res['rows']} rows) {res['forward'] * 1e3:9.2f} ms   sample step {res['sample'] * 1e3:7.3f} ms "
          f"({res['share_sample']:.2%})   replay step {res['replay'] * 1e3:7.3f} ms ({res['share_replay']:.2%})   "
          f"(medians of {args.repeats})")

if __name__ == "__main__":
    main()
