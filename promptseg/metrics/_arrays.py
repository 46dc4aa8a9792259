"""Array coercion (numpy only; tensors by duck typing) and message helpers shared by the metrics."""

from __future__ import annotations

from typing import Any

import numpy as np


def to_numpy(x: Any) -> np.ndarray:
    """Return `x` as a numpy array; tensors are detached and moved to CPU (duck typing)."""
    if isinstance(x, np.ndarray):
        return x
    if hasattr(x, "numpy"):
        if hasattr(x, "detach"):
            x = x.detach()
        if hasattr(x, "cpu"):
            x = x.cpu()
        return np.asarray(x.numpy())
    return np.asarray(x)


def as_binary(x: Any, name: str) -> np.ndarray:
    """A bool or 0/1 array as bool; other values are an error (references drop them silently)."""
    a = to_numpy(x)
    if a.dtype == np.bool_:
        return a
    if np.any((a != 0) & (a != 1)):
        raise ValueError(f"{name} must be boolean or contain only 0 and 1")
    return a != 0


def first_few(names: list[str], limit: int = 20) -> str:
    """The first `limit` names, comma-separated, and how many more there are (error messages)."""
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
