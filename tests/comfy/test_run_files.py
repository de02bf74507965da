"""Nothing lost, nothing mixed (issue 16): run names, damaged checkpoints and failed saves, through the real nodes.

Checkpoints go to the session's ``models/loras``; every test uses its own run names. The failed saves write into a
sub-folder of the loras folder that is really full or really read-only (tests/support/faulty_folders.py).
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch

import faulty_folders
from test_lora_nodes import _init, _randomize_, _run_name, loras, mods  # noqa: F401  (loras, mods: fixtures)

pytestmark = pytest.mark.comfy


def _sd3(run_node, tiny_sd3_file):
    return run_node("UNETLoader", unet_name=tiny_sd3_file, weight_dtype="default")[0]


def _save(run_node, trainer, prefix=""):
    return Path(run_node("FlowGRPOSaveLoRA", trainer=trainer, filename_prefix=prefix, export="comfyui")[0])


def _at(trainer, iteration):
    return dataclasses.replace(trainer, iteration=iteration)


def _bytes(paths):
    return {p.name: p.read_bytes() for p in paths}


def test_a_second_run_on_a_taken_name_gets_its_own_name_and_keeps_the_first(mods, run_node, tiny_sd3_file, loras):
    model = _sd3(run_node, tiny_sd3_file)
    name = _run_name("taken")
    first, _ = _init(run_node, model, name)
    assert first.run_name == name
    first_files = [_save(run_node, _at(first, 1)), _save(run_node, _at(first, 2))]
    first_files += [mods.io.state_path_for(p) for p in first_files]
    before = _bytes(first_files)

    second, _ = _init(run_node, model, name)  # resume "none": a new run
    assert second.run_name == f"{name}-2"
    _randomize_(second)
    written = _save(run_node, _at(second, 2))
    assert written.name == f"{name}-2_00002.safetensors"
    assert _bytes(first_files) == before, "the first run's checkpoints must not change"
    third, _ = _init(run_node, model, name)
    assert third.run_name == f"{name}-3"
    # 'latest' continues a run by its own name, and never another run's files
    resumed, _ = _init(run_node, model, name, resume="latest")
    assert resumed.run_name == name and resumed.iteration == 2
    resumed2, _ = _init(run_node, model, f"{name}-2", resume="latest")
    assert resumed2.run_name == f"{name}-2" and resumed2.iteration == 2


def test_latest_is_the_highest_iteration_not_the_newest_file(mods, run_node, tiny_sd3_file, loras):
    model = _sd3(run_node, tiny_sd3_file)
    name = _run_name("latest")
    trainer, _ = _init(run_node, model, name)
    _save(run_node, _at(trainer, 7))
    _save(run_node, _at(trainer, 3))  # written after, so newer on disk
    assert mods.io.find_latest_checkpoint(name).name == f"{name}_00007.safetensors"
    resumed, _ = _init(run_node, model, name, resume="latest")
    assert resumed.iteration == 7


def _damage(path: Path, kind: str) -> None:
    data = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")  # safetensors: u64 header length, JSON header, tensor bytes
    if kind == "flipped_byte":
        data[start + 3] ^= 0x10
    elif kind == "truncated":
        data = data[: len(data) - 9]
    elif kind == "zeroed":
        data[start:] = bytes(len(data) - start)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("target,kind", [("state", "flipped_byte"), ("state", "truncated"), ("lora", "flipped_byte"),
                                         ("lora", "truncated"), ("lora", "zeroed"), ("lora", "swapped")])
def test_a_damaged_checkpoint_is_refused_and_names_the_newest_intact_one(target, kind, mods, run_node,
                                                                         tiny_sd3_file, loras):
    model = _sd3(run_node, tiny_sd3_file)
    name = _run_name("damaged")
    trainer, _ = _init(run_node, model, name)
    _randomize_(trainer)
    good = _save(run_node, _at(trainer, 1))
    with torch.inference_mode(False), torch.no_grad():
        for p in trainer.lora_params.values():
            p.mul_(1.5)  # other values in the newer checkpoint
    bad = _save(run_node, _at(trainer, 2))
    victim = mods.io.state_path_for(bad) if target == "state" else bad
    if kind == "swapped":  # a whole, readable LoRA file, but not the one this state was saved with
        shutil.copyfile(good, bad)
    else:
        _damage(victim, kind)
    NodeInputError = mods.state.NodeInputError
    with pytest.raises(NodeInputError, match=rf"cannot resume from {bad.name}: .*damaged.*set resume to "
                                             rf"'{good.name}', the newest intact checkpoint"):
        _init(run_node, model, name, resume="latest")
    with pytest.raises(NodeInputError, match="damaged"):
        _init(run_node, model, name, resume=bad.name)
    resumed, _ = _init(run_node, model, name, resume=good.name)  # the fallback, because the user asks for it
    assert resumed.iteration == 1 and resumed.run_name == name


@pytest.mark.parametrize("fault", ["full", "read_only"])
def test_a_failed_save_is_a_clear_node_error_keeps_the_previous_checkpoint_and_leaves_no_orphan(
        fault, mods, run_node, tiny_sd3_file, loras):
    model = _sd3(run_node, tiny_sd3_file)
    name = _run_name(fault)
    trainer, _ = _init(run_node, model, name)
    _randomize_(trainer)
    sub = loras / f"fault_{name}"
    if fault == "full":
        folder_cm = faulty_folders.full_folder(sub)
    else:  # the previous checkpoint is written first, then the folder turns read-only
        scratch = loras / f"scratch_{name}"
        previous = _save(run_node, _at(trainer, 1), prefix=f"scratch_{name}/{name}")
        trainer_files = {p.name: p.read_bytes() for p in (previous, mods.io.state_path_for(previous))}
        shutil.rmtree(scratch)
        folder_cm = faulty_folders.read_only_folder(sub, trainer_files)
    with folder_cm as folder:
        folder = getattr(folder, "path", folder)
        if fault == "full":
            previous = _save(run_node, _at(trainer, 1), prefix=f"{sub.name}/{name}")
            big = {f"big_{i}": torch.zeros(faulty_folders.FULL_TOO_BIG // 4) for i in range(1)}
            trainer = dataclasses.replace(trainer, extra={**trainer.extra, "ballast": big})  # the state won't fit
        before = _bytes(sorted(folder.iterdir()))
        assert set(before) == {f"{name}_00001.safetensors", f"{name}_00001.flowgrpo-state"}
        with pytest.raises(mods.state.NodeInputError) as failed:
            _save(run_node, _at(trainer, 2), prefix=f"{sub.name}/{name}")
        message = str(failed.value)
        assert message.startswith("FlowGRPO Save LoRA: could not write checkpoint ")
        assert f"into {folder} (" in message, message
        assert f"checkpoint ({sub.name}/{name}_00001.safetensors) is kept" in message, message
        assert {"full": "free space", "read_only": "make the folder writable"}[fault] in message
        assert _bytes(sorted(folder.iterdir())) == before, "the previous checkpoint stays byte for byte, no orphan"
    # the trainer is unchanged by the failed save: the same save succeeds where the disk allows it
    retried = _save(run_node, _at(trainer, 2), prefix=f"retry_{name}")
    assert mods.io.state_path_for(retried).is_file()
