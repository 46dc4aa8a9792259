"""Array coercion (numpy only; tensors by duck typing) and message helpers shared by the metrics."""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np

_NUMERIC_KINDS = "biuf"  # bool, signed / unsigned integer, float


def to_numpy(x: Any) -> np.ndarray:
    """Return `x` as a numpy array; tensors are detached and moved to CPU (duck typing)."""
    if isinstance(x, np.ndarray):
        return x
    if hasattr(x, "numpy"):
        if hasattr(x, "detach"):
            x = x.detach()
        if hasattr(x, "cpu"):
            x = x.cpu()
        try:
            return np.asarray(x.numpy())
        except (TypeError, RuntimeError) as exc:  # e.g. torch bfloat16 has no numpy dtype
            raise TypeError(f"cannot convert {type(x).__name__} to numpy: {exc}") from None
    try:
        return np.asarray(x)
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"expected an array (numpy, torch or nested lists), got {type(x).__name__}: {exc}"
        ) from None


def as_numeric(x: Any, name: str) -> np.ndarray:
    """`x` as a numpy array of bool, integer or float dtype (anything else is a TypeError)."""
    a = to_numpy(x)
    if a.dtype.kind not in _NUMERIC_KINDS:
        raise TypeError(f"{name} must be a bool, integer or float array, got dtype {a.dtype}")
    return a


def as_binary(x: Any, name: str) -> np.ndarray:
    """A bool or 0/1 array as bool; other values are an error (references drop them silently)."""
    a = as_numeric(x, name)
    if a.dtype == np.bool_:
        return a
    if np.any((a != 0) & (a != 1)):
        raise ValueError(f"{name} must be boolean or contain only 0 and 1")
    return a != 0


def as_int(x: Any, name: str) -> int:
    """`x` as a Python int: an int or numpy integer (not a bool, float or string)."""
    if isinstance(x, bool) or not isinstance(x, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {x!r} ({type(x).__name__})")
    return int(x)


def first_few(names: list[str], limit: int = 20) -> str:
    """The first `limit` names, comma-separated, and how many more there are (error messages)."""
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
