"""Random streams seeded by ``(run seed, iteration)``, never by process or rank.

Every rank computes the same prompts, windows and noise for an iteration, a resumed run replays the same
sequence, and the stream name keeps unrelated draws (prompts, step windows, initial noise) independent.
"""

from __future__ import annotations

import hashlib

import torch


def iteration_seed(seed: int, iteration: int, stream: str) -> int:
    """A 63-bit seed from a hash of ``(stream, seed, iteration)``; ``(0, 1)`` and ``(1, 0)`` do not collide."""
    digest = hashlib.blake2b(f"flowgrpo:{stream}:{int(seed)}:{int(iteration)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def iteration_generator(seed: int, iteration: int, stream: str, device: str | torch.device = "cpu") -> torch.Generator:
    """A fresh ``torch.Generator`` on ``device`` seeded with :func:`iteration_seed`."""
    generator = torch.Generator(device=device)
    generator.manual_seed(iteration_seed(seed, iteration, stream))
    return generator
