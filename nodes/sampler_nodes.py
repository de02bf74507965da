"""Sampling nodes: the Flow-GRPO / DanceGRPO / CPS reverse SDE as a stock ComfyUI SAMPLER.

``FlowGRPOSDESampler`` outputs a ``comfy.samplers.KSAMPLER`` that stock ``SamplerCustomAdvanced`` (with any guider,
scheduler and noise node) drives. Each step calls the wrapped model for the denoised ``D``, turns it into the velocity
``v = (x - D) / sigma`` and takes ``flowgrpo_core.sde.sde_step``. With ``sde_kind = ode`` (or ``noise_level = 0``) it is
exactly ComfyUI's ``euler`` sampler, so the same graph previews what an RL rollout will see.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from comfy_api.latest import io
from tqdm.auto import trange

from ..flowgrpo_core.sde import SDE_KINDS, check_noise_level, sde_step
from .model_adapter import predict_velocity, require_flow_model

__all__ = ["FlowGRPOSDESampler", "sample_flow_sde", "make_sde_sampler"]

def _interrupt_point() -> None:
    import comfy.model_management

    comfy.model_management.throw_exception_if_processing_interrupted()


@torch.no_grad()
def sample_flow_sde(model: Callable[..., torch.Tensor], x: torch.Tensor, sigmas: torch.Tensor,
                    extra_args: Optional[dict] = None, callback: Optional[Callable[[dict], Any]] = None,
                    disable: Optional[bool] = None, sde_kind: str = "flow_sde", noise_level: float = 0.7,
                    seed: int = 0) -> torch.Tensor:
    """A KSAMPLER function (``comfy.samplers.KSAMPLER(sample_flow_sde, extra_options)``).

    ``model(x, sigma_batch, **extra_args)`` returns the denoised sample (ComfyUI's convention). Steps go
    ``sigmas[i] -> sigmas[i + 1]``; the step that reaches sigma 0 is always the deterministic ODE step (it lands on
    the predicted clean sample). The step noise comes from a local ``torch.Generator`` on ``x.device`` seeded with
    ``seed``, so a run is reproducible and independent of the global RNG.
    """
    check_noise_level(sde_kind, noise_level)
    require_flow_model(model)
    extra_args = {} if extra_args is None else extra_args
    generator = torch.Generator(device=x.device)
    generator.manual_seed(int(seed))

    for i in trange(len(sigmas) - 1, disable=disable):
        _interrupt_point()
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        velocity, denoised = predict_velocity(model, x, sigma, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
        kind = "ode" if float(sigma_next) == 0.0 else sde_kind
        x = sde_step(kind, x, velocity, sigma, sigma_next, noise_level, generator=generator).prev_sample
    return x


def make_sde_sampler(sde_kind: str = "flow_sde", noise_level: float = 0.7, seed: int = 0):
    """A ``comfy.samplers.KSAMPLER`` running :func:`sample_flow_sde` with these options."""
    import comfy.samplers

    check_noise_level(sde_kind, noise_level)
    return comfy.samplers.KSAMPLER(sample_flow_sde,
                                   extra_options={"sde_kind": sde_kind, "noise_level": float(noise_level),
                                                  "seed": int(seed)})


class FlowGRPOSDESampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FlowGRPOSDESampler",
            display_name="FlowGRPO SDE Sampler",
            category="FlowGRPO/sampling",
            description=(
                "A SAMPLER for SamplerCustomAdvanced that runs the stochastic reverse process used by Flow-GRPO "
                "rollouts on flow-matching models (FLUX, Qwen-Image, SD3). sde_kind 'ode' (or noise_level 0) "
                "reproduces the stock euler sampler; the last step to sigma 0 is always deterministic."
            ),
            inputs=[
                io.Combo.Input(
                    "sde_kind", options=list(SDE_KINDS), default="flow_sde",
                    tooltip=("Reverse-step family. flow_sde: Flow-GRPO's SDE, noise scaled by sqrt(sigma/(1-sigma)); "
                             "dance_sde: DanceGRPO's constant-noise SDE; cps: coefficients-preserving sampling; "
                             "euler_ancestral: ComfyUI's euler_ancestral on flow models (eta, s_noise 1); "
                             "ode: plain Euler (deterministic, same as the stock euler sampler)."),
                ),
                io.Float.Input(
                    "noise_level", default=0.7, min=0.0, max=5.0, step=0.01,
                    tooltip=("Stochasticity of each step. flow_sde: a (0.7 SD3.5, 0.9 FLUX, 1.2 Qwen-Image in the "
                             "papers); dance_sde: eta (constant diffusion, ~0.3); cps: eta in [0, 1] (share of noise "
                             "re-injected); euler_ancestral: eta in [0, 1]. 0 gives the deterministic Euler path. Ignored by ode."),
                ),
                io.Int.Input(
                    "seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                    tooltip=("Seed of the per-step SDE noise (a private generator on the sampling device), so a run "
                             "is reproducible. The initial latent noise still comes from the NOISE input."),
                ),
            ],
            outputs=[io.Sampler.Output(tooltip="Connect to the sampler input of SamplerCustomAdvanced.")],
        )

    @classmethod
    def execute(cls, sde_kind: str, noise_level: float, seed: int) -> io.NodeOutput:
        return io.NodeOutput(make_sde_sampler(sde_kind, noise_level, seed))
NODES = [FlowGRPOSDESampler]
