"""flowgrpo_core.profiling: wall seconds and peak memory per phase on CPU (Linux VmHWM), nesting and repeats."""

from __future__ import annotations

import pytest
import torch

from flowgrpo_core.profiling import PhaseTimer

BIG_MB = 200


def _touch_big_tensor() -> float:
    big = torch.ones(BIG_MB * 2 ** 20 // 4, dtype=torch.float32)  # every page written: resident, not just reserved
    return float(big[-1])


def test_cpu_phases_record_seconds_and_a_peak_that_sees_a_big_allocation():
    timer = PhaseTimer("cpu")
    with timer.phase("idle"):
        sum(range(1000))
    with timer.phase("alloc"):
        _touch_big_tensor()
    m = timer.metrics()
    assert set(m) == {"time_idle_s", "peak_mem_idle_mb", "time_alloc_s", "peak_mem_alloc_mb", "time_total_s"}
    assert m["time_idle_s"] > 0 and m["time_alloc_s"] > 0
    assert m["time_total_s"] == pytest.approx(m["time_idle_s"] + m["time_alloc_s"])
    assert m["peak_mem_idle_mb"] is not None and m["peak_mem_alloc_mb"] is not None
    assert m["peak_mem_alloc_mb"] - m["peak_mem_idle_mb"] > 0.8 * BIG_MB
    # the tensor is freed: a later phase's peak starts again from the current RSS
    with timer.phase("after"):
        pass
    assert timer.metrics()["peak_mem_after_mb"] < m["peak_mem_alloc_mb"] - 0.5 * BIG_MB


def test_nested_and_repeated_phases():
    timer = PhaseTimer(None)
    with timer.phase("iteration"):
        with timer.phase("rollout"):
            _touch_big_tensor()
        with timer.phase("update"):
            pass
    with timer.phase("update"):
        pass
    m = timer.metrics()
    # the outer phase saw the inner one's peak although the inner phase reset the counter afterwards
    assert m["peak_mem_iteration_mb"] >= m["peak_mem_rollout_mb"]
    assert m["peak_mem_rollout_mb"] - m["peak_mem_update_mb"] > 0.5 * BIG_MB
    assert m["time_iteration_s"] >= m["time_rollout_s"]
    assert m["time_iteration_s"] < m["time_total_s"] < m["time_iteration_s"] + m["time_update_s"], \
        "the total counts outermost phases only: the update inside the iteration is not counted twice"
    timer.reset()
    assert timer.metrics() == {"time_total_s": 0.0}


def test_a_phase_that_raises_is_still_recorded():
    timer = PhaseTimer("cpu")
    with pytest.raises(KeyError):
        with timer.phase("reward"):
            raise KeyError("x")
    assert timer.metrics()["time_reward_s"] > 0


def test_a_device_without_memory_counters_gives_none_and_still_times():
    timer = PhaseTimer("meta")
    with timer.phase("rollout"):
        pass
    m = timer.metrics()
    assert m["peak_mem_rollout_mb"] is None and m["time_rollout_s"] > 0
