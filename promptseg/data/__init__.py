"""Benchmark data: deterministic episode lists and the split files they are drawn from."""

from .episodes import Episode, episode_digest, episodes, serialize_episodes

__all__ = ["Episode", "episode_digest", "episodes", "serialize_episodes"]
