"""flowgrpo_core.checkpoint: atomic writes, exact optimizer round trip, training-state files, PEFT export."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import errno

import pytest
import safetensors
import safetensors.torch
import torch

from flowgrpo_core import checkpoint as ck


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ----------------------------------------------------------------------------------------------- atomic writes
def test_atomic_save_writes_cpu_contiguous_copies_and_metadata(tmp_path):
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    view = base.t()  # non-contiguous, shares memory with base
    param = torch.nn.Parameter(torch.ones(2))
    path = ck.atomic_save_safetensors({"a": base, "b": view, "p": param}, tmp_path / "x.safetensors",
                                      metadata={"k": "v"})
    assert _files(tmp_path) == ["x.safetensors"]
    loaded = safetensors.torch.load_file(str(path))
    assert torch.equal(loaded["a"], base) and torch.equal(loaded["b"], view) and torch.equal(loaded["p"], param)
    assert ck.read_safetensors_metadata(path) == {"k": "v"}
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask, "permissions of a normally created file"


def test_failed_write_keeps_the_old_file_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    ck.atomic_save_safetensors({"w": torch.full((4,), 7.0)}, path, {"version": "old"})
    before = path.read_bytes()
    # complex128 is a real torch dtype that safetensors cannot store: the write fails inside safetensors
    with pytest.raises(Exception):
        ck.atomic_save_safetensors({"w": torch.zeros(4), "bad": torch.zeros(2, dtype=torch.complex128)}, path,
                                   {"version": "new"})
    assert path.read_bytes() == before
    assert _files(tmp_path) == ["ckpt.safetensors"], "the temporary file must be removed"
    # a metadata value that is not a string fails too (inside safetensors), same guarantees
    with pytest.raises(TypeError):
        ck.atomic_save_safetensors({"w": torch.zeros(4)}, path, {"version": 2})
    assert path.read_bytes() == before and _files(tmp_path) == ["ckpt.safetensors"]
    # a first write that fails leaves nothing at all
    with pytest.raises(Exception):
        ck.atomic_save_safetensors({"bad": torch.zeros(1, dtype=torch.complex128)}, tmp_path / "new.safetensors")
    assert _files(tmp_path) == ["ckpt.safetensors"]


# ----------------------------------------------------------------------------------------------- optimizer
def _trained_adamw(seed: int = 0, steps: int = 3, **kw):
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(5, 3, generator=g)), torch.nn.Parameter(torch.randn(3, generator=g))]
    opt = torch.optim.AdamW(params, lr=1e-2, betas=(0.9, 0.99), weight_decay=1e-4, eps=1e-8, **kw)
    for i in range(steps):
        _step(opt, params, i)
    return params, opt


def _step(opt, params, i):
    opt.zero_grad()
    loss = sum(((p - 0.1 * i) ** 3).sum() for p in params)
    loss.backward()
    opt.step()


@pytest.mark.parametrize("amsgrad", [False, True])
def test_optimizer_round_trip_is_exact(amsgrad):
    params, opt = _trained_adamw(amsgrad=amsgrad)
    tensors, meta = ck.optimizer_state_tensors(opt.state_dict())
    assert all(isinstance(t, torch.Tensor) for t in tensors.values())
    json.loads(meta)  # plain JSON
    blob = safetensors.torch.save({k: v.contiguous() for k, v in tensors.items()})
    restored = ck.optimizer_state_from_tensors(safetensors.torch.load(blob), meta)

    fresh = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt2 = torch.optim.AdamW(fresh, lr=0.5)  # other hyper-parameters: load_state_dict must restore them
    opt2.load_state_dict(restored)
    assert opt2.param_groups[0]["betas"] == (0.9, 0.99) and isinstance(opt2.param_groups[0]["betas"], tuple)
    assert opt2.param_groups[0]["lr"] == 1e-2
    _step(opt, params, 3)
    _step(opt2, fresh, 3)
    for a, b in zip(params, fresh):
        assert torch.equal(a, b), "the next step after a round trip must be bitwise identical"
    for i in range(2):
        for name, value in opt.state[params[i]].items():
            assert torch.equal(value, opt2.state[fresh[i]][name]), name


def test_optimizer_step_as_number_and_odd_keys_round_trip():
    state = {"state": {0: {"step": 3, "momentum_buffer": torch.ones(2), "flag": None}, 7: {"step": 2.5}},
             "param_groups": [{"params": [0, 7], "lr": float("inf"), "betas": (0.9, 0.999), "nested": {"__x": 1},
                               "name": "g"}]}
    tensors, meta = ck.optimizer_state_tensors(state)
    back = ck.optimizer_state_from_tensors(tensors, meta)
    assert set(back["state"]) == {0, 7}
    assert back["state"][0]["step"] == 3 and isinstance(back["state"][0]["step"], int)
    assert back["state"][7]["step"] == 2.5 and back["state"][0]["flag"] is None
    assert torch.equal(back["state"][0]["momentum_buffer"], torch.ones(2))
    group = back["param_groups"][0]
    assert group["params"] == [0, 7] and math.isinf(group["lr"]) and group["betas"] == (0.9, 0.999)
    assert group["nested"] == {"__x": 1} and group["name"] == "g"
    with pytest.raises(TypeError, match="not a tensor or plain JSON"):
        ck.optimizer_state_tensors({"state": {0: {"bad": object()}}, "param_groups": []})
    with pytest.raises(ck.CheckpointError, match="state_dict"):
        ck.optimizer_state_from_tensors({}, json.dumps({"state": {}}))


# ----------------------------------------------------------------------------------------------- training state
def test_training_state_round_trip(tmp_path):
    params, opt = _trained_adamw(seed=1)
    history = [{"reward_mean": 0.5, "loss": -0.1}, {"reward_mean": 0.75, "loss": float("nan")}]
    settings = {"rank": 4, "alpha": 4.0, "targets": "attention", "family": "flux"}
    extra = {"run_name": "r", "keys": ["a", "b"], "rng": torch.arange(5, dtype=torch.uint8), "pair": (1, "x")}
    path = ck.save_training_state(tmp_path / "s.flowgrpo-state", opt, iteration=2, history=history,
                                  settings=settings, extra=extra)
    meta = ck.read_safetensors_metadata(path)
    assert meta["format"] == ck.STATE_FORMAT and meta["format_version"] == str(ck.STATE_FORMAT_VERSION)
    with torch.inference_mode():  # as in a ComfyUI node: what comes back must still be trainable state
        loaded = ck.load_training_state(path)
    assert loaded.iteration == 2 and loaded.settings == settings
    assert loaded.history[0] == history[0] and math.isnan(loaded.history[1]["loss"])
    assert loaded.extra["keys"] == ["a", "b"] and loaded.extra["pair"] == (1, "x")
    assert torch.equal(loaded.extra["rng"], extra["rng"]) and loaded.extra["rng"].dtype == torch.uint8
    assert not any(t.is_inference() for s in loaded.optimizer_state["state"].values() for t in s.values())
    fresh = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt2 = torch.optim.AdamW(fresh)
    opt2.load_state_dict(loaded.optimizer_state)
    _step(opt, params, 5)
    _step(opt2, fresh, 5)
    assert all(torch.equal(a, b) for a, b in zip(params, fresh))


def test_training_state_bad_files_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint file"):
        ck.load_training_state(tmp_path / "missing.flowgrpo-state")
    junk = tmp_path / "junk.flowgrpo-state"
    junk.write_bytes(b"this is not safetensors")
    with pytest.raises(ck.CheckpointError, match="not a readable safetensors"):
        ck.load_training_state(junk)
    lora = tmp_path / "plain.safetensors"
    safetensors.torch.save_file({"a": torch.zeros(1)}, str(lora), metadata={"format": "pt"})
    with pytest.raises(ck.CheckpointError, match="not a FlowGRPO training state"):
        ck.load_training_state(lora)
    _, opt = _trained_adamw()
    tensors, metadata = ck.training_state_payload(opt, iteration=1, history=[], settings={})
    future = tmp_path / "future.flowgrpo-state"
    ck.atomic_save_safetensors(tensors, future, dict(metadata, format_version="99"))
    with pytest.raises(ck.CheckpointError, match="format version 99"):
        ck.load_training_state(future)
    damaged = tmp_path / "damaged.flowgrpo-state"
    ck.atomic_save_safetensors({}, damaged, dict(metadata))  # metadata refers to tensors that are not there
    with pytest.raises(ck.CheckpointError, match="do not match the checksum"):
        ck.load_training_state(damaged)
    unchecked = {k: v for k, v in metadata.items() if k != "tensors_sha256"}  # a file from before the checksum
    ck.atomic_save_safetensors({}, damaged, unchecked)
    with pytest.raises(ck.CheckpointError, match="does not contain"):
        ck.load_training_state(damaged)
    with pytest.raises(TypeError, match="extra.obj"):
        ck.save_training_state(tmp_path / "x.flowgrpo-state", opt, iteration=0, history=[], settings={},
                               extra={"obj": object()})
    assert not (tmp_path / "x.flowgrpo-state").exists()


# ----------------------------------------------------------------------------------------------- PEFT export
def test_peft_from_comfy_splits_fused_rows_exactly():
    g = torch.Generator().manual_seed(0)
    r, d = 3, 4
    up_qkv, down_qkv = torch.randn(3 * d, r, generator=g), torch.randn(r, d, generator=g)
    up_o, down_o = torch.randn(d, r, generator=g), torch.randn(r, d, generator=g)
    lora = {"diffusion_model.b.qkv.lora_up.weight": up_qkv, "diffusion_model.b.qkv.lora_down.weight": down_qkv,
            "diffusion_model.b.qkv.alpha": torch.tensor(2.0),
            "diffusion_model.b.proj.lora_up.weight": up_o, "diffusion_model.b.proj.lora_down.weight": down_o}
    key_map = {"diffusion_model.b.qkv": [("b.to_v", (2 * d, d)), ("b.to_q", (0, d)), ("b.to_k", (d, d))],
               "diffusion_model.b.proj": [("b.to_out.0", None)]}
    out = ck.peft_from_comfy(lora, key_map, prefix="transformer.")
    assert set(out) == {f"transformer.b.{m}.lora_{x}.weight" for m in ("to_q", "to_k", "to_v", "to_out.0")
                        for x in "AB"} | {f"transformer.b.{m}.alpha" for m in ("to_q", "to_k", "to_v")}
    fused = up_qkv @ down_qkv
    for i, m in enumerate(("to_q", "to_k", "to_v")):
        b, a = out[f"transformer.b.{m}.lora_B.weight"], out[f"transformer.b.{m}.lora_A.weight"]
        torch.testing.assert_close(b @ a, fused[i * d:(i + 1) * d], rtol=0, atol=0)
        assert float(out[f"transformer.b.{m}.alpha"]) == 2.0
    b_o, a_o = out["transformer.b.to_out.0.lora_B.weight"], out["transformer.b.to_out.0.lora_A.weight"]
    torch.testing.assert_close(b_o @ a_o, up_o @ down_o, rtol=0, atol=0)
    # every tensor is its own memory (safetensors refuses shared tensors)
    assert len({t.data_ptr() for t in out.values()}) == len(out)
    safetensors.torch.save(out)


def test_peft_fold_scale_gives_the_same_update_at_scale_one():
    g = torch.Generator().manual_seed(1)
    r, alpha = 4, 2.0
    up, down = torch.randn(6, r, generator=g), torch.randn(r, 5, generator=g)
    lora = {"diffusion_model.m.lora_up.weight": up, "diffusion_model.m.lora_down.weight": down,
            "diffusion_model.m.alpha": torch.tensor(alpha)}
    key_map = {"diffusion_model.m": [("m.to_q", (0, 2)), ("m.to_k", (2, 4))]}
    plain = ck.peft_from_comfy(lora, key_map, prefix="")
    folded = ck.peft_from_comfy(lora, key_map, prefix="", fold_scale=True)
    assert set(folded) == set(plain)
    for name, rows in (("m.to_q", slice(0, 2)), ("m.to_k", slice(2, 6))):
        assert float(plain[f"{name}.alpha"]) == alpha and float(folded[f"{name}.alpha"]) == r
        scale = float(folded[f"{name}.alpha"]) / r
        update = folded[f"{name}.lora_B.weight"] @ folded[f"{name}.lora_A.weight"] * scale
        torch.testing.assert_close(update, (alpha / r) * (up @ down)[rows], rtol=1e-6, atol=1e-6)
        assert not torch.allclose(folded[f"{name}.lora_B.weight"], plain[f"{name}.lora_B.weight"])
    assert torch.equal(lora["diffusion_model.m.lora_up.weight"], up), "the input is not modified"


def test_peft_from_comfy_refuses_inexact_exports():
    lora = {"diffusion_model.m.lora_up.weight": torch.ones(6, 2),
            "diffusion_model.m.lora_down.weight": torch.ones(2, 3)}
    with pytest.raises(ValueError, match="no diffusers name"):
        ck.peft_from_comfy(lora, {})
    with pytest.raises(ValueError, match="cover 4 of its 6 rows"):
        ck.peft_from_comfy(lora, {"diffusion_model.m": [("a", (0, 2)), ("b", (2, 2))]})
    with pytest.raises(ValueError, match="gap or overlap"):
        ck.peft_from_comfy(lora, {"diffusion_model.m": [("a", (0, 3)), ("b", (2, 4))]})
    with pytest.raises(ValueError, match="not a LoRA key"):
        ck.peft_from_comfy({**lora, "diffusion_model.m.diff_b": torch.ones(6)}, {"diffusion_model.m": [("a", None)]})
    with pytest.raises(ValueError, match="needs both"):
        ck.peft_from_comfy({"diffusion_model.m.lora_up.weight": torch.ones(6, 2)}, {"diffusion_model.m": [("a", None)]})


# ----------------------------------------------------------------------------------------------- damage and groups
def _saved_state(tmp_path):
    _, opt = _trained_adamw()
    path = ck.save_training_state(tmp_path / "run_00003.flowgrpo-state", opt, iteration=3, history=[{"r": 1.0}],
                                  settings={"rank": 2})
    return path, path.read_bytes()


def _data_start(data: bytes) -> int:
    return 8 + int.from_bytes(data[:8], "little")  # safetensors: u64 header length, JSON header, tensor bytes


@pytest.mark.parametrize("damage", ["flipped_tensor_byte", "zeroed_tensor_block", "truncated", "broken_header"])
def test_a_damaged_training_state_is_refused(tmp_path, damage):
    """Damage of several kinds, including kinds that leave the header readable, is refused with a clear error."""
    path, data = _saved_state(tmp_path)
    assert ck.load_training_state(path).iteration == 3
    start = _data_start(data)
    body = bytearray(data)
    if damage == "flipped_tensor_byte":
        body[start + 5] ^= 0x40
    elif damage == "zeroed_tensor_block":
        body[start:start + 16] = bytes(16)
    elif damage == "truncated":
        body = body[: len(body) - 7]
    else:
        body[10:20] = b"#" * 10
    assert bytes(body) != data
    path.write_bytes(bytes(body))
    with pytest.raises(ck.CheckpointError, match="damaged|not a readable"):
        ck.load_training_state(path)


def test_a_group_write_that_fails_leaves_the_old_files_and_no_partial_file(tmp_path, full_folder):
    """A group of files written where the second does not fit: nothing is renamed, no temporary file stays, the
    files that were there keep their bytes; a group that fits is written whole."""
    old = {name: bytes([i]) * 100 for i, name in enumerate(("a.safetensors", "a.flowgrpo-state"), start=1)}
    for name, content in old.items():
        (full_folder.path / name).write_bytes(content)
    with pytest.raises(OSError) as failed:
        ck.atomic_write_files([(full_folder.path / "a.safetensors", b"new" * 10),
                               (full_folder.path / "a.flowgrpo-state", b"x" * full_folder.too_big)])
    assert failed.value.errno in (errno.ENOSPC, errno.EFBIG)
    assert {p.name: p.read_bytes() for p in full_folder.path.iterdir()} == old
    written = ck.atomic_write_files([(full_folder.path / "b.safetensors", b"b" * 10),
                                     (full_folder.path / "b.flowgrpo-state", b"s" * 10)])
    assert [p.read_bytes() for p in written] == [b"b" * 10, b"s" * 10]


def test_a_group_write_into_a_read_only_folder_fails_and_changes_nothing(read_only_folder):
    before = {p.name: p.read_bytes() for p in read_only_folder.iterdir()}
    with pytest.raises(OSError) as failed:
        ck.atomic_write_files([(read_only_folder / "keep.safetensors", b"new")])
    assert failed.value.errno in (errno.EROFS, errno.EACCES, errno.EPERM)
    assert {p.name: p.read_bytes() for p in read_only_folder.iterdir()} == before
