"""Rewards: one interface for every scorer (:mod:`.base`), the weight-free image statistics (:mod:`.simple`), the
model backends by name (:mod:`.registry`: HPSv2, PickScore, aesthetic, CLIP score, ImageReward, OCR, GenEval), user
reward files (:mod:`.user`), and a reward server with its client (:mod:`.server`, :mod:`.remote`;
``python -m flowgrpo_core.rewards serve``)."""

from . import registry  # first: it imports the backend modules, which import it back (see registry)
from .base import RewardBackend, RewardResult, TorchReward, check_scores
from .remote import RemoteReward, RemoteRewardError
from .server import RewardServer
from .simple import SIMPLE_REWARDS, SimpleReward, jpeg_size_kb, simple_reward

__all__ = ["RewardBackend", "RewardResult", "TorchReward", "check_scores", "RemoteReward", "RemoteRewardError",
           "RewardServer", "SIMPLE_REWARDS", "SimpleReward", "jpeg_size_kb", "simple_reward"]
