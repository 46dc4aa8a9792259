"""Benchmark data: deterministic episode lists and the split files they are drawn from."""

from .episodes import Episode, episode_digest, episodes, serialize_episodes
from .perseg import PerSegDataset, PerSegItem

__all__ = [
    "Episode",
    "PerSegDataset",
    "PerSegItem",
    "episode_digest",
    "episodes",
    "serialize_episodes",
]
