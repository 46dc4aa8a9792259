"""`make_mini`: every miniature dataset of the benchmarks in its real on-disk layout."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

__all__ = ["make_mini"]


def make_mini(out: str | Path, datasets: Sequence[str] | str = "all", seed: int = 0) -> dict:
    """Write the miniature few-shot, dense and PerSeg datasets under `out`; returns paths."""
    from .mini_dense import DENSE_DATASETS, make_mini_dense
    from .mini_fewshot import MINI_FEWSHOT_DATASETS, make_mini_fewshot
    from .mini_perseg import make_mini_perseg

    if isinstance(datasets, str):
        datasets = [d.strip() for d in datasets.split(",") if d.strip()]
    wanted = list(datasets)
    if "all" in wanted:
        fewshot, dense = list(MINI_FEWSHOT_DATASETS), list(DENSE_DATASETS)
        perseg = True
    else:
        known = set(MINI_FEWSHOT_DATASETS) | {"coco2voc"} | set(DENSE_DATASETS) | {"perseg"}
        unknown = sorted(set(wanted) - known)
        if unknown:
            raise ValueError(
                f"unknown mini datasets {unknown}; choose from 'all', "
                f"{', '.join(MINI_FEWSHOT_DATASETS + tuple(DENSE_DATASETS))}, perseg"
            )
        fewshot = [d for d in wanted if d in MINI_FEWSHOT_DATASETS or d == "coco2voc"]
        dense = [d for d in wanted if d in DENSE_DATASETS]
        perseg = "perseg" in wanted
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    if fewshot:
        written.update(make_mini_fewshot(root, fewshot, seed=seed))
    if dense:
        written.update(make_mini_dense(root, dense, seed=seed))
    if perseg:
        written["perseg"] = make_mini_perseg(root, seed=seed)
    return written
