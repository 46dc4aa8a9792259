"""Helpers for tests and benchmarks: reference models with random weights, miniature data.

Nothing here is imported by the library itself; reference implementations (transformers, ...)
are imported lazily, so they are only needed by whoever calls these helpers.
"""

from .mini import make_mini

__all__ = ["make_mini"]
