"""One JSON conversion for result files, benchmark results and metadata."""

from __future__ import annotations

import math
from pathlib import PurePath
from typing import Any

import numpy as np
import torch

__all__ = ["to_jsonable"]


def to_jsonable(x: Any, *, finite_only: bool = False) -> Any:
    """JSON-compatible copy of `x`: tensors and arrays as (nested) lists, sets sorted, paths and
    anything else JSON cannot hold as strings; `finite_only` also turns NaN / inf into strings
    (strict JSON readers reject them)."""
    if isinstance(x, dict):
        return {str(k): to_jsonable(v, finite_only=finite_only) for k, v in x.items()}
    if isinstance(x, set | frozenset):
        x = sorted(x, key=str)
    if isinstance(x, list | tuple):
        return [to_jsonable(v, finite_only=finite_only) for v in x]
    if isinstance(x, torch.Tensor | np.ndarray | np.generic):
        return to_jsonable(x.tolist(), finite_only=finite_only)
    if isinstance(x, float):
        return str(x) if finite_only and not math.isfinite(x) else x
    if x is None or isinstance(x, bool | int | str):
        return x
    if isinstance(x, PurePath):
        return str(x)
    return str(x)
