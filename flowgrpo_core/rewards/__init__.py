"""Rewards: one interface for every scorer (:mod:`.base`), the weight-free image statistics (:mod:`.simple`)."""

from .base import RewardBackend, RewardResult, check_scores
from .simple import SIMPLE_REWARDS, SimpleReward, jpeg_size_kb, simple_reward

__all__ = ["RewardBackend", "RewardResult", "check_scores", "SIMPLE_REWARDS", "SimpleReward", "jpeg_size_kb",
           "simple_reward"]
