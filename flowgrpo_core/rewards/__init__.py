"""Rewards: one interface for every scorer (:mod:`.base`), the weight-free image statistics (:mod:`.simple`), and a
reward server with its client (:mod:`.server`, :mod:`.remote`; ``python -m flowgrpo_core.rewards serve``)."""

from .base import RewardBackend, RewardResult, TorchReward, check_scores
from .remote import RemoteReward, RemoteRewardError
from .server import RewardServer
from .simple import SIMPLE_REWARDS, SimpleReward, jpeg_size_kb, simple_reward

__all__ = ["RewardBackend", "RewardResult", "TorchReward", "check_scores", "RemoteReward", "RemoteRewardError",
           "RewardServer", "SIMPLE_REWARDS", "SimpleReward", "jpeg_size_kb", "simple_reward"]
