"""The GRPO update over a recorded trajectory.

For every trained step ``j`` and every micro-batch of the rollout's layout, the trainer recomputes
``log p_theta(x_{j+1} | x_j)`` with gradient, forms the clipped surrogate (plus ``beta * KL`` to the
adapter-disabled reference on the step means), and back-propagates at once so that only one step's graph is
alive. Gradients are averaged over samples and trained steps, clipped by norm, and the optimizer steps once
per mini-batch (``optimizer_steps`` per update; the first is exactly on-policy).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

from .grpo import clipped_surrogate_loss, kl_to_reference, policy_metrics
from .policy import FlowPolicy, index_cond
from .rollout import Trajectory, replay_step, sigma_batch
from .sde import sde_mean_std

ClipRange = Union[float, tuple[float, float]]


@dataclass(frozen=True)
class GRPOConfig:
    """Update hyper-parameters (reference defaults: grpo-math.md section 11).

    clip_range:      ratio clip, symmetric ``eps`` or ``(lo, hi)`` for ``[1 - lo, 1 + hi]``; 1e-4 (SDE), 1e-5 (CPS).
    adv_clip_max:    advantages clipped to ``+-adv_clip_max`` before the loss (None: no clip).
    kl_beta:         weight of the KL to the reference policy (0 disables the reference forward).
    kl_form:         ``"reference"`` (Flow-GRPO's scaled form) or ``"exact"`` Gaussian KL.
    max_grad_norm:   gradient-norm clip (None: none).
    optimizer_steps: optimizer steps per update; the batch's micro-batches are split into this many groups.
    """

    clip_range: ClipRange = 1e-4
    adv_clip_max: Optional[float] = 5.0
    kl_beta: float = 0.0
    kl_form: str = "reference"
    max_grad_norm: Optional[float] = 1.0
    optimizer_steps: int = 1


class GRPOTrainer:
    """Applies GRPO updates to ``policy.trainable_parameters()`` through ``optimizer``."""

    def __init__(self, policy: FlowPolicy, optimizer: torch.optim.Optimizer, config: GRPOConfig = GRPOConfig()):
        if config.optimizer_steps < 1:
            raise ValueError("optimizer_steps must be >= 1")
        self.policy = policy
        self.optimizer = optimizer
        self.config = config
        self.parameters = [p for p in policy.trainable_parameters()]
        if not self.parameters:
            raise ValueError("the policy has no trainable parameters; attach a LoRA adapter first")

    def _step_loss(self, trajectory: Trajectory, j: int, chunk: slice, advantages: torch.Tensor):
        """Loss of trained step ``j`` on one micro-batch, and the recomputed log-probs (detached)."""
        spec, cfg = trajectory.spec, self.config
        x = trajectory.latents[j, chunk]
        cond = index_cond(trajectory.cond, chunk)
        out = replay_step(self.policy, spec, j, x, cond, prev_sample=trajectory.latents[j + 1, chunk])
        loss = clipped_surrogate_loss(out.log_prob, trajectory.log_probs[j, chunk], advantages[chunk],
                                      cfg.clip_range, adv_clip=cfg.adv_clip_max)
        kl = torch.zeros((), device=loss.device)
        if cfg.kl_beta > 0:
            sigma, sigma_next = spec.sigmas[j], spec.sigmas[j + 1]
            with torch.no_grad(), self.policy.reference():
                v_ref = self.policy.velocity(x, sigma_batch(sigma, x), cond)
            ref_mean, _ = sde_mean_std(spec.step_kind(j), x, v_ref, sigma, sigma_next, spec.noise_level)
            kl = kl_to_reference(out.mean, ref_mean, out.std, delta=sigma_next - sigma, form=cfg.kl_form,
                                 kind=spec.step_kind(j)).mean()
            loss = loss + cfg.kl_beta * kl
        return loss, kl.detach(), out.log_prob.detach()

    def update(self, trajectory: Trajectory, advantages: torch.Tensor) -> dict[str, float]:
        """One GRPO update on ``trajectory`` with per-sample ``advantages`` ``[B]``; returns metrics."""
        spec, cfg = trajectory.spec, self.config
        batch = trajectory.batch_size
        advantages = advantages.to(device=trajectory.latents.device, dtype=torch.float32).reshape(-1)
        if advantages.shape[0] != batch:
            raise ValueError(f"{advantages.shape[0]} advantages for a batch of {batch} samples")
        if not bool(torch.isfinite(advantages).all()):
            raise ValueError("advantages contain NaN or inf; check the rewards (a NaN reward poisons its group)")
        chunks = spec.chunks(batch)
        if len(chunks) < cfg.optimizer_steps:
            raise ValueError(f"{cfg.optimizer_steps} optimizer steps need at least as many micro-batches, "
                             f"got {len(chunks)}; lower optimizer_steps or the micro-batch size")
        groups = [chunks[k::cfg.optimizer_steps] for k in range(cfg.optimizer_steps)]
        steps = spec.train_steps
        # per (trained step, sample) records kept on the device: no host synchronisation between steps, only one
        # finiteness check per optimizer step (which the gradient clip needs anyway)
        new_lp = torch.zeros((len(steps), batch), dtype=torch.float32, device=advantages.device)
        step_losses = torch.zeros((len(steps), batch), dtype=torch.float32, device=advantages.device)
        step_kls = torch.zeros_like(step_losses)
        columns = [torch.cat([torch.arange(c.start, c.stop) for c in group]).to(new_lp.device) for group in groups]
        grad_norms = []
        for group, group_columns in zip(groups, columns):
            self.optimizer.zero_grad(set_to_none=True)
            group_size = sum(c.stop - c.start for c in group)
            for chunk in group:
                weight = (chunk.stop - chunk.start) / group_size / len(steps)
                for row, j in enumerate(steps):
                    loss, kl, log_prob = self._step_loss(trajectory, j, chunk, advantages)
                    (loss * weight).backward()
                    new_lp[row, chunk] = log_prob
                    step_losses[row, chunk] = loss.detach()
                    step_kls[row, chunk] = kl
            norm = torch.nn.utils.clip_grad_norm_(self.parameters, cfg.max_grad_norm or float("inf"))
            group_losses = step_losses[:, group_columns]
            if not bool(torch.isfinite(torch.cat([group_losses.flatten(), norm.reshape(1).float()])).all()):
                self.optimizer.zero_grad(set_to_none=True)
                bad = (~torch.isfinite(group_losses)).any(dim=1).nonzero().flatten().tolist()
                if bad:
                    raise FloatingPointError(f"non-finite loss at step {steps[bad[0]]}; the update was skipped and "
                                             "the adapter is unchanged (lower the learning rate or check the rewards)")
                raise FloatingPointError("non-finite gradient norm; the optimizer step was skipped and the adapter "
                                         "is unchanged (lower the learning rate)")
            grad_norms.append(norm.detach())
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

        old_lp = trajectory.log_probs[steps]
        metrics = policy_metrics(new_lp.flatten(), old_lp.flatten(), cfg.clip_range)
        metrics.update(  # the loss each optimizer step minimised (a mean over its samples and steps), averaged
            loss=float(torch.stack([step_losses[:, c].mean() for c in columns]).mean()),
            kl=float(step_kls.mean()),
            grad_norm=float(torch.stack(grad_norms).mean()),
            first_log_ratio_abs_max=float((new_lp[:, columns[0]] - old_lp[:, columns[0]]).abs().max()),
            trained_steps=float(len(steps)),
        )
        return metrics
