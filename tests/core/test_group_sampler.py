"""Tests for flowgrpo_core.group_sampler: seeding, group layout, errors, and a 2-process gloo gather."""

from __future__ import annotations

import os
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from flowgrpo_core.grpo import group_advantages
from flowgrpo_core.seeding import iteration_seed
from flowgrpo_core.group_sampler import (
    GroupBatch,
    GroupSampler,
    gather_rewards,

    local_part,
)

REPO_ROOT = str(Path(__file__).resolve().parents[2])


def _reward(prompt_indices: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """A deterministic float64 reward of (prompt index, global position); varies within and across groups."""
    p, n = prompt_indices.double(), positions.double()
    return torch.sin(1.7 * p + 0.3) + 0.25 * torch.cos(2.3 * n) + 0.01 * n


def _advantages(rewards: torch.Tensor, group_ids: torch.Tensor, std_mode: str) -> torch.Tensor:
    """(r - mean_g) / (std + eps), ddof 0, eps 1e-4, unclipped (grpo-math.md §5.1), via flowgrpo_core.grpo."""
    return group_advantages(rewards, group_ids, std_mode=std_mode, eps=1e-4, ddof=0, clip=None).advantages


# --------------------------------------------------------------------------------------------- seeding


def test_same_seed_and_iteration_give_same_batch():
    a = GroupSampler(50, 4, 3, seed=7)
    b = GroupSampler(50, 4, 3, seed=7)
    for it in range(6):
        x, y = a.sample(it), b.sample(it)
        assert torch.equal(x.prompt_indices, y.prompt_indices)
        assert torch.equal(x.group_ids, y.group_ids)
        assert torch.equal(a.sample(it).prompt_indices, x.prompt_indices)  # repeated call on one instance
        assert x.iteration == it


def test_iterations_and_seeds_give_different_selections():
    s = GroupSampler(50, 4, 3, seed=7)
    selections = {tuple(s.sample(it).prompts.tolist()) for it in range(8)}
    assert len(selections) == 8
    other = GroupSampler(50, 4, 3, seed=8)
    assert any(not torch.equal(s.sample(it).prompts, other.sample(it).prompts) for it in range(4))
    # (seed, iteration) is not folded into seed + iteration
    assert iteration_seed(0, 1, "prompts") != iteration_seed(1, 0, "prompts")
    assert not torch.equal(GroupSampler(50, 4, 3, seed=0).sample(1).prompts,
                           GroupSampler(50, 4, 3, seed=1).sample(0).prompts)


def test_independent_of_global_rng():
    s = GroupSampler(50, 5, 2, seed=3)
    torch.manual_seed(0)
    first = s.sample(4).prompt_indices
    torch.manual_seed(12345)
    torch.rand(100)
    state = torch.get_rng_state()
    second = s.sample(4).prompt_indices
    assert torch.equal(first, second)
    assert torch.equal(torch.get_rng_state(), state)  # sampling does not consume the global RNG


def test_rank_does_not_change_global_batch():
    ref = GroupSampler(30, 4, 4, seed=11).sample(2)
    for w in (2, 4, 8):
        for r in range(w):
            b = GroupSampler(30, 4, 4, seed=11, rank=r, world_size=w).sample(2)
            assert torch.equal(b.prompt_indices, ref.prompt_indices)


# --------------------------------------------------------------------------------------------- layout


@pytest.mark.parametrize("num_prompts,P,G", [(50, 4, 3), (6, 6, 2), (9, 1, 5), (100, 7, 8)])
def test_groups_are_contiguous_and_consistent(num_prompts, P, G):
    for it in range(5):
        b = GroupSampler(num_prompts, P, G, seed=1).sample(it)
        assert b.prompt_indices.dtype == torch.long and b.group_ids.dtype == torch.long
        assert b.prompt_indices.shape == (P * G,) and b.group_ids.shape == (P * G,)
        rows = b.prompt_indices.view(P, G)
        assert torch.equal(rows, rows[:, :1].expand(P, G))  # G contiguous copies per prompt
        assert torch.equal(b.group_ids, torch.arange(P).repeat_interleave(G))
        assert torch.equal(b.prompts, rows[:, 0])
        assert len(set(b.prompts.tolist())) == P  # no replacement within an iteration
        assert int(b.prompt_indices.min()) >= 0 and int(b.prompt_indices.max()) < num_prompts
        counts = torch.bincount(b.prompt_indices, minlength=num_prompts)
        assert set(counts[b.prompts].tolist()) == {G}
        assert int(counts.sum()) == P * G


def test_all_prompts_used_when_P_equals_num_prompts():
    b = GroupSampler(6, 6, 2, seed=0).sample(3)
    assert sorted(b.prompts.tolist()) == list(range(6))


def test_no_shuffle_cycles_in_order():
    s = GroupSampler(5, 2, 2, seed=0, shuffle=False)
    assert [s.sample(i).prompts.tolist() for i in range(4)] == [[0, 1], [2, 3], [4, 0], [1, 2]]


def test_shuffle_covers_all_prompts_over_iterations():
    s = GroupSampler(10, 3, 2, seed=5)
    seen = set()
    for it in range(60):
        seen.update(s.sample(it).prompts.tolist())
    assert seen == set(range(10))


# --------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        (dict(num_prompts=10, prompts_per_iteration=2, group_size=1), r"at least 2 samples per prompt.*group_size >= 2"),
        (dict(num_prompts=3, prompts_per_iteration=4, group_size=2),
         r"only 3 prompts available but 4 requested per iteration; add prompts or lower prompts_per_iteration"),
        (dict(num_prompts=0, prompts_per_iteration=1, group_size=2), r"num_prompts=0"),
        (dict(num_prompts=10, prompts_per_iteration=0, group_size=2), r"prompts_per_iteration must be >= 1"),
        (dict(num_prompts=10, prompts_per_iteration=3, group_size=3, rank=0, world_size=2),
         r"3 \* 3 = 9 .*world_size=2.*prompts_per_iteration \(e\.g\. to 4\) or group_size.*multiple of 2"),
        (dict(num_prompts=10, prompts_per_iteration=2, group_size=2, rank=2, world_size=2), r"rank must be in \[0, 2\)"),
        (dict(num_prompts=10, prompts_per_iteration=2, group_size=2, rank=0, world_size=0), r"world_size must be >= 1"),
    ],
)
def test_invalid_configurations_raise(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        GroupSampler(seed=0, **kwargs)


def test_divisibility_suggestion_is_valid():
    # G=6, W=4: P must be a multiple of 2; the message suggests the next such P, which must then work.
    with pytest.raises(ValueError, match=r"e\.g\. to 4\)"):
        GroupSampler(10, 3, 6, seed=0, rank=0, world_size=4)
    GroupSampler(10, 4, 6, seed=0, rank=0, world_size=4)


def test_negative_iteration_and_bad_shapes_raise():
    s = GroupSampler(10, 2, 2, seed=0)
    with pytest.raises(ValueError, match="iteration must be >= 0"):
        s.sample(-1)
    b = s.sample(0)
    with pytest.raises(ValueError, match="holds 4 samples"):
        gather_rewards(torch.zeros(3), b)
    with pytest.raises(ValueError, match="global batch of 4"):
        local_part(torch.zeros(5), b)


# --------------------------------------------------------------------------------------------- split


@pytest.mark.parametrize("P,G,W", [(4, 3, 1), (4, 3, 2), (3, 4, 3), (4, 4, 8), (5, 2, 5)])
def test_local_shares_partition_the_global_batch(P, G, W):
    batches = [GroupSampler(20, P, G, seed=2, rank=r, world_size=W).sample(1) for r in range(W)]
    ref = batches[0]
    sizes = {b.local_size for b in batches}
    assert sizes == {P * G // W}
    positions = torch.cat([b.local_positions for b in batches])
    assert torch.equal(positions, torch.arange(P * G))  # contiguous, disjoint, rank order, complete
    assert torch.equal(torch.cat([b.local_prompt_indices for b in batches]), ref.prompt_indices)
    assert torch.equal(torch.cat([b.local_group_ids for b in batches]), ref.group_ids)
    full = torch.arange(P * G) * 10
    assert torch.equal(torch.cat([local_part(full, b) for b in batches]), full)


def test_single_process_gather_and_defaults():
    s = GroupSampler(10, 3, 4, seed=0)
    assert (s.rank, s.world_size) == (0, 1)
    f = GroupSampler.from_distributed(10, 3, 4, seed=0)
    assert (f.rank, f.world_size) == (0, 1)
    b = s.sample(0)
    r = torch.randn(12, dtype=torch.float64)
    assert torch.equal(gather_rewards(r, b), r)
    assert torch.equal(local_part(r, b), r)
    assert isinstance(b, GroupBatch)


# --------------------------------------------------------------------------------------------- 2 gloo processes

_NUM_PROMPTS, _P, _G, _SEED, _ITERS = 11, 3, 4, 1234, 3  # 12 samples, 6 per rank: group 1 straddles the ranks
_STD_MODES = ("group", "global")


def _gloo_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    if REPO_ROOT not in sys.path:
        sys.path.insert(0, REPO_ROOT)
    import torch.distributed as dist

    from flowgrpo_core.group_sampler import GroupSampler as Sampler
    from flowgrpo_core.group_sampler import gather_rewards as gather
    from flowgrpo_core.group_sampler import local_part as part

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=60))
    try:
        sampler = Sampler(_NUM_PROMPTS, _P, _G, _SEED)  # rank / world size resolved from the process group
        torch.manual_seed(rank)  # a rank-dependent global RNG must not matter
        result = {"rank": torch.tensor(sampler.rank), "world_size": torch.tensor(sampler.world_size)}
        for it in range(_ITERS):
            batch = sampler.sample(it)
            local_rewards = _reward(batch.local_prompt_indices, batch.local_positions)
            rewards = gather(local_rewards, batch)
            result[f"global_prompts_{it}"] = batch.prompt_indices
            result[f"local_prompts_{it}"] = batch.local_prompt_indices
            result[f"local_positions_{it}"] = batch.local_positions
            result[f"rewards_{it}"] = rewards
            for mode in _STD_MODES:
                adv = _advantages(rewards, batch.group_ids, mode)
                result[f"adv_{mode}_{it}"] = adv
                result[f"local_adv_{mode}_{it}"] = part(adv, batch)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_match_single_process(tmp_path, monkeypatch):
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (REPO_ROOT, os.environ.get("PYTHONPATH")) if p))
    world_size = 2
    ctx = mp.spawn(_gloo_worker, args=(world_size, str(tmp_path / "pg_init"), str(tmp_path)),
                   nprocs=world_size, join=False)
    deadline = time.monotonic() + 180
    try:
        while not ctx.join(timeout=1):  # raises ProcessRaisedException / ProcessExitedException on worker failure
            if time.monotonic() > deadline:
                pytest.fail("gloo workers did not finish within 180 s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
                p.join(5)

    res = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world_size)]
    single = GroupSampler(_NUM_PROMPTS, _P, _G, _SEED)  # rank 0, world size 1
    for r in range(world_size):
        assert int(res[r]["rank"]) == r and int(res[r]["world_size"]) == world_size
    half = _P * _G // world_size
    for it in range(_ITERS):
        ref = single.sample(it)
        ref_rewards = _reward(ref.prompt_indices, torch.arange(_P * _G))
        # the shares are equal, disjoint in position, and together exactly the global batch
        pos0, pos1 = res[0][f"local_positions_{it}"], res[1][f"local_positions_{it}"]
        assert pos0.shape == pos1.shape == (half,)
        assert not set(pos0.tolist()) & set(pos1.tolist())
        assert torch.equal(torch.cat([pos0, pos1]), torch.arange(_P * _G))
        assert torch.equal(torch.cat([res[0][f"local_prompts_{it}"], res[1][f"local_prompts_{it}"]]), ref.prompt_indices)
        for r in range(world_size):
            assert torch.equal(res[r][f"global_prompts_{it}"], ref.prompt_indices)
            assert torch.equal(res[r][f"rewards_{it}"], ref_rewards)
        for mode in _STD_MODES:
            ref_adv = _advantages(ref_rewards, ref.group_ids, mode)
            assert bool(torch.isfinite(ref_adv).all()) and float(ref_adv.abs().max()) > 0.1
            for r in range(world_size):
                assert torch.equal(res[r][f"adv_{mode}_{it}"], ref_adv)
                assert torch.equal(res[r][f"local_adv_{mode}_{it}"], ref_adv[r * half:(r + 1) * half])
            # the gather matters: normalising rank 0's rewards alone gives different advantages
            alone = _advantages(ref_rewards[:half], ref.group_ids[:half], mode)
            assert not torch.allclose(alone, ref_adv[:half])
