"""Which prompts a GRPO iteration samples, how each is repeated into a group, and how the batch splits across ranks.

Conventions (grpo-math.md §5.1, §6 and the seed notes of §11):

* an iteration draws ``P = prompts_per_iteration`` distinct prompts (no replacement within an iteration) and
  repeats each ``G = group_size`` times **contiguously**, so the global batch has ``N = P * G`` samples and
  sample ``n`` belongs to group ``n // G``;
* the draw depends only on ``(seed, iteration)`` through a private ``torch.Generator``: never on the global
  RNG, never on the rank. Every rank computes the same global batch, and a resumed run draws the same prompts;
* the global batch splits **contiguously** across ``world_size`` ranks: rank ``r`` owns the global positions
  ``[r * b, (r + 1) * b)`` with ``b = N / world_size``. A group may straddle two ranks when ``b`` is not a
  multiple of ``G``; advantages must therefore be computed on the gathered rewards (:func:`gather_rewards`),
  which every rank can do identically, and each rank then keeps its own share (:func:`local_part`).

Pure PyTorch; ``torch.distributed`` is only used when it is initialised (gloo on CPU works).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from .seeding import iteration_seed

def resolve_rank_world_size(rank: Optional[int] = None, world_size: Optional[int] = None) -> tuple[int, int]:
    """``(rank, world_size)``: the given values, else those of the initialised default process group, else ``(0, 1)``."""
    initialised = torch.distributed.is_available() and torch.distributed.is_initialized()
    if world_size is None:
        world_size = torch.distributed.get_world_size() if initialised else 1
    if rank is None:
        rank = torch.distributed.get_rank() if initialised else 0
    return int(rank), int(world_size)


@dataclass(frozen=True)
class GroupBatch:
    """The prompts of one iteration, for all ranks, and this rank's share.

    prompt_indices: ``[P*G]`` int64, indices into the prompt list; each chosen prompt appears ``G`` times in a row.
    group_ids:      ``[P*G]`` int64, ``n // G`` for global position ``n`` (values ``0 .. P-1``).
    local:          slice of global positions owned by ``rank`` (contiguous, length ``P*G / world_size``).
    iteration, rank, world_size, group_size: as given to / resolved by :class:`GroupSampler`.
    """

    prompt_indices: torch.Tensor
    group_ids: torch.Tensor
    local: slice
    iteration: int
    rank: int
    world_size: int
    group_size: int

    @property
    def global_size(self) -> int:
        """``P * G``, the number of samples over all ranks."""
        return int(self.prompt_indices.shape[0])

    @property
    def local_size(self) -> int:
        """``P * G / world_size``, the number of samples this rank generates."""
        return self.local.stop - self.local.start

    @property
    def num_groups(self) -> int:
        """``P``, the number of prompts (groups) in the global batch."""
        return self.global_size // self.group_size

    @property
    def prompts(self) -> torch.Tensor:
        """``[P]`` int64, the distinct prompts of this iteration in group order (``prompts[g]`` is group ``g``'s prompt)."""
        return self.prompt_indices[:: self.group_size]

    @property
    def local_positions(self) -> torch.Tensor:
        """``[b]`` int64, the global positions owned by this rank."""
        return torch.arange(self.local.start, self.local.stop, dtype=torch.long)

    @property
    def local_prompt_indices(self) -> torch.Tensor:
        """``[b]`` int64, the prompt of each sample this rank generates."""
        return self.prompt_indices[self.local]

    @property
    def local_group_ids(self) -> torch.Tensor:
        """``[b]`` int64, the global group id of each sample this rank generates."""
        return self.group_ids[self.local]


class GroupSampler:
    """Seeded, rank-independent choice of ``P`` prompts per iteration, each repeated ``G`` times.

    ``shuffle=True``: a fresh random permutation of all prompts per iteration, of which the first ``P`` are used.
    ``shuffle=False``: prompts are taken in order, cycling: iteration ``i`` uses ``(i*P + k) mod num_prompts``
    for ``k = 0 .. P-1`` (every prompt is seen once every ``ceil(num_prompts / P)`` iterations).

    ``rank`` / ``world_size`` left as ``None`` come from the initialised default process group, else ``(0, 1)``.
    """

    def __init__(
        self,
        num_prompts: int,
        prompts_per_iteration: int,
        group_size: int,
        seed: int,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
        shuffle: bool = True,
    ) -> None:
        rank, world_size = resolve_rank_world_size(rank, world_size)
        num_prompts, prompts_per_iteration, group_size = int(num_prompts), int(prompts_per_iteration), int(group_size)
        if num_prompts <= 0:
            raise ValueError(f"no prompts to sample from (num_prompts={num_prompts}); give at least one prompt")
        if prompts_per_iteration < 1:
            raise ValueError(f"prompts_per_iteration must be >= 1, got {prompts_per_iteration}")
        if group_size < 2:
            raise ValueError(
                f"GRPO needs at least 2 samples per prompt to compare; set group_size >= 2 (got {group_size})"
            )
        if prompts_per_iteration > num_prompts:
            raise ValueError(
                f"only {num_prompts} prompts available but {prompts_per_iteration} requested per iteration; "
                "add prompts or lower prompts_per_iteration"
            )
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}) for world_size {world_size}, got {rank}")
        total = prompts_per_iteration * group_size
        if total % world_size != 0:
            step = world_size // math.gcd(group_size, world_size)  # P must be a multiple of this
            suggest_p = -(-prompts_per_iteration // step) * step
            raise ValueError(
                f"prompts_per_iteration * group_size = {prompts_per_iteration} * {group_size} = {total} samples per "
                f"iteration cannot be split evenly across world_size={world_size} ranks; change prompts_per_iteration "
                f"(e.g. to {suggest_p}) or group_size so that their product is a multiple of {world_size}, "
                f"or run on a number of ranks that divides {total}"
            )
        self.num_prompts = num_prompts
        self.prompts_per_iteration = prompts_per_iteration
        self.group_size = group_size
        self.seed = int(seed)
        self.rank = rank
        self.world_size = world_size
        self.shuffle = bool(shuffle)

    @classmethod
    def from_distributed(cls, num_prompts: int, prompts_per_iteration: int, group_size: int, seed: int,
                         shuffle: bool = True) -> "GroupSampler":
        """A sampler whose rank and world size are those of the initialised default process group (else 0 and 1)."""
        return cls(num_prompts, prompts_per_iteration, group_size, seed, None, None, shuffle)

    @property
    def samples_per_iteration(self) -> int:
        """``P * G``, the global batch size."""
        return self.prompts_per_iteration * self.group_size

    @property
    def samples_per_rank(self) -> int:
        """``P * G / world_size``, the local batch size."""
        return self.samples_per_iteration // self.world_size

    def choose_prompts(self, iteration: int) -> torch.Tensor:
        """``[P]`` int64, the distinct prompts of ``iteration`` (a function of ``(seed, iteration)`` only)."""
        iteration = int(iteration)
        if iteration < 0:
            raise ValueError(f"iteration must be >= 0, got {iteration}")
        P, N = self.prompts_per_iteration, self.num_prompts
        if not self.shuffle:
            return (iteration * P + torch.arange(P, dtype=torch.long)) % N
        gen = torch.Generator(device="cpu")
        gen.manual_seed(iteration_seed(self.seed, iteration, "prompts"))
        return torch.randperm(N, generator=gen, dtype=torch.long)[:P]

    def sample(self, iteration: int) -> GroupBatch:
        """The global batch of ``iteration`` (identical on all ranks) and this rank's contiguous share."""
        G, b = self.group_size, self.samples_per_rank
        prompts = self.choose_prompts(iteration)
        return GroupBatch(
            prompt_indices=prompts.repeat_interleave(G),
            group_ids=torch.arange(self.prompts_per_iteration, dtype=torch.long).repeat_interleave(G),
            local=slice(self.rank * b, (self.rank + 1) * b),
            iteration=int(iteration),
            rank=self.rank,
            world_size=self.world_size,
            group_size=G,
        )


def gather_rewards(local_rewards: torch.Tensor, batch: GroupBatch, group=None) -> torch.Tensor:
    """``[P*G, ...]``: every rank's ``[b, ...]`` rewards, in global-batch order, on every rank.

    ``local_rewards[i]`` is the reward of global position ``batch.local.start + i``. With ``world_size == 1``
    the input is returned as is. Otherwise this is a collective (all ranks must call it, with equal shapes):
    ``all_gather`` over ``group`` (default: the default process group), then concatenation in rank order, which
    is global order because the split is contiguous. The tensor must live where the backend expects it
    (CPU for gloo, the rank's GPU for nccl). Dtype is kept; gather in float64 if advantages are computed in it.
    """
    if local_rewards.dim() == 0 or local_rewards.shape[0] != batch.local_size:
        raise ValueError(
            f"rank {batch.rank} holds {batch.local_size} samples but got rewards of shape {tuple(local_rewards.shape)}"
        )
    if batch.world_size == 1:
        return local_rewards
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"the batch was split across {batch.world_size} ranks but torch.distributed is not initialised"
        )
    actual = dist.get_world_size(group)
    if actual != batch.world_size:
        raise RuntimeError(f"the batch was split for world_size {batch.world_size} but the process group has {actual}")
    local_rewards = local_rewards.contiguous()
    parts = [torch.empty_like(local_rewards) for _ in range(actual)]
    dist.all_gather(parts, local_rewards, group=group)
    return torch.cat(parts, dim=0)


def local_part(global_tensor: torch.Tensor, batch: GroupBatch) -> torch.Tensor:
    """``[b, ...]``: this rank's share of a ``[P*G, ...]`` tensor in global order (e.g. the advantages)."""
    if global_tensor.dim() == 0 or global_tensor.shape[0] != batch.global_size:
        raise ValueError(
            f"expected a tensor over the global batch of {batch.global_size} samples, got shape {tuple(global_tensor.shape)}"
        )
    return global_tensor[batch.local]
