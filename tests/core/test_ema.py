"""flowgrpo_core.ema: Flow-GRPO's EMA schedule, exact state round trip through a training-state file, a swap that
always restores the live weights."""

from __future__ import annotations

import pytest
import torch

from flowgrpo_core import checkpoint as ck
from flowgrpo_core.ema import LoraEMA


def _lora(seed: int = 0, dtype=torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"blocks.0.attn.lora_up.weight": torch.randn(6, 2, generator=g).to(dtype).requires_grad_(),
            "blocks.0.attn.lora_down.weight": torch.randn(2, 5, generator=g).to(dtype).requires_grad_()}


def _train_step(params: dict[str, torch.Tensor], g: torch.Generator) -> None:
    with torch.no_grad():
        for p in params.values():
            p.add_(0.1 * torch.randn(p.shape, generator=g).to(p.dtype))


@pytest.mark.parametrize("warmup", [True, False])
def test_step_follows_the_documented_formula(warmup):
    params = _lora()
    decay, every = 0.9, 3
    ema = LoraEMA(params, decay=decay, update_every=every, warmup=warmup)
    reference = {k: v.detach().double().clone() for k, v in params.items()}  # an independent float64 hand loop
    g = torch.Generator().manual_seed(1)
    updated = []
    for n in range(11):
        _train_step(params, g)
        if ema.step(params, n):
            updated.append(n)
        if (n + 1) % every == 0:
            d = min(decay, (1 + n) / (10 + n)) if warmup else decay
            for k, p in params.items():
                reference[k] += (1 - d) * (p.detach().double() - reference[k])
        for k in params:
            assert ema.shadow[k].dtype == torch.float32
            torch.testing.assert_close(ema.shadow[k].double(), reference[k], rtol=1e-6, atol=1e-6)
    assert updated == [2, 5, 8] and ema.num_updates == 3
    # the shadow lags the live weights: it is neither the start nor the end point
    for k, p in params.items():
        assert not torch.allclose(ema.shadow[k], p.detach(), atol=1e-4)


def test_warmup_and_plain_decay_differ_and_match_flow_grpo_early_decay():
    ema = LoraEMA(_lora(), decay=0.9, update_every=1, warmup=True)
    assert [ema.decay_at(n) for n in (0, 1, 8)] == [pytest.approx(0.1), pytest.approx(2 / 11), pytest.approx(0.5)]
    assert ema.decay_at(1000) == 0.9
    assert LoraEMA(_lora(), decay=0.9, warmup=False).decay_at(0) == 0.9


def test_shadow_is_fp32_for_low_precision_params_and_updates_in_fp32():
    params = _lora(dtype=torch.bfloat16)
    ema = LoraEMA(params, decay=0.99, update_every=1, warmup=False)
    start = {k: v.detach().float().clone() for k, v in params.items()}
    with torch.no_grad():
        for p in params.values():
            p.add_(1.0)
    ema.step(params, 0)
    for k, p in params.items():
        expected = start[k] + 0.01 * (p.detach().float() - start[k])
        assert ema.shadow[k].dtype == torch.float32
        torch.testing.assert_close(ema.shadow[k], expected, rtol=1e-6, atol=1e-6)
        # an fp32 shadow keeps a step that bf16 would round away on part of the entries
        assert not torch.equal(ema.shadow[k], ema.shadow[k].bfloat16().float())


def test_state_dict_round_trips_bitwise_through_a_training_state_file(tmp_path):
    params = _lora()
    ema = LoraEMA(params, decay=0.95, update_every=2, warmup=True)
    g = torch.Generator().manual_seed(3)
    for n in range(5):
        _train_step(params, g)
        ema.step(params, n)
    opt = torch.optim.AdamW(list(params.values()), lr=1e-3)
    path = ck.save_training_state(tmp_path / "state.safetensors", opt, iteration=5, history=[], settings={},
                                  extra={"ema": ema.state_dict()})
    loaded = ck.load_training_state(path).extra["ema"]
    restored = LoraEMA.from_state_dict(loaded)
    assert (restored.decay, restored.update_every, restored.warmup, restored.num_updates) == (0.95, 2, True, 2)
    for k, s in ema.shadow.items():
        assert torch.equal(restored.shadow[k], s) and restored.shadow[k].dtype == torch.float32

    # load into an EMA of the same LoRA started elsewhere: afterwards both evolve identically
    other = LoraEMA(_lora(seed=9), decay=0.5, update_every=7, warmup=False)
    other.load_state_dict(loaded)
    for n in range(5, 9):
        _train_step(params, g)
        assert ema.step(params, n) == other.step(params, n)
    for k, s in ema.shadow.items():
        assert torch.equal(other.shadow[k], s)


def test_load_rejects_another_lora_with_a_clear_message():
    ema = LoraEMA(_lora(), decay=0.9)
    wrong_shape = LoraEMA({k: torch.zeros(v.shape[0], 3) for k, v in _lora().items()}, decay=0.9)
    with pytest.raises(ValueError, match="another LoRA"):
        ema.load_state_dict(wrong_shape.state_dict())
    wrong_names = LoraEMA({"x.lora_up.weight": torch.zeros(6, 2)}, decay=0.9)
    with pytest.raises(ValueError, match="names differ"):
        ema.load_state_dict(wrong_names.state_dict())
    with pytest.raises(ValueError, match="no 'num_updates'"):
        ema.load_state_dict({k: v for k, v in ema.state_dict().items() if k != "num_updates"})


@pytest.mark.parametrize("decay, every", [(1.0, 1), (-0.1, 1), (0.9, 0)])
def test_invalid_settings_are_refused(decay, every):
    with pytest.raises(ValueError, match="decay|update_every"):
        LoraEMA(_lora(), decay=decay, update_every=every)


def test_swapped_in_uses_the_shadow_and_restores_exact_live_values_even_on_error():
    params = _lora(dtype=torch.bfloat16)
    ema = LoraEMA(params, decay=0.9, update_every=1, warmup=False)
    _train_step(params, torch.Generator().manual_seed(5))
    ema.step(params, 0)
    live = {k: v.detach().clone() for k, v in params.items()}
    ids = {k: v.data_ptr() for k, v in params.items()}
    with pytest.raises(RuntimeError, match="boom"):
        with ema.swapped_in(params):
            for k, p in params.items():
                assert p.dtype == torch.bfloat16 and p.data_ptr() == ids[k]  # in place
                assert torch.equal(p, ema.shadow[k].bfloat16())
                assert not torch.equal(p, live[k])
            raise RuntimeError("boom")
    for k, p in params.items():
        assert torch.equal(p, live[k]) and p.requires_grad


def test_copy_is_a_detached_cpu_fp32_snapshot():
    params = _lora()
    initial = {k: v.detach().clone() for k, v in params.items()}
    ema = LoraEMA(params, decay=0.9, update_every=1, warmup=False)
    snapshot = ema.copy()
    _train_step(params, torch.Generator().manual_seed(2))
    ema.step(params, 0)
    for k, v in snapshot.items():
        assert v.device.type == "cpu" and v.dtype == torch.float32
        assert torch.equal(v, initial[k]) and not torch.equal(v, ema.shadow[k])
