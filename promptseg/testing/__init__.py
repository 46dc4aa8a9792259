"""Helpers for tests and benchmarks: reference models with random weights, miniature data.

Nothing here is imported by the library itself; reference implementations (transformers, ...)
and the test models are imported lazily, so they are only needed by whoever uses them.

Test models (zoo names `test_colorkey`, `test_empty`, `test_shifted`):

- `ColorKey()` finds each prompt's colour: 100 on every mini dataset (`eval refer`: CLIPSeg's
  +1 denominators give |GT| / (|GT| + 1) per phrase; `eval perseg`: 100 ΣI / (ΣI + 1e-10)).
- `Empty()` finds nothing; the edge values per eval path are:
  fss mIoU 0 and FB-IoU = 50 x the share of scored pixels that are GT background (< 50);
  fsis AP 0 (`empty_predictions: true`); vos J = F = 0 where the object is visible and 1 where
  GT is empty too, so J&F = 100 x the per-object mean share of frames without the object;
  ovseg PQ = SQ = RQ = 0, AP 0 (`empty_predictions: true`), mIoU = pACC = 0;
  refer mIoU = IoU_FG = AP = 0, 0 < IoU_BIN < 50 (background only); perseg mIoU = mAcc = 0.
- `ShiftedOracle(dx)` shifts ColorKey's masks `dx` pixels right: a w-wide rectangle that stays
  in the image scores IoU (w - dx) / (w + dx).
"""

from __future__ import annotations

from typing import Any

from .mini import make_mini

__all__ = ["ColorKey", "Empty", "ShiftedOracle", "make_mini"]

_MODELS = ("ColorKey", "Empty", "ShiftedOracle")


def __getattr__(name: str) -> Any:
    """The test models, imported on first use (they need torch and the model zoo)."""
    if name in _MODELS:
        from ..models import testing

        return getattr(testing, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
