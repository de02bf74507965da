"""``FlowGRPOPromptSource`` (nodes/prompt_nodes.py) in a real ComfyUI with the stock CLIPLoader, CLIPTextEncode,
UNETLoader and SamplerCustomAdvanced: prompt draw, batched conditioning, prompt files, errors."""

from __future__ import annotations

import importlib
import json
import os
from types import SimpleNamespace

import pytest
import torch

import tiny_models

pytestmark = pytest.mark.comfy

NODE = "FlowGRPOPromptSource"
NODE_NAME = "FlowGRPO Prompt Source"
SHORT_PROMPTS = ["a red cube on a table", "a blue sphere in the snow", "a green pyramid at night",
                 "a yellow taxi in the rain", "a small brown dog", "an old lighthouse", "a bowl of ramen",
                 "a paper boat on a lake"]
LONG_PROMPT = ", ".join(f"detail number {i} of an ornate baroque cathedral interior" for i in range(14))


@pytest.fixture(scope="module")
def mods(flowgrpo_pack):
    pkg = flowgrpo_pack.package
    return SimpleNamespace(prompts=importlib.import_module(f"{pkg}.nodes.prompt_nodes"),
                           state=importlib.import_module(f"{pkg}.nodes.state"),
                           group_sampler=importlib.import_module(f"{pkg}.flowgrpo_core.group_sampler"))


@pytest.fixture(scope="module")
def clip(run_node, tiny_clip_file):
    return run_node("CLIPLoader", clip_name=tiny_clip_file, type="sd3", device="default")[0]


@pytest.fixture(scope="module")
def sd3(run_node, tiny_sd3_file):
    return run_node("UNETLoader", unet_name=tiny_sd3_file, weight_dtype="default")[0]


@pytest.fixture(scope="module")
def input_dir(comfy_runtime):
    path = comfy_runtime.folder_paths.get_input_directory()
    os.makedirs(path, exist_ok=True)
    return path


def _source(run_node, clip, prompts, prompt_file="", negative_prompt="", prompts_per_iteration=2, group_size=4,
            iteration=0, seed=0, flux_guidance=3.5):
    return run_node(NODE, clip=clip, prompts="\n".join(prompts) if isinstance(prompts, list) else prompts,
                    prompt_file=prompt_file, negative_prompt=negative_prompt,
                    prompts_per_iteration=prompts_per_iteration, group_size=group_size, iteration=iteration,
                    seed=seed, flux_guidance=flux_guidance)


def _stock(run_node, clip, text):
    (cond,) = run_node("CLIPTextEncode", clip=clip, text=text)
    assert len(cond) == 1
    return cond[0][0], cond[0][1]["pooled_output"]


def _node_error(excinfo, *words):
    message = str(excinfo.value)
    assert message.startswith(NODE_NAME + ":"), message
    assert "Fix:" in message, message
    for word in words:
        assert word in message, message
    return message


# ----------------------------------------------------------------------------------------------- the batch
def test_batch_layout_matches_the_group_sampler_and_stock_encoding(run_node, clip, mods):
    P, G, iteration, seed = 3, 4, 5, 11
    positive, negative, groups, texts = _source(run_node, clip, ["# a comment", *SHORT_PROMPTS, ""],
                                                negative_prompt="blurry, low quality", prompts_per_iteration=P,
                                                group_size=G, iteration=iteration, seed=seed, flux_guidance=2.5)
    expected = mods.group_sampler.GroupSampler(len(SHORT_PROMPTS), P, G, seed, rank=0, world_size=1).sample(iteration)
    B = P * G
    assert isinstance(groups, mods.state.PromptBatch)
    assert groups.batch_size == B and groups.group_size == G and groups.iteration == iteration
    assert groups.group_ids.dtype == torch.long
    assert torch.equal(groups.group_ids, expected.group_ids)
    assert groups.prompt_indices == tuple(expected.prompt_indices.tolist())
    assert groups.texts == tuple(SHORT_PROMPTS[i] for i in expected.prompt_indices.tolist())
    chosen = [SHORT_PROMPTS[i] for i in expected.prompts.tolist()]
    assert texts == "\n".join(chosen)
    assert len(set(chosen)) == P

    assert len(positive) == 1 and len(negative) == 1
    cond, extra = positive[0]
    assert cond.shape == (B, 77, tiny_models.SD3_CONTEXT_DIM)
    assert extra["pooled_output"].shape == (B, tiny_models.SD3_POOLED_DIM)
    assert extra["guidance"] == 2.5 and negative[0][1]["guidance"] == 2.5
    for g, text in enumerate(chosen):
        stock_cond, stock_pooled = _stock(run_node, clip, text)
        for row in range(g * G, (g + 1) * G):
            assert torch.equal(cond[row], stock_cond[0]), (text, row)
            assert torch.equal(extra["pooled_output"][row], stock_pooled[0]), (text, row)
    for g in range(1, P):
        assert not torch.equal(cond[0], cond[g * G])
        assert not torch.equal(extra["pooled_output"][0], extra["pooled_output"][g * G])

    neg_cond, neg_pooled = _stock(run_node, clip, "blurry, low quality")
    assert torch.equal(negative[0][0], neg_cond.expand(B, -1, -1))
    assert torch.equal(negative[0][1]["pooled_output"], neg_pooled.expand(B, -1))
    assert not torch.equal(negative[0][0][0], cond[0])


def test_iterations_draw_different_prompt_sets_and_repeat_exactly(run_node, clip):
    def draw(iteration, seed=3):
        return _source(run_node, clip, SHORT_PROMPTS, prompts_per_iteration=2, group_size=2,
                       iteration=iteration, seed=seed)

    first, again, second = draw(0), draw(0), draw(1)
    assert first[3] == again[3] and first[2].texts == again[2].texts
    assert torch.equal(first[0][0][0], again[0][0][0])
    assert set(first[3].splitlines()) != set(second[3].splitlines())
    assert not torch.equal(first[0][0][0], second[0][0][0])
    assert all(len(set(d[3].splitlines())) == 2 and set(d[3].splitlines()) <= set(SHORT_PROMPTS)
               for d in (first, second))
    assert draw(0, seed=4)[2].texts != first[2].texts


# ----------------------------------------------------------------------------------------------- token lengths
SENSITIVE_STD = 0.1  # the test models' default init (std 0.02) barely reacts to the text; this one does


def _max_diff(a, b):
    return float((a - b).abs().max())


def test_long_and_short_prompts_batch_like_comfyui(run_node, clip, tiny_sd3_file):
    """A prompt over 77 CLIP tokens (two 77-token chunks) with a short one: the short one is repeated to 154 tokens
    (ComfyUI's CONDCrossAttn rule) and the long one's samples give exactly the unbatched SD3 output."""
    import comfy.conds

    P = G = 2
    positive, _, groups, _ = _source(run_node, clip, [LONG_PROMPT, SHORT_PROMPTS[0]], prompts_per_iteration=P,
                                     group_size=G, seed=1)
    cond, extra = positive[0]
    single = {t: _stock(run_node, clip, t) for t in (LONG_PROMPT, SHORT_PROMPTS[0])}
    assert (single[LONG_PROMPT][0].shape[1], single[SHORT_PROMPTS[0]][0].shape[1]) == (154, 77)
    assert cond.shape == (P * G, 154, tiny_models.SD3_CONTEXT_DIM)
    assert sorted(groups.texts) == sorted([LONG_PROMPT, SHORT_PROMPTS[0]] * G)
    comfy_concat = comfy.conds.CONDCrossAttn(single[LONG_PROMPT][0]).concat(
        [comfy.conds.CONDCrossAttn(single[SHORT_PROMPTS[0]][0])])
    for row, text in enumerate(groups.texts):
        assert torch.equal(cond[row], comfy_concat[0 if text == LONG_PROMPT else 1]), (row, text)
        assert torch.equal(extra["pooled_output"][row], single[text][1][0])

    (sd3,) = run_node("UNETLoader", unet_name=tiny_sd3_file, weight_dtype="default")
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(P * G, 16, 8, 8, generator=generator)
    sigma = torch.full((P * G,), 0.6)
    with torch.inference_mode():
        tiny_models.init_weights_(sd3.model.diffusion_model, seed=3, std=SENSITIVE_STD)
        batched = sd3.model.apply_model(x, sigma, c_crossattn=cond, y=extra["pooled_output"])
        unbatched = torch.cat([sd3.model.apply_model(x[r:r + 1], sigma[r:r + 1], c_crossattn=single[t][0],
                                                     y=single[t][1]) for r, t in enumerate(groups.texts)])
        other = sd3.model.apply_model(x, sigma, c_crossattn=_stock(run_node, clip, SHORT_PROMPTS[1])[0].repeat(1, 2, 1),
                                      y=extra["pooled_output"])
    long_rows = [r for r, t in enumerate(groups.texts) if t == LONG_PROMPT]
    short_rows = [r for r, t in enumerate(groups.texts) if t != LONG_PROMPT]
    torch.testing.assert_close(batched[long_rows], unbatched[long_rows], rtol=1e-5, atol=1e-5)
    assert _max_diff(batched[short_rows], other[short_rows]) > 1e-3  # the text matters to this model
    # SD3's joint attention weighs the repeated text tokens twice against the image tokens, so the short prompt's
    # samples move (ComfyUI itself keeps SD3 conds CONDRegular and never batches unequal lengths).
    assert _max_diff(batched[short_rows], unbatched[short_rows]) > 1e-3


def test_repeated_tokens_leave_cross_attention_unchanged(run_node, clip):
    """Each sample of a mixed long/short batch gives the unbatched CLIPTextEncode output on a cross-attention UNet
    (a tiny SD1.5-style model reading the same 4096-wide conditioning)."""
    import comfy.supported_models

    positive, _, groups, _ = _source(run_node, clip, [LONG_PROMPT, SHORT_PROMPTS[1]], prompts_per_iteration=2,
                                     group_size=2, seed=1)
    cond = positive[0][0]
    unet = tiny_models.build_model_patcher(comfy.supported_models.SD15,
                                           {**tiny_models.sd15_unet_config(), "context_dim": cond.shape[2]})
    tiny_models.init_weights_(unet.model.diffusion_model, seed=2, std=SENSITIVE_STD)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(4, 4, 8, 8, generator=generator)
    sigma = torch.full((4,), 2.0)
    singles = {t: _stock(run_node, clip, t)[0] for t in set(groups.texts)}
    assert sorted(c.shape[1] for c in singles.values()) == [77, 154]
    with torch.inference_mode():
        batched = unet.model.apply_model(x, sigma, c_crossattn=cond)
        unbatched = torch.cat([unet.model.apply_model(x[r:r + 1], sigma[r:r + 1], c_crossattn=singles[t])
                               for r, t in enumerate(groups.texts)])
        swapped = unet.model.apply_model(x, sigma, c_crossattn=cond.flip(0))
    torch.testing.assert_close(batched, unbatched, rtol=1e-5, atol=1e-5)
    assert _max_diff(batched, swapped) > 1e-3  # the text matters to this model


# ----------------------------------------------------------------------------------------------- stock sampler
def test_batched_positive_works_in_a_stock_sampler(run_node, clip, sd3):
    """SamplerCustomAdvanced + BasicGuider on an EmptySD3LatentImage batch of B: each group's samples equal a stock
    run with that prompt's own CLIPTextEncode conditioning (same noise, same latent batch)."""
    P, G = 2, 2
    positive, _, groups, texts = _source(run_node, clip, SHORT_PROMPTS[:4], prompts_per_iteration=P, group_size=G,
                                         seed=7)
    (latent,) = run_node("EmptySD3LatentImage", width=64, height=64, batch_size=P * G)

    def sample(conditioning):
        (sampler,) = run_node("KSamplerSelect", sampler_name="euler")
        (guider,) = run_node("BasicGuider", model=sd3, conditioning=conditioning)
        (sigmas,) = run_node("BasicScheduler", model=sd3, scheduler="simple", steps=3, denoise=1.0)
        (noise,) = run_node("RandomNoise", noise_seed=5)
        out, _ = run_node("SamplerCustomAdvanced", noise=noise, guider=guider, sampler=sampler, sigmas=sigmas,
                          latent_image=latent)
        return out["samples"]

    batched = sample(positive)
    assert batched.shape == (P * G, 16, 8, 8) and torch.isfinite(batched).all()
    for g, text in enumerate(texts.splitlines()):
        (stock,) = run_node("CLIPTextEncode", clip=clip, text=text)
        reference = sample(stock)
        rows = slice(g * G, (g + 1) * G)
        assert groups.texts[rows] == (text,) * G
        torch.testing.assert_close(batched[rows], reference[rows], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------- prompt files
def test_txt_and_jsonl_files_in_the_input_folder(run_node, clip, input_dir):
    os.makedirs(os.path.join(input_dir, "flowgrpo_prompts"), exist_ok=True)
    txt = ["a wooden chair", "a glass of water", "a snowy forest"]
    with open(os.path.join(input_dir, "flowgrpo_prompts", "train.txt"), "w", encoding="utf-8") as f:
        f.write("# training prompts\n" + "\n\n".join(txt) + "\n")
    jsonl = ["un chat noir", "a steam locomotive"]
    with open(os.path.join(input_dir, "flowgrpo_train.jsonl"), "w", encoding="utf-8") as f:
        f.write("\n".join(json.dumps({"prompt": p, "id": i}, ensure_ascii=False) for i, p in enumerate(jsonl)))

    _, _, groups, texts = _source(run_node, clip, "ignored box prompt", prompt_file="flowgrpo_prompts/train.txt",
                                  prompts_per_iteration=3, group_size=2)
    assert sorted(texts.splitlines()) == sorted(txt) and set(groups.texts) == set(txt)
    _, _, groups, texts = _source(run_node, clip, "ignored box prompt", prompt_file="  flowgrpo_train.jsonl ",
                                  prompts_per_iteration=2, group_size=3)
    assert sorted(texts.splitlines()) == sorted(jsonl) and groups.batch_size == 6


def test_prompt_file_changes_change_the_fingerprint(comfy_nodes, input_dir):
    cls = comfy_nodes[NODE]
    path = os.path.join(input_dir, "flowgrpo_fingerprint.txt")
    with open(path, "w", encoding="utf-8") as f:
        f.write("first prompt\n")
    before = cls.fingerprint_inputs(prompt_file="flowgrpo_fingerprint.txt", iteration=0)
    assert before == cls.fingerprint_inputs(prompt_file="flowgrpo_fingerprint.txt", iteration=0)
    with open(path, "w", encoding="utf-8") as f:
        f.write("first prompt\nsecond prompt\n")
    assert cls.fingerprint_inputs(prompt_file="flowgrpo_fingerprint.txt", iteration=0) != before


def test_prompt_file_errors(run_node, clip, input_dir, tmp_path):
    outside = tmp_path / "secret.txt"
    outside.write_text("a prompt outside the input folder\n", encoding="utf-8")
    inside = os.path.join(input_dir, "flowgrpo_inside.txt")
    with open(inside, "w", encoding="utf-8") as f:
        f.write("a prompt\nanother prompt\n")
    link = os.path.join(input_dir, "flowgrpo_link.txt")
    if not os.path.lexists(link):
        os.symlink(outside, link)
    traversal = os.path.relpath(outside, input_dir)
    assert traversal.startswith("..")

    with pytest.raises(ValueError) as info:
        _source(run_node, clip, SHORT_PROMPTS, prompt_file=traversal)
    _node_error(info, "outside ComfyUI's input folder")
    with pytest.raises(ValueError) as info:
        _source(run_node, clip, SHORT_PROMPTS, prompt_file="flowgrpo_link.txt")
    _node_error(info, "outside ComfyUI's input folder")
    with pytest.raises(ValueError) as info:
        _source(run_node, clip, SHORT_PROMPTS, prompt_file=inside)
    _node_error(info, "absolute path", "relative to ComfyUI's input folder")
    with pytest.raises(ValueError) as info:
        _source(run_node, clip, SHORT_PROMPTS, prompt_file="flowgrpo_no_such_file.txt")
    _node_error(info, "flowgrpo_no_such_file.txt", "not found", "input folder")

    with open(os.path.join(input_dir, "flowgrpo_bad.jsonl"), "w", encoding="utf-8") as f:
        f.write('{"prompt": "ok"}\n{"prompt": "broken"\n')
    with pytest.raises(ValueError) as info:
        _source(run_node, clip, SHORT_PROMPTS, prompt_file="flowgrpo_bad.jsonl")
    _node_error(info, "flowgrpo_bad.jsonl line 2", "not valid JSON")
    with open(os.path.join(input_dir, "flowgrpo_prompts.csv"), "w", encoding="utf-8") as f:
        f.write("a,b\n")
    with pytest.raises(ValueError) as info:
        _source(run_node, clip, SHORT_PROMPTS, prompt_file="flowgrpo_prompts.csv")
    _node_error(info, ".txt and .jsonl")
    with open(os.path.join(input_dir, "flowgrpo_comments.txt"), "w", encoding="utf-8") as f:
        f.write("# nothing but a comment\n\n")
    with pytest.raises(ValueError) as info:
        _source(run_node, clip, SHORT_PROMPTS, prompt_file="flowgrpo_comments.txt")
    _node_error(info, "contains no prompts")


# ----------------------------------------------------------------------------------------------- setting errors
def test_setting_errors_name_the_node_and_the_fix(run_node, clip):
    with pytest.raises(ValueError) as info:
        _source(run_node, clip, SHORT_PROMPTS, group_size=1)
    _node_error(info, "group_size must be at least 2 for GRPO")
    with pytest.raises(ValueError) as info:
        _source(run_node, clip, SHORT_PROMPTS[:3], prompts_per_iteration=4)
    _node_error(info, "the prompt list has 3 prompts but prompts_per_iteration is 4", "at most 3")
    with pytest.raises(ValueError) as info:  # duplicates do not count as different prompts
        _source(run_node, clip, ["a cat", "a cat", "a dog"], prompts_per_iteration=3)
    _node_error(info, "has 2 prompts but prompts_per_iteration is 3")
    with pytest.raises(ValueError) as info:
        _source(run_node, clip, "# only a comment\n\n")
    _node_error(info, "prompts box is empty")
    with pytest.raises(ValueError) as info:
        _source(run_node, None, SHORT_PROMPTS)
    _node_error(info, "clip input is empty", "connect the CLIP")


# ----------------------------------------------------------------------------------------------- batch_conditionings
def test_batch_conditionings_rules(mods):
    batch = mods.prompts.batch_conditionings
    a = [[torch.randn(1, 3, 8), {"pooled_output": torch.randn(1, 5), "attention_mask": torch.tensor([[1, 1, 0]]),
                                 "guidance": 2.0, "note": None}]]
    b = [[torch.randn(1, 6, 8), {"pooled_output": torch.randn(1, 5), "attention_mask": torch.ones(1, 6),
                                 "guidance": 2.0, "note": None}]]
    (out,) = batch([a, b], 3)
    cond, extra = out
    assert cond.shape == (6, 6, 8)
    assert torch.equal(cond[0], a[0][0][0].repeat(2, 1)) and torch.equal(cond[2], a[0][0][0].repeat(2, 1))
    assert torch.equal(cond[3], b[0][0][0]) and torch.equal(cond[5], b[0][0][0])
    assert torch.equal(extra["pooled_output"], torch.cat([a[0][1]["pooled_output"].expand(3, -1),
                                                          b[0][1]["pooled_output"].expand(3, -1)]))
    assert extra["attention_mask"].tolist()[:3] == [[1, 1, 0, 1, 1, 0]] * 3
    assert extra["guidance"] == 2.0 and extra["note"] is None
    assert a[0][0].shape == (1, 3, 8) and set(a[0][1]) == set(extra)  # inputs untouched

    errors = mods.prompts.PromptError
    with pytest.raises(errors, match="'guidance'"):
        batch([a, [[b[0][0], {**b[0][1], "guidance": 4.0}]]], 2)
    with pytest.raises(errors, match="only some .*'note'"):
        batch([a, [[b[0][0], {k: v for k, v in b[0][1].items() if k != "note"}]]], 2)
    with pytest.raises(errors, match="2 entries"):
        batch([a + b], 2)
    with pytest.raises(errors, match="least common multiple"):
        batch([[[torch.randn(1, 37, 8), {}]], [[torch.randn(1, 41, 8), {}]]], 2)
    with pytest.raises(errors, match="'control_mask'"):
        batch([[[torch.randn(1, 3, 8), {"control_mask": torch.ones(1, 3)}]],
               [[torch.randn(1, 6, 8), {"control_mask": torch.ones(1, 6)}]]], 1)


def test_encoding_cache_encodes_each_text_once_per_run_and_drops_the_least_recent(clip, mods):
    """The all-in-one loop keeps an EncodingCache per run: a prompt drawn again in a later iteration is not encoded
    again, its encoding is the one CLIPTextEncode gives, and the cache stays within its byte budget."""
    P = mods.prompts
    calls = []
    original = clip.encode_from_tokens_scheduled
    clip.encode_from_tokens_scheduled = lambda tokens, **kw: (calls.append(1), original(tokens, **kw))[1]
    try:
        cache = P.EncodingCache()
        batches = [P.encode_prompt_batch(clip, SHORT_PROMPTS[:4], "", 2, 2, it, 0, 3.5, cache=cache)
                   for it in range(6)]
        assert len(calls) == len({t for _, _, g in batches for t in g.texts}) + 1  # + the negative prompt
        fresh = P.encode_prompt_batch(clip, SHORT_PROMPTS[:4], "", 2, 2, 5, 0, 3.5)
        assert torch.equal(batches[5][0][0][0], fresh[0][0][0]) and torch.equal(batches[5][1][0][0], fresh[1][0][0])

        one = cache.entries[""][1]  # bytes of one encoding (all have the same shapes here)
        small = P.EncodingCache(max_bytes=2 * one)
        calls.clear()
        for text in ("a", "b", "a", "c", "b"):  # "a" used again before "c" arrives: "b" is then the oldest
            small.get(clip, text)
        assert list(small.entries) == ["c", "b"] and len(calls) == 4
    finally:
        clip.encode_from_tokens_scheduled = original
