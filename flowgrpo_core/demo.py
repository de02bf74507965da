"""A pure-core GRPO run: a tiny flow-matching MLP with a LoRA learns to prefer one mode of its data.

The base model is pre-trained by flow matching on a bimodal distribution: for prompt ``c`` a sample is
``o_c + s * 2 * 1 + 0.3 * noise`` with a fair sign ``s``. The closed-form reward ``mean(x - o_c)`` is about
+2 for the positive mode and -2 for the negative one, so the base policy's mean reward is near 0 and GRPO
should move it towards +2. Runs on CPU in seconds; deterministic under ``seed``.

Run ``python -m flowgrpo_core.demo``: the pure-core demo (no ComfyUI); the README's main job is the ComfyUI one
(``python -m flowgrpo demo``).
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from .group_sampler import GroupSampler
from .grpo import group_advantages
from .lora import add_lora
from .policy import ModulePolicy
from .rollout import RolloutSpec, sample_trajectory
from .seeding import iteration_generator
from .trainer import GRPOConfig, GRPOTrainer
from .windows import StepSelection, select_steps

DIM = 8
NUM_PROMPTS = 4


class TinyVelocityNet(nn.Module):
    """``v(x, sigma, c)``: an MLP over ``[x, embed(c), sigma]``; ``x`` is ``[B, DIM]``, ``c`` a LongTensor ``[B]``."""

    def __init__(self, dim: int = DIM, num_prompts: int = NUM_PROMPTS, hidden: int = 64):
        super().__init__()
        self.embed = nn.Embedding(num_prompts, dim)
        self.fc1 = nn.Linear(2 * dim + 2, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        s = sigma.to(x.dtype).view(-1, 1)
        h = torch.cat([x, self.embed(cond), s, torch.cos(math.pi / 2 * s)], dim=1)
        h = nn.functional.silu(self.fc1(h))
        h = nn.functional.silu(self.fc2(h))
        return self.fc3(h)


def prompt_offsets(seed: int) -> torch.Tensor:
    """``o_c`` for each prompt, ``[NUM_PROMPTS, DIM]``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(NUM_PROMPTS, DIM, generator=g)


def sample_data(cond: torch.Tensor, offsets: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    sign = torch.randint(0, 2, (cond.shape[0], 1), generator=g).float() * 2 - 1
    return offsets[cond] + 2.0 * sign + 0.3 * torch.randn(cond.shape[0], DIM, generator=g)


def reward(x: torch.Tensor, cond: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Closed-form reward ``[B]``: how far the sample sits on the positive side of its prompt's offset."""
    return (x.float() - offsets[cond]).mean(dim=1)


def pretrain(net: TinyVelocityNet, offsets: torch.Tensor, steps: int, seed: int) -> None:
    """Rectified-flow pre-training: ``x_sigma = (1 - sigma) x0 + sigma eps``, target ``v = eps - x0``."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(steps):
        cond = torch.randint(0, NUM_PROMPTS, (256,), generator=g)
        x0 = sample_data(cond, offsets, g)
        eps = torch.randn(x0.shape, generator=g)
        sigma = torch.rand(256, generator=g)
        x = (1 - sigma[:, None]) * x0 + sigma[:, None] * eps
        loss = (net(x, sigma, cond) - (eps - x0)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def shifted_sigmas(num_steps: int, shift: float) -> tuple[float, ...]:
    """SD3-style shifted grid ``sigma(t) = s t / (1 + (s - 1) t)`` on ``t = linspace(1, 0, N + 1)``."""
    t = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    return tuple(float(v) for v in shift * t / (1 + (shift - 1) * t))


@dataclass
class DemoConfig:
    seed: int = 0
    iterations: int = 30
    prompts_per_iteration: int = 4
    group_size: int = 8
    num_steps: int = 8
    shift: float = 3.0
    kind: str = "flow_sde"
    noise_level: float = 0.7
    selection: StepSelection = field(default_factory=lambda: StepSelection(mode="fraction", fraction=0.99))
    lora_rank: int = 4
    learning_rate: float = 3e-3
    pretrain_steps: int = 600
    kl_beta: float = 0.0


def run_demo(config: DemoConfig = DemoConfig(), log: Optional[Callable[[str], None]] = print) -> list[float]:
    """Pre-train the base, attach a LoRA, run GRPO; returns the mean reward of every iteration."""
    with torch.random.fork_rng():
        torch.manual_seed(config.seed)
        net = TinyVelocityNet()
        offsets = prompt_offsets(config.seed)
        pretrain(net, offsets, config.pretrain_steps, config.seed)
        add_lora(net, ["fc1", "fc2", "fc3"], rank=config.lora_rank)
    policy = ModulePolicy(net)
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=config.learning_rate, weight_decay=1e-4)
    trainer = GRPOTrainer(policy, optimizer, GRPOConfig(kl_beta=config.kl_beta))
    sampler = GroupSampler(NUM_PROMPTS, config.prompts_per_iteration, config.group_size, seed=config.seed)
    sigmas = shifted_sigmas(config.num_steps, config.shift)
    rewards_per_iteration = []
    for it in range(config.iterations):
        batch = sampler.sample(it)
        cond = batch.prompt_indices
        plan = select_steps(config.selection, config.num_steps, config.seed, it)
        spec = RolloutSpec(kind=config.kind, noise_level=config.noise_level, sigmas=sigmas,
                           sde_mask=plan.sde_mask, train_mask=plan.train_mask)
        g = iteration_generator(config.seed, it, "noise")
        x_start = torch.randn(cond.shape[0], DIM, generator=g)
        trajectory = sample_trajectory(policy, x_start, cond, spec, generator=g)
        r = reward(trajectory.final, cond, offsets)
        adv = group_advantages(r, batch.group_ids, std_mode="global")
        metrics = trainer.update(trajectory, adv.advantages)
        rewards_per_iteration.append(float(r.mean()))
        if log is not None:
            log(f"iter {it:3d}  reward {r.mean():+.3f} ± {r.std():.3f}  steps {plan.train_steps}  "
                f"clipfrac {metrics['clipfrac']:.2f}  grad_norm {metrics['grad_norm']:.3f}")
    return rewards_per_iteration


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Pure-core Flow-GRPO demo on a tiny flow-matching MLP (CPU).")
    parser.add_argument("--iterations", type=int, default=DemoConfig.iterations)
    parser.add_argument("--seed", type=int, default=DemoConfig.seed)
    parser.add_argument("--kind", default=DemoConfig.kind, choices=["flow_sde", "dance_sde", "cps"])
    parser.add_argument("--noise-level", type=float, default=DemoConfig.noise_level)
    args = parser.parse_args(argv)
    history = run_demo(DemoConfig(seed=args.seed, iterations=args.iterations, kind=args.kind,
                                  noise_level=args.noise_level))
    k = max(1, len(history) // 5)
    first, last = sum(history[:k]) / k, sum(history[-k:]) / k
    print(f"mean reward: first {k} iterations {first:+.3f} -> last {k} iterations {last:+.3f}")
    return 0 if last > first else 1


if __name__ == "__main__":
    sys.exit(main())
