"""flowgrpo_core: the Flow-GRPO / DanceGRPO math in plain PyTorch, with no ComfyUI import.

Modules, one concept each:

* ``sde``           one reverse step (Flow-SDE, Dance-SDE, CPS, ODE) with its Gaussian log-prob
* ``windows``       which steps are stochastic and trained (fraction, fixed/random/sliding window, subset)
* ``grpo``          group advantages, multi-reward aggregation, clipped surrogate loss, KL, metrics
* ``group_sampler`` prompts per iteration, repeated per group, split across ranks
* ``rollout``       a trajectory with per-step log-probs over a small policy interface
* ``trainer``       the GRPO update: replay log-probs, accumulate gradients, clip, step
* ``lora``          LoRA adapters for plain ``nn.Module`` policies through peft
* ``policy``        the small policy interface the rollout and trainer work over
* ``seeding``       random streams seeded by (run seed, iteration)
* ``checkpoint``    atomic safetensors writes, optimizer state and history files, PEFT export keys
* ``prompts``       prompt lists from text, ``.txt`` and ``.jsonl``
* ``rewards``       the reward interface (``base``) and weight-free image rewards (``simple``)
"""

__version__ = "0.1.0"
