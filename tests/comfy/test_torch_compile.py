"""``torch.compile`` is opt-in through ComfyUI's own mechanism: a MODEL patched by ``TorchCompileModel`` (which calls
``comfy_api.torch_helpers.set_torch_compile_wrapper``) before FlowGRPO LoRA Init keeps its compile wrapper, and the
rollout and the update run the compiled network, forward and backward, with the same results as uncompiled.

The test compiles with a recording backend that hands the graphs to ``aot_eager`` (AOTAutograd, forward and backward
graphs, no C++ compiler needed), so it checks what the pack controls (the compiled module is what runs, gradients flow
through it, log-prob ratio 1) and not inductor's code generation.
"""

from __future__ import annotations

import importlib
import json
from types import SimpleNamespace

import pytest
import torch

from test_grpo_nodes import UPDATE_DEFAULTS, batched_conditioning, init_trainer, load_model, prompt_batch, \
    randomise_lora_, rollout_inputs

pytestmark = pytest.mark.comfy


@pytest.fixture(scope="module")
def mods(flowgrpo_pack):
    return SimpleNamespace(state=importlib.import_module(f"{flowgrpo_pack.package}.nodes.state"))


def _train_once(mods, run_node, model, name):
    trainer, train_model = init_trainer(run_node, model, name)
    randomise_lora_(trainer)
    inputs = dict(rollout_inputs("sd3", steps=3), cfg=4.5)
    ro = run_node("FlowGRPOSDERollout", model=train_model, positive=batched_conditioning("sd3", (3, 5), 2),
                  negative=batched_conditioning("sd3", (4, 4), 2), groups=prompt_batch(mods), **inputs)[1]
    rewards = mods.state.Rewards(values=torch.tensor([1.0, 0.0, 0.3, 0.9]))
    before = {k: p.detach().clone() for k, p in trainer.lora_params.items()}
    _, metrics, _ = run_node("FlowGRPOUpdate", trainer=trainer, rollout=ro, rewards=rewards,
                             **dict(UPDATE_DEFAULTS, kl_beta=0.0))
    lora = {k: p.detach().clone() for k, p in trainer.lora_params.items()}
    assert any(not torch.equal(before[k], lora[k]) for k in lora), "the update must move the LoRA"
    return ro.trajectory, json.loads(metrics), lora


def test_a_torch_compile_wrapped_model_trains_compiled_with_the_uncompiled_results(mods, run_node, tiny_sd3_file):
    from comfy_api.torch_helpers import set_torch_compile_wrapper
    from torch._dynamo.backends.registry import lookup_backend

    aot_eager = lookup_backend("aot_eager")
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(torch.is_grad_enabled())  # sampling graphs are traced without grad, training graphs with
        return aot_eager(gm, example_inputs)

    torch._dynamo.reset()
    base = load_model("sd3", run_node, tiny_sd3_file)
    plain = _train_once(mods, run_node, base, "compile_off")
    compiled_model = base.clone()
    set_torch_compile_wrapper(model=compiled_model, backend=recording_backend)
    try:
        traj, metrics, lora = _train_once(mods, run_node, compiled_model, "compile_on")
    finally:
        torch._dynamo.reset()
    assert set(graphs) == {False, True}, "the rollout and the update must both run the compiled diffusion model"
    assert metrics["first_log_ratio_abs_max"] < 1e-5  # the compiled replay reproduces the compiled rollout
    torch.testing.assert_close(traj.latents, plain[0].latents, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(traj.log_probs, plain[0].log_probs, rtol=1e-4, atol=1e-4)
    assert lora.keys() == plain[2].keys()
    for k in lora:  # the same update through the compiled backward
        torch.testing.assert_close(lora[k], plain[2][k], rtol=1e-4, atol=1e-6)
