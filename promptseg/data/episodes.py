"""Deterministic few-shot episode lists: the hsnet/Matcher/SINE stream, as plain data.

Episodes are generated up front by a pure function, so loaders, workers and shards only index them.
"""

from __future__ import annotations

import hashlib
import numbers
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from promptseg.data.splits import (
    find_split,
    load_coco_split,
    load_lvis_split,
    read_fss_split,
    read_pascal_split,
    split_file,
)

__all__ = [
    "DATASETS",
    "DEFAULT_EPISODES",
    "Episode",
    "draw_supports",
    "episode_digest",
    "episodes",
    "lvis_fold_classes",
    "pick",
    "serialize_episodes",
]

T = TypeVar("T")
PathLike = str | os.PathLike[str]

DATASETS = ("pascal5i", "coco20i", "fss1000", "lvis92i")
DEFAULT_EPISODES = {"pascal5i": 1000, "coco20i": 1000, "fss1000": 2400, "lvis92i": 2300}
"""Episodes per fold of the reference protocol."""

FSS_FIRST_TEST_CLASS = 760
FSS_IMAGES = tuple(sorted(f"{k}.jpg" for k in range(1, 11)))  # 1, 10, 2, ..., 9 (string sort)


@dataclass(frozen=True)
class Episode:
    """One few-shot episode: dataset-level class id, query image id and support image ids."""

    index: int
    class_id: int
    query: str
    supports: tuple[str, ...]


def pick(rs: np.random.RandomState, seq: Sequence[T]) -> T:
    """``rs.choice(seq, 1, replace=False)[0]``: consumes a full permutation of ``len(seq)``.

    Drawn on ``len(seq)`` (identical stream: numpy permutes indices either way), which avoids
    converting long lists to arrays.
    """
    return seq[int(rs.choice(len(seq), 1, replace=False)[0])]


def draw_supports(
    rs: np.random.RandomState, pool: Sequence[str], query: str, shots: int
) -> tuple[str, ...]:
    """Draw supports one at a time, rejecting only the query; duplicates are kept."""
    if not any(item != query for item in pool):
        raise ValueError(f"no support candidate other than the query {query!r}")
    out: list[str] = []
    while len(out) < shots:
        s = pick(rs, pool)
        if s != query:
            out.append(s)
    return tuple(out)


def _int_fold(dataset: str, fold: int | str, n_folds: int) -> int:
    try:
        f = int(fold)
    except (TypeError, ValueError):
        f = -1
    if not 0 <= f < n_folds or str(f) != str(fold).strip():
        raise ValueError(f"{dataset} fold must be 0..{n_folds - 1}, got {fold!r}")
    return f


def _pascal(rs, fold, shots, n, splits_dir, cache_dir, trust_pickle, data_root) -> list[Episode]:
    f = _int_fold("pascal5i", fold, 4)
    path = split_file("pascal5i", f, splits_dir, cache_dir)
    meta = read_pascal_split(path)
    if not meta:
        raise ValueError(f"{path}: the split list is empty (no '<name>__<cc>' lines)")
    pools: dict[int, list[str]] = {}
    for name, c in meta:
        pools.setdefault(c, []).append(name)
    out = []
    for i in range(n):
        query, c = meta[i % len(meta)]
        out.append(Episode(i, c, query, draw_supports(rs, pools[c], query, shots)))
    return out


def _coco(rs, fold, shots, n, splits_dir, cache_dir, trust_pickle, data_root) -> list[Episode]:
    f = _int_fold("coco20i", fold, 4)
    path = split_file("coco20i", f, splits_dir, cache_dir, trust_pickle=trust_pickle)
    lists = load_coco_split(path, sha256=find_split("coco20i", f).sha256, trust_pickle=trust_pickle)
    classes = [f + 4 * v for v in range(20)]
    empty = [c for c in classes if not lists.get(c)]
    if empty:
        raise ValueError(f"{path}: fold {f} test classes {empty} have no images")
    out = []
    for i in range(n):
        c = pick(rs, classes)
        query = pick(rs, lists[c])
        out.append(Episode(i, c, query, draw_supports(rs, lists[c], query, shots)))
    return out


def _fss(rs, fold, shots, n, splits_dir, cache_dir, trust_pickle, data_root) -> list[Episode]:
    if str(fold) != "test":
        raise ValueError(f"fss1000 has one evaluation fold, 'test'; got {fold!r}")
    # Every FSS-1000 class holds 1.jpg..10.jpg, so the query list is synthesised.
    cats = sorted(read_fss_split(split_file("fss1000", "test", splits_dir, cache_dir)))
    ranks = range(1, 11)
    out: list[Episode] = []
    for rank, cat in enumerate(cats):
        for name in FSS_IMAGES:
            if len(out) == n:
                return out
            query = f"{cat}/{name}"
            supports: list[str] = []
            while len(supports) < shots:
                s = f"{cat}/{pick(rs, ranks)}.jpg"
                if s != query:
                    supports.append(s)
            out.append(Episode(len(out), FSS_FIRST_TEST_CLASS + rank, query, tuple(supports)))
    return out


def lvis_fold_classes(val: dict[Any, dict[str, Any]], fold: int, shots: int) -> list[Any]:
    """LVIS-92i fold classes (category keys, dict order); position = metric class id."""
    val_cats = [c for c in val if len(val[c]) > shots]
    per_fold = len(val_cats) // 10
    return [val_cats[fold + 10 * v] for v in range(per_fold)]


def _lvis(rs, fold, shots, n, splits_dir, cache_dir, trust_pickle, data_root) -> list[Episode]:
    f = _int_fold("lvis92i", fold, 10)
    if data_root is None:
        raise ValueError(
            "lvis92i episodes need data_root=<dir> holding LVIS/lvis_val.pkl "
            "(no public split file exists)"
        )
    val, _ = load_lvis_split(data_root, trust_pickle=trust_pickle)
    classes = lvis_fold_classes(val, f, shots)
    if not classes:
        raise ValueError(f"LVIS pickle has fewer than 10 classes with more than {shots} images")
    imgs = [list(val[c].keys()) for c in classes]  # pickle (insertion) order
    out = []
    for i in range(n):
        k = i % len(classes)
        query = pick(rs, imgs[k])
        supports = draw_supports(rs, imgs[k], query, shots)
        out.append(Episode(i, k, str(query), tuple(map(str, supports))))
    return out


_GENERATORS: dict[str, Callable[..., list[Episode]]] = {
    "pascal5i": _pascal,
    "coco20i": _coco,
    "fss1000": _fss,
    "lvis92i": _lvis,
}


def episodes(
    dataset: str,
    fold: int | str,
    shots: int,
    *,
    seed: int = 0,
    n: int | None = None,
    splits_dir: PathLike | None = None,
    data_root: PathLike | None = None,
    cache_dir: PathLike | None = None,
    trust_pickle: bool = False,
) -> list[Episode]:
    """The first ``n`` episodes (default: the protocol's N) of the seeded reference stream."""
    if not isinstance(dataset, str) or dataset not in _GENERATORS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    if isinstance(shots, bool) or not isinstance(shots, int) or shots < 1:
        raise ValueError(f"shots must be a positive int, got {shots!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an int in 0..2**32 - 1 (numpy RandomState), got {seed!r}")
    total = DEFAULT_EPISODES[dataset]
    n = total if n is None else n
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or not 0 <= n <= total:
        raise ValueError(f"n must be in 0..{total} for {dataset} (an int), got {n!r}")
    rs = np.random.RandomState(int(seed))
    return _GENERATORS[dataset](rs, fold, shots, n, splits_dir, cache_dir, trust_pickle, data_root)


def serialize_episodes(eps: Sequence[Episode]) -> str:
    """Canonical text of episodes: one ``i<TAB>class<TAB>query<TAB>s1,s2,...`` line per episode."""
    return "".join(f"{e.index}\t{e.class_id}\t{e.query}\t{','.join(e.supports)}\n" for e in eps)


def episode_digest(eps: Sequence[Episode]) -> str:
    """sha256 hex of the UTF-8 canonical serialisation (recorded in every result JSON)."""
    return hashlib.sha256(serialize_episodes(eps).encode("utf-8")).hexdigest()
