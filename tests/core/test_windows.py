"""Tests of flowgrpo_core.windows: which steps are SDE and which are trained."""

import math

import pytest
import torch

from flowgrpo_core.windows import StepPlan, StepSelection, select_steps


def _plan(num_steps=10, seed=0, iteration=0, **kwargs):
    return select_steps(StepSelection(**kwargs), num_steps, seed, iteration)


# --------------------------------------------------------------------------------------------------------------
# fraction


def test_fraction_099_trains_all_but_last():
    plan = _plan(10, mode="fraction", fraction=0.99)
    assert plan.train_steps == list(range(9))
    assert plan.sde_steps == list(range(9))
    assert plan.num_steps == 10


def test_fraction_counts():
    assert _plan(10, mode="fraction", fraction=0.5).train_steps == [0, 1, 2, 3, 4]
    assert _plan(10, mode="fraction", fraction=1.0).train_steps == list(range(9))  # capped at N - 1
    assert _plan(10, mode="fraction", fraction=0.5).sde_steps == list(range(9))  # SDE everywhere but the last
    # 100 * 0.29 is 28.999999999999996 in floating point; the intended count is 29
    assert len(_plan(100, mode="fraction", fraction=0.29).train_steps) == 29


# --------------------------------------------------------------------------------------------------------------
# fixed_window


def test_fixed_window():
    plan = _plan(10, mode="fixed_window", window_start=2, window_size=3)
    assert plan.train_steps == plan.sde_steps == [2, 3, 4]
    assert _plan(10, mode="fixed_window", window_start=6, window_size=3).train_steps == [6, 7, 8]
    with pytest.raises(ValueError, match="deterministic"):
        _plan(10, mode="fixed_window", window_start=7, window_size=3)


# --------------------------------------------------------------------------------------------------------------
# random_window


def test_random_window_moves_within_one_process():
    sel = StepSelection(mode="random_window", window_size=3, window_range=(0, 5))
    starts = [select_steps(sel, 10, 1234, it).train_steps[0] for it in range(20)]
    assert len(set(starts)) >= 2
    assert set(starts) <= {0, 1, 2}
    for it in range(20):
        plan = select_steps(sel, 10, 1234, it)
        k = plan.train_steps[0]
        assert plan.train_steps == plan.sde_steps == [k, k + 1, k + 2]
    many = {select_steps(sel, 10, 7, it).train_steps[0] for it in range(200)}
    assert many == {0, 1, 2}


def test_random_window_full_range_forced_start():
    # FLUX-fast config: w = 3 in [0, 3] leaves a single start
    sel = StepSelection(mode="random_window", window_size=3, window_range=(0, 3))
    assert all(select_steps(sel, 6, 0, it).train_steps == [0, 1, 2] for it in range(10))


def test_random_window_default_range_excludes_last():
    sel = StepSelection(mode="random_window", window_size=2)
    starts = {select_steps(sel, 5, 3, it).train_steps[0] for it in range(200)}
    assert starts == {0, 1, 2}  # window [k, k+2) within [0, 4)


@pytest.mark.parametrize("kwargs", [
    dict(mode="random_window", window_size=3, window_range=(2, 8)),
    dict(mode="random_subset", fraction=0.5),
])
def test_random_modes_deterministic_and_seeded(kwargs):
    sel = StepSelection(**kwargs)
    first = [select_steps(sel, 12, 99, it) for it in range(30)]
    again = [select_steps(sel, 12, 99, it) for it in range(30)]
    for a, b in zip(first, again):
        assert torch.equal(a.train_mask, b.train_mask) and torch.equal(a.sde_mask, b.sde_mask)
    other_seed = [select_steps(sel, 12, 100, it).train_steps for it in range(30)]
    assert other_seed != [p.train_steps for p in first]


def test_selection_ignores_and_preserves_global_rng():
    sel = StepSelection(mode="random_subset", fraction=0.5)
    torch.manual_seed(0)
    expected_next = torch.rand(3)
    torch.manual_seed(0)
    plan_a = select_steps(sel, 12, 5, 17)
    assert torch.equal(torch.rand(3), expected_next)  # global RNG stream untouched
    torch.manual_seed(12345)
    plan_b = select_steps(sel, 12, 5, 17)
    assert torch.equal(plan_a.train_mask, plan_b.train_mask)  # global seed has no influence


# --------------------------------------------------------------------------------------------------------------
# sliding_window


def test_sliding_window_sequence():
    # N = 8 -> last step 7; valid window starts c <= 6; c = 1 + 2 * p rolls back after 5
    sel = StepSelection(mode="sliding_window", window_size=3, window_start=1, stride=2, iters_per_shift=2)
    got = [select_steps(sel, 8, 0, it).train_steps for it in range(9)]
    expected = [
        [1, 2, 3], [1, 2, 3],
        [3, 4, 5], [3, 4, 5],
        [5, 6], [5, 6],  # truncated at step 6: step 7 is the deterministic last step
        [1, 2, 3], [1, 2, 3],
        [3, 4, 5],
    ]
    assert got == expected
    for it in range(9):
        plan = select_steps(sel, 8, 0, it)
        assert plan.sde_steps == plan.train_steps


def test_sliding_window_stride_one_and_zero():
    sel = StepSelection(mode="sliding_window", window_size=2, stride=1, iters_per_shift=1)
    got = [select_steps(sel, 6, 0, it).train_steps for it in range(7)]
    assert got == [[0, 1], [1, 2], [2, 3], [3, 4], [4], [0, 1], [1, 2]]
    fixed = StepSelection(mode="sliding_window", window_size=2, window_start=3, stride=0, iters_per_shift=1)
    assert all(select_steps(fixed, 10, 0, it).train_steps == [3, 4] for it in range(50))


def test_sliding_window_does_not_depend_on_seed():
    sel = StepSelection(mode="sliding_window", window_size=4, stride=1, iters_per_shift=25)
    for it in (0, 24, 25, 80, 500):
        assert select_steps(sel, 25, 0, it).train_steps == select_steps(sel, 25, 999, it).train_steps


# --------------------------------------------------------------------------------------------------------------
# random_subset


def test_random_subset_counts():
    sel = StepSelection(mode="random_subset", fraction=0.6)
    for it in range(20):
        plan = select_steps(sel, 16, 4, it)
        assert len(plan.train_steps) == math.floor(15 * 0.6) == 9
        assert plan.sde_steps == list(range(15))
    subsets = {tuple(select_steps(sel, 16, 4, it).train_steps) for it in range(20)}
    assert len(subsets) > 1
    exact = StepSelection(mode="random_subset", num_train=4)
    assert all(len(select_steps(exact, 16, 4, it).train_steps) == 4 for it in range(20))


# --------------------------------------------------------------------------------------------------------------
# invariants over every mode


ALL_MODES = [
    dict(mode="fraction", fraction=0.99),
    dict(mode="fraction", fraction=1.0),
    dict(mode="fixed_window", window_start=0, window_size=1),
    dict(mode="random_window", window_size=1),
    dict(mode="random_window", window_size=2, window_range=(0, 2)),
    dict(mode="sliding_window", window_size=3, stride=1, iters_per_shift=1),
    dict(mode="sliding_window", window_size=2, stride=2, iters_per_shift=3),
    dict(mode="random_subset", fraction=1.0),
    dict(mode="random_subset", fraction=0.5),
]


@pytest.mark.parametrize("kwargs", ALL_MODES)
@pytest.mark.parametrize("num_steps", [2, 3, 5, 10, 25])
def test_last_step_never_selected_and_train_subset_of_sde(kwargs, num_steps):
    sel = StepSelection(**kwargs)
    for seed in range(4):
        for it in range(60):
            try:
                plan = select_steps(sel, num_steps, seed, it)
            except ValueError:
                assert num_steps <= 3  # only the tiny grids can be too short for some settings
                continue
            assert plan.sde_mask.shape == plan.train_mask.shape == (num_steps,)
            assert plan.sde_mask.dtype == plan.train_mask.dtype == torch.bool
            assert not plan.sde_mask[-1] and not plan.train_mask[-1]
            assert not (plan.train_mask & ~plan.sde_mask).any()
            assert plan.train_mask.any()


def test_two_steps_trains_the_first():
    for kwargs in (dict(mode="fraction"), dict(mode="random_window", window_size=1),
                   dict(mode="sliding_window", window_size=3), dict(mode="random_subset", fraction=1.0)):
        plan = _plan(2, **kwargs)
        assert plan.train_steps == [0] and plan.sde_steps == [0]


def test_describe():
    assert _plan(10, mode="fixed_window", window_start=2, window_size=3).describe() == "N=10 sde=[2-4] train=[2-4]"


# --------------------------------------------------------------------------------------------------------------
# bad settings


@pytest.mark.parametrize("kwargs", [
    dict(mode="grpo"),
    dict(mode="fraction", fraction=0.0),
    dict(mode="fraction", fraction=1.5),
    dict(mode="fraction", fraction=float("nan")),
    dict(mode="random_subset", fraction=-0.1),
    dict(mode="fixed_window", window_size=0),
    dict(mode="fixed_window", window_start=-1),
    dict(mode="random_window", window_size=4, window_range=(0, 3)),
    dict(mode="random_window", window_size=1, window_range=(3, 2)),
    dict(mode="random_window", window_size=1, window_range=(0, 2, 4)),
    dict(mode="sliding_window", stride=-1),
    dict(mode="sliding_window", iters_per_shift=0),
    dict(mode="random_subset", num_train=0),
])
def test_bad_selection_raises(kwargs):
    with pytest.raises(ValueError):
        StepSelection(**kwargs)


@pytest.mark.parametrize("kwargs,num_steps,match", [
    (dict(mode="fraction"), 1, "at least 2"),
    (dict(mode="fraction", fraction=0.05), 10, "selects no step"),
    (dict(mode="random_subset", fraction=0.1), 10, "selects no step"),
    (dict(mode="random_subset", num_train=10), 10, "num_train"),
    (dict(mode="random_window", window_size=3, window_range=(0, 10)), 10, "beyond step 8"),
    (dict(mode="random_window", window_size=10), 10, "larger than"),
    (dict(mode="fixed_window", window_start=8, window_size=2), 10, "deterministic"),
    (dict(mode="sliding_window", window_start=9), 10, "past step 8"),
])
def test_bad_settings_for_grid_raise(kwargs, num_steps, match):
    with pytest.raises(ValueError, match=match):
        select_steps(StepSelection(**kwargs), num_steps, 0, 0)


def test_bad_iteration_raises():
    with pytest.raises(ValueError):
        select_steps(StepSelection(), 10, 0, -1)


def test_step_plan_rejects_bad_masks():
    sde = torch.tensor([True, True, False])
    with pytest.raises(ValueError, match="subset"):
        StepPlan(sde_mask=torch.tensor([True, False, False]), train_mask=torch.tensor([False, True, False]))
    with pytest.raises(ValueError, match="last step"):
        StepPlan(sde_mask=torch.tensor([True, True, True]), train_mask=torch.tensor([True, False, False]))
    with pytest.raises(ValueError, match="no step"):
        StepPlan(sde_mask=sde, train_mask=torch.zeros(3, dtype=torch.bool))
