"""Load Reward Model's sources in a real ComfyUI: user reward files in models/reward_scripts (listed, scored, broken
files reported), and torch rewards under ComfyUI's model management (loaded to score, offloaded for the update)."""

from __future__ import annotations

import importlib
import json
import shutil
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

LOAD = "FlowGRPOLoadRewardModel"

USER_FILE = '''
import torch
from flowgrpo_core.rewards import RewardBackend, TorchReward


class BlueSky(RewardBackend):
    name = "blue_sky_{tag}"

    def _score(self, images, prompts, metadata):
        return images[:, : images.shape[1] // 2, :, 2].mean(dim=(1, 2))


class LinearProbe(TorchReward):
    name = "linear_probe_{tag}"

    def __init__(self, device, dtype):
        probe = torch.nn.Linear(3, 1)
        with torch.no_grad():
            probe.weight.copy_(torch.tensor([[1.0, -2.0, 0.5]]))
            probe.bias.fill_(0.25)
        super().__init__(probe, dtype=dtype, batch_size=2)

    def _score_batch(self, images, prompts, metadata):
        return self.model(images.mean(dim=(1, 2)).to(self.dtype)).squeeze(-1)
'''

BROKEN_FILE = "import torch\n\nraise RuntimeError('boom at import')\n"


@pytest.fixture(scope="module")
def mods(flowgrpo_pack):
    package = flowgrpo_pack.package
    return SimpleNamespace(loading=importlib.import_module(f"{package}.nodes.reward_loading"),
                           state=importlib.import_module(f"{package}.nodes.state"))


@pytest.fixture()
def user_files(comfy_runtime, request):
    """Writes a user reward file (names tagged with the test) and a broken one into models/reward_scripts."""
    folder = comfy_runtime.home / "models" / "reward_scripts"
    folder.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:6]
    good, broken = folder / f"probe_{tag}.py", folder / f"broken_{tag}.py"
    good.write_text(USER_FILE.format(tag=tag))
    broken.write_text(BROKEN_FILE)
    yield SimpleNamespace(tag=tag, good=good, broken=broken)
    good.unlink(missing_ok=True)
    broken.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def run(comfy_nodes):
    """``run(node_id, **inputs)`` (an input may be called ``name``)."""
    from conftest import call_node

    return lambda node_id, /, **inputs: call_node(comfy_nodes[node_id], **inputs)


def _options(comfy_nodes, name: str) -> list[str]:
    kind, spec = comfy_nodes[LOAD].INPUT_TYPES()["required"][name][:2]
    return spec["options"] if kind == "COMBO" else kind


def test_user_reward_file_is_listed_and_scores_and_a_broken_file_is_reported(mods, comfy_nodes, run_node, run,
                                                                            user_files, caplog):
    with caplog.at_level("WARNING", logger="flowgrpo"):
        options = _options(comfy_nodes, "backend")
    tag = user_files.tag
    assert f"user:blue_sky_{tag}" in options and f"user:linear_probe_{tag}" in options
    assert options.index("jpeg_compressibility") < options.index(f"user:blue_sky_{tag}")
    errors = mods.loading.user_rewards().errors
    assert any(e.startswith(f"{user_files.broken}:3: RuntimeError: boom at import") for e in errors), errors
    assert any(str(user_files.broken) in r.getMessage() for r in caplog.records)

    images = torch.rand(3, 8, 6, 3, generator=torch.Generator().manual_seed(0))
    (blue,) = run_node(LOAD, backend=f"user:blue_sky_{tag}", weights="(default)", device="auto", dtype="auto")
    rewards, scores, _ = run("FlowGRPOScoreImages", reward_model=blue, images=images, name="", scale=1.0)
    expected = torch.stack([images[i, :4, :, 2].mean() for i in range(3)])
    torch.testing.assert_close(rewards.values, expected)
    assert rewards.components[0][0] == f"blue_sky_{tag}" and len(scores) == 3

    (probe,) = run_node(LOAD, backend=f"user:linear_probe_{tag}", weights="(default)", device="cpu", dtype="float32")
    rewards, _, _ = run("FlowGRPOScoreImages", reward_model=probe, images=images, name="", scale=2.0)
    mean_rgb = images.mean(dim=(1, 2))
    by_hand = 2.0 * (mean_rgb[:, 0] - 2.0 * mean_rgb[:, 1] + 0.5 * mean_rgb[:, 2] + 0.25)
    torch.testing.assert_close(rewards.values, by_hand)


def test_a_changed_user_file_is_picked_up_and_an_unknown_backend_is_a_node_error(mods, comfy_nodes, run_node,
                                                                                user_files):
    tag = user_files.tag
    user_files.good.write_text(USER_FILE.format(tag=tag).replace(f"blue_sky_{tag}", f"renamed_{tag}"))
    options = _options(comfy_nodes, "backend")
    assert f"user:renamed_{tag}" in options and f"user:blue_sky_{tag}" not in options
    with pytest.raises(mods.state.NodeInputError, match=r"FlowGRPO Load Reward Model: unknown reward backend "
                                                        r"'user:nope'.*Fix: .*models/reward_scripts"):
        run_node(LOAD, backend="user:nope", weights="(default)", device="auto", dtype="auto")


def test_torch_reward_is_loaded_to_score_and_offloaded_for_the_update(mods, run_node, run, user_files,
                                                                      tiny_sd3_file):
    import comfy.model_management as mm
    from test_grpo_nodes import UPDATE_DEFAULTS, batched_conditioning, init_trainer, load_model, prompt_batch, \
        rollout_inputs

    (probe,) = run_node(LOAD, backend=f"user:linear_probe_{user_files.tag}", weights="(default)", device="auto",
                        dtype="auto")
    assert isinstance(probe, mods.loading.ManagedReward) and not probe.loaded

    model = load_model("sd3", run_node, tiny_sd3_file)
    trainer, train_model = init_trainer(run_node, model, "managed_reward")
    groups = prompt_batch(SimpleNamespace(state=mods.state))
    _, rollout = run_node("FlowGRPOSDERollout", model=train_model,
                          positive=batched_conditioning("sd3", seeds=(3, 5), group=2),
                          negative=batched_conditioning("sd3", seeds=(4, 4), group=2), groups=groups,
                          **rollout_inputs("sd3"))
    images = torch.rand(groups.group_ids.numel(), 8, 8, 3, generator=torch.Generator().manual_seed(1))
    rewards, _, _ = run("FlowGRPOScoreImages", reward_model=probe, images=images, name="probe", scale=1.0)
    assert probe.loaded and any(m is probe.patcher for m in mm.loaded_models())
    _, metrics, _ = run_node("FlowGRPOUpdate", trainer=trainer, rollout=rollout, rewards=rewards, **UPDATE_DEFAULTS)
    assert not probe.loaded, "the reward model stays loaded while the diffusion model trains"
    assert json.loads(metrics)["rewards"]["probe"] == pytest.approx(rewards.values.tolist())
    again, _, _ = run("FlowGRPOScoreImages", reward_model=probe, images=images, name="probe", scale=1.0)
    assert probe.loaded and torch.equal(again.values, rewards.values)


def test_missing_weights_name_the_folder_and_file_and_a_present_file_loads_and_scores(mods, flowgrpo_pack,
                                                                                      comfy_runtime, comfy_nodes,
                                                                                      run, run_node, tmp_path,
                                                                                      monkeypatch):
    from rewardkit.open_clip_tiny import build_tiny_hps, register_tiny_arch

    folder = comfy_runtime.home / "models" / "reward_models"
    missing = f"HPS_missing_{uuid.uuid4().hex[:6]}.pt"
    with pytest.raises(mods.state.NodeInputError) as info:
        run_node(LOAD, backend="hpsv2.1", weights="(default)", device="auto", dtype="auto")
    message = str(info.value)
    assert message.startswith("FlowGRPO Load Reward Model: reward 'hpsv2.1' needs the file "
                              "'HPS_v2.1_compressed.pt'"), message
    assert str(folder) in message and str(folder / "HPS_v2.1_compressed.pt") in message
    assert "huggingface.co/xswu/HPSv2" in message and "Fix: " in message
    with pytest.raises(mods.state.NodeInputError, match=rf"needs the file '{missing}'.*{folder}"):
        run_node(LOAD, backend="hpsv2", weights=missing, device="auto", dtype="auto")

    # the tiny HPS file (real format) appears in the weights list and loads through the same node
    hps = importlib.import_module(f"{flowgrpo_pack.package}.flowgrpo_core.rewards.hps")
    monkeypatch.setattr(hps, "HPS_ARCH", register_tiny_arch(tmp_path))
    name = f"tiny_hps_{uuid.uuid4().hex[:6]}.pt"
    path = build_tiny_hps(comfy_runtime.home / "models", name=name)
    try:
        assert name in _options(comfy_nodes, "weights")
        (model,) = run_node(LOAD, backend="hpsv2", weights=name, device="cpu", dtype="float32")
        assert isinstance(model, mods.loading.ManagedReward) and model.needs_prompt
        images = torch.rand(2, 40, 56, 3, generator=torch.Generator().manual_seed(3))
        texts = ["a photo of a cat", "a red car"]
        direct = model.inner.score(images, texts).scores
        groups = mods.state.PromptBatch(texts=tuple(texts), group_ids=torch.arange(2), prompt_indices=(0, 1),
                                        iteration=0, group_size=1)
        rewards, _, _ = run("FlowGRPOScoreImages", reward_model=model, images=images, groups=groups, name="",
                            scale=1.0)
        torch.testing.assert_close(rewards.values, direct)
        assert rewards.components[0][0] == "hpsv2"
        assert bool((rewards.values.abs() <= 1.0).all())  # a cosine
    finally:
        path.unlink(missing_ok=True)


def test_geneval_reads_the_jsonl_records_of_prompt_source(mods, comfy_runtime, run, run_node, tiny_clip_file):
    """A GenEval prompt file (one record per line) -> Prompt Source -> Score Images: each image is judged against
    its own prompt's record (tiny random OWL-ViT through the production loader)."""
    from rewardkit.detector_tiny import build_tiny_owlvit

    name = f"owlvit_{uuid.uuid4().hex[:6]}"
    folder = build_tiny_owlvit(comfy_runtime.home / "models", name=name)
    records = [{"tag": "single_object", "prompt": "a photo of a cat", "include": [{"class": "cat", "count": 1}]},
               {"tag": "colors", "prompt": "a photo of a red car",
                "include": [{"class": "car", "count": 1, "color": "red"}], "exclude": [{"class": "dog", "count": 1}]}]
    prompt_file = Path(comfy_runtime.folder_paths.get_input_directory()) / f"{name}.jsonl"
    prompt_file.write_text("\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")
    try:
        clip = run_node("CLIPLoader", clip_name=tiny_clip_file, type="sd3", device="default")[0]
        _, _, groups, _ = run_node("FlowGRPOPromptSource", clip=clip, prompts="", prompt_file=prompt_file.name,
                                   negative_prompt="", prompts_per_iteration=2, group_size=2, iteration=0, seed=0,
                                   flux_guidance=3.5)
        (geneval,) = run_node(LOAD, backend="geneval", weights=name, device="cpu", dtype="float32")
        images = torch.rand(4, 32, 32, 3, generator=torch.Generator().manual_seed(5))
        rewards, scores, _ = run("FlowGRPOScoreImages", reward_model=geneval, images=images, groups=groups,
                                 name="", scale=1.0)
        by_prompt = {r["prompt"]: r for r in records}
        expected = geneval.inner.score(images, list(groups.texts), [by_prompt[t] for t in groups.texts]).scores
        torch.testing.assert_close(rewards.values, expected)
        assert all(0.0 <= s <= 1.0 for s in scores) and rewards.components[0][0] == "geneval"
        with pytest.raises(mods.state.NodeInputError, match="FlowGRPO Score Images: .*metadata"):
            plain = mods.state.PromptBatch(texts=tuple(str(t) for t in groups.texts), group_ids=groups.group_ids,
                                           prompt_indices=groups.prompt_indices, iteration=0, group_size=2)
            run("FlowGRPOScoreImages", reward_model=geneval, images=images, groups=plain, name="", scale=1.0)
    finally:
        prompt_file.unlink(missing_ok=True)
        shutil.rmtree(folder, ignore_errors=True)
