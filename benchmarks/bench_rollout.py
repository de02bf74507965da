"""The rollout node against ComfyUI's stock sampler: same model, conditioning, batch, resolution and steps, one run.

* stock: ``SamplerCustomAdvanced`` with ``CFGGuider`` (``BasicGuider`` for a CFG-free model), ``BasicScheduler``
  simple, ``RandomNoise`` and the ``euler`` sampler: the cost of plain sampling;
* ours: ``FlowGRPOSDERollout`` on the trainer's MODEL (``FlowGRPOLoRAInit``, rank 16: the LoRA is applied in every
  forward, as in training), flow_sde 0.7, every step but the last stochastic with its log-prob recorded and every
  latent stored.

Prints the medians and the median of the per-repeat ratios ours / stock (target <= 1.05).

Run: ``.venv/bin/python benchmarks/bench_rollout.py [--model sd3|flux-width|flux-dev|qwen-image] [--depth 4] [--size 32] [--batch 8]
[--steps 10] [--repeats 5] [--device cuda --dtype bf16]``
"""

from __future__ import annotations

import statistics

from bench_update import pack_modules, sample_rollout
from comfy_bench import build_model, comfy_in_process, describe, median_ratio, parse_sizes, timed


def compare(run, mods: dict, model, args) -> dict:
    """Stock vs ours on ``model`` at ``args``' sizes: a warm-up of each, then ``args.repeats`` interleaved timed
    pairs. ``{"stock", "ours"}``: median seconds, ``"ratio"``: median per-repeat ratio, ``"rows"``: the
    ``(ours, stock)`` pairs, ``"fns"``: the two calls (for bench_gpu's FLOP count), ``"trainer"`` and
    ``"train_model"``: the rank-16 LoRA's."""
    import torch

    latent = {"samples": torch.zeros(model.latent_shape)}
    if model.cfg != 1.0:
        (guider,) = run("CFGGuider", model=model.patcher, positive=model.positive, negative=model.negative,
                        cfg=model.cfg)
    else:
        (guider,) = run("BasicGuider", model=model.patcher, conditioning=model.positive)
    (sigmas,) = run("BasicScheduler", model=model.patcher, scheduler="simple", steps=args.steps, denoise=1.0)
    (noise,) = run("RandomNoise", noise_seed=0)
    (euler,) = run("KSamplerSelect", sampler_name="euler")
    trainer, train_model = run("FlowGRPOLoRAInit", model=model.patcher, rank=16, alpha=16.0, targets="attention",
                               learning_rate=1e-4, seed=0, run_name="bench_rollout", resume="none")
    device = train_model.load_device

    def stock():
        run("SamplerCustomAdvanced", noise=noise, guider=guider, sampler=euler, sigmas=sigmas, latent_image=latent)

    def ours():
        sample_rollout(run, mods, model, args, train_model)

    stock(), ours()  # warm-up
    rows = []
    for _ in range(args.repeats):
        t_stock = timed(stock, device)[0]
        rows.append((timed(ours, device)[0], t_stock))
    med_ours, med_stock = (statistics.median(c) for c in zip(*rows))
    return dict(stock=med_stock, ours=med_ours, ratio=median_ratio(rows), rows=rows,
                fns=dict(stock=stock, ours=ours), trainer=trainer, train_model=train_model)


def main() -> None:
    args = parse_sizes(batch=8)
    node, run = comfy_in_process(args.device)

    model = build_model(args)
    res = compare(run, pack_modules(node), model, args)
    print(describe(args, model))
    print(f"stock euler {res['stock'] * 1e3:9.1f} ms   FlowGRPOSDERollout {res['ours'] * 1e3:9.1f} ms   "
          f"ratio {res['ratio']:.3f}x   (medians of {args.repeats})")

if __name__ == "__main__":
    main()
