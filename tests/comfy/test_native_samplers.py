"""The core's euler_ancestral kind against ComfyUI's own sample_euler_ancestral_RF, step by step."""

from types import SimpleNamespace

import torch


def _velocity(x, sigma):
    """A smooth, non-linear velocity field standing in for a network."""
    return torch.tanh(x) * (1.5 - sigma) + 0.3 * x.roll(1, dims=-1)


def test_euler_ancestral_matches_comfyui_with_the_same_noise(comfy_runtime):
    """Fed the same noise, the core's step reproduces every intermediate of ComfyUI's sampler, so the core can
    score a stock euler_ancestral trajectory with exact log-probs."""
    import comfy.k_diffusion.sampling as kds
    import tiny_models
    from flowgrpo_core.sde import sde_step

    g = torch.Generator().manual_seed(0)
    x_start = torch.randn(2, 4, 6, 6, generator=g)
    sigmas = torch.tensor([1.0, 0.85, 0.6, 0.35, 0.1, 0.0])
    noises = [torch.randn(x_start.shape, generator=g) for _ in range(len(sigmas) - 1)]

    class Denoiser:
        """A KSAMPLER's denoiser: returns x0_hat = x - sigma * v (ComfyUI's convention), and reaches the model
        patcher as ComfyUI's denoiser does (``inner_model.model_patcher``: 2026 samplers read its model_sampling's
        noise_scale); the patcher is a real tiny SD3's, a flow model with noise scale 1."""

        inner_model = SimpleNamespace(model_patcher=tiny_models.build_sd3())

        def __call__(self, x, sigma, **_):
            s = sigma.view(-1, 1, 1, 1)
            return x - s * _velocity(x, s)

    denoiser = Denoiser()

    for eta in (0.0, 0.5, 1.0):
        calls = iter(noises)
        states = []
        final = kds.sample_euler_ancestral_RF(denoiser, x_start.clone(), sigmas, eta=eta, s_noise=1.0, disable=True,
                                              callback=lambda d: states.append(d["x"].clone()),
                                              noise_sampler=lambda s, s_next: next(calls))
        states.append(final)
        for i in range(len(sigmas) - 1):
            s, s_next = float(sigmas[i]), float(sigmas[i + 1])
            x = states[i]
            step = sde_step("euler_ancestral", x, _velocity(x, s), s, s_next, eta, prev_sample=states[i + 1])
            ours = step.mean + step.std * noises[i] if eta > 0 and s_next > 0 else step.mean
            assert (ours - states[i + 1]).abs().max() <= 1e-5, (eta, i)
            assert torch.isfinite(step.log_prob).all()
            if eta > 0 and s_next > 0:
                assert torch.all(step.std > 0) and torch.all(step.log_prob != 0)
