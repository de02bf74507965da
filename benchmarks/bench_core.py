"""Core hot paths, each timed side by side with its bare baseline in one run (median of repeats).

1. ``sde_step`` (Flow-SDE with log-prob) vs a bare Euler update ``x + delta * v`` on an SD3-512 latent batch.
2. ``sample_trajectory`` vs a bare Euler sampling loop over the same policy (rollout bookkeeping overhead).
3. ``GRPOTrainer.update`` vs plain forward + backward passes over the same (step, micro-batch) pairs.

Run: ``.venv/bin/python benchmarks/bench_core.py [--device cuda] [--repeats 7]``
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flowgrpo_core.demo import TinyVelocityNet, shifted_sigmas  # noqa: E402
from flowgrpo_core.lora import add_lora  # noqa: E402
from flowgrpo_core.policy import ModulePolicy  # noqa: E402
from flowgrpo_core.rollout import RolloutSpec, sample_trajectory  # noqa: E402
from flowgrpo_core.sde import sde_step  # noqa: E402
from flowgrpo_core.trainer import GRPOConfig, GRPOTrainer  # noqa: E402


def timed(fn, device: str, inner: int) -> float:
    fn()  # warm-up
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(inner):
        fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / inner


def side_by_side(name: str, ours, baseline, device: str, repeats: int, inner: int) -> None:
    ratios, t_ours, t_base = [], [], []
    for _ in range(repeats):
        a, b = timed(ours, device, inner), timed(baseline, device, inner)
        t_ours.append(a)
        t_base.append(b)
        ratios.append(a / b)
    print(f"{name:<42} ours {statistics.median(t_ours) * 1e3:9.3f} ms   baseline {statistics.median(t_base) * 1e3:9.3f} ms"
          f"   ratio {statistics.median(ratios):6.2f}x  (median of {repeats})")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    dev = args.device
    print(f"device {dev}, torch {torch.__version__}, threads {torch.get_num_threads()}")

    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(8, 16, 64, 64, device=dev, generator=g)
    v = torch.randn(8, 16, 64, 64, device=dev, generator=g)
    side_by_side("sde_step(flow_sde) vs Euler, 8x16x64x64",
                 lambda: sde_step("flow_sde", x, v, 0.8, 0.7, 0.7, generator=g),
                 lambda: x + (0.7 - 0.8) * v, dev, args.repeats, inner=20)

    torch.manual_seed(0)
    net = add_lora(TinyVelocityNet(hidden=256), ["fc1", "fc2", "fc3"], rank=8).to(dev)
    policy = ModulePolicy(net)
    steps, batch = 10, 64
    sigmas = shifted_sigmas(steps, 3.0)
    spec = RolloutSpec("flow_sde", 0.7, sigmas, [True] * (steps - 1) + [False], [True] * (steps - 1) + [False])
    x0 = torch.randn(batch, 8, device=dev, generator=g)
    cond = torch.arange(batch, device=dev) % 4

    @torch.no_grad()
    def euler_loop():
        y = x0
        for i in range(steps):
            y = y + (sigmas[i + 1] - sigmas[i]) * net(y, torch.full((batch,), sigmas[i], device=dev), cond)
        return y

    side_by_side("sample_trajectory vs bare Euler loop (MLP)",
                 lambda: sample_trajectory(policy, x0, cond, spec, generator=g), euler_loop, dev, args.repeats, inner=5)

    traj = sample_trajectory(policy, x0, cond, spec, generator=g)
    opt = torch.optim.SGD(policy.trainable_parameters(), lr=0.0)
    trainer = GRPOTrainer(policy, opt, GRPOConfig())
    adv = torch.randn(batch, device=dev, generator=g)
    params = policy.trainable_parameters()

    def plain_backward():
        opt.zero_grad()
        for j in spec.train_steps:
            out = net(traj.latents[j], torch.full((batch,), sigmas[j], device=dev), cond)
            out.square().mean().backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    side_by_side("GRPOTrainer.update vs forward+backward (MLP)", lambda: trainer.update(traj, adv), plain_backward,
                 dev, args.repeats, inner=5)


if __name__ == "__main__":
    main()
